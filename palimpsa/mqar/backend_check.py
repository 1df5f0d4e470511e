"""Check, on the device that will train, that the Palimpsa op's backends agree inside the MQAR models.

    python -m palimpsa.mqar.backend_check --models palimpsa palimpsa_g1 meta_mamba2 [--device cuda]

For each model (any name ``palimpsa mqar --models`` takes, grouped ones included): the same weights and batch,
with op backend "torch" and "triton", in float32 (TF32 off): the training loss and every parameter gradient, and
the evaluation passes' logits and last-layer output variance (no autograd).  Prints the relative errors; exits
1 if any exceeds the limit (so a GPU script can fall back to the PyTorch backend).  On a GPU the check also
compiles every Triton kernel a training run uses, evaluation included, once, before the runs start.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from palimpsa.mqar.cli import model_name_argument
from palimpsa.mqar.data import IGNORE_INDEX, multiquery_ar
from palimpsa.mqar.models import MQARModel, MQARModelConfig, palimpsa_op_backend, parse_model_name


def loss_and_grads(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, backend: str):
    """Query-position cross-entropy and the gradient of every parameter, with the op on ``backend``."""
    model.zero_grad(set_to_none=True)
    mask = labels != IGNORE_INDEX
    with palimpsa_op_backend(backend):
        loss = F.cross_entropy(model(inputs, positions=mask), labels[mask])
        loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@torch.no_grad()
def evaluation_outputs(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, backend: str):
    """The evaluation passes of a run with the op on ``backend``: (logits [M, vocab] of a validation pass,
    logits and last-layer variance [M, H, V] (None for a model without one) of a test pass)."""
    mask = labels != IGNORE_INDEX
    with palimpsa_op_backend(backend):
        validation = model(inputs, positions=mask)
        test_logits, variance = model(inputs, positions=mask, output_variance=True)
    return validation, test_logits, variance


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare_backends(name: str, device: str, seq_len: int, num_kv_pairs: int, batch: int, **model_kwargs) -> dict:
    """{"loss": rel. error, "grad": worst rel. error over parameters, "worst_param": its name, "eval": worst rel.
    error of the evaluation passes' logits and variance}.

    name: a model name as ``palimpsa mqar --models`` takes it (e.g. "palimpsa_g1").  model_kwargs:
    MQARModelConfig fields (vocab_size, d_model, num_heads, head_k_dim, head_v_dim); the paper's by default.
    """
    parse_model_name(name)  # a bad name is a ValueError naming the valid forms
    torch.manual_seed(0)
    config = MQARModelConfig.from_model_name(name, **model_kwargs)
    model = MQARModel(config).to(device)
    inputs, labels = multiquery_ar(config.vocab_size, batch, seq_len, num_kv_pairs, seed=0)
    inputs, labels = inputs.to(device), labels.to(device)
    ref_loss, ref_grads = loss_and_grads(model, inputs, labels, "torch")
    loss, grads = loss_and_grads(model, inputs, labels, "triton")
    errors = {k: relative_error(grads[k], ref_grads[k]) for k in ref_grads}
    worst = max(errors, key=errors.get)
    ref_eval = evaluation_outputs(model, inputs, labels, "torch")
    ours = evaluation_outputs(model, inputs, labels, "triton")
    eval_error = max(relative_error(a, b) for a, b in zip(ours, ref_eval) if b is not None)
    return {"loss": relative_error(loss, ref_loss), "grad": errors[worst], "worst_param": worst, "eval": eval_error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=model_name_argument, default=["palimpsa", "meta_mamba2"],
                        help="model names as `palimpsa mqar --models` takes them, e.g. palimpsa_g1")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-kv-pairs", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--limit", type=float, default=1e-3, help="largest accepted relative error")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--head-k-dim", type=int, default=None)
    parser.add_argument("--head-v-dim", type=int, default=None)
    args = parser.parse_args(argv)
    model_kwargs = dict(d_model=args.d_model, num_heads=args.num_heads, head_k_dim=args.head_k_dim,
                        head_v_dim=args.head_v_dim)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for name in args.models:
        try:
            r = compare_backends(name, args.device, args.seq_len, args.num_kv_pairs, args.batch, **model_kwargs)
        except Exception as err:  # a backend that cannot run is a failed check, reported as such
            print(f"{name}: triton backend failed: {type(err).__name__}: {err}")
            ok = False
            continue
        passed = max(r["loss"], r["grad"], r["eval"]) <= args.limit
        ok &= passed
        print(f"{name}: loss rel. err {r['loss']:.2e}, worst grad rel. err {r['grad']:.2e} ({r['worst_param']}), "
              f"evaluation rel. err {r['eval']:.2e} -> {'ok' if passed else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
