"""Run a grid of MQAR runs: resumable, one JSON line per finished run, spread over every visible GPU.

``OUT/results.jsonl`` is the record: a run whose run_id (hash of its config) is already there is skipped, so
re-running the same command resumes a sweep.  Each record is appended under a file lock by rewriting the file
to a temporary name and renaming it over the old one, so a reader (or a crash) never sees half a line and
parallel workers never interleave.  With several devices (or ``workers_per_device`` > 1) one worker process
per slot pulls runs from a shared queue.  Each run in progress keeps a checkpoint in ``OUT/checkpoints/``
(saved at every validation, removed when the run ends), so a run cut short by the time budget or a lost machine
continues from its last validation when the sweep is run again.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch

from palimpsa.mqar.train import RunConfig, run_id, train_run

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.log"
UNFINISHED_FILE = "unfinished.jsonl"
PROGRESS_FILE = "progress.jsonl"  # one line per validation of every run, to watch a sweep in progress
CHECKPOINT_DIR = "checkpoints"  # <run_id>.pt: the training state of each run in progress
RUN_FIELDS = {f.name for f in fields(RunConfig)}


@dataclass
class SweepGrid:
    """The runs of a sweep: the product models x settings x d_models x lrs x seeds.

    settings: (seq_len, num_kv_pairs) pairs.  batch_size_by_seq_len: a batch size per sequence length
    (overrides fixed["batch_size"] for those lengths).  fixed: any other RunConfig field.
    """

    models: Sequence[str]
    settings: Sequence[tuple[int, int]]
    d_models: Sequence[int]
    lrs: Sequence[float]
    seeds: Sequence[int]
    fixed: dict = field(default_factory=dict)
    batch_size_by_seq_len: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("models", "settings", "d_models", "lrs", "seeds"):
            if len(getattr(self, name)) == 0:
                raise ValueError(f"the sweep grid needs at least one value of {name}")
        bad = set(self.fixed) - RUN_FIELDS
        if bad:
            raise ValueError(f"unknown fixed run fields {sorted(bad)}; valid: {sorted(RUN_FIELDS)}")
        for pair in self.settings:
            if len(pair) != 2:
                raise ValueError(f"settings must be (seq_len, num_kv_pairs) pairs, got {pair!r}")

    def runs(self) -> list[RunConfig]:
        """Every run of the grid, in a fixed order (setting, d_model, seed, lr, model)."""
        out = []
        for (L, kv), d, seed, lr, model in itertools.product(self.settings, self.d_models, self.seeds, self.lrs,
                                                             self.models):
            values = dict(self.fixed)
            if L in self.batch_size_by_seq_len:
                values["batch_size"] = self.batch_size_by_seq_len[L]
            values.update(model=model, seq_len=int(L), num_kv_pairs=int(kv), d_model=int(d), lr=float(lr),
                          seed=int(seed))
            out.append(RunConfig.from_dict(values))
        return out


def _locked_append(path: Path, record: dict) -> None:
    """Append one JSON line to ``path`` atomically (lock, copy + line to a temporary file, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = path.read_bytes() if path.exists() else b""
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(old + line.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_result(out_dir: str | os.PathLike, record: dict) -> None:
    """Add one finished run's record to OUT/results.jsonl (atomic, safe with parallel writers)."""
    _locked_append(Path(out_dir) / RESULTS_FILE, record)


def finished_run_ids(out_dir: str | os.PathLike) -> set[str]:
    """run_ids already recorded in OUT/results.jsonl."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return set()
    with open(path) as f:
        return {json.loads(line)["run_id"] for line in f if line.strip()}


def visible_devices() -> list[str]:
    """Every CUDA device, or ["cpu"] without one."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def checkpoint_path(out_dir: str | os.PathLike, config: RunConfig) -> Path:
    """Where a sweep keeps the checkpoint of ``config``'s run: OUT/checkpoints/<run_id>.pt."""
    return Path(out_dir) / CHECKPOINT_DIR / f"{run_id(config)}.pt"


def _run_and_record(config: RunConfig, device: str, out_dir: Path, progress: bool, position: int,
                    deadline: Optional[float], op_backend: str, checkpoints: bool) -> bool:
    """Train one run and append its record; a failure goes to OUT/errors.log.  True when recorded."""
    try:
        record = train_run(config, device=device, progress=progress, progress_position=position, deadline=deadline,
                           op_backend=op_backend, on_eval=lambda line: _locked_append(out_dir / PROGRESS_FILE, line),
                           checkpoint_path=checkpoint_path(out_dir, config) if checkpoints else None)
    except Exception:  # one broken run must not stop the sweep; its traceback is kept
        message = f"run {run_id(config)} {config}\n{traceback.format_exc()}\n"
        with open(out_dir / ERRORS_FILE, "a") as f:
            f.write(message)
        print(message, file=sys.stderr)
        return False
    if record["stop_reason"] == "deadline":  # cut short by the sweep's time budget: not a finished run
        _locked_append(out_dir / UNFINISHED_FILE, record)
        return False
    append_result(out_dir, record)
    return True


def _worker(slot: int, device: str, queue, out_dir: str, progress: bool, deadline: Optional[float], op_backend: str,
            threads: Optional[int], checkpoints: bool) -> None:
    """Worker process: take runs from the queue until a None arrives or the deadline passes."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if threads:
        torch.set_num_threads(threads)
    while True:
        item = queue.get()
        if item is None or (deadline is not None and time.time() > deadline):
            return
        _run_and_record(RunConfig.from_dict(item), device, Path(out_dir), progress, slot, deadline, op_backend,
                        checkpoints)


def run_sweep(
    runs: Sequence[RunConfig],
    out_dir: str | os.PathLike,
    devices: Optional[Sequence[str]] = None,
    workers_per_device: int = 1,
    progress: bool = True,
    time_budget_s: Optional[float] = None,
    op_backend: str = "auto",
    threads: Optional[int] = None,
    checkpoints: bool = True,
) -> dict:
    """Run every run not yet recorded in OUT/results.jsonl.

    Args:
        runs: the planned runs (e.g. ``SweepGrid.runs()``).
        out_dir: OUT, where results.jsonl (and errors.log, unfinished.jsonl) live.
        devices: e.g. ["cuda:0", "cuda:1"]; default every visible GPU, else ["cpu"].
        workers_per_device: worker processes per device (small models share a GPU well).
        progress: show tqdm bars.
        time_budget_s: wall-clock budget; no run starts after it and a run still training at its end stops,
            is scored and goes to unfinished.jsonl instead of results.jsonl (a later call continues it from its
            checkpoint, or redoes it without checkpoints).
        op_backend: the Palimpsa op's backend for every run ("auto", "torch", "triton").
        threads: torch CPU threads per worker (default: the cores shared evenly among the workers, which
            avoids oversubscribed thread pools; torch's own default for a single in-process run).
        checkpoints: keep each run's training state in OUT/checkpoints/ while it runs, and resume from it.

    Returns:
        {"planned": n, "skipped": already recorded, "recorded": newly recorded}.
    """
    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = list(devices) if devices else visible_devices()
    done = finished_run_ids(out_dir)
    pending, seen = [], set(done)
    for config in runs:
        rid = run_id(config)
        if rid not in seen:  # also drops duplicates inside the grid
            pending.append(config)
            seen.add(rid)
    before = len(done)
    deadline = None if time_budget_s is None else time.time() + time_budget_s
    # interleaved (cuda:0, cuda:1, cuda:0, ...) and no more workers than runs, so the runs spread evenly
    slots = [device for _ in range(workers_per_device) for device in devices][:max(1, len(pending))]
    if len(slots) == 1 or len(pending) <= 1:
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for config in pending:
                if deadline is not None and time.time() > deadline:
                    break
                _run_and_record(config, slots[0], out_dir, progress, 0, deadline, op_backend, checkpoints)
        finally:
            torch.set_num_threads(previous_threads)
    else:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for config in pending:
            queue.put({f.name: getattr(config, f.name) for f in fields(RunConfig)})
        for _ in slots:
            queue.put(None)
        worker_threads = threads or max(1, (os.cpu_count() or 1) // len(slots))
        workers = [ctx.Process(target=_worker, args=(i, device, queue, str(out_dir), progress, deadline, op_backend,
                                                     worker_threads, checkpoints))
                   for i, device in enumerate(slots)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    recorded = len(finished_run_ids(out_dir)) - before
    return {"planned": len(runs), "skipped": len(runs) - len(pending), "recorded": recorded}
