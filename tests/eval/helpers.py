"""A tiny random Palimpsa language model with the byte-level tokenizer, for evaluation tests."""

from __future__ import annotations

import torch

from palimpsa.eval.harness import LOCAL_TASKS_DIR as TASKS_DIR  # noqa: F401  (the shipped offline tasks)

TINY_PALIMPSA = dict(model_type="palimpsa", hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8,
                     hidden_ratio=2)


def tiny_model_and_tokenizer(seed: int = 0):
    from palimpsa.models import PalimpsaConfig, PalimpsaForCausalLM
    from palimpsa.train.tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    values = {k: v for k, v in TINY_PALIMPSA.items() if k != "model_type"}
    config = PalimpsaConfig(vocab_size=320, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **values)
    return PalimpsaForCausalLM(config).eval(), tokenizer


@torch.no_grad()
def continuation_loglik(model, context_ids, continuation_ids) -> float:
    """log p(continuation | context) summed over the continuation's tokens."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = len(context_ids)
    return float(sum(logprobs[start - 1 + i, token] for i, token in enumerate(continuation_ids)))
