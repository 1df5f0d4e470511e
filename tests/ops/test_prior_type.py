"""The prior is a number or a tensor: a string (or a bool) is refused, not converted."""

import pytest
import torch

from palimpsa.ops import chunk_palimpsa, fused_recurrent_palimpsa, naive_palimpsa


@pytest.mark.parametrize("op", [naive_palimpsa, chunk_palimpsa, fused_recurrent_palimpsa])
@pytest.mark.parametrize("prior", ["1", b"1", True])
def test_prior_of_the_wrong_type_is_refused(op, prior):
    B, T, H, K, V = 1, 3, 2, 4, 4
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g, beta = -torch.rand(B, T, H), torch.rand(B, T, H, V)
    with pytest.raises(TypeError, match="prior must be a positive float"):
        op(q, k, v, g, beta, prior=prior)
    op(q, k, v, g, beta, prior=1)  # an int is a number


@pytest.mark.parametrize("prior", ["1", b"1", True])
def test_step_refuses_a_prior_of_the_wrong_type(prior):
    from palimpsa.ops import palimpsa_step

    B, H, K, V = 1, 2, 4, 4
    q, k, v = torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V)
    state = (torch.zeros(B, H, K, V), torch.ones(B, H, K, V))
    with pytest.raises(TypeError, match="prior must be a positive float"):
        palimpsa_step(q, k, v, -torch.rand(B, H), torch.rand(B, H, V), state, prior=prior)
    palimpsa_step(q, k, v, -torch.rand(B, H), torch.rand(B, H, V), state, prior=1)
