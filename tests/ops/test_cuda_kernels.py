"""The CUDA C++ kernels (palimpsa/ops/cuda/) without a GPU: their host logic, and their compilation for sm_90 by
NVRTC (which needs no GPU; the test setup installs NVIDIA's NVRTC wheel on Linux).

What runs them on a GPU, against the float64 reference: ``scripts/gpu_gluon_fwd_check.py --variants cuda`` and
``scripts/gpu_check_all.sh`` (their defaults at K = 48, 64, 96, 128 on sm_90).  Here: every configuration the
benchmark shapes and the checks use compiles, its shared-memory size agrees with the kernel's layout (a
``static_assert`` in each kernel against the host's ``shared_bytes``), it fits a block, and ptxas reports no
spills beyond a few bytes; the host refuses what the kernels cannot run, with errors that say why.
"""

from __future__ import annotations

import ctypes
import re
from types import SimpleNamespace

import pytest
import torch

from palimpsa.ops.cuda import nvrtc, output, sweep


def _nvrtc_or_skip():
    try:
        nvrtc.nvrtc_library()
    except OSError as err:
        pytest.skip(f"NVRTC not installed: {err}")


def _compile(filename: str, defines: dict, name: str):
    cubin, log = nvrtc.compile_cubin(nvrtc.kernel_source(filename, defines), name, 90, ["-Xptxas=-v"])
    registers = int(re.search(r"Used (\d+) registers", log)[1])
    spill_stores = int(re.search(r"(\d+) bytes spill stores", log)[1])
    return cubin, registers, spill_stores


# (K, V, H) of the benchmark shapes 760M-like, 170M-like, d64 and d128
SHAPES = [(96, 192, 16), (48, 48, 16), (64, 64, 16), (128, 128, 8)]


@pytest.mark.parametrize("K,V,H", SHAPES)
def test_sweep_compiles_for_sm90_without_spills(K, V, H):
    _nvrtc_or_skip()
    lanes = sweep.lanes_over_k(K)
    assert lanes == (32 if K % 32 == 0 else 16)
    # the default layout, the second case also without 16-byte vector loads (inputs at an unaligned address or rows
    # of odd lengths); where K allows 32 lanes, also the other layout (16 lanes over K: bwd_key_lanes=16) and the
    # other choice of compact shared memory, without dq/dk pairs
    default_compact = sweep.default_compact(K) and lanes == 32
    pairs = sweep.PAIRS and lanes == 32
    cases = [(torch.bfloat16, False, False, False, True, lanes, default_compact, pairs),
             (torch.float32, True, True, True, False, lanes, default_compact, pairs)]
    if lanes == 32:
        cases += [(torch.bfloat16, False, False, False, True, 16, False, False),
                  (torch.bfloat16, False, False, False, True, 32, not default_compact, False)]
    for dtype, has_dvar, has_init, varlen, aligned, key_lanes, compact, pairs in cases:
        # what the launch picks (at d64 and d128 the tuned warps and segments)
        lanes, warps, segment, blocks = sweep.block_layout(K, V, 32, has_dvar, key_lanes, compact=compact)
        assert lanes == key_lanes and blocks == 1
        assert sweep.uses_pairs(K, V, 32, has_dvar, pairs, key_lanes=key_lanes, compact=compact) == pairs
        smem = sweep.shared_bytes(K, V, warps, 32, segment, has_dvar=has_dvar, key_lanes=key_lanes, compact=compact)
        assert smem <= nvrtc.MAX_SHARED_BYTES
        defines = sweep.kernel_defines(K, V, H, 32, 64, warps, dtype, has_dvar, has_init, varlen, segment,
                                       g_dtype=torch.float32, aligned=aligned, lanes=key_lanes, compact=compact,
                                       pairs=pairs)
        cubin, registers, spills = _compile("sweep.cu", defines, "palimpsa_sweep")
        assert len(cubin) > 1000 and registers <= 255
        # a few bytes at most; at K = 128 (8 rows a thread) the scaled and the direct chunk bodies spill a few words
        # (16 bytes under NVRTC 12.8, 48 under 12.9), and the d128 backward still ran faster with them (fwd+bwd
        # 6.616 -> 6.471 ms, results/bench/sweep_scaled_h200_ba3df0d.md); at d64's 16 warps (128 registers a
        # thread) the variance's path spills 48 bytes under NVRTC 13, 80 with the compact shared memory (its
        # 16-token segments), outside the sub-block loop
        assert spills <= (16 if K <= 96 and warps <= 8 else 96), (K, V, dtype, key_lanes, compact, spills)


def test_sweep_layouts_and_blocks_follow_key_size_and_shared_memory():
    assert sweep.lanes_over_k(96) == 32 and sweep.lanes_over_k(48) == 16 and sweep.lanes_over_k(96, 16) == 16
    with pytest.raises(ValueError, match="need K a multiple of 32, got K = 48"):
        sweep.lanes_over_k(48, 32)
    with pytest.raises(ValueError, match="16 or 32 lanes over K, got 8"):
        sweep.lanes_over_k(64, 8)
    # two blocks a multiprocessor halve the warps of a block at 760M-like; shorter segments shrink a warp's share
    assert sweep.block_warps(96, 192, 32, False, 32, blocks=2) == 4
    assert sweep.block_layout(96, 192, 32, False) == (32, 8, 16, 1)
    assert sweep.block_layout(64, 64, 32, True) == (32, 16, 8, 1)  # tuned (BLOCKS_TUNED)
    assert sweep.block_layout(128, 128, 32, False) == (32, 8, 8, 1)
    assert sweep.block_layout(64, 32, 32, False) == (32, 8, 16, 1)  # 16 warps would need V a multiple of 64
    assert sweep.block_layout(48, 48, 32, False) == (16, 4, 16, 1)
    assert sweep.block_layout(64, 64, 32, False, blocks=2) == (32, 4, 16, 2)  # asked for: not the tuned pick
    assert sweep.shared_bytes(96, 192, 12, 32, 8, key_lanes=32) <= nvrtc.MAX_SHARED_BYTES
    assert sweep.shared_bytes(96, 192, 12, 32, 16, key_lanes=32) > nvrtc.MAX_SHARED_BYTES
    # the compact shared memory: 16 rows of sums instead of 32, one checkpoint slot fewer a warp; 12 warps of
    # 16-token segments fit then, and the tuned picks at K = 64 and 128 are 16-token segments
    assert (sweep.shared_bytes(96, 192, 8, 32, 16, key_lanes=32)
            - sweep.shared_bytes(96, 192, 8, 32, 16, key_lanes=32, compact=True)) == 8 * 4 * (16 * 36 + 2 * 12 * 32)
    assert sweep.shared_bytes(96, 192, 12, 32, 16, True, key_lanes=32, compact=True) <= nvrtc.MAX_SHARED_BYTES
    assert sweep.block_layout(96, 192, 32, False, warps=12, segment=16, compact=True) == (32, 12, 16, 1)
    assert sweep.block_layout(64, 64, 32, True, compact=True) == (32, 16, 16, 1)
    assert sweep.block_layout(128, 128, 32, False, compact=True) == (32, 8, 16, 1)
    assert sweep.block_layout(96, 192, 32, False, compact=True) == (32, 8, 16, 1)  # untuned: the most warps that fit
    assert sweep.block_layout(48, 48, 32, False, compact=True) == (16, 4, 16, 1)  # 16 lanes: not compact
    assert [sweep.default_compact(K) for K in (48, 64, 96, 128)] == [False, True, False, True]
    assert sweep.uses_pairs(96, 192, 32, False, True) and not sweep.uses_pairs(96, 192, 32, False, False)
    assert not sweep.uses_pairs(48, 48, 32, False, True)  # 16 lanes over K
    assert not sweep.uses_pairs(96, 192, 32, False, True, key_lanes=16)
    with pytest.raises(ValueError, match="need 32 lanes over K"):
        sweep.kernel_defines(48, 48, 16, 32, 64, 4, torch.bfloat16, False, False, False, lanes=16, pairs=True)
    # one segment a chunk with the compact layout: the chunk's start in its last checkpoint slot, no buffer of its own
    assert sweep.start_in_slot(32, 32, 32, True) and not sweep.start_in_slot(32, 16, 32, True)
    assert not sweep.start_in_slot(32, 32, 32, False)
    assert (sweep.shared_bytes(96, 192, 8, 32, 32, key_lanes=32, compact=True)
            == 4 * (2 * 32 * 96 + 32 * 3 * 32 + 4 * 32 + 8 * (7 * 2 * 12 * 32 + 16 * 36)))
    assert sweep.block_layout(96, 192, 32, True, segment=32, compact=True) == (32, 8, 32, 1)
    q = torch.zeros(1, 32, 1, 96)
    v = torch.zeros(1, 32, 1, 192)
    args = (q, q, v, q[..., 0], v, *([None] * 9), v, *([None] * 11), 1.0, 32, 1, 32, 1, False, False)
    with pytest.raises(ValueError, match="cannot run 12 warps a block at K = 96, V = 192"):
        sweep.launch_sweep(*args, warps=12, segment=16)  # 283 kB of shared memory
    with pytest.raises(ValueError, match="cannot run 5 warps"):
        sweep.launch_sweep(*args, warps=5)
    with pytest.raises(ValueError, match="segment must be 4, 8, 16 or 32 tokens, got 12"):
        sweep.launch_sweep(*args, segment=12)
    with pytest.raises(ValueError, match="blocks per multiprocessor must be 1 or 2, got 3"):
        sweep.launch_sweep(*args, blocks=3)
    with pytest.raises(ValueError, match="dq/dk pairs need 32 lanes over K and dq, dk the two halves"):
        sweep.launch_sweep(*(args[:14] + (q, q) + args[16:]), pairs=True)  # dq, dk not one interleaved buffer
    from palimpsa.ops.triton.config import CONFIG, kernel_config

    with kernel_config(bwd_key_lanes=16, bwd_sweep_blocks=2, bwd_sweep_warps=12, bwd_sweep_segment=8,
                       bwd_sweep_ck_first=False, bwd_sweep_compact=True, bwd_sweep_pairs=False):
        assert (CONFIG.bwd_key_lanes, CONFIG.bwd_sweep_blocks, CONFIG.bwd_sweep_warps, CONFIG.bwd_sweep_segment,
                CONFIG.bwd_sweep_ck_first, CONFIG.bwd_sweep_compact,
                CONFIG.bwd_sweep_pairs) == (16, 2, 12, 8, False, True, False)
    for option, bad in (("bwd_key_lanes", 8), ("bwd_sweep_blocks", 3), ("bwd_sweep_warps", 5),
                        ("bwd_sweep_segment", 12), ("bwd_key_lanes", True), ("bwd_sweep_ck_first", 1),
                        ("bwd_sweep_compact", "yes"), ("bwd_sweep_pairs", 1)):
        with pytest.raises(ValueError, match=f"{option} must be None"):
            with kernel_config(**{option: bad}):
                pass


@pytest.mark.parametrize("K,V,H", SHAPES)
def test_output_kernel_compiles_for_sm90_without_spills(K, V, H):
    _nvrtc_or_skip()
    for dtype, with_variance, varlen, aligned in ((torch.bfloat16, False, False, True),
                                                  (torch.float16, True, True, False)):
        warps = output.block_warps(K, V, 64)
        assert warps is not None
        defines = output.kernel_defines(K, V, H, 64, warps, dtype, torch.float32, with_variance, varlen, aligned)
        cubin, registers, spills = _compile("output.cu", defines, "palimpsa_output")
        assert len(cubin) > 1000 and spills == 0
        # two blocks a multiprocessor (BLOCKS_PER_SM) need at most half its 64 K registers each
        assert registers * 32 * warps * output.BLOCKS_PER_SM <= 65536, (K, V, registers)


@pytest.mark.parametrize("K,V,H", SHAPES)
def test_sequence_walk_compiles_for_sm90_and_keeps_its_blocks_resident(K, V, H):
    _nvrtc_or_skip()
    warps = output.walk_warps(K, V)
    for dtype, with_variance, varlen, has_init, final, aligned in (
            (torch.bfloat16, False, False, False, False, True), (torch.bfloat16, True, True, True, True, False),
            (torch.float32, True, False, False, True, True)):
        min_blocks = output.walk_min_blocks(K, warps, dtype, aligned)
        defines = output.kernel_defines(K, V, H, output.WALK_CHUNK, warps, dtype, torch.float32, with_variance, varlen,
                                        aligned, walk=True, has_init=has_init, final=final, min_blocks=min_blocks)
        cubin, registers, spills = _compile("output.cu", defines, "palimpsa_output")
        assert len(cubin) > 1000 and spills == 0, (K, V, spills)
        # the walk has no chunks to spread: min_blocks blocks (24 warps at K <= 96) fit a multiprocessor's registers
        # and shared memory
        assert registers * 32 * warps * min_blocks <= 65536, (K, V, registers)
        assert min_blocks * (output.shared_bytes(K, warps, output.WALK_CHUNK) + 1024) <= output.SHARED_PER_SM
    assert output.walk_min_blocks(96, 8) * 8 == 24 and output.walk_min_blocks(128, 8) * 8 == 16
    assert output.walk_min_blocks(96, 8, torch.float32) * 8 == 16 and output.walk_min_blocks(96, 8, aligned=False) == 2


@pytest.mark.parametrize("K,V,H", [(96, 192, 16), (64, 64, 16)])
def test_sweep_with_one_segment_a_chunk_compiles(K, V, H):
    """The compact layout with 32-token segments (``kernel_config(bwd_sweep_compact=True, bwd_sweep_segment=32)``, not
    a default): the chunk's start in the last checkpoint slot (PSTARTSLOT); the layout's size is the host's."""
    _nvrtc_or_skip()
    for dtype, has_dvar, has_init, varlen, aligned in ((torch.bfloat16, False, False, False, True),
                                                       (torch.float32, True, True, True, False)):
        lanes, warps, segment, _ = sweep.block_layout(K, V, 32, has_dvar, segment=32, compact=True)
        defines = sweep.kernel_defines(K, V, H, 32, 64, warps, dtype, has_dvar, has_init, varlen, segment,
                                       g_dtype=torch.float32, aligned=aligned, lanes=lanes, compact=True, pairs=True,
                                       ck_first=True)
        assert defines["PSTARTSLOT"] and defines["PSHARED_BYTES"] <= nvrtc.MAX_SHARED_BYTES
        _, registers, spills = _compile("sweep.cu", defines, "palimpsa_sweep")
        assert registers <= 255 and spills <= 96, (K, dtype, spills)


def test_a_host_size_that_differs_from_the_kernel_layout_does_not_compile():
    _nvrtc_or_skip()
    defines = sweep.kernel_defines(96, 192, 16, 32, 64, 8, torch.bfloat16, False, False, False)
    defines["PSHARED_BYTES"] += 4
    with pytest.raises(RuntimeError, match="shared-memory size differs"):
        nvrtc.compile_cubin(nvrtc.kernel_source("sweep.cu", defines), "palimpsa_sweep", 90)


@pytest.mark.parametrize("K,V,H", SHAPES)
def test_sweep_with_dq_dk_summed_per_four_tokens_compiles_without_spills(K, V, H):
    """bwd_dqk_tokens = 4 (not the default): where it fits the default block, the kernel compiles for sm_90 with
    the same allowance of spills; the layout's size is the host's (its static_assert)."""
    _nvrtc_or_skip()
    warps = sweep.block_warps(K, V, 32, False)
    assert sweep.dqk_tokens(K, V, warps, 32, False, 4) == 4  # every benchmark shape without variance
    defines = sweep.kernel_defines(K, V, H, 32, 64, warps, torch.bfloat16, False, False, False,
                                   g_dtype=torch.float32, dqk=4)
    _, registers, spills = _compile("sweep.cu", defines, "palimpsa_sweep")
    assert registers <= 255 and spills <= (16 if K <= 96 else 64), (K, V, spills)


def test_dq_dk_tokens_take_what_fits():
    assert sweep.dqk_tokens(96, 192, 8, 32, False, None) == 2  # the default
    assert sweep.dqk_tokens(96, 192, 8, 32, False, 4) == 4
    assert sweep.dqk_tokens(96, 192, 8, 32, True, 4) == 4  # with the variance's gradient staged too
    # K = 112: 8 warps of 4-token sums would not fit a block: 2
    assert sweep.block_warps(112, 224, 32, False) == 8
    assert sweep.shared_bytes(112, 224, 8, 32, dqk_tokens=4) > nvrtc.MAX_SHARED_BYTES
    assert sweep.dqk_tokens(112, 224, 8, 32, False, 4) == 2
    for bad in (3, 8, 0):
        with pytest.raises(ValueError, match="per 2 or 4 tokens"):
            sweep.dqk_tokens(96, 192, 8, 32, False, bad)
    from palimpsa.ops.triton.config import CONFIG, kernel_config

    with kernel_config(bwd_dqk_tokens=4):
        assert CONFIG.bwd_dqk_tokens == 4
    for bad in (3, True, "4"):
        with pytest.raises(ValueError, match="bwd_dqk_tokens must be None, 2 or 4"):
            with kernel_config(bwd_dqk_tokens=bad):
                pass


def test_block_warps_follow_shared_memory_and_value_size():
    # 760M-like: 8 warps (32 columns) fill one block of ~200 kB; 170M-like: V = 48 takes blocks of 4 warps
    assert sweep.block_warps(96, 192, 32) == 8 and sweep.block_warps(48, 48, 32) == 4
    assert sweep.block_warps(128, 128, 32) == 4  # 8 warps of 8 rows would need more than a block's shared memory
    assert sweep.shared_bytes(96, 192, 8, 32, has_dvar=True) <= nvrtc.MAX_SHARED_BYTES
    assert sweep.block_warps(40, 64, 32) is None and sweep.block_warps(256, 64, 32) is None
    assert sweep.block_warps(64, 30, 32) is None  # V not a multiple of 4
    assert output.block_warps(96, 192, 64) == 8 and output.block_warps(48, 48, 64) == 4
    assert output.block_warps(96, 192, 256) is None  # a chunk of 256 tokens does not fit twice a multiprocessor
    for K, V, _ in SHAPES:  # two blocks of the output kernel fit a multiprocessor's shared memory
        warps = output.block_warps(K, V, 64)
        assert 2 * (output.shared_bytes(K, warps, 64) + 1024) <= output.SHARED_PER_SM


def test_dtype_codes_and_alignment():
    assert [nvrtc.dtype_code(d, "q") for d in (torch.bfloat16, torch.float16, torch.float32)] == [0, 1, 2]
    with pytest.raises(TypeError, match="got torch.float64 for g"):
        nvrtc.dtype_code(torch.float64, "g")
    x = torch.zeros(64, dtype=torch.bfloat16)
    assert nvrtc.aligned16(48, 48, x) and nvrtc.aligned16(48, 48, x, None)
    assert not nvrtc.aligned16(48, 48, x[1:])  # starts 2 bytes in
    assert not nvrtc.aligned16(36, 48, x)  # rows of 36 bf16 are not whole 16-byte vectors


def test_kernel_source_defines_come_first():
    src = nvrtc.kernel_source("output.cu", {"PK": 64, "PV": 64})
    assert src.startswith("#define PK 64\n#define PV 64\n") and "palimpsa_output" in src
    assert "#define R (PK / PKLANES)" in src  # common.cuh, before the kernel


def test_launch_arguments_reach_the_driver_packed_at_their_alignment(monkeypatch):
    """A launch packs its arguments into one buffer (no ctypes object per argument): what the driver reads through
    the address array must be each argument, as a 64-bit pointer, an int32 or a float32, at its natural alignment."""
    seen = {}

    def launch(function, gx, gy, gz, bx, by, bz, shared, stream, argv, extra):
        seen.update(grid=(gx, gy, gz), block=bx, shared=shared,
                    values=[ctype.from_address(argv[i]).value for i, ctype in enumerate(seen["types"])],
                    aligned=all(argv[i] % ctypes.sizeof(ctype) == 0 for i, ctype in enumerate(seen["types"])))
        return 0

    monkeypatch.setattr(nvrtc, "_driver", lambda: SimpleNamespace(cuLaunchKernel=launch))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=0))
    kernel = object.__new__(nvrtc.Kernel)  # no GPU here: the attributes a loaded kernel has
    kernel._function, kernel.shared_bytes, kernel._packings = None, 4096, {}
    x = torch.zeros(8)
    for args in ((x, 7, None, 0.5, True, x[2:], -3), (x, 8, x, -1.25, False, None, 2 ** 31 - 1)):
        seen["types"] = [ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_float, ctypes.c_int32,
                         ctypes.c_uint64, ctypes.c_int32]
        kernel((3, 2, 1), 256, args)
        expected = [a.data_ptr() if isinstance(a, torch.Tensor) else 0 if a is None else a for a in args]
        assert seen == dict(seen, grid=(3, 2, 1), block=256, shared=4096, values=expected, aligned=True)
    assert len(kernel._packings) == 1  # one buffer for the one pattern of argument kinds
    with pytest.raises(TypeError, match="argument of type str"):
        kernel((1, 1, 1), 32, (x, "7"))
    with pytest.raises(ValueError, match="does not fit its type"):
        kernel((1, 1, 1), 32, (x, 2 ** 31))


def test_launchers_refuse_what_the_kernels_cannot_run():
    q = torch.zeros(1, 32, 1, 40)
    v = torch.zeros(1, 32, 1, 64)
    with pytest.raises(ValueError, match="K a multiple of 16 up to 128"):
        output.fwd_output_cuda(q, q, v, q[..., 0], v, torch.ones(1), 1.0, None, False, (None, None))
    with pytest.raises(ValueError, match="K a multiple of 16 up to 128"):
        output.fwd_walk_cuda(q, q, v, q[..., 0], v, torch.ones(1), 1.0, None, False, None, False)
    with pytest.raises(ValueError, match="K a multiple of 16 up to 128"):
        sweep.launch_sweep(q, q, v, q[..., 0], v, *([None] * 9), v, *([None] * 11), 1.0, 32, 1, 32, 1, False,
                           False)


def test_a_missing_nvrtc_is_reported_once_and_clearly(monkeypatch):
    monkeypatch.setenv("PALIMPSA_NVRTC_LIBRARY", "/nonexistent/libnvrtc.so")
    monkeypatch.setattr(nvrtc, "_NVRTC", None)
    monkeypatch.setattr(nvrtc, "_NVRTC_MISSING", None)
    for _ in range(2):  # the second call answers from the first search
        with pytest.raises(OSError, match="no NVRTC library found .*/nonexistent/libnvrtc.so.*PALIMPSA_NVRTC_LIBRARY"):
            nvrtc.nvrtc_library()
    monkeypatch.setattr(nvrtc, "_candidates", lambda: pytest.fail("searched again"))
    with pytest.raises(OSError):
        nvrtc.nvrtc_library()
