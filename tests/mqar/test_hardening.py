"""MQAR sweeps under stress: a second sweep into the same folder, a repeated record, racing report writers, failed
runs under a time budget, a NaN loss, Ctrl-C."""

import json
import os
import signal

import pytest

import palimpsa.mqar.sweep as sweep_module
import palimpsa.mqar.train as train_module
from palimpsa.cli import main as cli_main
from palimpsa.mqar.report import write_report
from palimpsa.mqar.sweep import SweepLockedError, append_result, run_sweep, sweep_lock
from palimpsa.mqar.train import RunConfig, train_run
from palimpsa.train.interrupt import Interrupted

TINY = dict(vocab_size=32, num_heads=2, num_train=32, num_validation=8, num_test=8, batch_size=8, epochs=3,
            eval_every=3)
CLI = ["mqar", "--models", "attention", "--settings", "16:2", "--d-models", "8", "--seeds", "0", "--vocab-size",
       "32", "--num-heads", "2", "--num-train", "32", "--num-validation", "8", "--num-test", "8", "--batch-size", "8",
       "--epochs", "3", "--eval-every", "3", "--workers-per-device", "1", "--no-progress"]


def _config(**overrides):
    return RunConfig(**{**dict(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=3e-3, seed=0, **TINY),
                        **overrides})


def _strict(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, capsys):
    with sweep_lock(tmp_path):  # a sweep in progress
        with pytest.raises(SweepLockedError, match=f"pid {os.getpid()}.*use another --out"):
            run_sweep([_config()], tmp_path, progress=False)
        assert cli_main(CLI + ["--lrs", "0.003", "--out", str(tmp_path)]) == 2
        assert "another MQAR sweep" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()
    assert run_sweep([_config()], tmp_path, progress=False)["recorded"] == 1  # the lock went with its holder


def test_a_run_is_never_recorded_twice(tmp_path):
    record = {"run_id": "abc", "model": "attention"}
    assert append_result(tmp_path, record) and not append_result(tmp_path, dict(record, seconds=2))
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_report_writers_use_their_own_temporary_files(tmp_path):
    run_sweep([_config()], tmp_path, progress=False)
    # another writer's temporary files at the names every writer used to share
    for name in ("summary.md.tmp", "accuracy_vs_state_size.png.tmp.png", "accuracy_vs_step.png.tmp.png"):
        (tmp_path / name).mkdir()
    table, written = write_report(tmp_path / "results.jsonl", tmp_path)
    assert len(written) == 3 and all(path.stat().st_size > 0 for path in written)  # one length: no length plot
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == [
        "accuracy_vs_state_size.png.tmp.png", "accuracy_vs_step.png.tmp.png", "summary.md.tmp"]


@pytest.mark.parametrize("budget", [[], ["--time-budget", "600"]])
def test_a_failed_run_is_a_failed_command_with_or_without_a_time_budget(tmp_path, monkeypatch, budget):
    real = sweep_module.train_run

    def fail_one(config, **kwargs):
        if config.lr == 1e-3:
            raise RuntimeError("this run breaks")
        return real(config, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", fail_one)
    assert cli_main(CLI + ["--lrs", "0.001", "0.003", "--out", str(tmp_path)] + budget) == 1
    assert len(_strict(tmp_path / "results.jsonl")) == 1 and "this run breaks" in (tmp_path / "errors.log").read_text()


def test_a_nan_loss_is_recorded_as_strict_json(tmp_path):
    run_sweep([_config(lr=1e6, eval_every=None)], tmp_path, progress=False)  # NaN before its first validation
    (record,) = _strict(tmp_path / "results.jsonl")
    assert record["stop_reason"] == "non_finite_loss" and record["final_train_loss"] is None


class _CtrlCAtStep(train_module.MQARModel):
    """The MQAR model, pressing Ctrl-C during its STOP-th training forward pass."""

    STOP = 2

    def __init__(self, config):
        super().__init__(config)
        self.training_calls = 0

    def forward(self, *args, **kwargs):
        if self.training:
            self.training_calls += 1
            if self.training_calls == self.STOP:
                os.kill(os.getpid(), signal.SIGINT)
        return super().forward(*args, **kwargs)


def test_ctrl_c_stops_calmly_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    command = CLI + ["--lrs", "0.003", "--out", str(tmp_path)]
    monkeypatch.setattr(train_module, "MQARModel", _CtrlCAtStep)
    assert cli_main(command) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "palimpsa mqar: interrupted; run the same command again to resume from step 2"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1 and not (tmp_path / "results.jsonl").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(train_module, "MQARModel", _CtrlCAtStep.__mro__[1])
    assert cli_main(command) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    (record,) = _strict(tmp_path / "results.jsonl")
    whole = train_run(RunConfig.from_dict(record["config"]), progress=False)
    assert record["resumed_at_steps"] == [2] and whole["resumed_at_steps"] == []
    assert [record[k] for k in ("steps", "history", "test_accuracy")] == \
        [json.loads(json.dumps(whole[k])) for k in ("steps", "history", "test_accuracy")]


def test_a_sweep_interrupted_between_runs_says_how_to_continue(tmp_path, monkeypatch):
    def train_then_ctrl_c(config, **kwargs):
        record = train_run(config, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(sweep_module, "train_run", train_then_ctrl_c)
    with pytest.raises(Interrupted, match="^interrupted; run the same command again to continue the sweep$"):
        run_sweep([_config(lr=1e-3), _config(lr=3e-3)], tmp_path, progress=False)
    assert len(_strict(tmp_path / "results.jsonl")) == 1  # the first run finished and is kept
