"""Check on a CUDA device that an MQAR run stopped after its first step and resumed from its checkpoint follows
the uninterrupted run (fused AdamW state, bf16 autocast and the Triton op included).

    PYTHONPATH=. python scripts/gpu_resume_check.py [--models palimpsa meta_mamba2 ...]

Prints, per model, the largest difference between the two runs' validation losses and accuracies, and exits 1
if they differ by more than the tolerance.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from palimpsa.mqar.train import RunConfig, train_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["palimpsa", "meta_mamba2", "gated_deltanet"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed loss / accuracy difference")
    args = parser.parse_args()
    failed = False
    for model in args.models:
        config = RunConfig(model=model, seq_len=64, num_kv_pairs=8, d_model=64, num_heads=4, lr=3e-3, seed=0,
                           vocab_size=256, num_train=512, num_validation=64, num_test=64, batch_size=64, epochs=3,
                           eval_every=4)
        whole = train_run(config, device=args.device, progress=False)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "run.pt"
            train_run(config, device=args.device, progress=False, deadline=0.0, checkpoint_path=path)
            resumed = train_run(config, device=args.device, progress=False, checkpoint_path=path)
        later = resumed["history"]  # the stop's extra validation stays out of the resumed run
        same_steps = [h[0] for h in later] == [h[0] for h in whole["history"]]
        same_choice = (resumed["best_step"], resumed["test_accuracy"]) == (whole["best_step"], whole["test_accuracy"])
        loss_diff = max(abs(a[1] - b[1]) for a, b in zip(later, whole["history"]))
        acc_diff = max(abs(a[2] - b[2]) for a, b in zip(later, whole["history"]))
        ok = same_steps and resumed["resumed_at_steps"] == [1] and max(loss_diff, acc_diff) <= args.tolerance
        ok = ok and (same_choice or later != whole["history"])  # bitwise equal histories must choose alike
        failed |= not ok
        print(f"{model:15s} steps {resumed['steps']:3d} resumed at {resumed['resumed_at_steps']} "
              f"loss diff {loss_diff:.2e} accuracy diff {acc_diff:.2e} bitwise {later == whole['history']} "
              f"same best step and test accuracy {same_choice} "
              f"-> {'ok' if ok else 'FAILED'}")
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
