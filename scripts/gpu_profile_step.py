"""Time one training step of a bench model with compiled blocks on and off, and list its heaviest GPU kernels.

    PYTHONPATH=. python scripts/gpu_profile_step.py [--model palimpsa-g1] [--size 760m] [--layers 4] [--top 30]

The model is ``palimpsa bench train``'s (``--layers`` cuts it to that many blocks: every block has the same
kernels, so a few show where a step's time goes at a fraction of the compile and run time).  For each of
compiled / plain: 2 warm-up steps, 3 timed steps (median printed), then one step under the PyTorch profiler,
whose kernels are listed by total device time (the component breakdown of ``palimpsa bench train`` cannot see
inside compiled blocks).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from palimpsa.bench.train import VOCAB_SIZE, _preset_config, make_step
from palimpsa.layers.modules import compiled_blocks
from palimpsa.train.optim import parameter_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="palimpsa-g1", choices=("palimpsa", "palimpsa-g1", "notpalimpsa"))
    parser.add_argument("--size", default="760m")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--modes", default="compiled,plain")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    overrides = {"palimpsa": {}, "palimpsa-g1": {"importance_groups": 1},
                 "notpalimpsa": {"metaplasticity": False}}[args.model]
    overrides["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_preset_config(f"palimpsa-{args.size}", VOCAB_SIZE, overrides))
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=True)
    tokens = torch.randint(0, VOCAB_SIZE, (args.batch, args.seq_len), device=device)
    step = make_step(model, optimizer, tokens, device, "bf16")
    for mode in args.modes.split(","):
        with compiled_blocks(mode == "compiled"):
            started = time.perf_counter()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            warm = time.perf_counter() - started
            times = []
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 1e9
            ms = 1e3 * statistics.median(times)
            print(f"== {args.model} {args.size} x{args.layers} layers, {mode}: step {ms:.1f} ms "
                  f"(warm-up {warm:.1f} s), peak {peak:.1f} GB", flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top,
                                              max_name_column_width=70)
            print(table, flush=True)


if __name__ == "__main__":
    main()
