"""The LM trainer on bad luck and bad input: a NaN loss, torn and foreign files, wrong config types, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from palimpsa.cli import main
from palimpsa.train import TrainConfig, train
from palimpsa.train.checkpoint import CheckpointError
from palimpsa.train.interrupt import Interrupted
from palimpsa.train.loop import NonFiniteLossError
from palimpsa.train.metrics import read_metrics
from tests.train.corpus import stand_in_config, write_corpus
from tests.train.tiny_model import TinyPackedLM, tiny_factory


def _config(data_dir, out_dir, **overrides):
    return stand_in_config(data_dir, out_dir, **overrides)


class OnCall(TinyPackedLM):
    """The tiny LM that does something to itself at its ``at``-th forward call (1-based)."""

    def __init__(self, vocab_size: int, at: int, action: str):
        super().__init__(vocab_size)
        self.calls, self.at, self.action = 0, at, action

    def forward(self, *args, **kwargs):
        self.calls += 1
        output = super().forward(*args, **kwargs)
        if self.calls >= self.at and self.action == "nan":
            output.logits = output.logits * float("nan")
        if self.calls == self.at and self.action == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)
        return output


def _strict_records(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")

    with open(path) as handle:
        return [json.loads(line, parse_constant=refuse) for line in handle]


def test_a_non_finite_loss_stops_without_saving_or_exporting(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", save_every=2, export_hf=True)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(config, model_factory=lambda vocab: OnCall(vocab, at=3, action="nan"))
    records = _strict_records(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] is None
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert not (tmp_path / "run" / "model").exists()


def test_a_non_finite_loss_is_an_error_exit_of_the_command(monkeypatch, tmp_path, capsys):
    import palimpsa.train.loop as loop

    monkeypatch.setattr(loop, "build_model", lambda *args, **kwargs: OnCall(320, at=1, action="nan"))
    corpus = write_corpus(str(tmp_path / "corpus"))
    code = main(["train", "--data", corpus, "--seq-len", "32", "--batch-size", "1", "--max-steps", "3",
                 "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--no-export-hf"])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "NaN or infinite" in error[0]


def test_a_torn_last_metrics_line_does_not_block_the_resume(corpus, tmp_path):
    train(_config(corpus, tmp_path / "run", stop_at_step=3), model_factory=tiny_factory)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # a crash in the middle of writing step 4's record
    resumed = train(_config(corpus, tmp_path / "run"), model_factory=tiny_factory)
    assert resumed.steps == [4, 5, 6]
    assert [r["step"] for r in _strict_records(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))


def test_a_broken_metrics_line_inside_the_file_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2"):
        read_metrics(str(path))


def test_checkpoints_load_with_weights_only(corpus, tmp_path):
    train(_config(corpus, tmp_path / "run", max_steps=1), model_factory=tiny_factory)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["kind"] == "lm" and state["step"] == 1


class _Arbitrary:
    """A class torch.load(weights_only=True) must not unpickle."""


@pytest.mark.parametrize("content", ["garbage", "foreign", "pickled", "mqar"])
def test_a_corrupt_or_foreign_checkpoint_is_refused_in_one_line(corpus, tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
    elif content == "foreign":
        torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, path)
    elif content == "pickled":
        torch.save({"format": "palimpsa-training-state", "object": _Arbitrary()}, path)
    else:
        from palimpsa.train.checkpoint import save_training_state

        save_training_state(path, "mqar-run", {"step": 1})
    with pytest.raises(CheckpointError, match="checkpoint") as error:
        train(_config(corpus, out), model_factory=tiny_factory)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("values, field", [
    ({"data": "corpus"}, "data"), ({"lr": True}, "lr"), ({"lr": "3e-4"}, "lr"), ({"max_steps": 10.0}, "max_steps"),
    ({"betas": [0.9]}, "betas"), ({"model_overrides": ["x"]}, "model_overrides"), ({"resume": 1}, "resume"),
    ({"time_limit_s": float("inf")}, "time_limit_s"), ({"tokenizer": None}, "tokenizer"),
])
def test_every_config_field_is_type_checked(values, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig.from_dict(values)


def test_config_accepts_json_spellings():
    config = TrainConfig.from_dict({"betas": [0.9, 0.99], "lr": 1, "data": ["a"], "stop_at_step": None})
    assert config.betas == (0.9, 0.99) and config.lr == 1


def test_ctrl_c_saves_and_the_same_call_resumes_on_the_same_trajectory(corpus, tmp_path):
    straight = train(_config(corpus, tmp_path / "straight"), model_factory=tiny_factory)
    with pytest.raises(Interrupted, match="resume from step 3") as interrupted:
        train(_config(corpus, tmp_path / "split"), model_factory=lambda vocab: OnCall(vocab, 3, "ctrl-c"))
    assert interrupted.value.resume_step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    resumed = train(_config(corpus, tmp_path / "split"), model_factory=tiny_factory)
    assert resumed.start_step == 3 and resumed.steps == [4, 5, 6]
    assert [r["loss"] for r in read_metrics(str(tmp_path / "split" / "metrics.jsonl"))] == straight.losses


def test_the_command_says_interrupted_resumed_and_already_complete(monkeypatch, tmp_path, capsys):
    import palimpsa.train.loop as loop

    corpus = write_corpus(str(tmp_path / "corpus"))
    args = ["train", "--data", corpus, "--seq-len", "32", "--batch-size", "1", "--max-steps", "4", "--out-dir",
            str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--no-export-hf"]
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: OnCall(320, at=2, action="ctrl-c"))
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "palimpsa train: interrupted; run the same command again to resume from step 2"]
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: TinyPackedLM(320))
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "resuming from step 2" in captured.err and json.loads(captured.out)["resumed_from_step"] == 2
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "already complete at step 4" in captured.err


def test_bf16_on_a_cpu_autocasts(corpus, tmp_path):
    fp32 = train(_config(corpus, tmp_path / "fp32", max_steps=2, precision="fp32"), model_factory=tiny_factory)
    auto = train(_config(corpus, tmp_path / "auto", max_steps=2), model_factory=tiny_factory)
    bf16 = train(_config(corpus, tmp_path / "bf16", max_steps=2, precision="bf16"), model_factory=tiny_factory)
    assert auto.losses == fp32.losses  # auto is float32 on the CPU
    assert bf16.losses != fp32.losses  # bf16 is what was asked for, not float32 in silence
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_or_fsdp_without_torchrun_is_refused(corpus, tmp_path, monkeypatch, strategy):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        train(_config(corpus, tmp_path / "run", parallel=strategy), model_factory=tiny_factory)
