"""The GLA kernels' autotuning choices that can be checked without a GPU."""

from __future__ import annotations

import pytest

gla = pytest.importorskip("palimpsa.ops.triton.gla")


def test_small_heads_run_one_configuration_untimed():
    configs = gla.TUNED_CONFIGS
    assert len(configs) > 1
    # MQAR's heads (K = 16, Vd = 32): only the first; positional and keyword arguments both count
    assert gla.one_config_for_small_heads(configs, {"K": 16}, VD=32) == configs[:1]
    assert gla.one_config_for_small_heads(configs, {}, K=8, VD=16) == configs[:1]
    # the benchmark shapes' heads are tuned over every configuration
    assert gla.one_config_for_small_heads(configs, {"K": 96, "VD": 192}) == configs
    assert gla.one_config_for_small_heads(configs, {"K": 48}, VD=48) == configs


def test_float32_tiles_and_chunks_are_small():
    import torch

    assert gla._blocks(16, 8, torch.float32) == (16, 16)
    assert gla._blocks(24, 10, torch.float32) == (32, 16)
    assert gla._blocks(96, 192, torch.float32) == (32, 32)
    assert gla._blocks(16, 8, torch.bfloat16) == (64, 64)
    # the chunk the kernels run: capped for float32 (the runtime and compile_report both use kernel_chunk)
    assert gla.kernel_chunk(4096, 64, torch.float32) == 32 and gla.kernel_chunk(4096, 64, torch.bfloat16) == 64
    assert gla.kernel_chunk(37, 64, torch.bfloat16) == 64 and gla.kernel_chunk(20, 64, torch.bfloat16) == 32
    assert gla.kernel_chunk(5, 64, torch.float32) == 16

