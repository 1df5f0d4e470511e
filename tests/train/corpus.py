"""A small deterministic text corpus written to disk for training tests."""

from __future__ import annotations

import json
import os
import random

WORDS = ("memory importance prior forgetting attention state key value query gate decay posterior "
         "mean precision token sequence document pack boundary loss step").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def write_corpus(directory: str, seed: int = 0, text_files: int = 3, jsonl_records: int = 8) -> str:
    """``text_files`` .txt documents and one .jsonl of ``jsonl_records`` documents of varied lengths."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for index in range(text_files):
        with open(os.path.join(directory, f"doc{index}.txt"), "w", encoding="utf-8") as handle:
            handle.write(" ".join(sentence(rng) for _ in range(rng.randint(1, 6))))
    with open(os.path.join(directory, "more.jsonl"), "w", encoding="utf-8") as handle:
        for _ in range(jsonl_records):
            handle.write(json.dumps({"text": " ".join(sentence(rng) for _ in range(rng.randint(1, 4))),
                                     "id": rng.random()}) + "\n")
    return directory


def stand_in_config(data_dir, out_dir, **overrides):
    """A TrainConfig for the tests' stand-in model on the CPU: no progress bar, no export; ``overrides`` win."""
    from palimpsa.train import TrainConfig

    values = dict(model="stand-in", data=[str(data_dir)], seq_len=32, batch_size=2, grad_accum=1, max_steps=6,
                  lr=3e-3, warmup_steps=2, log_every=1, out_dir=str(out_dir), progress=False, device="cpu",
                  export_hf=False)
    values.update(overrides)
    return TrainConfig(**values)
