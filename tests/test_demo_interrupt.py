"""Ctrl-C in ``palimpsa demo``: one line and exit status 130, no traceback."""

import os
import signal

import palimpsa.demo as demo
from palimpsa.cli import main


def test_ctrl_c_in_the_demo_prints_one_line_and_exits_130(monkeypatch, capsys):
    real = demo.generate_corpus

    def corpus_then_ctrl_c(*args, **kwargs):
        text = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # pressed before the first step
        return text

    monkeypatch.setattr(demo, "generate_corpus", corpus_then_ctrl_c)
    assert main(["demo", "--steps", "5"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("palimpsa demo: interrupted at step 0 of 5") and "Traceback" not in "".join(err)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_still_says_interrupted(monkeypatch, capsys):
    def interrupted_at_once(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted_at_once)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err.strip() == "palimpsa demo: interrupted"
