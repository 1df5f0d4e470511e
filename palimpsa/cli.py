"""``palimpsa <verb> ...``: a thin command-line shell over the library.

Each feature package that has a command exposes ``palimpsa/<feature>/cli.py`` with
``add_parser(subparsers)``, which adds its verb and sets ``func`` (a callable taking the parsed
arguments and returning an exit code).  This module only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

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
    parser = argparse.ArgumentParser(prog="palimpsa", description="Palimpsa: Bayesian metaplastic attention")
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
    except (ValueError, FileNotFoundError) as err:
        # Bad input (arguments, files, configs): say what is wrong without a traceback.
        # PALIMPSA_TRACEBACK=1 shows the full traceback instead.
        if os.environ.get("PALIMPSA_TRACEBACK") == "1":
            raise
        print(f"palimpsa {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
