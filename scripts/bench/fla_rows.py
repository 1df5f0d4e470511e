"""fla's columns of the kernel table, one shape and kernel at a time, saved after each.

The same measurement as ``palimpsa.bench.ops.bench_shape`` (same inputs, seed 0, same gradients), but
written to ``OUT_JSON`` after every kernel, so that a device call stopped by its time limit still
returns what was measured (fla autotunes every kernel anew for each shape; on 2026-11-25 the whole
table with fla did not finish within 420 s on an H100).

    PYTHONPATH=/tmp/site:. python3 scripts/bench/fla_rows.py OUT_JSON SHAPE [SHAPE ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from palimpsa.bench import ops as bench

KERNELS = (
    ("fla_chunk_simple_gla", bench._fla_simple_gla, ("q", "k", "v", "g")),
    ("fla_chunk_gated_delta_rule", bench._fla_gated_delta_rule, ("q", "k", "v", "g", "beta")),
)


def main() -> int:
    out_path, names = sys.argv[1], sys.argv[2:]
    if not bench.fla_available():
        print("fla not importable", flush=True)
        return 1
    result = {"environment": bench.environment(), "rows": {}}
    t0 = time.time()
    for name in names:
        shape = bench.shape_by_name(name)
        inputs = bench.make_inputs(shape, torch.bfloat16, "cuda")
        for key, forward, grads in KERNELS:
            print(f"[{time.time() - t0:6.1f} s] {name} {key} ...", flush=True)
            t = time.time()
            entry = bench._try_measure(forward, inputs, grads)
            entry["seconds"] = round(time.time() - t, 1)
            result["rows"].setdefault(name, {})[key] = entry
            bench.write_atomic(out_path, json.dumps(result, indent=1) + "\n")
            print(f"[{time.time() - t0:6.1f} s] {name} {key}: {json.dumps(entry)}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
