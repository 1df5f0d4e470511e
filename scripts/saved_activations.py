"""Bytes kept for the backward per token, for one layer of a benchmark model, with compiled blocks on the CPU.

Builds ``palimpsa bench train``'s model at a size (default 760m) cut to one decoder layer, runs a forward under
bf16 autocast with the blocks compiled (inductor on the CPU: the same partitioner decides what is kept as on a
GPU), and sums the storage of every tensor autograd saves, except the parameters and their casts.  The op's own
saved tensors are those of its CPU path (the Triton path keeps others).

    PYTHONPATH=. python scripts/saved_activations.py palimpsa-g1 [--size 760m] [--tokens 256] [--backend inductor]
"""

from __future__ import annotations

import argparse
import sys

import torch

from palimpsa.bench.train import MODELS, build_bench_model
from palimpsa.layers.modules import compiled_blocks


def saved_bytes(model_name: str, size: str, tokens: int, backend: str):
    """(total bytes saved, [(shape, dtype, bytes)] largest first) for one forward of ``tokens`` tokens."""
    torch.manual_seed(0)
    model = build_bench_model(model_name, size, 512)
    backbone = model.model if hasattr(model, "model") else model.backbone
    backbone.layers = torch.nn.ModuleList(list(backbone.layers)[:1])
    model.train()
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))

    def forward():
        seen = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen and tuple(t.shape) not in weight_shapes:
                seen[key] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), t.untyped_storage().nbytes())
            return t

        compiled = compiled_blocks(backend != "eager", devices=("cpu",),
                                   backend=backend if backend != "eager" else "inductor")
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with compiled, torch.autocast("cpu", dtype=torch.bfloat16), hooks:
            model(input_ids=ids, labels=ids)
        return seen

    forward()  # compiles
    seen = forward()
    return sum(v[2] for v in seen.values()), sorted(seen.values(), key=lambda v: -v[2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--size", default="760m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args(argv)
    total, rows = saved_bytes(args.model, args.size, args.tokens, args.backend)
    print(f"{args.model} {args.size}, one layer and the head, {args.backend}: {total / args.tokens / 1e3:.1f} kB "
          f"saved per token")
    for shape, dtype, nbytes in rows[:20]:
        print(f"  {shape} {dtype}: {nbytes / args.tokens:.0f} B per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
