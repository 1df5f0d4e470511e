"""``palimpsa bench cpu``: every implementation timed, the table and its numbers written side by side."""

from __future__ import annotations

import json

from palimpsa.bench import cpu


def test_cpu_bench_times_every_path_and_writes_both_files(tmp_path, capsys):
    assert cpu.main(["--shape", "1", "16", "1", "4", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert set(record["results"]) == {"chunk", "chunk_g1", "chunk_notpalimpsa", "loop"}
    assert all(r["median_s"] > 0 for r in record["results"].values())
    table = (tmp_path / "cpu_bench.md").read_text()
    assert all(f"| {name} |" in table for name in record["results"]) and "loop / this" in table
    assert "speed-up" in capsys.readouterr().out


def test_one_implementation_writes_nothing(tmp_path):
    assert cpu.main(["--impl", "chunk_g1", "--shape", "1", "16", "1", "4", "4", "--repeats", "1",
                     "--out", str(tmp_path)]) == 0
    assert not list(tmp_path.iterdir())  # a single timing (for whole-process timers) leaves no table
