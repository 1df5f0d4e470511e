"""``palimpsa bench train`` at the tiny size on a CPU, and the bypass of fla's Hopper check it uses."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from palimpsa.bench import breakdown
from palimpsa.bench.fla_compat import hopper_check_bypassed, is_hopper_refusal
from palimpsa.bench.train import main
from palimpsa.cli import main as cli_main

FIELDS = ("model", "size", "status", "params", "step_s", "tokens_per_s", "breakdown")


def test_bench_train_tiny_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--sizes", "tiny", "--models", "palimpsa,gated-deltanet,fla-gated-deltanet", "--batch", "1",
                 "--seq-len", "32", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "train_bench.json").read_text())
    assert result["settings"]["batch"] == 1 and result["settings"]["seq_len"] == 32
    assert result["settings"]["compile_effective"] is False  # a CPU never compiles
    assert result["environment"]["torch"] == torch.__version__
    rows = {row["model"]: row for row in result["rows"]}
    for name in ("palimpsa", "gated-deltanet"):
        row = rows[name]
        assert row["status"] == "ok" and all(field in row for field in FIELDS)
        assert row["params"] > 0 and row["step_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_s"])
        ms = row["breakdown"]["ms"]
        assert set(breakdown.COMPONENTS) <= set(ms)
        # every component that a step must spend time in was found by the profiler
        for component in ("op", "projections", "convolutions", "norms", "mlp", "loss", "optimizer"):
            assert ms[component] > 0, (name, component, ms)
        assert row["breakdown"]["total_ms"] == pytest.approx(sum(ms.values()))
    fla_row = rows["fla-gated-deltanet"]
    if "fla" not in sys.modules and fla_row["status"].startswith("skipped"):
        assert "fla is not importable" in fla_row["status"]
    table = (out / "train_bench.md").read_text()
    assert "| palimpsa | tiny |" in table and "| op | gates | projections |" in table
    assert table in capsys.readouterr().out


def test_each_compiled_model_starts_from_a_clean_compile_cache(monkeypatch, tmp_path):
    """Compiled graphs of one model must not carry over to the next (same block class, other shapes)."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    args = ["--sizes", "tiny", "--models", "palimpsa,notpalimpsa", "--batch", "1", "--seq-len", "16", "--steps", "1",
            "--warmup", "0", "--device", "cpu", "--no-profile", "--out", str(tmp_path / "bench")]
    assert main(args) == 0 and len(resets) == 2
    assert main(args + ["--no-compile"]) == 0 and len(resets) == 2


def test_bench_models_with_one_importance_gate_per_head():
    from palimpsa.bench.train import build_bench_model

    for name, base in (("palimpsa-g1", "palimpsa"), ("meta-mamba2-g1", "meta-mamba2")):
        grouped, full = build_bench_model(name, "tiny"), build_bench_model(base, "tiny")
        assert grouped.config.importance_groups == 1 and full.config.importance_groups != 1
        assert grouped.config.num_hidden_layers == full.config.num_hidden_layers


def test_bench_train_takes_a_vocabulary_size(tmp_path):
    from palimpsa.bench.train import build_bench_model

    assert build_bench_model("palimpsa", "tiny", 300).config.vocab_size == 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_bench_model("palimpsa", "tiny", 1)
    out = tmp_path / "bench"
    assert main(["--sizes", "tiny", "--models", "notpalimpsa", "--batch", "1", "--seq-len", "16", "--steps", "1",
                 "--warmup", "0", "--device", "cpu", "--no-profile", "--vocab-size", "320", "--out", str(out)]) == 0
    assert json.loads((out / "train_bench.json").read_text())["settings"]["vocab_size"] == 320


def test_bench_train_is_a_palimpsa_subcommand_and_checks_its_flags(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["bench", "train", "--sizes", "huge"])
    with pytest.raises(SystemExit):
        cli_main(["bench", "train", "--steps", "0"])
    code = cli_main(["bench", "train", "--sizes", "tiny", "--models", "notpalimpsa", "--batch", "1", "--seq-len",
                     "16", "--steps", "1", "--warmup", "0", "--no-profile", "--device", "cpu", "--out",
                     str(tmp_path)])
    assert code == 0
    row = json.loads((tmp_path / "train_bench.json").read_text())["rows"][0]
    assert row["status"] == "ok" and "breakdown" not in row


FAKE_CHUNK_O = '''
from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0

NUM_WARPS = [2, 4] if IS_NVIDIA_HOPPER else [2, 4, 8]


def chunk_bwd_dqkwg(g=None):
    if g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0:
        raise RuntimeError("Triton >= 3.4.0 on Hopper GPUs produces incorrect results for "
                           "gated chunk_bwd_dqkwg (see #640). Please install tilelang")
    return "ran"
'''


@pytest.fixture
def fake_fla(tmp_path, monkeypatch):
    """A stand-in for fla's layout: fla/utils.py and fla/ops/common/chunk_o.py with the issue-640 check."""
    root = tmp_path / "fake"
    (root / "fla" / "ops" / "common").mkdir(parents=True)
    for package in ("fla", "fla/ops", "fla/ops/common"):
        (root / package / "__init__.py").write_text("")
    (root / "fla" / "utils.py").write_text("IS_NVIDIA_HOPPER = True\nTRITON_ABOVE_3_4_0 = True\n")
    (root / "fla" / "ops" / "common" / "chunk_o.py").write_text(textwrap.dedent(FAKE_CHUNK_O))
    saved = {name: module for name, module in sys.modules.items() if name == "fla" or name.startswith("fla.")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_fla_check_bypass_switches_off_only_the_check_and_restores_it(fake_fla):
    import fla.ops.common.chunk_o as chunk_o
    import fla.utils

    with pytest.raises(RuntimeError) as refusal:
        chunk_o.chunk_bwd_dqkwg(g=1)
    assert is_hopper_refusal(refusal.value)
    assert not is_hopper_refusal(RuntimeError("CUDA out of memory"))
    with hopper_check_bypassed() as bypassed:
        assert bypassed
        assert chunk_o.chunk_bwd_dqkwg(g=1) == "ran"
        assert fla.utils.IS_NVIDIA_HOPPER is True  # only the kernel module's copy changes
    with pytest.raises(RuntimeError):
        chunk_o.chunk_bwd_dqkwg(g=1)


def test_kernel_kinds_sort_kernels_by_name():
    from types import SimpleNamespace

    def kernel(name, us):
        return SimpleNamespace(name=name, device_type="DeviceType.CUDA", self_device_time_total=us)

    events = [kernel("_scan_bwd", 4000.0), kernel("nvjet_sm90_tst_256x128_64x4", 2000.0),
              kernel("triton_poi_fused_add_mul_0", 500.0), kernel("void at::native::elementwise_kernel<128, 4>", 250.0),
              kernel("void at::native::conv_depthwise2d_forward_kernel", 100.0),
              kernel("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 50.0),
              kernel("something_else", 25.0),
              kernel("bench::mlp", 900.0),  # a record_function range on the device timeline: not a kernel
              SimpleNamespace(name="ProfilerStep#1", device_type="DeviceType.CUDA", self_device_time_total=700.0,
                              is_user_annotation=True),
              SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", self_cpu_time_total=1e6)]
    ms = breakdown.kernel_kinds(events, op_kernels=frozenset({"_scan_bwd"}))
    assert ms == {"op": 4.0, "matmul": 2.0, "compiled": 0.5, "elementwise": 0.25, "convolution": 0.1,
                  "optimizer": 0.05, "other": 0.025}

    from torch.autograd.profiler_util import Kernel

    parent = SimpleNamespace(name="aten::to")
    copy = SimpleNamespace(name="aten::copy_", device_type="DeviceType.CPU", cpu_parent=parent,
                           input_shapes=[[4, 8], [4, 8]], kernels=[Kernel("_scan_bwd", "cuda:0", 900.0)])
    top = breakdown.top_kernels(events + [kernel("_scan_bwd", 1000.0), copy], count=2)
    assert top == [["_scan_bwd", 5.0, 2, "aten::copy_ < aten::to [(4, 8), (4, 8)]"],
                   ["nvjet_sm90_tst_256x128_64x4", 2.0, 1, ""]]


def test_op_kernel_names_include_the_grouped_kernels():
    import palimpsa.ops.triton.gla  # noqa: F401
    import palimpsa.ops.triton.importance  # noqa: F401

    names = breakdown.op_kernel_names()
    assert {"_scan_bwd", "_scan_fwd", "_fwd_states", "_bwd_dqk"} <= names


def test_op_kernel_names_include_the_gluon_kernels(monkeypatch):
    """The per-channel op's Gluon kernels (the reverse sweep, the output kernel) are op kernels, not "other": on a
    GPU they are GluonJITFunction objects (here, where the interpreter runs them as Triton, a stand-in of that
    class name)."""
    import types

    class GluonJITFunction:
        def __init__(self, fn):
            self.fn = fn

    def unit_bwd_gluon_kernel():
        pass

    module = types.ModuleType("palimpsa.ops.triton.fake_gluon")
    module.kernel = GluonJITFunction(unit_bwd_gluon_kernel)
    monkeypatch.setitem(sys.modules, "palimpsa.ops.triton.fake_gluon", module)
    assert "unit_bwd_gluon_kernel" in breakdown.op_kernel_names()


def test_op_kernel_names_include_the_cuda_kernels():
    """The CUDA C++ sweep and output kernel (launched through the driver, not Triton) are op kernels too, by the
    names their sources give them."""
    from pathlib import Path

    import palimpsa.ops.cuda as cuda

    names = breakdown.op_kernel_names()
    assert {"palimpsa_sweep", "palimpsa_output"} <= names
    assert breakdown.kernel_kind("palimpsa_sweep", names) == "op"
    folder = Path(cuda.__file__).parent
    sources = (folder / "sweep.cu").read_text() + (folder / "output.cu").read_text()
    for name in cuda.KERNEL_NAMES:
        assert f"\n{name}(" in sources, name  # the extern "C" kernel of that name exists


def test_op_kernel_names_see_through_autotuner_subclasses(monkeypatch):
    """fla wraps its kernels in a subclass of Triton's Autotuner (``CachedAutotuner``): its kernels are op kernels."""
    import types

    from triton.runtime.autotuner import Autotuner

    class CachedAutotuner(Autotuner):
        def __init__(self, fn):  # no Triton set-up: only ``.fn`` is read
            self.fn = fn

    @__import__("triton").jit
    def chunk_fwd_kernel_h_blockdim64(x):
        pass

    module = types.ModuleType("fla.ops.fake_chunk")
    module.kernel = CachedAutotuner(chunk_fwd_kernel_h_blockdim64)
    monkeypatch.setitem(sys.modules, "fla.ops.fake_chunk", module)
    assert "chunk_fwd_kernel_h_blockdim64" in breakdown.op_kernel_names()


def test_profile_without_ranges_leaves_the_graphs_alone_and_splits_nothing_by_component():
    """A compiled model is profiled without component ranges: no module hooks or wrapped functions in place."""
    model = torch.nn.Linear(4, 4)
    seen = []

    def step():
        seen.append(len(model._forward_pre_hooks))
        with breakdown.optimizer_range():
            model(torch.randn(2, 4)).sum().backward()

    result = breakdown.profile_step(model, step, torch.device("cpu"), ranges=False)
    assert result["ms"] is None and result["total_ms"] > 0
    assert seen == [0]  # one step, the profiled one, with no hooks
    with_ranges = breakdown.profile_step(model, step, torch.device("cpu"))
    assert with_ranges["ms"] is not None and len(seen) == 3  # a step before the profiled one
    assert seen[1] > 0 and seen[2] > 0


def test_the_table_says_when_compiled_models_have_no_component_split():
    from palimpsa.bench.train import format_tables

    settings = {"batch": 1, "seq_len": 8, "precision": "bf16", "device": "cuda", "compile_effective": True,
                "warmup": 0, "steps": 1}
    kinds = {kind: 1.0 for kind in breakdown.KERNEL_KINDS}
    rows = [{"model": "notpalimpsa", "size": "tiny", "status": "ok", "notes": [], "params": 1, "step_s": 0.1,
             "tokens_per_s": 80.0, "breakdown": {"ms": None, "total_ms": 7.0, "clock": "device", "kernels": kinds}}]
    table = format_tables({"settings": settings, "environment": {"device_name": "a GPU"}, "rows": rows,
                           "command": "x"})
    assert "split by kernel kind only" in table and "| op | gates |" not in table
    assert "| notpalimpsa | tiny | 1.0 |" in table
