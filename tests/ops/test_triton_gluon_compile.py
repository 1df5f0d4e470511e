"""The Gluon output kernel, compiled for an H100/H200 (sm_90) without a GPU.

Gluon has no CPU interpreter, so what can be checked here is that the kernel compiles, under the pinned Triton
and (through scripts/test.sh) the newest release, and that it keeps the property it was written for: no barrier
and no shared memory, so the sum over K of every token stays inside each warp (the variant that stages each
chunk's q and k rows in shared memory has the staging's few barriers per program, none per token).  The
compiler runs in a subprocess, because this test session interprets every Triton kernel (tests/conftest.py).  Its
numbers are checked on a GPU against the float64 reference and the Triton kernel (scripts/gpu_gluon_fwd_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
gluon_module = pytest.importorskip("palimpsa.ops.triton.chunk_fwd_gluon")

from palimpsa.ops.triton import function  # noqa: E402
from palimpsa.ops.triton.config import CONFIG, StateTuning, kernel_config  # noqa: E402
from palimpsa.ops.triton.utils import k_parts  # noqa: E402

CASES = [(96, 192, False, False), (96, 192, True, True), (48, 48, True, False), (16, 32, False, False)]


def compile_reports(module: str, cases) -> list:
    """``module.compile_report(*case)`` for every case, in a process that compiles instead of interpreting."""
    code = (f"import json\nfrom {module} import compile_report\n"
            f"print(json.dumps([compile_report(*case) for case in {list(cases)!r}]))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports():
    return dict(zip(CASES, compile_reports("palimpsa.ops.triton.chunk_fwd_gluon", CASES)))


@pytest.mark.parametrize("case", CASES)
def test_gluon_output_kernel_compiles_without_barriers_or_shared_memory(reports, case):
    K, V, with_variance, varlen = case
    report = reports[case]
    assert report["shared"] == 0 and report["barriers"] == 0, report
    KA, KB = k_parts(K)
    # one reciprocal per state element a thread holds (a quarter of each column's key rows), per token
    assert report["reciprocals"] == (KA + KB) // gluon_module.LANES_PER_COLUMN.value, report
    # the sums over K: two butterfly shuffles per row part and per sum (o, and the variance when asked for)
    assert report["shuffles"] == 2 * (1 + (KB > 0)) * (1 + with_variance), report


# (K, V, lanes_k, with_variance, arch, kernel, warps, stage, maxnreg, unroll, cols): 760M-like as the op runs it
# (16 lanes of two columns, unroll 4), and 8 lanes of one column with the variance at K = 48
SWEEP_CASES = [(96, 192, 16, False, 90, "sweep", 1, 0, None, 4, 2), (48, 48, 8, True, 90, "sweep", 1, 0, None, 1, 1)]
LOCAL_CASES = [(96, 192, 16, False, 90, "local", 1, 0, None, 1, 2), (48, 48, 16, True, 90, "local", 1, 0, None, 1, 1)]


def test_gluon_sweep_compiles_without_barriers_or_shared_memory():
    """The backward's Gluon kernels: one warp per program, so no reduction of a token may cross warps."""
    reports = compile_reports("palimpsa.ops.triton.chunk_bwd_gluon", SWEEP_CASES + LOCAL_CASES)
    for (K, V, lanes_k, *_, cols), report in zip(SWEEP_CASES, reports):
        assert report["shared"] == 0 and report["barriers"] == 0, report
        KA, KB = k_parts(K)
        # four tokens per sub-block, one reciprocal per state element a thread holds
        assert report["reciprocals"] == 4 * (KA + KB) // lanes_k * cols, report
    # two columns a thread: the sums over V take one butterfly level fewer (246 shuffles against 390 at one column)
    assert reports[0]["shuffles"] < 300, reports[0]
    for (K, V, lanes_k, *_, cols), report in zip(LOCAL_CASES, reports[len(SWEEP_CASES):]):
        # the local-adjoint pass is element-wise: no shuffle either
        assert report["shared"] == 0 and report["barriers"] == 0 and report["shuffles"] == 0, report
        KA, KB = k_parts(K)
        assert report["reciprocals"] == (KA + KB) // lanes_k * cols, report


def test_gluon_output_kernel_with_two_columns_per_thread_compiles():
    """The output kernel as it runs at K = 96 (OUTPUT_TUNED): 8 lanes of two value columns each; still no barrier
    and no shared memory, the same reciprocals per thread, three butterfly levels per sum over K and column."""
    (report,) = compile_reports("palimpsa.ops.triton.chunk_fwd_gluon", [(96, 192, False, False, 90, 2)])
    assert report["shared"] == 0 and report["barriers"] == 0, report
    KA, KB = k_parts(96)
    assert report["reciprocals"] == (KA + KB) // 8 * 2, report
    assert report["shuffles"] == 3 * 2 * 2, report  # 3 levels x 2 columns x 2 row parts


def test_gluon_output_kernel_with_staged_rows_compiles():
    """fwd_inputs at K = 96: the chunk's q and k rows (64 tokens x 96 rows x 2, float32) staged in shared memory
    once, so a few barriers per program (the staging's, not one per token), and every token's arithmetic as
    without: the same reciprocals and shuffles."""
    (report, single) = compile_reports("palimpsa.ops.triton.chunk_fwd_gluon", [(96, 192, False, False, 90, 2, True),
                                                                               (128, 128, False, False, 90, 2, True)])
    assert report["shared"] == 2 * 64 * 96 * 4 and 0 < report["barriers"] <= 4, report
    assert report["reciprocals"] == 96 // 8 * 2 and report["shuffles"] == 3 * 2 * 2, report
    # a token's rows read as 16-byte pieces: q and k, each two of part A (64 rows over 8 lanes, 4 rows a piece,
    # the pieces 32 rows apart so that the 8 lanes of a phase read 128 consecutive bytes) and one of part B
    assert report["shared_vector_loads"] == 2 * (2 + 1), report
    # K = 128 (OUTPUT_TUNED, OUTPUT_INPUTS): one key part of 128 rows, 16 a lane, read as four 16-byte pieces each
    assert single["shared"] == 2 * 64 * 128 * 4 and 0 < single["barriers"] <= 4, single
    assert single["reciprocals"] == 128 // 8 * 2 and single["shuffles"] == 3 * 2, single
    assert single["shared_vector_loads"] == 2 * 4, single


def test_output_rows_per_thread():
    """Staged rows: at most 4 consecutive rows (16 bytes) a thread, so that a phase of 8 lanes reads 128
    consecutive bytes of shared memory without bank conflicts; from global memory, each lane's whole share."""
    assert [gluon_module.rows_per_thread(rows, 8, True) for rows in (64, 32, 16, 0)] == [4, 4, 2, 0]
    assert [gluon_module.rows_per_thread(rows, 8, False) for rows in (64, 32)] == [8, 4]
    assert gluon_module.rows_per_thread(64, 4, True) == 4 and gluon_module.rows_per_thread(64, 4, False) == 16


def test_gluon_sweep_with_several_warps_compiles():
    """Warps side by side over the value columns: the same work per thread (reciprocals), the sums over V
    through shared memory."""
    (report,) = compile_reports("palimpsa.ops.triton.chunk_bwd_gluon", [(96, 192, 8, False, 90, "sweep", 4)])
    KA, KB = k_parts(96)
    assert report["reciprocals"] == 4 * (KA + KB) // 8, report
    assert report["shared"] > 0 and report["barriers"] > 0, report


def test_gluon_sweep_staged_and_capped_compile():
    """bwd_stage = 1 at 760M-like: the four token states of a sub-block in shared memory (4 tokens x (M, P) x K rows
    x 4 columns x 4 bytes), fewer spills than with them in registers (none under Triton 3.6, 72 against 352 bytes
    under 3.9); bwd_stage = 2 also the four sub-block starts of a segment; bwd_maxnreg = 128 holds the registers
    to 128."""
    cases = [(96, 192, 8, False, 90, "sweep", 1, 0), (96, 192, 8, False, 90, "sweep", 1, 1),
             (96, 192, 8, False, 90, "sweep", 1, 1, 128), (96, 192, 8, False, 90, "sweep", 1, 2)]
    plain, staged, capped, starts = compile_reports("palimpsa.ops.triton.chunk_bwd_gluon", cases)
    assert staged["shared"] == 4 * 2 * 96 * 4 * 4 and staged["stack"] < plain["stack"], (staged, plain)
    assert starts["shared"] == 2 * staged["shared"] and starts["reciprocals"] == staged["reciprocals"], starts
    assert staged["reciprocals"] == 4 * 96 // 8, staged
    assert capped["registers"] <= 128, capped


def test_gluon_sweep_block_checks_its_arguments():
    from palimpsa.ops.triton.chunk_bwd_gluon import gluon_sweep_block_v

    assert gluon_sweep_block_v(8) == 4 and gluon_sweep_block_v(8, 4) == 16 and gluon_sweep_block_v(16, 1, 2) == 4
    with pytest.raises(ValueError, match="bwd_warps"):
        gluon_sweep_block_v(8, 3)
    with pytest.raises(ValueError, match="bwd_lanes_k"):
        gluon_sweep_block_v(6)


def test_warps_per_program_follow_the_value_size():
    assert gluon_module.gluon_warps(192) == 4 and gluon_module.gluon_warps(48) == 2
    assert gluon_module.gluon_warps(8) == 1 and gluon_module.gluon_warps(12) == 1


def test_the_forward_backend_is_checked():
    q = torch.zeros(1, 1, 1, 96)
    assert CONFIG.fwd_backend in ("auto", "triton", "gluon", "cuda")
    with pytest.raises(ValueError, match="fwd_backend"):
        with kernel_config(fwd_backend="tpu"):
            pass
    with kernel_config(fwd_backend="cuda"):  # asked for where it cannot run: a clear error, no silent fallback
        with pytest.raises(ValueError, match="NVIDIA GPU only"):
            function.output_kernel(q, 192)
    saved = CONFIG.fwd_backend
    CONFIG.fwd_backend = "tpu"  # as a bad PALIMPSA_FWD_BACKEND would set it
    try:
        with pytest.raises(ValueError, match="PALIMPSA_FWD_BACKEND"):
            function.output_kernel(q)
    finally:
        CONFIG.fwd_backend = saved
    with kernel_config(fwd_backend="gluon"):
        assert function.output_kernel(q) == "gluon"
    with kernel_config(fwd_backend="triton"):
        assert function.output_kernel(q) == "triton"


def test_auto_picks_gluon_only_where_it_was_measured_faster(monkeypatch):
    """"auto": Gluon on a CUDA tensor of an sm_90 device at K = 48, 64, 96 or 128 (checked and faster there on an
    H200), Triton for every other key size (even between those), architecture, CPU tensors and under the
    interpreter."""
    class FakeCuda:
        is_cuda = True
        device = "cuda:0"

        def __init__(self, K):
            self.shape = (1, 1, 1, K)

    monkeypatch.setattr(function, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(function, "_nvrtc_available", lambda: False)  # the CUDA sweep's choice: tested below
    with kernel_config(fwd_backend="auto", bwd_backend="auto"):
        for K, expected in ((16, "triton"), (32, "triton"), (48, "gluon"), (56, "triton"), (64, "gluon"),
                            (80, "triton"), (96, "gluon"), (112, "triton"), (128, "gluon"), (256, "triton")):
            assert function.output_kernel(FakeCuda(K)) == expected, K
            assert function.sweep_kernel(FakeCuda(K), 64) == expected, K
        assert function.output_kernel(torch.zeros(1, 1, 1, 64)) == "triton"  # a CPU tensor
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert function.output_kernel(FakeCuda(64)) == "triton"
        monkeypatch.setattr(function, "interpreting", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert function.sweep_kernel(FakeCuda(64), 64) == "triton"
    with kernel_config(bwd_backend="gluon"):
        assert function.sweep_kernel(torch.zeros(1, 1, 1, 16), 16) == "gluon"  # an explicit choice is kept
    monkeypatch.setattr(function, "interpreting", lambda: False)
    monkeypatch.setattr(function, "_nvrtc_available", lambda: True)
    with kernel_config(bwd_backend="auto"):  # the CUDA sweep where the Gluon one would run and it can (NVRTC, V % 4)
        for K, V, expected in ((96, 192, "cuda"), (48, 48, "cuda"), (128, 128, "cuda"), (64, 30, "gluon"),
                               (56, 64, "triton")):
            assert function.sweep_kernel(FakeCuda(K), V) == expected, (K, V)
        for K, V, expected in ((48, 48, "cuda"), (64, 64, "cuda"), (96, 192, "cuda"), (128, 128, "gluon"),
                               (64, 30, "gluon"), (56, 64, "triton")):
            assert function.output_kernel(FakeCuda(K), V) == expected, (K, V)
        assert function.output_kernel(FakeCuda(48)) == "gluon"  # V unknown
        monkeypatch.setattr(function, "_nvrtc_available", lambda: False)
        assert function.sweep_kernel(FakeCuda(96), 192) == "gluon"
        assert function.output_kernel(FakeCuda(48), 48) == "gluon"
    monkeypatch.setattr(function, "interpreting", lambda: True)
    with kernel_config(bwd_backend="cuda"):  # asked for where it cannot run: a clear error, no silent fallback
        with pytest.raises(ValueError, match="NVIDIA GPU only"):
            function.sweep_kernel(torch.zeros(1, 1, 1, 64), 64)
        monkeypatch.setattr(function, "interpreting", lambda: False)
        with pytest.raises(ValueError, match="K a multiple of 16 up to 128 and V a multiple of 4, got K = 40"):
            function.sweep_kernel(FakeCuda(40), 64)
        with pytest.raises(ValueError, match="got K = 64, V = 30"):
            function.sweep_kernel(FakeCuda(64), 30)
        assert function.sweep_kernel(FakeCuda(96), 192) == "cuda"


def test_the_sequence_walk_runs_where_measured_with_a_full_gpu_or_when_asked(monkeypatch):
    """fwd_walk None ("auto"): the CUDA output kernel walks whole sequences only where "auto" runs the Gluon or CUDA
    output kernel (sm_90) and NVRTC loads, or fwd_backend is "cuda"; K is one of CUDA_WALK_KEY_SIZES and the walk's
    warps fill WALK_MIN_WARPS_PER_SM of every multiprocessor; True: asked for, with a clear error where it cannot
    run; False: never."""
    class FakeCuda:
        is_cuda = True
        device = "cuda:0"

        def __init__(self, K, H=16):
            self.shape = (4, 4096, H, K)

    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(function, "interpreting", lambda: False)
    monkeypatch.setattr(function, "_nvrtc_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Properties())
    with kernel_config(fwd_backend="auto"):
        # 760M-like: 4 sequences x 16 heads x 192 / 4 columns = 3072 warps, 23 a multiprocessor; d128 (K = 128, where
        # the chunks run the Gluon output kernel) 1024, 7.8
        assert function.walk_forward(FakeCuda(96), 192, 4)
        assert function.walk_forward(FakeCuda(128, H=8), 128, 4)
        assert not function.walk_forward(FakeCuda(96), 192, 1)  # 768 warps, 5.8 a multiprocessor: the chunks win
        assert not function.walk_forward(FakeCuda(80), 192, 4)  # not measured at K = 80
        assert not function.walk_forward(FakeCuda(64), 30, 4)  # V not a multiple of 4
        assert not function.walk_forward(FakeCuda(96), 192, 70000)  # more sequences than a grid's rows
        with kernel_config(fwd_walk=False):
            assert not function.walk_forward(FakeCuda(96), 192, 4)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert not function.walk_forward(FakeCuda(96), 192, 4)  # not measured on that architecture
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(function, "_nvrtc_available", lambda: False)
        assert not function.walk_forward(FakeCuda(96), 192, 4)
        monkeypatch.setattr(function, "_nvrtc_available", lambda: True)
    for backend in ("triton", "gluon"):  # an explicit output kernel other than CUDA is kept
        with kernel_config(fwd_backend=backend):
            assert not function.walk_forward(FakeCuda(96), 192, 4)
    with kernel_config(fwd_backend="cuda"):
        assert function.walk_forward(FakeCuda(96), 192, 4)
        with pytest.raises(ValueError, match="NVIDIA GPU only"):
            function.walk_forward(torch.zeros(1, 1, 1, 64), 64, 1)
    with kernel_config(fwd_walk=True, fwd_backend="triton"):  # asked for: whatever the output kernel setting
        assert function.walk_forward(FakeCuda(64), 64, 1)
        with pytest.raises(ValueError, match="fwd_walk 'cuda' needs K a multiple of 16 up to 128, V a multiple "
                                             "of 4 and at most 65535 sequences .*got K = 64, V = 30, 1 sequences"):
            function.walk_forward(FakeCuda(64), 30, 1)
        with pytest.raises(ValueError, match="got K = 64, V = 64, 70000 sequences"):
            function.walk_forward(FakeCuda(64), 64, 70000)
        with pytest.raises(ValueError, match="NVIDIA GPU only"):
            function.walk_forward(torch.zeros(1, 1, 1, 64), 64, 1)
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match="fwd_walk"):
            with kernel_config(fwd_walk=bad):
                pass


def test_sweep_settings_are_checked():
    from palimpsa.ops.triton.chunk_bwd import chunk_bwd
    from palimpsa.ops.triton.utils import SequenceLayout

    for bad in (dict(bwd_lanes_k=3), dict(bwd_cols=3), dict(bwd_cols=True), dict(bwd_warps=3), dict(bwd_stage=3),
                dict(bwd_target_programs=0), dict(bwd_target_programs=1536.0), dict(bwd_target_programs=True),
                dict(bwd_maxnreg=300),
                dict(bwd_maxnreg=True), dict(bwd_maxnreg=12), dict(bwd_stage=False), dict(bwd_unroll=3),
                dict(bwd_unroll=True), dict(bwd_inputs=1), dict(fwd_inputs=0), dict(fwd_inputs=1),
                dict(state_tuning=(32, 32)), dict(state_tuning=StateTuning(24, 32)),
                dict(state_tuning=StateTuning(32, 32, 3)), dict(state_tuning=StateTuning(32, 32, 4, 0)),
                dict(state_tuning=StateTuning(32, 32, 4, None, 300))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            with kernel_config(**bad):
                pass
    q = torch.zeros(1, 4, 1, 16)
    v = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="bwd_lanes_k"):  # 32 lanes for 16 key rows: none for some lanes
        chunk_bwd(q, q, v, torch.zeros(1, 4, 1), v, torch.ones(1), 1.0, None, SequenceLayout(1, 4, None, q.device),
                  v, None, None, sweep="gluon", lanes_k=32)


def test_sweep_layout_and_schedule_by_key_size():
    """Unset, the sweep's lanes, columns, stage, register cap and unroll come from SWEEP_TUNED by key size (checked
    and measured on an H200), else 8 lanes, 1 column, stage 0, no cap, unroll 1; a setting overrides them, a cap
    of 0 means none, and setting the lanes, columns or warps by hand leaves the other unset ones untuned."""
    from palimpsa.ops.triton.config import SWEEP_TUNED, UNTUNED_SWEEP, sweep_tuning

    assert SWEEP_TUNED[64] == SWEEP_TUNED[96] == (16, 2, 0, None, 4, 1536, True)
    assert sweep_tuning(128) == (16, 1, 0, None, 4, 1536, True)
    assert sweep_tuning(48) == (16, 2, 0, None, 4, 1536, True)
    assert sweep_tuning(96) == (16, 2, 0, None, 4, 1536, True)
    assert sweep_tuning(32) == UNTUNED_SWEEP == (8, 1, 0, None, 1, 8192, False)
    with kernel_config(bwd_stage=2, bwd_maxnreg=0, bwd_unroll=1, bwd_inputs=False):
        assert sweep_tuning(48) == (16, 2, 2, None, 1, 1536, False)
    with kernel_config(bwd_maxnreg=168, bwd_target_programs=4096):
        assert sweep_tuning(96) == (16, 2, 0, 168, 4, 4096, True)
    with kernel_config(bwd_warps=2):  # measured with one warp only
        assert sweep_tuning(48) == (8, 1, 0, None, 1, 8192, False)
    with kernel_config(bwd_lanes_k=16, bwd_unroll=4):
        assert sweep_tuning(96) == (16, 1, 0, None, 4, 8192, False)
    with kernel_config(bwd_cols=1):
        assert sweep_tuning(64) == (8, 1, 0, None, 1, 8192, False)


def test_state_tuning_by_key_and_chunk_size():
    from palimpsa.ops.triton.config import STATE_TUNED, state_tuning

    assert state_tuning(96, 192) == STATE_TUNED[96, 64] == (64, 64, 4, None, None)  # the forward's chunks of 64
    assert state_tuning(96, 192, 32) == (64, 32, 4, None, None)  # the backward's chunks of 32
    assert state_tuning(128, 128, 32) == (32, 64, 4, None, None)
    assert state_tuning(48, 48) == state_tuning(48, 48, 32) == (64, 32, 4, None, None)
    assert state_tuning(32, 48) == (32, 16, 4, None, None)  # not measured: blocks of the largest powers of two
    assert state_tuning(96, 192, 16) == (64, 64, 4, None, None)  # nor this chunk size: as chunks of 64
    with kernel_config(state_tuning=StateTuning(16, 16, 8, 2, 128)):
        assert state_tuning(96, 192) == state_tuning(96, 192, 32) == (16, 16, 8, 2, 128)


def test_output_columns_by_key_size():
    from palimpsa.ops.triton.config import OUTPUT_INPUTS, OUTPUT_TUNED, output_columns, output_inputs

    assert OUTPUT_TUNED == {48: 2, 64: 2, 96: 2, 128: 2}
    assert [output_columns(K) for K in (48, 64, 96, 128, 32)] == [2, 2, 2, 2, 1]
    with kernel_config(fwd_cols=2):
        assert output_columns(96) == 2
    assert OUTPUT_INPUTS == {48, 64, 96, 128}
    assert [output_inputs(K) for K in (48, 64, 96, 128, 32)] == [True, True, True, True, False]
    with kernel_config(fwd_inputs=False):
        assert not output_inputs(96)
    with kernel_config(fwd_inputs=True):
        assert output_inputs(32)
    with pytest.raises(ValueError, match="fwd_cols"):
        with kernel_config(fwd_cols=3):
            pass
    assert gluon_module.output_lanes(1) == 4 and gluon_module.output_lanes(2) == 8
    with pytest.raises(ValueError, match="fwd_cols"):
        gluon_module.output_lanes(4)


def test_the_op_hands_the_tuned_sweep_settings_to_the_backward(monkeypatch):
    """The per-channel op's backward passes sweep_tuning(K) on to chunk_bwd."""
    from palimpsa.ops.triton import function

    seen = {}

    def fake_chunk_bwd(*args, **kwargs):
        seen.update(lanes_k=kwargs["lanes_k"], cols=kwargs["sweep_cols"], stage=kwargs["sweep_stage"],
                    maxnreg=kwargs["sweep_maxnreg"], unroll=kwargs["sweep_unroll"],
                    target_programs=kwargs["target_programs"], inputs=kwargs["sweep_inputs"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(function, "chunk_bwd", fake_chunk_bwd)
    q = torch.zeros(1, 4, 1, 48)
    v = torch.zeros(1, 4, 1, 8)
    for backend, programs in (("gluon", 1536), ("triton", 2048)):  # units: the Gluon sweep's tuning, Triton's own
        with kernel_config(bwd_backend=backend), pytest.raises(RuntimeError, match="stop here"):
            function._bwd_op(q, q, v, torch.zeros(1, 4, 1), v, torch.ones(1), None, None, None, v, None, None, None,
                             1.0, 64)
        assert seen == dict(lanes_k=16, cols=2, stage=0, maxnreg=None, unroll=4, target_programs=programs, inputs=True)


def test_the_tuned_sweeps_keep_their_spills_small():
    """The sweep as it runs at 760M-like (SWEEP_TUNED[96]: 16 lanes of two columns, unroll 4, no cap, the chunk's
    inputs in shared memory) compiles to 255 registers and 216 bytes of stack under Triton 3.6 (328 under 3.9); the
    H200 numbers of results/bench were taken under 3.6.  A change that spills much more (the sub-block's states,
    1.5 kB a thread, moving to local memory) fails here.  At K = 128 (SWEEP_TUNED[128]: one column a thread) it
    does not spill at all (two columns spilled 528 bytes)."""
    from palimpsa.ops.triton.config import SWEEP_TUNED

    cases = [(K, V, SWEEP_TUNED[K]) for K, V in ((96, 192), (128, 128))]
    reports = compile_reports("palimpsa.ops.triton.chunk_bwd_gluon",
                              [(K, V, t.lanes_k, False, 90, "sweep", 1, t.stage, t.maxnreg, t.unroll, t.cols, t.inputs)
                               for K, V, t in cases])
    assert reports[0]["stack"] <= 400, reports[0]
    assert reports[1]["stack"] == 0, reports[1]
