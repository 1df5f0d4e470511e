"""MQAR models with grouped importance (``palimpsa_g<G>``, ``meta_mamba2_g<G>``): names, configs, state sizes,
records and the report's G column."""

import argparse

import pytest
import torch

from palimpsa.mqar.cli import add_parser, build_grid
from palimpsa.mqar.models import MQARModel, MQARModelConfig, parse_model_name, recurrent_state_bytes
from palimpsa.mqar.report import format_table, summarize
from palimpsa.mqar.train import RunConfig, run_id, train_run

TINY = dict(vocab_size=64, d_model=16, num_heads=2)  # K = 8, V = 16 per head


def test_parse_model_name():
    assert parse_model_name("palimpsa") == ("palimpsa", None)
    assert parse_model_name("notpalimpsa") == ("notpalimpsa", None)
    assert parse_model_name("palimpsa_g1") == ("palimpsa", 1)
    assert parse_model_name("meta_mamba2_g16") == ("meta_mamba2", 16)
    for bad in ("notpalimpsa_g1", "mamba2_g2", "attention_g4", "palimpsa_g0", "palimpsa_g", "palimpsa_gx",
                "palimpsa_g01", "transformer"):
        with pytest.raises(ValueError, match="_g<G>"):
            parse_model_name(bad)


@pytest.mark.parametrize("name, groups", [("palimpsa_g1", 1), ("palimpsa_g4", 4), ("meta_mamba2_g2", 2)])
def test_grouped_models_build_the_layer_with_their_groups(name, groups):
    torch.manual_seed(0)
    config = MQARModelConfig.from_model_name(name, **TINY)
    assert (config.importance_groups, config.groups) == (groups, groups)
    model = MQARModel(config)
    for block in model.blocks:
        assert block.mixer.importance_groups == groups
        assert block.mixer.importance_up_proj.out_features == block.mixer.num_heads * groups
    x = torch.randint(64, (2, 12))
    logits, variance = model(x, output_variance=True)
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all() and (variance > 0).all()
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_plain_name_is_one_gate_per_value_channel():
    config = MQARModelConfig("palimpsa", **TINY)
    assert config.importance_groups is None and config.groups == config.value_dim == 16
    assert MQARModel(config).blocks[0].mixer.importance_groups == 16
    assert MQARModelConfig("notpalimpsa", **TINY).groups is None


def test_bad_importance_groups_raise():
    with pytest.raises(ValueError, match="dividing the value size V"):
        MQARModelConfig.from_model_name("palimpsa_g3", **TINY)
    with pytest.raises(ValueError, match="importance_groups applies to"):
        MQARModelConfig("notpalimpsa", importance_groups=1, **TINY)
    with pytest.raises(ValueError, match="importance_groups"):
        RunConfig(model="palimpsa_g5", seq_len=16, num_kv_pairs=2, d_model=16, num_heads=2)
    with pytest.raises(ValueError, match="model name"):
        RunConfig(model="gla", seq_len=16, num_kv_pairs=2)


@pytest.mark.parametrize("name, expected_entries", [
    ("palimpsa", 2 * 8 * 16 + 2 * 8 * 16),   # mu [H, K, V] and I [H, K, V]
    ("palimpsa_g4", 2 * 8 * 16 + 2 * 8 * 4),  # I constant in each of 4 groups: [H, K, 4]
    ("palimpsa_g1", 2 * 8 * 16 + 2 * 8),      # one importance per head and key
    ("notpalimpsa", 2 * 8 * 16),
    ("meta_mamba2_g2", 2 * 8 * 16 + 2 * 8 * 2),
])
def test_state_bytes_count_the_grouped_importance(name, expected_entries):
    assert recurrent_state_bytes(MQARModelConfig.from_model_name(name, **TINY), seq_len=100) == 4 * expected_entries


def test_the_command_line_takes_grouped_names():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["mqar", "--models", "palimpsa", "palimpsa_g1", "palimpsa_g4", "notpalimpsa"])
    assert [c.model for c in build_grid(args).runs()] == ["palimpsa", "palimpsa_g1", "palimpsa_g4", "notpalimpsa"] * 2
    with pytest.raises(SystemExit):
        parser.parse_args(["mqar", "--models", "notpalimpsa_g1"])


def test_a_grouped_run_records_its_groups_and_its_own_id():
    common = dict(seq_len=16, num_kv_pairs=2, d_model=8, num_heads=2, vocab_size=32, num_train=16, num_validation=8,
                  num_test=8, batch_size=8, epochs=1)
    grouped = RunConfig(model="palimpsa_g1", **common)
    assert run_id(grouped) != run_id(RunConfig(model="palimpsa", **common))
    record = train_run(grouped, progress=False)
    assert record["model"] == "palimpsa_g1" and record["importance_groups"] == 1
    assert record["state_bytes"] == 4 * (2 * 4 * 8 + 2 * 4)
    assert record["variance_auroc"] is None or 0 <= record["variance_auroc"] <= 1  # the variance is scored


def row(model, val, test, groups="absent"):
    r = dict(model=model, seq_len=64, num_kv_pairs=16, d_model=64, lr=1e-2, seed=0, val_accuracy=val,
             test_accuracy=test, state_bytes=1, steps=10, device="cpu", variance_auroc=None,
             config=dict(num_heads=4, d_model=64, head_k_dim=8, head_v_dim=16))
    if groups != "absent":
        r["importance_groups"] = groups
    return r


def test_the_table_says_g_and_orders_the_groups():
    results = [row("notpalimpsa", 0.5, 0.5, None), row("palimpsa_g1", 0.6, 0.6, 1), row("palimpsa_g4", 0.7, 0.7, 4),
               row("palimpsa", 0.8, 0.8)]  # a record from before grouped importance: G = V
    rows = summarize(results)
    assert [r["model"] for r in rows] == ["palimpsa", "palimpsa_g4", "palimpsa_g1", "notpalimpsa"]
    assert [r["importance_groups"] for r in rows] == [16, 4, 1, None]
    table = format_table(rows)
    assert "| palimpsa | 64 | 16 | 64 | 4×8×16 | 16 (= V) |" in table
    assert "| palimpsa_g1 | 64 | 16 | 64 | 4×8×16 | 1 |" in table
    assert "| notpalimpsa | 64 | 16 | 64 | 4×8×16 | — |" in table
