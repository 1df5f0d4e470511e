"""palimpsa.bench.ncu_summary on an excerpt of a real ncu details page (H200, 760M-like: the forward's chunk-state
kernel, in microseconds, and the reverse sweep, in milliseconds)."""

from pathlib import Path

import pytest

from palimpsa.bench import ncu_summary

EXCERPT = Path(__file__).parent / "data" / "ncu_details_excerpt.txt"
ELEMENTS = 4 * 4096 * 16 * 96 * 192


def test_parse_reads_every_launch_and_its_metrics():
    launches = ncu_summary.parse(EXCERPT.read_text())
    assert [launch.name for launch in launches] == ["chunk_states_kernel", "unit_bwd_gluon_kernel"]
    states, sweep = launches
    assert states.grid == "(3, 3, 64)" and sweep.block == "(32, 1, 1)"
    assert ncu_summary.duration_ms(states) == pytest.approx(0.5555, abs=5e-3)  # printed in us
    assert ncu_summary.duration_ms(sweep) == pytest.approx(29.83, abs=0.01)  # printed in ms
    assert sweep.metrics["Registers Per Thread"] == 255
    assert sweep.metrics["Local Memory Spilling Requests"] == 371_610_624
    assert sweep.fp32 == 2_516_582_400 + 4_671_783_936
    assert "L1TEX" in sweep.stall
    assert states.metrics["SM Frequency"] == pytest.approx(1.77)
    assert sweep.metrics["SM Frequency"] == pytest.approx(1.98)
    assert states.fp32 != sweep.fp32 and "L1TEX" in states.stall  # each launch keeps its own paragraphs


def test_row_gives_per_element_token_costs():
    sweep = ncu_summary.parse(EXCERPT.read_text())[1]
    row = ncu_summary.row(sweep, ELEMENTS)
    assert row["instr_per_element"] == pytest.approx(32 * 13_297_569_792 / ELEMENTS)
    assert row["fp32_per_element"] == pytest.approx(47.6, abs=0.05)
    # issuing one instruction per scheduler and cycle: 4 schedulers x 132 SMs at ncu's measured 1.98 GHz
    assert row["issue_floor_ms"] == pytest.approx(1e3 * 13_297_569_792 / (4 * 132 * 1.98e9))
    states = ncu_summary.row(ncu_summary.parse(EXCERPT.read_text())[0], ELEMENTS)
    assert states["issue_floor_ms"] == pytest.approx(1e3 * 100_136_448 / (4 * 132 * 1.77e9))
    assert "| `unit_bwd_gluon_kernel` |" in ncu_summary.table([row])


def test_main_prints_the_table_and_rejects_bad_input(tmp_path, capsys):
    assert ncu_summary.main([str(EXCERPT), "--shape", "760M-like"]) == 0
    out = capsys.readouterr().out
    assert "4.832e+09 element-tokens" in out and "unit_bwd_gluon_kernel" in out
    with pytest.raises(SystemExit):
        ncu_summary.main([str(EXCERPT), "--shape", "1B-like"])
    assert "--shape" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("no kernels here\n")
    with pytest.raises(SystemExit):
        ncu_summary.main([str(empty), "--shape", "760M-like"])
    assert "no kernel launch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncu_summary.main([str(tmp_path / "missing.txt"), "--shape", "760M-like"])
    assert "no such file" in capsys.readouterr().err
    odd = tmp_path / "odd_unit.txt"
    odd.write_text(EXCERPT.read_text().replace("Duration                         us",
                                               "Duration                  fortnight"))
    with pytest.raises(SystemExit):
        ncu_summary.main([str(odd), "--shape", "760M-like"])
    assert "unknown unit 'fortnight'" in capsys.readouterr().err


def test_any_kernel_name_starts_a_launch():
    text = EXCERPT.read_text().replace("  unit_bwd_gluon_kernel (48", "  void at::native::kernel<float, 4>(float*) (48")
    names = [launch.name for launch in ncu_summary.parse(text)]
    assert names == ["chunk_states_kernel", "void at::native::kernel<float, 4>(float*)"]
