"""The MQAR generator: a hand-checked example, Zoology's invariants, determinism, the sampling laws."""

import math

import pytest
import torch

from palimpsa.mqar.data import (IGNORE_INDEX, check_task, make_splits, multiquery_ar, query_slot_probabilities,
                                split_seeds)


def test_hand_checked_example():
    # V = 32: keys in [1, 16), values in [16, 32); L = 16, 3 pairs -> context of 6 tokens, query slots at 6..14
    inputs, labels = multiquery_ar(vocab_size=32, num_examples=2, input_seq_len=16, num_kv_pairs=3, seed=0)
    # row 0: pairs 15->19, 10->23, 9->25; queries 10 at 6, 9 at 8, 15 at 10 (checked by hand)
    assert inputs.tolist() == [[15, 19, 10, 23, 9, 25, 10, 0, 9, 0, 15, 0, 0, 0, 0, 0],
                               [1, 19, 14, 21, 10, 18, 14, 0, 10, 0, 1, 0, 0, 0, 0, 0]]
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, x, x, x, 23, x, 25, x, 19, x, x, x, x, x],
                               [x, x, x, x, x, x, 21, x, 18, x, 19, x, x, x, x, x]]


@pytest.mark.parametrize("V,L,n", [(64, 32, 8), (8192, 128, 16), (100, 64, 1)])
def test_zoology_invariants(V, L, n):
    inputs, labels = multiquery_ar(V, 64, L, n, seed=3)
    assert inputs.shape == labels.shape == (64, L) and inputs.dtype == labels.dtype == torch.int64
    context = 2 * n
    keys, values = inputs[:, 0:context:2], inputs[:, 1:context:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(inputs.shape[0]):
        k, v = keys[row].tolist(), values[row].tolist()
        assert len(set(k)) == n and len(set(v)) == n  # distinct keys, distinct values
        rest = inputs[row, context:]
        query_pos = (rest != 0).nonzero()[:, 0] + context
        # every key is queried exactly once, at an even offset after the context; everything else is filler 0
        assert sorted(inputs[row, query_pos].tolist()) == sorted(k)
        assert ((query_pos - context) % 2 == 0).all()
        # labels only at the query positions, each the value paired with the queried key
        assert (labels[row] != IGNORE_INDEX).nonzero()[:, 0].tolist() == query_pos.tolist()
        pair = dict(zip(k, v))
        assert labels[row, query_pos].tolist() == [pair[key] for key in inputs[row, query_pos].tolist()]
    # no labels in the context
    assert (labels[:, :context] == IGNORE_INDEX).all()


def test_deterministic_per_seed_and_splits_differ():
    a = multiquery_ar(256, 50, 64, 8, seed=7)
    b = multiquery_ar(256, 50, 64, 8, seed=7)
    c = multiquery_ar(256, 50, 64, 8, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    seeds = split_seeds(5)
    assert len(set(seeds)) == 3 and not set(seeds) & set(split_seeds(6))
    splits = make_splits(256, 64, 8, 20, 10, 10, seed=5)
    assert torch.equal(splits.test[0], multiquery_ar(256, 10, 64, 8, seed=seeds[2])[0])
    assert not torch.equal(splits.train[0][:10], splits.test[0])


def test_random_non_queries_fills_only_filler():
    plain, labels = multiquery_ar(256, 20, 64, 8, seed=1)
    noisy, labels2 = multiquery_ar(256, 20, 64, 8, seed=1, random_non_queries=True)
    assert torch.equal(labels, labels2)
    kept = plain != 0
    assert torch.equal(noisy[kept], plain[kept]) and (noisy[~kept] != 0).float().mean() > 0.9


def test_query_slots_follow_the_power_law():
    # one pair per example: the slot of its query is a single weighted draw
    L, N, a = 24, 40_000, 0.5
    inputs, _ = multiquery_ar(64, N, L, 1, seed=0, power_a=a)
    slots = ((inputs[:, 2:] != 0).nonzero()[:, 1] // 2)
    freq = torch.bincount(slots, minlength=(L - 2) // 2).double() / N
    expected = query_slot_probabilities((L - 2) // 2, a)
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / N))


def test_keys_are_uniform():
    N = 20_000
    inputs, _ = multiquery_ar(16, N, 8, 2, seed=0)  # keys: 2 distinct of [1, 8)
    first, second = inputs[:, 0], inputs[:, 2]
    for column in (first, second):
        freq = torch.bincount(column, minlength=8)[1:].double() / N
        assert torch.allclose(freq, torch.full_like(freq, 1 / 7), atol=4 * math.sqrt(0.25 / N))
    pairs = torch.bincount((first - 1) * 7 + (second - 1), minlength=49).view(7, 7).double() / N
    off_diagonal = pairs[~torch.eye(7, dtype=torch.bool)]
    assert pairs.diagonal().sum() == 0
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, 1 / 42), atol=4 * math.sqrt(0.25 / N))


@pytest.mark.parametrize("V,L,n,match", [(64, 31, 4, "even"), (64, 64, 4, "larger"), (256, 64, 17, "4 \\*"),
                                         (256, 64, 0, ">= 1")])
def test_bad_settings_raise(V, L, n, match):
    with pytest.raises(ValueError, match=match):
        check_task(V, L, n)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="num_examples"):
        multiquery_ar(256, 2.5, 64, 8, seed=0)
    with pytest.raises(ValueError, match="power_a"):
        multiquery_ar(256, 2, 64, 8, seed=0, power_a=0.0)
