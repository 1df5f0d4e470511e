"""DDP and FSDP2 with 2 CPU processes (gloo) give the losses of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from palimpsa.train import train
from palimpsa.train.distributed import shutdown_distributed
from tests.train.corpus import stand_in_config, write_corpus
from tests.train.tiny_model import tiny_factory

STEPS = 4


def _config(data_dir, out_dir, **overrides):
    return stand_in_config(data_dir, out_dir, **{**dict(seq_len=24, batch_size=1, max_steps=STEPS, warmup_steps=1),
                                                 **overrides})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, data_dir: str, out_root: str, strategies) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        results = {}
        for strategy in strategies:
            out_dir = os.path.join(out_root, strategy)
            # stop halfway and resume: exercises sharded checkpoint save/load too
            first = train(_config(data_dir, out_dir, parallel=strategy, stop_at_step=STEPS // 2),
                          model_factory=tiny_factory)
            second = train(_config(data_dir, out_dir, parallel=strategy), model_factory=tiny_factory)
            results[strategy] = first.losses + second.losses
        with open(os.path.join(out_root, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")), text_files=4, jsonl_records=10)


def test_ddp_and_fsdp2_match_one_process(corpus, tmp_path):
    single = train(_config(corpus, tmp_path / "single", batch_size=2), model_factory=tiny_factory)
    strategies = ("ddp", "fsdp", "auto")  # auto is DDP under torchrun
    mp.spawn(_worker, args=(2, _free_port(), corpus, str(tmp_path), strategies), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as handle:
            results = json.load(handle)
        for strategy in strategies:
            assert results[strategy] == pytest.approx(single.losses, rel=1e-5, abs=1e-6), strategy
