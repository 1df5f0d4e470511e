"""The summary of ncu's source page (palimpsa.bench.ncu_source) on small hand-made pages."""

import gzip

import pytest

from palimpsa.bench import ncu_source

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_selected",'
          '"stall_wait","stall_short_sb","stall_wait (Not Issued)"')
ROWS = [
    '"0x10","      FFMA R1, R2, R3, R4","10","300","4","2","4","2"',
    '"0x20","@!P0   FFMA.FTZ R5, R1, R3, R4","5","100","1","0","4","0"',
    '"0x30","      LDS.128 R8, [R9]","5","100","0","5","0","5"',
    '"0x40","      MUFU.RCP R6, R5","0","","-","-","-","-"',
]


def write(tmp_path, lines, name="page.csv", gz=False):
    text = "\n".join(['"Kernel Name","palimpsa_sweep",""', *lines]) + "\n"
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_shares_and_opcodes(tmp_path, gz):
    instructions = ncu_source.read_source_page(write(tmp_path, [HEADER, *ROWS], gz=gz))
    assert [i.opcode for i in instructions] == ["FFMA", "FFMA", "LDS", "MUFU"]
    # 20 samples: selected 5, wait 7, short_sb 8; the (Not Issued) column is a subset and not counted
    assert ncu_source.reason_shares(instructions) == {"short_sb": 0.4, "wait": 0.35, "selected": 0.25}
    rows = ncu_source.by_opcode(instructions)
    assert [r["opcode"] for r in rows] == ["FFMA", "LDS", "MUFU"]
    assert rows[0]["executed"] == pytest.approx(0.8) and rows[0]["samples"] == pytest.approx(0.75)
    assert rows[0]["stalls"] == {"selected": 5, "wait": 2, "short_sb": 8}
    text = ncu_source.report(instructions, top=2)
    assert "| FFMA | 80.0% | 75.0% | short_sb 53%, wait 13% |" in text
    assert "| `FFMA R1, R2, R3, R4` | 50.00% | 300 | short_sb 40%, wait 20% |" in text
    assert "LDS.128" not in text.split("| instruction |")[1]  # only the top 2 instructions are listed


def test_bad_pages_are_refused_with_the_reason(tmp_path):
    cases = [
        ([ '"a","b"', '"1","2"'], "not an ncu source page"),
        (['"Address","Source","Instructions Executed"', '"0x10","FFMA","1"'], "no stall_\\* columns"),
        ([HEADER, '"0x10","FFMA R1","1"'], "line 3: 3 fields where the header has 8"),
        ([HEADER, '"0x10","FFMA R1","1","x","0","0","0","0"'], "line 3: a number was expected"),
        ([HEADER], "no instruction rows"),
    ]
    for lines, message in cases:
        with pytest.raises(ValueError, match=message):
            ncu_source.read_source_page(write(tmp_path, lines))
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        ncu_source.read_source_page(broken)


def test_cli(tmp_path, capsys):
    assert ncu_source.main([str(write(tmp_path, [HEADER, *ROWS])), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| stall reason | share of samples |") and "| short_sb | 40.0% |" in out
    with pytest.raises(SystemExit) as exit_info:
        ncu_source.main([str(tmp_path / "missing.csv")])
    assert exit_info.value.code == 2 and "missing.csv" in capsys.readouterr().err
