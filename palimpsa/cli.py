"""``palimpsa <verb> ...``: a thin command-line shell over the library.

Each feature package that has a command exposes ``palimpsa/<feature>/cli.py`` with
``add_parser(subparsers)``, which adds its verb and sets ``func`` (a callable taking the parsed
arguments and returning an exit code).  This module only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import List, Optional, Sequence

# Bad input (arguments, files, configs, an unreachable download): one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError)

# Verb modules, in the order ``palimpsa --help`` lists them.  A module that is missing is skipped.
VERB_MODULES = (
    "palimpsa.info",
    "palimpsa.demo",
    "palimpsa.mqar.cli",
    "palimpsa.bench.cli",
    "palimpsa.train.cli",
    "palimpsa.eval.cli",
    "palimpsa.convert.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from palimpsa import __version__

    parser = argparse.ArgumentParser(prog="palimpsa", description="Palimpsa: Bayesian metaplastic attention")
    parser.add_argument("--version", action="version", version=f"palimpsa {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue  # this feature is not part of the installed package
            raise
        module.add_parser(subparsers)
    return parser


def chosen_parsers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[argparse.ArgumentParser]:
    """``parser`` and the (sub)command parsers that ``args`` went through, outermost first."""
    chain = [parser]
    while True:
        actions = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, actions[0].dest, None) if actions else None
        if name is None or name not in actions[0].choices:
            return chain
        chain.append(actions[0].choices[name])


def spell_flags(message: str, parsers: Sequence[argparse.ArgumentParser]) -> str:
    """``message`` with the Python names of the parsers' options written as their flags: ``overwrite=True``
    becomes ``--overwrite`` and ``seq_len`` becomes ``--seq-len`` (names without an underscore are left alone,
    as they read as plain words)."""
    for parser in parsers:
        for action in parser._actions:
            flags = [o for o in action.option_strings if o.startswith("--")]
            if not flags or action.dest in (argparse.SUPPRESS, "help"):
                continue
            negative = [o for o in flags if o.startswith("--no-")]
            positive = [o for o in flags if o not in negative]
            by_value = {"True": positive if isinstance(action, (argparse._StoreTrueAction,
                                                                argparse.BooleanOptionalAction)) else [],
                        "False": negative or (flags if isinstance(action, argparse._StoreFalseAction) else [])}
            for value, spelled in by_value.items():
                if spelled:
                    message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}={value}\b", spelled[0], message)
            if "_" in action.dest:
                message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}\b(?!=)", (positive or flags)[0], message)
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        # Ctrl-C: one line (a run that saved its state says from which step the same command resumes) and
        # the exit status shells expect after SIGINT
        print(f"palimpsa {args.verb}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        # Say what is wrong, in the command line's words, without a traceback.
        # PALIMPSA_TRACEBACK=1 shows the full traceback instead.
        if os.environ.get("PALIMPSA_TRACEBACK") == "1":
            raise
        parsers = chosen_parsers(parser, args)
        print(f"{parsers[-1].prog}: error: {spell_flags(str(err), parsers[1:])}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
