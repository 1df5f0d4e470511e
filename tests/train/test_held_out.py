"""Held-out loss in the trainer: fixed packs of eval_data, ``val_loss`` at eval steps and at the stop."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from palimpsa.train import TrainConfig, train
from palimpsa.train.cli import add_parser, config_from_args
from palimpsa.train.data import DocumentSource, PackedStream, collate_packs, held_out_packs, make_encoder
from palimpsa.train.metrics import read_metrics
from palimpsa.train.models import padded_vocab_size
from palimpsa.train.tokenizer import byte_level_tokenizer
from tests.train.corpus import stand_in_config, write_corpus
from tests.train.tiny_model import tiny_factory


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A held-out corpus written with another seed than the training one."""
    return write_corpus(str(tmp_path_factory.mktemp("held_out")), seed=1)


def test_held_out_packs_are_the_first_packs_and_never_repeat(held_out):
    encode = make_encoder(byte_level_tokenizer())
    packs = held_out_packs(DocumentSource([held_out]), encode, 32, 4)
    stream = PackedStream(DocumentSource([held_out]), encode, 32)
    for pack in packs:
        expected = stream.next_pack()
        assert pack.tokens.tolist() == expected.tokens.tolist() and pack.seq_lengths == expected.seq_lengths
    total = sum(len(encode(text)) for text in DocumentSource([held_out]).documents())
    assert len(held_out_packs(DocumentSource([held_out]), encode, 32, total // 32)) == total // 32
    with pytest.raises(ValueError, match="fewer than"):
        held_out_packs(DocumentSource([held_out]), encode, 32, total // 32 + 1)


def test_val_loss_is_logged_at_eval_steps_and_at_the_stop_and_matches_the_saved_weights(corpus, held_out,
                                                                                       tmp_path):
    config = stand_in_config(corpus, tmp_path / "run", max_steps=5, log_every=4, eval_data=[held_out],
                             eval_every=2, eval_packs=3)
    train(config, model_factory=tiny_factory)
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [2, 4, 5]
    assert all("val_loss" in r and r["eval_s"] >= 0 for r in records)
    assert len({r["val_loss"] for r in records}) == 3  # the weights changed between evaluations

    # The last val_loss is the mean next-token loss of the final weights over the first 3 held-out packs.
    tokenizer = byte_level_tokenizer()
    model = tiny_factory(padded_vocab_size(len(tokenizer)))
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"])
    batch = collate_packs(held_out_packs(DocumentSource([held_out]), make_encoder(tokenizer), 32, 3))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens).logits
    expected = F.cross_entropy(logits[0], batch.targets[0], ignore_index=-100).item()
    assert records[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_without_eval_every_val_loss_is_logged_only_at_the_stop(corpus, held_out, tmp_path):
    config = stand_in_config(corpus, tmp_path / "run", max_steps=4, log_every=2, eval_data=[held_out],
                             eval_packs=2)
    train(config, model_factory=tiny_factory)
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [(r["step"], "val_loss" in r) for r in records] == [(2, False), (4, True)]


def test_held_out_options_check_their_values(corpus, held_out, tmp_path):
    with pytest.raises(ValueError, match="eval_every=3 needs eval_data"):
        stand_in_config(corpus, tmp_path, eval_every=3)
    with pytest.raises(ValueError, match="eval_packs must be a positive integer"):
        stand_in_config(corpus, tmp_path, eval_data=[held_out], eval_packs=0)
    with pytest.raises(ValueError, match="eval_every must be a non-negative integer"):
        stand_in_config(corpus, tmp_path, eval_data=[held_out], eval_every=-1)
    with pytest.raises(ValueError, match="eval_data must be a list of strings"):
        TrainConfig(data=[corpus], eval_data=held_out)
    too_many = stand_in_config(corpus, tmp_path / "run", eval_data=[held_out], eval_packs=10_000)
    with pytest.raises(ValueError, match="fewer than 10000 packs"):
        train(too_many, model_factory=tiny_factory)


def test_cli_takes_several_eval_data_entries(corpus, held_out):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", corpus, "--eval-data", held_out, corpus, "--eval-every", "5",
                              "--eval-packs", "7"])
    config = config_from_args(args)
    assert config.eval_data == [held_out, corpus] and config.eval_every == 5 and config.eval_packs == 7


def test_cli_compiles_blocks_unless_told_not_to(corpus):
    """Compiled blocks are the trainer's default (they act on CUDA only); --no-compile turns them off."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["train", "--data", corpus])).compile is True
    assert config_from_args(parser.parse_args(["train", "--data", corpus, "--no-compile"])).compile is False
