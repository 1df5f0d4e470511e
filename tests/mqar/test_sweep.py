"""A tiny end-to-end sweep on the CPU: results, resume, table, plots, and the command line."""

import json

import pytest
import torch

import palimpsa.mqar.sweep as sweep_module
from palimpsa.cli import main as cli_main
from palimpsa.mqar.report import write_report
from palimpsa.mqar.sweep import SweepGrid, checkpoint_path, finished_run_ids, run_sweep
from palimpsa.mqar.train import RunConfig, run_id, train_run

TINY = dict(vocab_size=32, num_heads=2, num_train=32, num_validation=8, num_test=8, batch_size=16, epochs=1)
REQUIRED = {"model", "seq_len", "num_kv_pairs", "d_model", "lr", "seed", "epochs", "steps", "val_accuracy",
            "test_accuracy", "state_bytes", "seconds", "device"}


def tiny_grid():
    return SweepGrid(models=["attention", "palimpsa"], settings=[(16, 2)], d_models=[8], lrs=[1e-3, 3e-3],
                     seeds=[0], fixed=dict(TINY))


def test_sweep_records_resumes_and_reports(tmp_path, monkeypatch):
    runs = tiny_grid().runs()
    stats = run_sweep(runs, tmp_path, progress=False)
    assert stats == {"planned": 4, "skipped": 0, "recorded": 4, "failed": 0, "unfinished": 0}
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4 and all(REQUIRED <= set(r) for r in records)
    assert {r["run_id"] for r in records} == {run_id(c) for c in runs}
    palimpsa = [r for r in records if r["model"] == "palimpsa"]
    assert all(r["steps"] == 2 and r["device"] == "cpu" for r in records)
    assert all(r["state_bytes"] == 2 * 2 * 4 * 8 * 4 for r in palimpsa)  # mu and I: 2 heads x K=4 x V=8, float32
    assert all(r["variance_auroc"] is None or 0.0 <= r["variance_auroc"] <= 1.0 for r in palimpsa)
    progress = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {p["run_id"] for p in progress} == {r["run_id"] for r in records}  # every run logged its validations

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_module, "train_run", must_not_train)
    assert run_sweep(runs, tmp_path, progress=False) == {"planned": 4, "skipped": 4, "recorded": 0, "failed": 0,
                                                         "unfinished": 0}
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines

    table, written = write_report(tmp_path / "results.jsonl", tmp_path)
    assert "| attention | 16 | 2 | 8 | KV cache |" in table and "| palimpsa | 16 | 2 | 8 | 2×4×8 |" in table
    for name in ("summary.md", "accuracy_vs_state_size.png", "accuracy_vs_step.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy_vs_state_size.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "accuracy_vs_seq_len.png").exists()  # one sequence length: no single-point plot
    summary = (tmp_path / "summary.md").read_text()
    every_run = summary.split("## Every run")[1].strip().splitlines()[2:]
    assert len(every_run) == len(records)  # one line per run; one chosen lr per (model, seed)
    assert sum(line.endswith("| yes |") for line in every_run) == len({(r["model"], r["seed"]) for r in records})


def test_parallel_workers_record_every_run_once(tmp_path):
    grid = SweepGrid(models=["attention"], settings=[(16, 2)], d_models=[8], lrs=[1e-3, 2e-3, 3e-3], seeds=[0],
                     fixed=dict(TINY))
    stats = run_sweep(grid.runs(), tmp_path, devices=["cpu"], workers_per_device=2, progress=False)
    assert stats["recorded"] == 3
    assert finished_run_ids(tmp_path) == {run_id(c) for c in grid.runs()}


def test_command_line_overrides_the_preset(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["mqar", "--out", str(out), "--models", "attention", "--settings", "16:2", "--d-models", "8",
            "--lrs", "0.001", "--seeds", "0", "--vocab-size", "32", "--num-heads", "2", "--num-train", "16",
            "--num-validation", "8", "--num-test", "8", "--batch-size", "16", "--epochs", "1", "--no-progress"]
    assert cli_main(args) == 0
    assert "| attention | 16 | 2 | 8 |" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["config"]["num_train"] == 16 and record["steps"] == 1
    assert (out / "accuracy_vs_state_size.png").exists()


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="unknown fixed run fields"):
        SweepGrid(models=["palimpsa"], settings=[(16, 2)], d_models=[8], lrs=[1e-3], seeds=[0], fixed={"lr_max": 1})
    with pytest.raises(ValueError, match="at least one value of lrs"):
        SweepGrid(models=["palimpsa"], settings=[(16, 2)], d_models=[8], lrs=[], seeds=[0])
    with pytest.raises(ValueError, match="lr"):
        RunConfig(model="palimpsa", seq_len=16, num_kv_pairs=2, lr=-1.0)


def test_time_limited_run_fits_its_length(monkeypatch):
    """A run with time_limit_s times steps FIT_PROBE_START..FIT_AT_STEP, then cuts its planned total to what
    fits (here: the time is nearly spent, so it stops right at the fit step) and records that."""
    import palimpsa.mqar.train as train_module

    monkeypatch.setattr(train_module, "FIT_PROBE_START", 2)
    monkeypatch.setattr(train_module, "FIT_AT_STEP", 4)
    config = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, max_steps=10_000,
                       eval_every=1000, time_limit_s=1e-3, warmup_steps=4,
                       **dict(TINY, num_train=64, epochs=1000))
    record = train_module.train_run(config, progress=False)
    assert record["fitted_to_time_limit"] and record["steps"] == record["planned_steps"] == 4
    unlimited = train_module.train_run(RunConfig(**{**config.__dict__, "time_limit_s": None, "max_steps": 6}),
                                       progress=False)
    assert not unlimited["fitted_to_time_limit"] and unlimited["steps"] == 6


def test_a_run_stopped_inside_the_time_probe_still_fits_its_length(monkeypatch, tmp_path):
    """Stopped at step 1, after the probe started (FIT_PROBE_START = 1) and before the fit (FIT_AT_STEP = 4), the
    resumed run probes again once warmed up and fits its length at the end of that probe."""
    import palimpsa.mqar.train as train_module

    monkeypatch.setattr(train_module, "FIT_PROBE_START", 1)
    monkeypatch.setattr(train_module, "FIT_AT_STEP", 4)
    config = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, max_steps=10_000,
                       eval_every=1000, time_limit_s=1e-3, warmup_steps=4, **dict(TINY, num_train=64, epochs=1000))
    path = tmp_path / "run.pt"
    stopped = train_module.train_run(config, progress=False, checkpoint_path=path, deadline=0.0)
    assert stopped["steps"] == 1 and not stopped["fitted_to_time_limit"] and path.exists()
    resumed = train_module.train_run(config, progress=False, checkpoint_path=path)
    assert resumed["resumed_at_steps"] == [1] and resumed["fitted_to_time_limit"]
    # the new probe starts after the resumed process's untimed warm-up steps and is as long as the first one
    fit_step = 1 + train_module.WARMUP_UNTIMED_STEPS + 4 - 1
    assert resumed["steps"] == resumed["planned_steps"] == fit_step  # the time is spent: it stops at the fit


def test_query_index_matches_the_label_mask():
    from palimpsa.mqar.data import multiquery_ar
    from palimpsa.mqar.train import query_index

    _, labels = multiquery_ar(64, 5, 32, 4, seed=0)
    index = query_index(labels)
    assert index.shape == (5, 4)
    mask = labels != -100
    assert (labels.gather(1, index).reshape(-1) == labels[mask]).all()
    labels[0, index[0, 0]] = -100  # rows with different query counts: no fixed-size index
    assert query_index(labels) is None


# 4 batches per epoch and 3 epochs: a stop after step 1 is mid-epoch, and the resumed run crosses epochs
RESUMABLE = dict(TINY, batch_size=8, epochs=3, eval_every=3)


def test_a_stopped_run_resumes_on_the_same_trajectory(tmp_path):
    config = RunConfig(model="palimpsa", seq_len=16, num_kv_pairs=2, d_model=8, lr=3e-3, seed=0, **RESUMABLE)
    whole = train_run(config, progress=False)
    path = tmp_path / "run.pt"
    stopped = train_run(config, progress=False, deadline=0.0, checkpoint_path=path)  # past deadline: stops at 1
    assert stopped["stop_reason"] == "deadline" and stopped["steps"] == 1 and path.exists()
    assert stopped["history"][0][0] == 1  # the stopped run's record has its extra validation at the stop
    resumed = train_run(config, progress=False, checkpoint_path=path)
    assert resumed["resumed_at_steps"] == [1] and whole["resumed_at_steps"] == []
    assert resumed["steps"] == whole["steps"] == 12 and resumed["stop_reason"] == "planned_steps"
    # ... which the resumed run leaves out: every loss, accuracy and choice equals the uninterrupted run's
    assert [tuple(h) for h in resumed["history"]] == [tuple(h) for h in whole["history"]]
    for key in ("final_train_loss", "best_step", "val_accuracy", "test_accuracy", "variance_auroc"):
        assert resumed[key] == whole[key], key
    assert resumed["seconds_per_step"] > 0
    assert not path.exists()  # removed once the run is over


def test_a_checkpoint_of_another_run_or_a_broken_file_is_refused(tmp_path):
    config = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=3e-3, seed=0, **RESUMABLE)
    path = tmp_path / "run.pt"
    train_run(config, progress=False, deadline=0.0, checkpoint_path=path)
    other = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, seed=0, **RESUMABLE)
    with pytest.raises(ValueError, match="belongs to run"):
        train_run(other, progress=False, checkpoint_path=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        train_run(config, progress=False, checkpoint_path=path)


def test_a_sweep_continues_an_interrupted_run(tmp_path):
    config = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=3e-3, seed=0, **RESUMABLE)
    train_run(config, progress=False, deadline=0.0, checkpoint_path=checkpoint_path(tmp_path, config))
    assert run_sweep([config], tmp_path, progress=False) == {"planned": 1, "skipped": 0, "recorded": 1, "failed": 0,
                                                             "unfinished": 0}
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["resumed_at_steps"] == [1] and record["steps"] == 12
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_time_limited_run_fits_its_length_before_the_deadline(monkeypatch):
    """A time limit with time to spare but a sweep deadline close by: the run fits its length to the deadline (here:
    it stops at the fit step, planned and recorded) instead of being cut short there and left unrecorded."""
    import time

    import palimpsa.mqar.train as train_module

    monkeypatch.setattr(train_module, "FIT_PROBE_START", 2)
    monkeypatch.setattr(train_module, "FIT_AT_STEP", 4)
    monkeypatch.setattr(train_module, "FIT_SAFETY", 0.5)  # room for a busy machine's slower steps after the fit
    config = RunConfig(model="attention", seq_len=16, num_kv_pairs=2, d_model=8, lr=1e-3, max_steps=100_000,
                       eval_every=1000, time_limit_s=3600.0, warmup_steps=4, **dict(TINY, num_train=64, epochs=1e6))
    record = train_module.train_run(config, progress=False, deadline=time.time() + 2.0)
    assert record["stop_reason"] == "planned_steps" and record["fitted_to_time_limit"]
    assert record["steps"] == record["planned_steps"] < 100_000


def test_workers_pin_a_gpu_only_when_the_device_names_one():
    """"cuda" means the current GPU: torch.cuda.set_device refuses a device without an index."""
    from palimpsa.mqar.sweep import cuda_index

    assert cuda_index("cuda") is None
    assert cuda_index("cuda:1") == 1
    assert cuda_index("cpu") is None


@pytest.mark.parametrize("name", ["palimpsa_g1", "palimpsa", "meta_mamba2"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(name):
    """MQAR blocks under torch.compile (aot_eager on the CPU: tracing and partitioning as on a GPU) match eager,
    loss and every gradient, and a second model of the same shape reuses the compiled graph."""
    from torch._dynamo.utils import counters

    from palimpsa.layers.modules import set_compiled_blocks
    from palimpsa.mqar.models import MQARModel, MQARModelConfig

    def loss_and_grads(model, tokens):
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    config = MQARModelConfig.from_model_name(name, vocab_size=32, d_model=16, n_layers=2, num_heads=2)
    tokens = torch.randint(0, 32, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = MQARModel(config)
    loss, grads = loss_and_grads(model, tokens)
    counters.clear()
    set_compiled_blocks(True, devices=("cpu",), backend="aot_eager")
    try:
        c_loss, c_grads = loss_and_grads(model, tokens)
        graphs = counters["stats"]["unique_graphs"]
        torch.manual_seed(1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            loss_and_grads(MQARModel(config), tokens)  # a new run's model: no new graph
    finally:
        set_compiled_blocks(False)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for grad, c_grad in zip(grads, c_grads):
        torch.testing.assert_close(c_grad, grad, rtol=1e-4, atol=1e-6)


def test_compile_reaches_every_run_and_its_record(tmp_path, monkeypatch):
    """--compile: each run trains inside compiled_blocks(True) (CUDA tensors only: a CPU run is unchanged) and its
    record says so; the run's identity does not change."""
    from palimpsa.layers import modules

    seen = []
    original = sweep_module.train_run

    def spy(config, **kwargs):
        record = original(config, **kwargs)
        seen.append((modules.compiled_blocks_enabled(), record["compile"]))
        return record

    monkeypatch.setattr(sweep_module, "train_run", spy)
    out = tmp_path / "cli"
    args = ["mqar", "--out", str(out), "--models", "attention", "--settings", "16:2", "--d-models", "8",
            "--lrs", "0.001", "--seeds", "0", "--vocab-size", "32", "--num-heads", "2", "--num-train", "16",
            "--num-validation", "8", "--num-test", "8", "--batch-size", "16", "--epochs", "1", "--no-progress",
            "--compile"]
    assert cli_main(args) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["compile"] is True and seen == [(False, True)]  # restored after the run
    config = RunConfig.from_dict(record["config"])
    assert record["run_id"] == run_id(config)
