"""``palimpsa`` itself: --version, errors in the command line's words, every option documented."""

from __future__ import annotations

import argparse
import re

import pytest

from palimpsa import __version__
from palimpsa.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"palimpsa {__version__}"


def test_errors_name_flags_not_python_keywords(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "kept.txt").write_text("x")
    assert main(["convert", "mamba2", str(tmp_path / "src"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("palimpsa convert mamba2: error:")
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert main(["train", "--data", str(tmp_path), "--seq-len", "1", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--seq-len must be at least 2" in err and "seq_len" not in err


def _parsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command words, parser) for every command and subcommand under ``parser``."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}".strip())


def _shows_default(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    """Whether ``--help`` states the option's default: in its text, or added by ArgumentDefaultsHelpFormatter."""
    if "default" in (action.help or "").lower():
        return True
    return (issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
            and action.default not in (None, argparse.SUPPRESS))


def test_every_option_has_a_description_and_its_default():
    undocumented = []
    for command, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            flag = f"{command} {action.option_strings[-1]}"
            if not re.sub(r"\(default[^)]*\)", "", action.help or "").strip():
                undocumented.append(f"{flag}: no description")
            elif action.nargs != 0 and not _shows_default(parser, action):  # flags that take a value
                undocumented.append(f"{flag}: no default")
    assert undocumented == []


def test_spell_flags_writes_booleans_as_their_flags():
    from palimpsa.cli import chosen_parsers, spell_flags

    parser = build_parser()
    parsers = chosen_parsers(parser, parser.parse_args(["train"]))
    assert [p.prog for p in parsers] == ["palimpsa", "palimpsa train"]
    message = "use another out_dir or resume=False; export_hf=True; the model 'x'"
    assert spell_flags(message, parsers[1:]) == "use another --out-dir or --no-resume; --export-hf; the model 'x'"


def test_no_default_output_goes_into_results():
    """Only an explicit --out writes into the repository's committed results/."""
    defaults = {}
    for command, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.dest in ("out", "out_dir") and action.option_strings:
                defaults[f"{command} {action.option_strings[0]}"] = action.default
    assert "bench cpu --out" in defaults and "eval --out" in defaults
    assert [k for k, v in defaults.items() if str(v).replace("\\", "/").lstrip("./").startswith("results")] == []
    assert build_parser().parse_args(["bench", "cpu"]).out == "runs/bench"
