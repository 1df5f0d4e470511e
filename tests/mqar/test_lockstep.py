"""Lockstep groups (``palimpsa.mqar.lockstep``) and sweeps with ``equal_steps``: runs keep pace with the slowest,
agree on the smallest fitted length, and never wait for a run that ended or went silent."""

import json
import threading
import time

import pytest

import palimpsa.mqar.train as train_module
from palimpsa.mqar.lockstep import Lockstep
from palimpsa.mqar.sweep import run_sweep
from palimpsa.mqar.train import RunConfig

TINY = dict(vocab_size=32, num_heads=2, num_train=64, num_validation=8, num_test=8, batch_size=16, epochs=1000,
            eval_every=1000)


def in_threads(*targets):
    results = [None] * len(targets)

    def call(i, target):
        results[i] = target()

    threads = [threading.Thread(target=call, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a lockstep member never returned"
    return results


def test_a_fast_run_keeps_pace_with_a_slow_one():
    group = Lockstep(2, lag=2, poll_s=0.001)
    fast, slow = group.member(0), group.member(1)
    leads = []

    def run_fast():
        fast.start(0, will_fit=False)
        for step in range(1, 31):
            fast.after_step(step)
            leads.append(step - group.steps[1])
        fast.finish()

    def run_slow():
        slow.start(0, will_fit=False)
        for step in range(1, 31):
            time.sleep(0.005)
            slow.after_step(step)
        slow.finish()

    in_threads(run_fast, run_slow)
    assert max(leads) <= 2  # never more than lag steps ahead of the slow run
    assert leads[-1] >= 0


def test_the_group_agrees_on_the_smallest_fitted_length():
    group = Lockstep(4, poll_s=0.001)
    members = [group.member(i) for i in range(4)]
    for m in members[:3]:
        m.start(0, will_fit=True)
    members[3].start(0, will_fit=False)  # no length to propose: not waited for
    agreed = in_threads(lambda: members[0].agree(50), lambda: (time.sleep(0.05), members[1].agree(30))[1],
                        lambda: members[2].agree(40))
    assert agreed == [30, 30, 30]
    assert members[3].agree(20) == 20  # posted after the decision: the smaller of the decision and its own
    assert members[3].agree(45) == 30


def test_an_ended_or_silent_run_is_not_waited_for():
    group = Lockstep(3, lag=1, stall_s=0.2, poll_s=0.001)
    ended, running = group.member(0), group.member(2)  # slot 1: a run that never starts
    ended.start(0, will_fit=True)
    ended.finish()
    running.start(0, will_fit=True)
    started = time.time()
    for step in range(1, 6):  # the silent run never started: waited for until stall_s has passed
        running.after_step(step)
    assert time.time() - started >= 0.15
    assert running.agree(17) == 17


def test_bad_groups_raise():
    for bad in (dict(size=0), dict(size=2, lag=-1), dict(size=2, stall_s=0)):
        with pytest.raises(ValueError):
            Lockstep(**bad)
    with pytest.raises(ValueError, match="slot"):
        Lockstep(2).member(2)


def test_time_limited_runs_in_lockstep_share_one_length(monkeypatch):
    """Alone, a run whose time is spent stops at its fit step and one with time to spare runs to max_steps; in one
    lockstep group both run the smaller length, and the record says so."""
    monkeypatch.setattr(train_module, "FIT_PROBE_START", 2)
    monkeypatch.setattr(train_module, "FIT_AT_STEP", 4)
    base = dict(seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, max_steps=12, warmup_steps=4, **TINY)
    hurried = RunConfig(model="attention", time_limit_s=1e-3, **base)
    patient = RunConfig(model="palimpsa", time_limit_s=600.0, **base)
    alone = [train_module.train_run(c, progress=False) for c in (hurried, patient)]
    assert [r["planned_steps"] for r in alone] == [4, 12] and alone[0]["lockstep_runs"] is None
    group = Lockstep(2, poll_s=0.001)
    together = in_threads(lambda: train_module.train_run(hurried, progress=False, lockstep=group.member(0)),
                          lambda: train_module.train_run(patient, progress=False, lockstep=group.member(1)))
    assert [(r["steps"], r["planned_steps"], r["lockstep_runs"]) for r in together] == [(4, 4, 2), (4, 4, 2)]


def test_a_sweep_with_equal_steps_runs_its_workers_in_lockstep(tmp_path):
    """Two worker processes (the real fit step, FIT_AT_STEP = 200): different time limits, one length; and a
    model's own op backend (op_backend_by_model) reaches its runs."""
    base = dict(seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, max_steps=240, warmup_steps=200, **TINY)
    runs = [RunConfig(model="attention", time_limit_s=1e-3, **base),
            RunConfig(model="notpalimpsa", time_limit_s=600.0, **base)]
    stats = run_sweep(runs, tmp_path, devices=["cpu"], workers_per_device=2, progress=False, checkpoints=False,
                      equal_steps=True, op_backend_by_model={"notpalimpsa": "torch"})
    assert stats["recorded"] == 2
    records = {r["model"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert [(r["steps"], r["planned_steps"], r["lockstep_runs"]) for r in records.values()] == [(200, 200, 2)] * 2
    assert (records["attention"]["op_backend"], records["notpalimpsa"]["op_backend"]) == ("auto", "torch")


def test_equal_steps_need_every_run_at_once_and_backends_are_checked(tmp_path):
    runs = [RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=lr, **TINY) for lr in (1e-3, 2e-3)]
    with pytest.raises(ValueError, match="every run to train at once"):
        run_sweep(runs, tmp_path, devices=["cpu"], workers_per_device=1, progress=False, equal_steps=True)
    with pytest.raises(ValueError, match="op backend of palimpsa must be one of"):
        run_sweep(runs, tmp_path, progress=False, op_backend_by_model={"palimpsa": "cuda"})


def test_the_command_line_passes_equal_steps_and_torch_op_models(tmp_path, monkeypatch):
    import palimpsa.mqar.cli as cli_module
    from palimpsa.cli import main as cli_main

    seen = {}

    def fake_sweep(runs, out, **kwargs):
        seen.update(kwargs)
        return {"planned": len(runs), "skipped": 0, "recorded": 0, "failed": 0, "unfinished": 0}

    monkeypatch.setattr(cli_module, "run_sweep", fake_sweep)
    cli_main(["mqar", "--out", str(tmp_path), "--models", "palimpsa_g1", "notpalimpsa", "--equal-steps",
              "--torch-op-for", "palimpsa_g1", "--time-budget", "10", "--no-progress"])
    assert seen["equal_steps"] and seen["op_backend_by_model"] == {"palimpsa_g1": "torch"}
