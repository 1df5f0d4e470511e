"""``chunk_bwd.split_pairs``: the CUDA sweep's interleaved dq/dk buffer split into two dense tensors in one pass
(run by Triton's interpreter here, in float32 and float16: the interpreter's bfloat16 is wrong; the bf16 split runs in
every GPU check of the sweep's gradients, scripts/gpu_ops_check.py)."""

from __future__ import annotations

import pytest
import torch

from palimpsa.ops.triton.chunk_bwd import split_pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 32), (1, 1, 1, 1), (3, 700)])
def test_split_pairs_matches_the_strided_halves(dtype, shape):
    pairs = torch.randn(*shape, 2)
    first, second = split_pairs(pairs, dtype)
    for got, want in ((first, pairs[..., 0]), (second, pairs[..., 1])):
        assert got.shape == shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, want.to(dtype))
    assert first.data_ptr() != second.data_ptr()


def test_split_pairs_refuses_what_is_not_a_contiguous_pair_buffer():
    with pytest.raises(ValueError, match=r"contiguous \[\.\.\., 2\] buffer, got shape \(4, 3\)"):
        split_pairs(torch.zeros(4, 3), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        split_pairs(torch.zeros(2, 4).t(), torch.float32)
    empty = split_pairs(torch.zeros(0, 2), torch.bfloat16)
    assert [t.shape for t in empty] == [(0,), (0,)]
