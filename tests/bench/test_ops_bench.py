"""``palimpsa bench ops`` pieces that run without a GPU: the grouped forwards and the table."""

from __future__ import annotations

import pytest
import torch

from palimpsa.bench import ops
from palimpsa.ops import naive_palimpsa


def test_grouped_forwards_compute_the_op():
    shape = ops.Shape("tiny", 1, 20, 2, 8, 16)
    x = {n: t.double() for n, t in ops.make_inputs(shape, torch.float32, "cpu").items()}
    # the benchmark's G = 1 and NotPalimpsa forwards go through the grouped path (PyTorch here)
    from palimpsa.ops.checks import prepare_inputs
    from palimpsa.ops.grouped import grouped_palimpsa

    for beta in (x["beta"][..., :1], None):
        prepared = prepare_inputs(x["q"], x["k"], x["v"], x["g"], beta, 1.0, None, None, None)
        o = grouped_palimpsa(prepared, False, False, None, use_triton=False)[0]
        ref, _ = naive_palimpsa(x["q"], x["k"], x["v"], x["g"], beta)
        torch.testing.assert_close(o, ref)


def test_table_has_the_grouped_rows_and_marks_timing_only_fla():
    timing = {"fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "peak_mb": 10.0}
    row = {"shape": {"name": "760M-like", "B": 4, "T": 4096, "H": 16, "K": 96, "V": 192}, "floor_ms": 0.5,
           "floor_fwd_bwd_ms": 1.5, "ours": dict(timing, fwd_over_floor=2.0, fwd_bwd_over_floor=2.0),
           "grouped_g1": dict(timing), "not_palimpsa": dict(timing),
           "fla_chunk_simple_gla": {"fwd_ms": 0.5, "fwd_bwd_ms": 2.0, "peak_mb": 5.0,
                                    "note": ops.TIMING_ONLY_NOTE},
           "fla_chunk_gated_delta_rule": {"error": "RuntimeError: no"}}
    table = ops.format_table({"environment": {"torch": "x", "triton": "y", "fla": "z"}, "rows": [row]})
    assert "| 760M-like | 1.000 | 3.000 | 10 | 1.000 | 3.000 | 0.500 | 2.000 | 1.50x |" in table
    assert ops.TIMING_ONLY_NOTE in table
    assert "| 760M-like | 1.000 | 3.000 | 10 | 0.500 | 2.0x | 1.500 | 2.0x | 0.500 | 2.000 | 5 |" in table


def test_floors_are_the_reciprocal_and_fp32_issue_bounds():
    """760M-like: 4.83e9 element-tokens; forward bound by the reciprocals (about 1.16 ms), backward by its FP32
    instructions (about 2.5 ms) on 132 SMs at 1.98 GHz."""
    shape = ops.shape_by_name("760M-like")
    assert shape.elements == 4 * 4096 * 16 * 96 * 192
    clocks = ops.SMS * ops.CLOCK_HZ
    assert shape.floor_ms("fwd") == pytest.approx(1e3 * shape.elements / (ops.MUFU_LANES * clocks))
    assert shape.floor_ms("bwd") == pytest.approx(1e3 * shape.elements * 17 / (ops.FP32_LANES * clocks))
    assert 1.1 < shape.floor_ms("fwd") < 1.2 and 2.3 < shape.floor_ms("bwd") < 2.6
    assert shape.floor_ms("fwd_bwd") == pytest.approx(shape.floor_ms("fwd") + shape.floor_ms("bwd"))


def test_bench_shape_rejects_unknown_fla_kernel():
    with pytest.raises(ValueError, match="fla_kernels"):
        ops.bench_shape(ops.shape_by_name("170M-like"), device="cpu", fla_kernels=("simple_gla", "flash"))


def test_variant_inputs_are_sliced_before_timing():
    """G = 1 and fla's delta rule get their beta shapes as inputs, so no slicing is timed inside the call."""
    inputs = ops.make_inputs(ops.shape_by_name("170M-like"), torch.float32, "cpu")
    B, T, H, V = inputs["v"].shape
    g1 = ops.g1_inputs(inputs)
    assert g1["beta"].shape == (B, T, H, 1) and g1["beta"].is_contiguous()
    assert torch.equal(g1["beta"][..., 0], inputs["beta"][..., 0])
    assert ops.gdn_inputs(inputs)["beta"].shape == (B, T, H)
    assert g1["q"] is inputs["q"]


def test_grouped_table_gives_device_times_beside_the_wall_times():
    """The kernels' own time and its ratio to fla's, and the host's time, where the benchmark measured them (on a
    GPU); n/a otherwise."""
    timing = {"fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "peak_mb": 10.0}
    row = {"shape": {"name": "170M-like", "B": 8, "T": 2048, "H": 16, "K": 48, "V": 48}, "floor_ms": 0.5,
           "floor_fwd_bwd_ms": 1.5, "ours": dict(timing, fwd_over_floor=2.0, fwd_bwd_over_floor=2.0),
           "grouped_g1": dict(timing, fwd_bwd_device_ms=1.2), "not_palimpsa": dict(timing, fwd_bwd_device_ms=0.4),
           "fla_chunk_simple_gla": {"fwd_ms": 0.5, "fwd_bwd_ms": 2.0, "peak_mb": 5.0, "fwd_bwd_device_ms": 0.3}}
    table = ops.format_table({"environment": {"torch": "x", "triton": "y", "fla": "z"}, "rows": [row]})
    assert "| 1.50x | 1.200 | 0.400 | 0.300 | 4.00x |" in table
    del row["fla_chunk_simple_gla"]["fwd_bwd_device_ms"]
    table = ops.format_table({"environment": {"torch": "x", "triton": "y", "fla": "z"}, "rows": [row]})
    assert "| 1.50x | 1.200 | 0.400 | n/a | n/a |" in table
    row["grouped_g1"]["fwd_bwd_host_ms"], row["fla_chunk_simple_gla"]["fwd_bwd_host_ms"] = 2.5, 1.9
    table = ops.format_table({"environment": {"torch": "x", "triton": "y", "fla": "z"}, "rows": [row]})
    assert "| n/a | n/a | 2.500 | n/a | 1.900 |" in table  # the host's time to issue each fwd+bwd
