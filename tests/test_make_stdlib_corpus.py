"""scripts/make_stdlib_corpus.py: the README's corpus command works on a fresh clone (its folder is created)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_the_corpus_into_a_new_folder(tmp_path):
    out = tmp_path / "corpus" / "stdlib.jsonl"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_stdlib_corpus.py"), str(out),
                           "--max-files", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line)["text"] for line in lines)
    assert json.loads(done.stdout)["documents"] == 3
    assert os.listdir(out.parent) == ["stdlib.jsonl"]
