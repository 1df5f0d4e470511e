"""``python -m palimpsa.mqar.pace`` on the CPU: it times every model's training step and writes its report."""

from __future__ import annotations

import re

from palimpsa.mqar import pace


def test_pace_times_each_model_and_writes_the_report(tmp_path):
    out = tmp_path / "pace.md"
    rc = pace.main(["--models", "palimpsa_g1", "notpalimpsa", "--seq-len", "32", "--num-kv-pairs", "4",
                    "--d-model", "16", "--num-heads", "2", "--head-k-dim", "8", "--head-v-dim", "8",
                    "--batch-size", "4", "--num-train", "16", "--steps", "2", "--warmup", "1", "--device", "cpu",
                    "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert not (tmp_path / "pace.md.tmp").exists()
    for model in ("palimpsa_g1", "notpalimpsa"):
        row = re.search(rf"^\| {model} \| ([0-9.]+) \(([0-9.]+)-([0-9.]+)\) \| ([0-9.]+) \| — \| — \|$", text, re.M)
        assert row, text
        assert all(float(row[i]) > 0 for i in (1, 2, 3)), row[0]  # the milliseconds (the first step: 0.1 s units)


def test_time_steps_times_every_step():
    import torch

    config = pace.RunConfig(model="palimpsa", seq_len=32, num_kv_pairs=4, d_model=16, num_heads=2, head_k_dim=8,
                            head_v_dim=8, batch_size=2, num_train=8, num_validation=8, num_test=8)
    timing = pace.time_steps(config, torch.device("cpu"), steps=3, warmup=1, compile_blocks=False)
    assert set(timing) == {"median", "min", "max", "first"} and all(t > 0 for t in timing.values())
