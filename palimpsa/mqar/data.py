"""Multi-query associative recall (MQAR) data, with the semantics of Zoology's generator.

Zoology (Arora, Eyuboglu et al., "Zoology: measuring and improving recall in efficient language
models", 2023) defines the task; this is an independent, vectorised re-implementation of its
``multiquery_ar`` with the same layout::

    vocab:   token 0 = filler, keys in [1, V/2), values in [V/2, V)
    context: k_1 v_1 k_2 v_2 ... k_n v_n        (n = num_kv_pairs distinct keys and distinct values)
    queries: after the context, slot j (j = 0 .. S-1, S = (L - 2n) // 2) is the even offset 2n + 2j; n of the
             S slots are drawn without replacement with probability proportional to (j+1) ** (power_a - 1) and
             key i is placed in the i-th drawn slot
    sequence (length L + 1) -> inputs = seq[:-1], labels = seq[1:] with -100 everywhere except at
             the position of each queried key, whose label is that key's value

Sampling "without replacement" is done exactly, in parallel over examples: uniform draws by redrawing
repeats (see _distinct_uniform_draws), weighted ones by the Gumbel-top-n trick (the same distribution, order
included, as drawing one slot at a time as ``numpy.random.choice(replace=False, p=...)`` does).
The random stream differs from Zoology's, so the examples differ; the distribution does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# Examples per block of the weighted draws: bounds their memory (block * number of query slots).
_BLOCK = 4096


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_task(vocab_size: int, input_seq_len: int, num_kv_pairs: int) -> None:
    """Raise ValueError unless (vocab_size, input_seq_len, num_kv_pairs) is a valid MQAR setting.

    Zoology's conditions: L even, V > L, and 4 n <= L (the context takes 2n tokens and every key needs a
    distinct query slot among the (L - 2n) / 2 that follow).
    """
    _check_int("vocab_size", vocab_size, 4)
    _check_int("input_seq_len", input_seq_len, 4)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size must be larger than input_seq_len ({input_seq_len}), got {vocab_size}")
    if 4 * num_kv_pairs > input_seq_len:
        raise ValueError(
            f"num_kv_pairs must satisfy 4 * num_kv_pairs <= input_seq_len ({input_seq_len}), got {num_kv_pairs}"
        )
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(f"num_kv_pairs ({num_kv_pairs}) exceeds the {vocab_size // 2 - 1} available keys")


def query_slot_probabilities(num_slots: int, power_a: float) -> torch.Tensor:
    """Zoology's power law over query slots: p_j proportional to (j+1) ** (power_a - 1).

    Returns: [num_slots] float64 summing to 1 (small j, i.e. queries close to the context, are likeliest).
    """
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    p = power_a * torch.arange(1, num_slots + 1, dtype=torch.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct_uniform_draws(num_examples: int, population: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Ordered draws of ``size`` distinct items of range(population), uniform over all such tuples.

    Draw with replacement, then redraw every repeat (all but the earliest position of each repeated
    value) until no row has a repeat.  The procedure commutes with any relabelling of the population and
    always ends with distinct items, so its result is uniform over ordered distinct tuples: the same law
    as ``numpy.random.choice(population, size, replace=False)``.  Cost O(N size log size), whatever the
    population.

    Returns: [num_examples, size] int64.
    """
    draws = torch.randint(population, (num_examples, size), generator=gen)
    rows = torch.arange(num_examples)  # rows that may still hold a repeat
    while rows.numel():
        block = draws[rows]
        ordered, order = torch.sort(block, dim=1, stable=True)  # equal values keep their position order
        repeat_sorted = torch.zeros_like(ordered, dtype=torch.bool)
        repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
        count = int(repeat.sum())
        if count == 0:
            break
        block[repeat] = torch.randint(population, (count,), generator=gen)
        draws[rows] = block
        rows = rows[repeat.any(dim=1)]
    return draws


def _weighted_draws(num_examples: int, log_weights: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Ordered draws of ``size`` distinct items with probabilities proportional to exp(log_weights).

    Gumbel-top-k: the top ``size`` of log_weights + Gumbel noise, in decreasing order, have the law of
    drawing one item at a time without replacement (``numpy.random.choice(replace=False, p=...)``).
    log_weights: [population].  Returns: [num_examples, size] int64.
    """
    out = torch.empty(num_examples, size, dtype=torch.int64)
    for start in range(0, num_examples, _BLOCK):
        stop = min(start + _BLOCK, num_examples)
        u = torch.rand(stop - start, log_weights.numel(), generator=gen, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # u in [0, 1): keep the logs finite
        out[start:stop] = torch.topk(log_weights + gumbel, size, dim=1, sorted=True).indices
    return out


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples (deterministic given ``seed``).

    Args:
        vocab_size: V; keys come from [1, V/2), values from [V/2, V), 0 is the filler token.
        num_examples: N.
        input_seq_len: L (even, < V).
        num_kv_pairs: n key-value pairs per example (4 n <= L).
        seed: seed of the generator's own random stream.
        power_a: power-law exponent of the query placement (Zoology's default 0.01).
        random_non_queries: replace the filler tokens by uniform random tokens of [0, V) (Zoology's
            option; off here, as in the protocol, so 0 is the filler).

    Returns:
        inputs: [N, L] int64; labels: [N, L] int64, -100 except at the n query positions of each row,
        where the label is the queried key's value.
    """
    check_task(vocab_size, input_seq_len, num_kv_pairs)
    _check_int("num_examples", num_examples, 1)
    _check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    n, L = num_kv_pairs, input_seq_len
    half = vocab_size // 2
    context = 2 * n
    num_slots = (L - context) // 2

    keys = 1 + _distinct_uniform_draws(num_examples, half - 1, n, gen)  # [N, n] in [1, V/2)
    values = half + _distinct_uniform_draws(num_examples, vocab_size - half, n, gen)  # [N, n] in [V/2, V)
    log_p = query_slot_probabilities(num_slots, power_a).log()
    slots = _weighted_draws(num_examples, log_p, n, gen)  # [N, n] query slots

    seq = torch.zeros(num_examples, L + 1, dtype=torch.int64)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    query_pos = context + 2 * slots  # position of each queried key in the (L+1)-long sequence
    seq.scatter_(1, query_pos, keys)
    target = torch.full((num_examples, L + 1), IGNORE_INDEX, dtype=torch.int64)
    target.scatter_(1, query_pos + 1, values)  # the value is the token that should follow its key

    inputs, labels = seq[:, :-1].contiguous(), target[:, 1:].contiguous()
    if random_non_queries:
        noise = torch.randint(vocab_size, inputs.shape, generator=gen)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, labels


@dataclass(frozen=True)
class MQARSplits:
    """Train, validation and test sets of one setting: each (inputs [N, L], labels [N, L]) int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def split_seeds(seed: int) -> tuple[int, int, int]:
    """Distinct generator seeds of the train, validation and test sets of data seed ``seed``."""
    _check_int("seed", seed, 0)
    return 3 * seed + 1, 3 * seed + 2, 3 * seed + 3


def make_splits(
    vocab_size: int,
    input_seq_len: int,
    num_kv_pairs: int,
    num_train: int,
    num_validation: int,
    num_test: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> MQARSplits:
    """Train/validation/test sets drawn from three different seeds derived from ``seed`` (see split_seeds)."""
    seeds = split_seeds(seed)
    sizes = (num_train, num_validation, num_test)
    parts = [
        multiquery_ar(vocab_size, size, input_seq_len, num_kv_pairs, s, power_a, random_non_queries)
        for size, s in zip(sizes, seeds)
    ]
    return MQARSplits(*parts)
