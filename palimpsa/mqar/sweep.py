"""Run a grid of MQAR runs: resumable, one JSON line per finished run, spread over every visible GPU.

``OUT/results.jsonl`` is the record: a run whose run_id (hash of its config) is already there is skipped, so
re-running the same command resumes a sweep.  Each record is appended under a file lock by rewriting the file
to a temporary name and renaming it over the old one, so a reader (or a crash) never sees half a line and
parallel workers never interleave.  With several devices (or ``workers_per_device`` > 1) one worker process
per slot pulls runs from a shared queue.  Each run in progress keeps a checkpoint in ``OUT/checkpoints/``
(saved at every validation, removed when the run ends), so a run cut short by the time budget or a lost machine
continues from its last validation when the sweep is run again.  With ``equal_steps`` every run trains at once
and in lockstep (:mod:`palimpsa.mqar.lockstep`), so that time-limited runs of models of different speeds end
with the same number of steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from queue import Empty
from typing import Optional, Sequence

import torch

from palimpsa.io import atomic_write, json_line, read_json_lines
from palimpsa.mqar.lockstep import Lockstep, LockstepMember
from palimpsa.mqar.models import OP_BACKENDS
from palimpsa.mqar.train import RunConfig, run_id, train_run
from palimpsa.train.interrupt import Interrupted, resume_message, stop_on_interrupt, stop_requested

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.log"
UNFINISHED_FILE = "unfinished.jsonl"
PROGRESS_FILE = "progress.jsonl"  # one line per validation of every run, to watch a sweep in progress
CHECKPOINT_DIR = "checkpoints"  # <run_id>.pt: the training state of each run in progress
LOCK_FILE = "sweep.lock"  # held by the sweep running into OUT
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


class SweepLockedError(ValueError):
    """Another sweep is running into the same output folder."""


@contextlib.contextmanager
def sweep_lock(out_dir: Path):
    """Hold OUT/sweep.lock for the duration of a sweep: a second sweep into OUT is refused with
    SweepLockedError (the lock is the kernel's, so a sweep that dies releases it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise SweepLockedError(f"another MQAR sweep (pid {holder}) is running into {out_dir} (it holds {path}); "
                                   "wait for it to end or use another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _locked_append(path: Path, record: dict, unique_key: Optional[str] = None) -> bool:
    """Append one strict JSON line to ``path`` atomically (lock, copy + line to a temporary file, rename).  With
    ``unique_key``, a record whose value there is already in the file is not appended.  True when appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json_line(record, sort_keys=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if unique_key is not None and any(r.get(unique_key) == record[unique_key] for r in read_json_lines(path)):
                return False
            old = path.read_bytes() if path.exists() else b""
            if old and not old.endswith(b"\n"):  # a torn last line (written by an older, non-atomic writer)
                old = old[:old.rfind(b"\n") + 1]
            atomic_write(path, lambda f: f.write(old + line.encode()))
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_result(out_dir: str | os.PathLike, record: dict) -> bool:
    """Add one finished run's record to OUT/results.jsonl (atomic, safe with parallel writers); a run already
    recorded there is not recorded again.  True when appended."""
    return _locked_append(Path(out_dir) / RESULTS_FILE, record, unique_key="run_id")


def finished_run_ids(out_dir: str | os.PathLike) -> set[str]:
    """run_ids already recorded in OUT/results.jsonl."""
    return {r["run_id"] for r in read_json_lines(Path(out_dir) / RESULTS_FILE)}


def visible_devices() -> list[str]:
    """Every CUDA device, or ["cpu"] without one."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def checkpoint_path(out_dir: str | os.PathLike, config: RunConfig) -> Path:
    """Where a sweep keeps the checkpoint of ``config``'s run: OUT/checkpoints/<run_id>.pt."""
    return Path(out_dir) / CHECKPOINT_DIR / f"{run_id(config)}.pt"


def _run_and_record(config: RunConfig, device: str, out_dir: Path, progress: bool, position: int,
                    deadline: Optional[float], op_backend: str, checkpoints: bool,
                    lockstep: Optional[LockstepMember] = None, compile_blocks: bool = False) -> dict:
    """Train one run and file its record: results.jsonl when finished, unfinished.jsonl when the time budget cut
    it short, nowhere when Ctrl-C stopped it (its checkpoint resumes it); a failure goes to OUT/errors.log.

    Returns {"outcome": "recorded" | "duplicate" | "unfinished" | "interrupted" | "failed", "step": steps done}.
    """
    try:
        record = train_run(config, device=device, progress=progress, progress_position=position, deadline=deadline,
                           op_backend=op_backend, on_eval=lambda line: _locked_append(out_dir / PROGRESS_FILE, line),
                           checkpoint_path=checkpoint_path(out_dir, config) if checkpoints else None,
                           lockstep=lockstep, compile_blocks=compile_blocks)
    except Exception:  # one broken run must not stop the sweep; its traceback is kept
        message = f"run {run_id(config)} {config}\n{traceback.format_exc()}\n"
        with open(out_dir / ERRORS_FILE, "a") as f:
            f.write(message)
        print(message, file=sys.stderr)
        return {"outcome": "failed", "step": None}
    if record["stop_reason"] == "interrupted":
        return {"outcome": "interrupted", "step": record["steps"]}
    if record["stop_reason"] == "deadline":  # cut short by the sweep's time budget: not a finished run
        _locked_append(out_dir / UNFINISHED_FILE, record)
        return {"outcome": "unfinished", "step": record["steps"]}
    return {"outcome": "recorded" if append_result(out_dir, record) else "duplicate", "step": record["steps"]}


def cuda_index(device: str) -> Optional[int]:
    """The GPU index a worker pins itself to: 1 for "cuda:1"; None for "cuda" (the current GPU) or the CPU."""
    parsed = torch.device(device)
    return parsed.index if parsed.type == "cuda" else None


def _worker(slot: int, device: str, queue, outcomes, out_dir: str, progress: bool, deadline: Optional[float],
            op_backends: dict, threads: Optional[int], checkpoints: bool, lockstep: Optional[Lockstep],
            compile_blocks: bool = False) -> None:
    """Worker process: take (run index, run config) items from the queue until a None arrives, the deadline
    passes or Ctrl-C is pressed; put each run's outcome (see :func:`_run_and_record`) on ``outcomes``.
    op_backends: the op backend of each model; lockstep: the sweep's group (each run has the slot of its index)."""
    if cuda_index(device) is not None:
        torch.cuda.set_device(cuda_index(device))
    if threads:
        torch.set_num_threads(threads)
    try:
        with stop_on_interrupt():
            while not stop_requested():
                item = queue.get()
                if item is None or (deadline is not None and time.time() > deadline):
                    return
                index, values = item
                config = RunConfig.from_dict(values)
                member = lockstep.member(index) if lockstep is not None else None
                try:
                    outcomes.put(_run_and_record(config, device, Path(out_dir), progress, slot, deadline,
                                                 op_backends[config.model], checkpoints, member, compile_blocks))
                finally:
                    if member is not None:
                        member.finish()
    except KeyboardInterrupt:  # a second Ctrl-C: the sweep's process says what happened
        return


def _interrupted_message(outcomes: list[dict], checkpoints: bool) -> str:
    """The one line a sweep stopped by Ctrl-C shows."""
    steps = sorted(o["step"] for o in outcomes if o["outcome"] == "interrupted")
    if not steps:
        return "interrupted; run the same command again to continue the sweep"
    if not checkpoints:
        return "interrupted; run the same command again to continue the sweep (interrupted runs start over: " \
               "--no-checkpoints)"
    if len(steps) == 1:
        return resume_message(steps[0])
    return "interrupted; run the same command again to resume (the runs in progress continue from steps " \
           f"{', '.join(map(str, steps))})"


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
    op_backend_by_model: Optional[dict] = None,
    equal_steps: bool = False,
    compile_blocks: bool = False,
) -> dict:
    """Run every run not yet recorded in OUT/results.jsonl.

    Args:
        runs: the planned runs (e.g. ``SweepGrid.runs()``).
        out_dir: OUT, where results.jsonl (and errors.log, unfinished.jsonl) live.  One sweep at a time: a
            second one into the same OUT raises SweepLockedError (OUT/sweep.lock).
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
        op_backend_by_model: {model name: op backend} for models whose op runs on another backend than
            ``op_backend`` (e.g. those whose Triton check failed on this device).
        equal_steps: every run trains at once, in lockstep, and time-limited runs share one length, the smallest
            any of them fits (see :mod:`palimpsa.mqar.lockstep`); needs a worker slot per run to go
            (devices x workers_per_device), else ValueError.
        compile_blocks: every run's blocks through ``torch.compile`` on CUDA (see :func:`train.train_run`).

    Returns:
        {"planned": n, "skipped": already recorded, "recorded": newly recorded, "failed": runs that raised (see
        OUT/errors.log), "unfinished": runs cut short by the time budget}.

    Raises:
        Interrupted (a KeyboardInterrupt) after Ctrl-C: the runs in progress stop at their next step, save their
        state and are left out of the records; its message says how to resume.
    """
    if workers_per_device < 1:
        raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
    op_backend_by_model = dict(op_backend_by_model or {})
    for model, backend in [("", op_backend), *op_backend_by_model.items()]:
        if backend not in OP_BACKENDS:
            raise ValueError(f"op backend{' of ' + model if model else ''} must be one of {OP_BACKENDS}, "
                             f"got {backend!r}")
    op_backends = {config.model: op_backend_by_model.get(config.model, op_backend) for config in runs}
    out_dir = Path(out_dir)
    devices = list(devices) if devices else visible_devices()
    with sweep_lock(out_dir), stop_on_interrupt():
        done = finished_run_ids(out_dir)
        pending, seen = [], set(done)
        for config in runs:
            rid = run_id(config)
            if rid not in seen:  # also drops duplicates inside the grid
                pending.append(config)
                seen.add(rid)
        deadline = None if time_budget_s is None else time.time() + time_budget_s
        # interleaved (cuda:0, cuda:1, cuda:0, ...) and no more workers than runs, so the runs spread evenly
        slots = [device for _ in range(workers_per_device) for device in devices]
        if equal_steps and len(pending) > len(slots):
            raise ValueError(f"equal steps need every run to train at once: {len(pending)} runs to go but "
                             f"{len(slots)} worker slots ({len(devices)} devices x {workers_per_device} workers per "
                             "device); raise workers_per_device")
        slots = slots[:max(1, len(pending))]
        try:
            if len(slots) == 1 or len(pending) <= 1:
                outcomes = _run_here(pending, slots[0], out_dir, progress, deadline, op_backends, threads,
                                     checkpoints, compile_blocks)
            else:
                outcomes = _run_in_workers(pending, slots, out_dir, progress, deadline, op_backends, threads,
                                           checkpoints, equal_steps, compile_blocks)
        except KeyboardInterrupt as interrupt:  # a second Ctrl-C: no waiting for the runs' last validation
            if isinstance(interrupt, Interrupted):
                raise
            raise Interrupted("interrupted; run the same command again to continue the sweep (runs in progress "
                              "resume from their last checkpoint)") from None
        if stop_requested():
            raise Interrupted(_interrupted_message(outcomes, checkpoints))
    count = {name: sum(o["outcome"] == name for o in outcomes) for name in ("recorded", "failed", "unfinished")}
    return {"planned": len(runs), "skipped": len(runs) - len(pending), **count}


def _run_here(pending: list[RunConfig], device: str, out_dir: Path, progress: bool, deadline: Optional[float],
              op_backends: dict, threads: Optional[int], checkpoints: bool,
              compile_blocks: bool = False) -> list[dict]:
    """The runs one after another in this process; their outcomes."""
    outcomes = []
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for config in pending:
            if (deadline is not None and time.time() > deadline) or stop_requested():
                break
            outcomes.append(_run_and_record(config, device, out_dir, progress, 0, deadline, op_backends[config.model],
                                            checkpoints, compile_blocks=compile_blocks))
    finally:
        torch.set_num_threads(previous_threads)
    return outcomes


def _run_in_workers(pending: list[RunConfig], slots: list[str], out_dir: Path, progress: bool,
                    deadline: Optional[float], op_backends: dict, threads: Optional[int],
                    checkpoints: bool, equal_steps: bool = False, compile_blocks: bool = False) -> list[dict]:
    """The runs spread over one worker process per slot (a device name), in lockstep with ``equal_steps``;
    their outcomes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, outcome_queue = ctx.Queue(), ctx.Queue()
    lockstep = Lockstep(len(pending), ctx) if equal_steps else None
    for index, config in enumerate(pending):
        queue.put((index, {f.name: getattr(config, f.name) for f in fields(RunConfig)}))
    for _ in slots:
        queue.put(None)
    worker_threads = threads or max(1, (os.cpu_count() or 1) // len(slots))
    workers = [ctx.Process(target=_worker, args=(i, device, queue, outcome_queue, str(out_dir), progress, deadline,
                                                 op_backends, worker_threads, checkpoints, lockstep, compile_blocks))
               for i, device in enumerate(slots)]
    for w in workers:
        w.start()
    outcomes = []
    while any(w.is_alive() for w in workers) or not outcome_queue.empty():
        try:
            outcomes.append(outcome_queue.get(timeout=0.5))
        except Empty:
            pass
    for w in workers:
        w.join()
    failed_workers = sum(w.exitcode != 0 for w in workers)  # a worker that died (e.g. out of memory) fails its run
    return outcomes + [{"outcome": "failed", "step": None}] * failed_workers
