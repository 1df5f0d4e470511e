"""``palimpsa info``: what it reports about this machine's backends."""

from __future__ import annotations

import re

from palimpsa.info import collect_info
from palimpsa.ops.cuda import nvrtc


def test_info_reports_nvrtc_and_the_backends(monkeypatch):
    info = collect_info()
    assert info["backend on CPU tensors"].startswith("torch")
    assert re.match(r"(\d+\.\d+ \(the CUDA C\+\+ kernels|not found \(no NVRTC library found)", info["nvrtc"])
    monkeypatch.setattr(nvrtc, "_NVRTC", None)
    monkeypatch.setattr(nvrtc, "_NVRTC_MISSING", "no NVRTC library found (tried x)")
    assert collect_info()["nvrtc"] == "not found (no NVRTC library found (tried x))"
