"""What the GPU would run, checked without a GPU: benchmarks/static_report.py compiles every kernel for sm_90
and sm_80 and reads its SASS; these tests fail where the design says something must not be there.

Catches what the CPU interpreter cannot: lowering errors, shared-memory overflow, register spills, global
atomics and GPU-scope fences in the default training path. Runs in a subprocess because this session's
triton runs in interpreter mode.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrepa_kernels.backends import triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.HAS_TRITON, reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "benchmarks/static_report.py", "--quick", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / "static_report.json").read_text())
    return data, out


def triton_backend_of(data, **where):
    rows = [r for r in data["kernels"] if r["backend"] == "triton"]
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def test_every_record_has_the_promised_fields_and_files(report):
    data, out = report
    fields = {"name", "backend", "role", "dtype", "arch", "config", "default_training", "cubin", "registers",
              "spill_bytes", "shared_bytes", "HGMMA", "HMMA", "ATOMG", "REDG", "MEMBAR", "LDGSTS", "UTMALDG"}
    assert data["kernels"]
    for r in data["kernels"]:
        assert fields <= set(r), r["name"]
        assert (out / r["cubin"]).stat().st_size > 0 and r["registers"] > 0
    roles = {r["role"] for r in triton_backend_of(data)}
    assert {"relation_pass", "gradient_pass", "loss_only", "memory_minimal"} <= roles
    assert {r["arch"] for r in data["kernels"]} >= {"sm_80", "sm_90"}


def test_default_training_kernels_on_hopper_use_hgmma_without_spills_atomics_or_fences(report):
    data, _ = report
    hopper = [r for r in data["kernels"] if r["default_training"] and r["arch"].startswith("sm_90")
              and r["dtype"] in ("bf16", "fp16")]
    assert {r["role"] for r in hopper if r["backend"] == "triton"} == {"relation_pass", "gradient_pass"}
    for r in hopper:
        assert r["spill_bytes"] == 0, r
        assert r["ATOMG"] == 0 and r["REDG"] == 0, r
        assert r["MEMBAR_GPU"] == 0, r
        assert r["HGMMA"] > 0 if r["backend"] == "triton" else r["HMMA"] + r["HGMMA"] > 0, r


def test_default_training_kernels_on_ampere_use_tensor_cores_without_spills_or_atomics(report):
    data, _ = report
    for r in triton_backend_of(data, arch="sm_80", default_training=True):
        assert r["spill_bytes"] == 0 and r["HMMA"] > 0 and r["ATOMG"] + r["REDG"] == 0, r


def test_memory_minimal_atomics_are_relaxed_and_the_acq_rel_variant_shows_the_fence(report):
    data, _ = report
    relaxed = triton_backend_of(data, role="memory_minimal")
    assert {r["arch"] for r in relaxed} == {"sm_80", "sm_90"}  # sm_80 spells them RED.E: counted too
    assert all(r["REDG"] > 0 and r["ATOMG"] == 0 and r["MEMBAR_GPU"] == 0 for r in relaxed), relaxed
    # The check can fail: the shipped default before the two-pass path had a GPU-wide fence per atomic.
    (acq_rel,) = triton_backend_of(data, role="memory_minimal_acq_rel")
    assert acq_rel["MEMBAR_GPU"] > 0 and acq_rel["ATOMG"] > 0


def test_row_owned_schedule_has_no_atomics(report):
    data, _ = report
    rows = triton_backend_of(data, role="memory_minimal_row_owned")
    assert rows and all(r["ATOMG"] + r["REDG"] == 0 for r in rows)


def test_the_model_is_labelled_and_favours_the_two_pass_path_at_full_grid(report):
    data, out = report
    modelled = data["modelled"]
    assert "modelled" in modelled["label"] and modelled["assumptions"]
    for device in modelled["devices"].values():
        shape = next(s for s in device["shapes"] if s["n"] == 17_550)
        paths = shape["paths"]
        assert paths["two_pass"]["atomics"] == 0 and paths["memory_minimal"]["atomics"] > 3e9
        assert paths["two_pass"]["time_ms"][1] < paths["naive"]["time_ms"][0]
        assert all(0 < f <= 1 for f in paths["two_pass"]["fraction_of_limit"])
    big = next(s for s in modelled["devices"]["H100 SXM"]["shapes"] if s["n"] == 75_600)
    assert not big["paths"]["naive"]["fits"] and big["paths"]["two_pass"]["fits"]  # 91 GB of pairs on 80 GB
    assert "modelled" in (out / "static_report.md").read_text()


def test_wide_offsets_only_past_int32():
    assert not triton_backend.needs_wide_offsets(75_600, 3072)
    assert triton_backend.needs_wide_offsets(1_000_000, 4096)
