"""A saved model loads through transformers' Auto classes in a fresh interpreter without ``import palimpsa``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from palimpsa.models import (GatedDeltaNetForCausalLM, GatedDeltaNetLMConfig, MetaMamba2Config, MetaMamba2ForCausalLM,
                             PalimpsaConfig, PalimpsaForCausalLM)
from palimpsa.models.auto_module import MODULE_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# In a fresh interpreter that never imports palimpsa itself: first without trust_remote_code (transformers must
# refuse and say what to pass), then with it (the model loads and gives the saved model's logits).
LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
report = {}
for folder in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    report[folder] = {"refusal": refusal}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    torch.save(logits, folder + ".logits.pt")
    report[folder]["class"] = type(model).__module__ + "." + type(model).__name__
print("REPORT", json.dumps(report))
"""


def test_auto_classes_load_saved_models_without_import_palimpsa(tmp_path):
    torch.manual_seed(0)
    models = {
        "palimpsa": PalimpsaForCausalLM(PalimpsaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                       num_heads=2, head_dim=8, hidden_ratio=2)),
        "meta_mamba2": MetaMamba2ForCausalLM(MetaMamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                              num_heads=4, head_dim=16, state_size=8, expand=2,
                                                              n_groups=1)),
        "gated_deltanet": GatedDeltaNetForCausalLM(GatedDeltaNetLMConfig(vocab_size=64, hidden_size=32,
                                                                         num_hidden_layers=1, num_heads=2, head_dim=8,
                                                                         hidden_ratio=2)),
    }
    folders = {}
    for name, model in models.items():
        folders[name] = str(tmp_path / name)
        model.eval().save_pretrained(folders[name])
        assert os.path.isfile(os.path.join(folders[name], f"{MODULE_NAME}.py"))
        assert [p for p in os.listdir(folders[name]) if p.startswith(".")] == []  # no temporary left
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", LOAD, *folders.values()], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.rpartition("REPORT ")[2])  # transformers' refused prompt precedes it
    for name, model in models.items():
        got = report[folders[name]]
        assert got["refusal"] is not None and "trust_remote_code=True" in got["refusal"]
        assert got["class"] == f"{type(model).__module__}.{type(model).__name__}"
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        torch.testing.assert_close(torch.load(folders[name] + ".logits.pt"), expected)
