"""Evidence for the metaplastic conversion: does turning a trained Mamba2 into a Meta-Mamba2 help it recall?

Protocol (issue "metaplastic conversion", item 5), all on CPU, deterministic given --seed:
  1. train a small Mamba2 on an MQAR setting until its test accuracy plateaus (or --max-pretrain-steps);
  2. convert it with ``palimpsa.convert.mamba2_to_meta_mamba2`` (through a ``transformers`` Mamba2ForCausalLM
     holding the trained weights, i.e. the path users take) and check the logits did not move;
  3. from that point run two arms for --finetune-steps steps on the same batches with the same lr schedule:
     (a) the Mamba2 continues, (b) the converted Meta-Mamba2 is fine-tuned.
     Both arms keep the phase-1 AdamW moments of the shared parameters.  The new gate parameters of (b) get
     AdamW groups of their own (W_up, W_down: lr x --gate-lr-multiplier; c: lr x --scale-lr-multiplier; eps
     1e-16, no weight decay): at conversion their gradients are of the order of softplus(c) times the others',
     far below AdamW's default eps (1e-8), so with the shared settings they would not move at all (see
     palimpsa/convert/metaplastic.py).
Writes curves (PNG), every number (JSON) and a summary (Markdown) under --out.

The Mamba2 is trained as ``MetaMamba2ForCausalLM(metaplasticity=False)``: the same function as transformers'
Mamba2 (tested in tests/models), whose CPU path is an order of magnitude slower.

    python scripts/convert_evidence.py --out results/convert
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM

from palimpsa.convert import gate_gradients, mamba2_to_meta_mamba2, relative_logits_change
from palimpsa.convert.cli import scale_argument
from palimpsa.convert.metaplastic import is_gate_parameter
from palimpsa.models import MetaMamba2Config, MetaMamba2ForCausalLM
from palimpsa.mqar.data import IGNORE_INDEX, multiquery_ar


@dataclass
class Settings:
    # MQAR task
    vocab_size: int = 64
    seq_len: int = 32
    num_kv_pairs: int = 8
    # model (a deliberately small state, so that recall is capacity-limited)
    hidden_size: int = 32
    num_layers: int = 2
    state_size: int = 4
    head_dim: int = 16
    n_groups: int = 1
    # training
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_pretrain_steps: int = 2500
    eval_every: int = 50
    plateau_evals: int = 6  # stop phase 1 when the best accuracy has not risen by plateau_delta in this many evals
    plateau_delta: float = 0.01
    finetune_steps: int = 500
    finetune_lr: float = 1e-3
    gate_lr_multiplier: float = 50.0  # lr of the new gate projections W_up, W_down (x finetune_lr)
    scale_lr_multiplier: float = 50.0  # lr of the new gate scales c (x finetune_lr)
    importance_scale: str = "auto"  # or a float
    num_test: int = 512
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# data: multi-query associative recall (the project's Zoology-compatible generator)
def mqar_batch(num: int, s: Settings, seed: int):
    """MQAR examples: inputs, labels [num, L] int64 (labels -100 except at query positions)."""
    return multiquery_ar(s.vocab_size, num, s.seq_len, s.num_kv_pairs, seed)


def recall_loss(model, inputs, labels):
    logits = model(inputs, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def accuracy(model, inputs, labels, batch_size=128) -> float:
    """Per example, the fraction of queries predicted exactly; then the mean over examples."""
    model.eval()
    scores = []
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
        pred = model(x, use_cache=False).logits.argmax(-1)
        queried = y != IGNORE_INDEX
        scores.append(((pred == y) & queried).sum(1).float() / queried.sum(1).float())
    model.train()
    return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------------------------------------------
# models and optimisers
def mamba2_config(s: Settings) -> dict:
    inner = 2 * s.hidden_size
    return dict(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
                num_heads=inner // s.head_dim, head_dim=s.head_dim, state_size=s.state_size, n_groups=s.n_groups,
                expand=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def make_optimizer(named_params, s: Settings, lr: float, gate_lr: float = 0.0, scale_lr: float = 0.0):
    """AdamW: weight decay on matrices only; the conversion's gate projections and gate scales in groups of
    their own (no weight decay, eps 1e-16 so that Adam normalises their tiny gradients)."""
    decay, no_decay, gate, scale = [], [], [], []
    for name, p in named_params:
        if name.endswith("importance_scale"):
            scale.append(p)
        elif is_gate_parameter(name):
            gate.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [dict(params=decay, weight_decay=s.weight_decay, base_lr=lr),
              dict(params=no_decay, weight_decay=0.0, base_lr=lr)]
    for params, group_lr in ((gate, gate_lr), (scale, scale_lr)):
        if params:
            groups.append(dict(params=params, weight_decay=0.0, eps=1e-16, base_lr=group_lr))
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def moments_by_name(model, optimizer) -> dict:
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: copy.deepcopy(state) for p, state in optimizer.state.items()}


def load_moments(model, optimizer, moments: dict) -> None:
    for name, p in model.named_parameters():
        if name in moments:
            optimizer.state[p] = copy.deepcopy(moments[name])


def mean_gate_factor(model) -> float:
    """Mean over layers and heads of softplus(c), the scale of the importance gate (0 without gates)."""
    values = [F.softplus(p.detach()).mean() for n, p in model.named_parameters() if n.endswith("importance_scale")]
    return float(torch.stack(values).mean()) if values else 0.0


def train_steps(model, optimizer, s: Settings, steps: int, data_seed: int, lr_factor, test, log_name,
                start_step: int = 0, stop_on_plateau: bool = False):
    """Run ``steps`` AdamW steps on fresh batches (batch i drawn from seed data_seed + i).

    Returns the curve: a list of {"step", "accuracy", "loss", "gate_factor"} every ``s.eval_every`` steps.
    """
    curve = [dict(step=start_step, accuracy=accuracy(model, *test), loss=None, gate_factor=mean_gate_factor(model))]
    best, since_best, losses = curve[0]["accuracy"], 0, []
    t0 = time.time()
    for i in range(steps):
        set_lr(optimizer, lr_factor(i))
        inputs, labels = mqar_batch(s.batch_size, s, data_seed + i)
        loss = recall_loss(model, inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (i + 1) % s.eval_every == 0 or i + 1 == steps:
            acc = accuracy(model, *test)
            curve.append(dict(step=start_step + i + 1, accuracy=acc, loss=sum(losses) / len(losses),
                              gate_factor=mean_gate_factor(model)))
            losses = []
            print(f"[{log_name}] step {start_step + i + 1:5d}  loss {curve[-1]['loss']:.4f}  acc {acc:.4f}  "
                  f"softplus(c) {curve[-1]['gate_factor']:.2e}  ({time.time() - t0:.0f}s)", flush=True)
            if acc > best + s.plateau_delta:
                best, since_best = acc, 0
            else:
                since_best += 1
            if stop_on_plateau and since_best >= s.plateau_evals:
                break
    return curve


# ----------------------------------------------------------------------------------------------------------------
def convert_through_transformers(mamba2: MetaMamba2ForCausalLM, s: Settings) -> tuple:
    """Put the trained weights in a transformers Mamba2ForCausalLM and convert that, as a user would."""
    hf = Mamba2ForCausalLM(Mamba2Config(**mamba2_config(s))).eval()
    hf.load_state_dict(mamba2.state_dict(), strict=True)
    meta = mamba2_to_meta_mamba2(hf, importance_scale=scale_argument(s.importance_scale), seed=s.seed)
    return hf, meta


def write_atomically(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gate) = plt.subplots(1, 2, figsize=(11, 4))
    curves = result["curves"]
    ax.plot([p["step"] for p in curves["pretrain"]], [p["accuracy"] for p in curves["pretrain"]],
            color="gray", label="Mamba2 (phase 1)")
    for arm, color, style in (("mamba2_continued", "tab:blue", "-"), ("meta_mamba2_finetuned", "tab:red", "--")):
        ax.plot([p["step"] for p in curves[arm]], [p["accuracy"] for p in curves[arm]], color=color, ls=style,
                label=arm)
    ax.axvline(result["conversion"]["step"], color="k", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("MQAR test accuracy")
    s = result["settings"]
    ax.set_title(f"MQAR L={s['seq_len']} kv={s['num_kv_pairs']} V={s['vocab_size']}, d={s['hidden_size']} "
                 f"N={s['state_size']}")
    ax.legend()
    meta = curves["meta_mamba2_finetuned"]
    ax_gate.semilogy([p["step"] for p in meta], [p["gate_factor"] for p in meta], color="tab:red")
    ax_gate.set_xlabel("step")
    ax_gate.set_ylabel("mean softplus(c) of the importance gates")
    ax_gate.set_title("Meta-Mamba2 after conversion")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def summary_markdown(result: dict) -> str:
    c, f = result["conversion"], result["final"]
    lines = [
        "# Metaplastic conversion: evidence on MQAR",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds']:.0f} s on {result['machine']}, "
        f"torch {result['torch']}).",
        "",
        f"Phase 1 trained a Mamba2 for {c['step']} steps ({result['pretrain_stop']}); its test accuracy was "
        f"{c['accuracy_before']:.4f}.",
        f"Conversion (importance_scale = {c['importance_scale']}, calibrated by `importance_scale='auto'` unless "
        f"the command sets it): relative logits change "
        f"{c['relative_logits_change_random_tokens']:.2e} on random tokens, "
        f"{c['relative_logits_change_mqar']:.2e} on MQAR test inputs; test accuracy after conversion "
        f"{c['accuracy_after']:.4f}; smallest |gradient| of a gate parameter {c['min_gate_gradient']:.2e}.",
        "",
        "| after conversion, same batches and lr schedule | steps | final test accuracy | best test accuracy |",
        "|---|---|---|---|",
    ]
    for arm in ("mamba2_continued", "meta_mamba2_finetuned"):
        lines.append(f"| {arm} | {f[arm]['steps']} | {f[arm]['accuracy']:.4f} | {f[arm]['best_accuracy']:.4f} |")
    plain, meta = result["curves"]["mamba2_continued"], result["curves"]["meta_mamba2_finetuned"]
    gap = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(plain, meta))
    lines += ["",
              "Final accuracy, Meta-Mamba2 minus Mamba2: "
              f"{f['meta_mamba2_finetuned']['accuracy'] - f['mamba2_continued']['accuracy']:+.4f}; "
              f"largest gap along the fine-tuning curves: {gap:.4f} (one test set of "
              f"{result['settings']['num_test']} examples, one seed).",
              f"Mean gate factor softplus(c) of the Meta-Mamba2: {meta[0]['gate_factor']:.2e} at conversion, "
              f"{meta[-1]['gate_factor']:.2e} after fine-tuning "
              f"(gate lr x{result['settings']['gate_lr_multiplier']:g}, "
              f"scale lr x{result['settings']['scale_lr_multiplier']:g} of the fine-tuning lr)."]
    lines += ["", "Relative logits change after conversion, by initial gate scale c (random tokens):", "",
              "| c | softplus(c) | relative change |", "|---|---|---|"]
    for row in c["scale_sweep"]:
        lines.append(f"| {row['importance_scale']} | {row['softplus']:.2e} | {row['relative_logits_change']:.2e} |")
    lines += ["", "Curves: `curves.png`; every number: `convert_evidence.json` (written by the command above)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, value in asdict(Settings()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", default="runs/convert", help="output folder (default: runs/convert)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    test = mqar_batch(s.num_test, s, seed=10_000_000 + s.seed)  # test seeds never used for training

    # phase 1: the Mamba2 (warmup then constant lr) until its accuracy plateaus
    torch.manual_seed(s.seed)
    mamba2 = MetaMamba2ForCausalLM(MetaMamba2Config(**mamba2_config(s), metaplasticity=False)).train()
    opt = make_optimizer(mamba2.named_parameters(), s, s.lr)
    pretrain = train_steps(mamba2, opt, s, s.max_pretrain_steps, data_seed=s.seed * 1_000_003,
                           lr_factor=lambda i: min(1.0, (i + 1) / s.warmup_steps), test=test, log_name="pretrain",
                           stop_on_plateau=True)
    step0 = pretrain[-1]["step"]
    stop = "plateau" if step0 < s.max_pretrain_steps else "max_pretrain_steps reached"
    moments = moments_by_name(mamba2, opt)

    # conversion, through a transformers Mamba2ForCausalLM
    hf, meta = convert_through_transformers(mamba2.eval(), s)
    change_random = relative_logits_change(hf, meta, s.vocab_size, length=s.seq_len)
    with torch.no_grad():
        ref, got = hf(test[0][:64]).logits.double(), meta(test[0][:64], use_cache=False).logits.double()
    change_mqar = float((got - ref).abs().max() / ref.abs().max())
    grads = gate_gradients(meta.train(), mqar_batch(s.batch_size, s, seed=20_000_000 + s.seed)[0])
    sweep = []
    for c in (-20.0, -16.0, -12.0, -10.0, -8.0, -6.0, -4.0):
        probe = mamba2_to_meta_mamba2(hf, importance_scale=c, seed=s.seed)
        sweep.append(dict(importance_scale=c, softplus=float(F.softplus(torch.tensor(c))),
                          relative_logits_change=relative_logits_change(hf, probe, s.vocab_size, length=s.seq_len)))
    conversion = dict(step=step0, importance_scale=meta.config.importance_scale_init,
                      accuracy_before=pretrain[-1]["accuracy"],
                      accuracy_after=accuracy(meta, *test), relative_logits_change_random_tokens=change_random,
                      relative_logits_change_mqar=change_mqar, min_gate_gradient=min(grads.values()),
                      max_gate_gradient=max(grads.values()), scale_sweep=sweep)
    print(f"[convert] {json.dumps({k: v for k, v in conversion.items() if k != 'scale_sweep'})}", flush=True)

    # phase 2: both arms, same batches, same cosine schedule, phase-1 moments for the shared parameters
    def cosine(i):
        return 0.5 * (1 + math.cos(math.pi * i / s.finetune_steps))

    curves, final = {"pretrain": pretrain}, {}
    data_seed = s.seed * 1_000_003 + 500_000
    for arm, model in (("mamba2_continued", mamba2), ("meta_mamba2_finetuned", meta)):
        model.train()
        optimizer = make_optimizer(model.named_parameters(), s, s.finetune_lr, s.finetune_lr * s.gate_lr_multiplier,
                                   s.finetune_lr * s.scale_lr_multiplier)
        load_moments(model, optimizer, moments)
        curves[arm] = train_steps(model, optimizer, s, s.finetune_steps, data_seed=data_seed, lr_factor=cosine,
                                  test=test, log_name=arm, start_step=step0)
        final[arm] = dict(steps=s.finetune_steps, accuracy=curves[arm][-1]["accuracy"],
                          best_accuracy=max(p["accuracy"] for p in curves[arm]))

    result = dict(command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  settings=asdict(s), pretrain_stop=stop, conversion=conversion, final=final, curves=curves,
                  wall_seconds=time.time() - t_start, torch=torch.__version__,
                  machine=f"{platform.machine()} CPU, {args.threads} threads")
    write_atomically(os.path.join(args.out, "convert_evidence.json"), json.dumps(result, indent=1).encode())
    write_atomically(os.path.join(args.out, "README.md"), summary_markdown(result).encode())
    plot(result, os.path.join(args.out, "curves.png"))
    print(summary_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
