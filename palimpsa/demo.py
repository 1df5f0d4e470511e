"""``palimpsa demo``: train a tiny byte-level Palimpsa language model on the CPU in under a minute.

The text is generated here (no download): short sentences from a small grammar, so a model that learns
gets visibly better samples.  Shows a progress bar, prints the loss curve's start and end and a greedy
sample from ``generate()``.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from tqdm.auto import tqdm

from palimpsa.train.interrupt import Interrupted, stop_on_interrupt, stop_requested

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "remembers", "forgets"]
OBJECTS = ["the red ball", "a green apple", "the blue house", "an old book", "the quiet river", "a bright star"]
PLACES = ["in the garden", "at night", "by the sea", "near the hill", "after lunch", "in the rain"]


def generate_corpus(num_sentences: int, seed: int = 0) -> str:
    """Sentences 'subject verb object place.' drawn from a fixed grammar."""
    rng = random.Random(seed)
    return " ".join(
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        for _ in range(num_sentences)
    )


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random windows of ``data`` [N] -> input_ids [batch_size, seq_len]."""
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s: s + seq_len] for s in starts.tolist()])


def run_demo(steps: int = 300, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
             metaplasticity: bool = True) -> dict:
    """Train a ~0.3M-parameter byte-level Palimpsa LM; returns first/last loss, seconds and a sample."""
    from palimpsa.models import PalimpsaConfig, PalimpsaForCausalLM

    torch.manual_seed(seed)
    text = generate_corpus(20000, seed=seed)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    config = PalimpsaConfig(vocab_size=256, hidden_size=96, num_hidden_layers=2, num_heads=4, head_dim=24,
                            metaplasticity=metaplasticity, hidden_ratio=2, bos_token_id=None, eos_token_id=None)
    model = PalimpsaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    stream = batches(data, batch_size, seq_len, torch.Generator().manual_seed(seed))
    losses = []
    start = time.time()
    with tqdm(range(steps), desc="demo: training a tiny Palimpsa LM", unit="step") as bar:
        for step in bar:
            if stop_requested():  # Ctrl-C: the demo keeps no checkpoint
                raise Interrupted(f"interrupted at step {step} of {steps}; the demo keeps no checkpoint: run the same "
                                  "command again to start over (--steps sets its length)")
            input_ids = next(stream)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.time() - start
    model.eval()
    prompt = "the old man"
    prompt_ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=60, do_sample=False)
    sample = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    n_params = sum(p.numel() for p in model.parameters())
    return {"first_loss": sum(losses[:10]) / min(10, len(losses)),
            "last_loss": sum(losses[-10:]) / min(10, len(losses)), "seconds": seconds, "sample": sample,
            "parameters": n_params}


def main(args) -> int:
    with stop_on_interrupt():
        result = run_demo(steps=args.steps, seed=args.seed, metaplasticity=not args.no_metaplasticity)
    print(f"parameters: {result['parameters']:,}   time: {result['seconds']:.0f} s")
    print(f"loss (mean of 10 steps): start {result['first_loss']:.3f} -> end {result['last_loss']:.3f}")
    print(f"greedy sample: {result['sample']!r}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny Palimpsa LM on the CPU (under a minute on 2 cores)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of 16 x 128 bytes (default: 300)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the text, the weights and the batches (default: 0)")
    parser.add_argument("--no-metaplasticity", action="store_true", help="the NotPalimpsa ablation")
    parser.set_defaults(func=main)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    raise SystemExit(main(p.parse_args(["demo"])))
