"""Check a model's training step on this device: the default op backend against the PyTorch one.

Builds a preset model, runs one packed batch (documents joined with cu_seqlens) forward and backward in
float32 with the backend ``chunk_palimpsa`` picks by itself (Triton on a GPU) and with ``backend="torch"``,
and prints the relative differences of the logits, the loss and the gradients.  Exit code 1 when one is
above ``--limit``: then training curves from that backend cannot be trusted.

    PYTHONPATH=. python scripts/check_model_backends.py [--model palimpsa-small] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

import palimpsa.layers.palimpsa as palimpsa_layer
from palimpsa.ops import chunk_palimpsa
from palimpsa.train.loop import packed_logits, summed_token_loss
from palimpsa.train.data import Pack, collate_packs
from palimpsa.train.models import build_model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def step(model, batch, backend):
    """(logits, loss, gradients) of one packed batch with the op's backend forced to ``backend``."""
    palimpsa_layer.chunk_palimpsa = (chunk_palimpsa if backend == "auto"
                                     else functools.partial(chunk_palimpsa, backend=backend))
    model.zero_grad(set_to_none=True)
    logits = packed_logits(model, batch)
    loss = summed_token_loss(logits, batch.targets) / batch.num_targets
    loss.backward()
    return logits.detach(), loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="palimpsa-small")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--limit", type=float, default=1e-3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(args.model, 320).to(device)
    lengths = [args.tokens // 2, args.tokens // 4 - 7, args.tokens // 8 + 7, args.tokens - args.tokens // 2
               - args.tokens // 4 - args.tokens // 8]
    pack = Pack(tokens=torch.randint(0, 256, (args.tokens,)).numpy(), seq_lengths=lengths)
    batch = collate_packs([pack]).to(device)
    auto = step(model, batch, "auto")
    reference = step(model, batch, "torch")
    errors = {name: relative(a, b) for name, a, b in zip(("logits", "loss", "gradients"), auto, reference)}
    print(json.dumps({"model": args.model, "device": str(torch.cuda.get_device_name() if device.type == "cuda"
                                                      else "cpu"), "relative_error": errors, "limit": args.limit}))
    return 0 if all(e <= args.limit for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
