"""``python -m palimpsa.mqar.backend_check``: the op's backends compared inside the MQAR models (Triton through its
interpreter on this CPU), grouped models included."""

import pytest

from palimpsa.mqar.backend_check import compare_backends, main

TINY = dict(seq_len=16, num_kv_pairs=2, batch=1, vocab_size=32, d_model=16, num_heads=2)  # K = 8, V = 16


@pytest.mark.parametrize("name", ["palimpsa_g1", "palimpsa_g4"])
def test_grouped_models_are_checked_training_and_evaluation(name):
    result = compare_backends(name, "cpu", **TINY)
    assert set(result) == {"loss", "grad", "worst_param", "eval"}
    assert max(result["loss"], result["grad"], result["eval"]) < 1e-4


def test_a_bad_model_name_is_refused_before_any_check(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "notpalimpsa_g1", "--device", "cpu"])
    assert "_g<G>" in capsys.readouterr().err
