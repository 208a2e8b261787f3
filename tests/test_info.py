"""`python -m vrepa_kernels.info` and the build record behind its `cuda_extension:` line."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from vrepa_kernels import info
from vrepa_kernels.backends import cuda_backend

LINE = re.compile(r"^cuda_extension: (built \(sm_\d+a?(, sm_\d+a?)*(, PTX compute_\d+)?\)|not built \(.+\))$")


def test_module_entry_point_prints_versions_backends_and_the_extension_line():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "vrepa_kernels.info"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"torch: {torch.__version__}" in out.stdout
    assert any(line.startswith("triton: ") for line in lines)
    assert "backends on cpu: reference, torch" in lines  # no interpreter in this environment
    extension_lines = [line for line in lines if line.startswith("cuda_extension:")]
    assert len(extension_lines) == 1 and LINE.match(extension_lines[0]), extension_lines
    assert extension_lines[0] == cuda_backend.cuda_extension_line()


def test_not_built_line(monkeypatch):
    monkeypatch.setattr(cuda_backend, "cuda_module", None)
    monkeypatch.setattr(cuda_backend, "build_info",
                        lambda: {"cuda": {"built": False, "reason": "skipped: VREPA_SKIP_CUDA=1"}})
    assert info.report()[-1] == "cuda_extension: not built (skipped: VREPA_SKIP_CUDA=1)"
    assert LINE.match(info.report()[-1])


def test_built_line_lists_the_targets(monkeypatch):
    fake = type("Ext", (), dict(sass_archs="80,90a", ptx_arch="80", cuda_runtime_version=13000,
                                driver_version=staticmethod(lambda: 0)))
    monkeypatch.setattr(cuda_backend, "cuda_module", fake)
    assert info.report()[-1] == "cuda_extension: built (sm_80, sm_90a, PTX compute_80)"


def _nvcc_present():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (home and os.path.exists(os.path.join(home, "bin", "nvcc")))
                or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_extension_is_built_wherever_nvcc_is():
    # CI has nvcc and no GPU: this is where a CUDA compile error would otherwise pass silently.
    record = cuda_backend.build_info()
    if not record:
        pytest.skip("the package was not built by setup.py (no _build_info.json)")
    if record["cuda"].get("reason", "").startswith("skipped"):
        pytest.skip(record["cuda"]["reason"])
    assert cuda_backend.cpu_twin_line() == "cpu_twin: built", record["cpu"]
    if _nvcc_present():
        assert cuda_backend.cuda_extension_built(), record["cuda"]
        assert cuda_backend.emulator_line() == "kernel_emulator: built", record["emulator"]
