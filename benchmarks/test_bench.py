"""Benchmark tests for CI: tiny shapes, timings recorded by pytest-benchmark and never asserted.

They assert what could be false: the benchmarked implementations agree with the reference, the useful-FLOP
count matches the library's pair count, and the CLI writes complete records, refusing or recording (never
crashing on) shapes that do not fit.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
import sequence_parallel  # noqa: E402

from vrepa_kernels import trd_loss_reference  # noqa: E402
from vrepa_kernels.relation import canonicalize  # noqa: E402

import impls as registry  # noqa: E402
import report  # noqa: E402
from cases import PRESETS, Case, useful_flops  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = Case(batch=2, frames=4, tokens_per_frame=24, ds=32, dt=16, relation="temporal")
REQUIRED_KEYS = {"impl", "N", "D", "Ds", "Dt", "dtype", "device", "mode", "relation", "time_ms_median",
                 "peak_mem_mb", "status", "device_name", "torch_version", "triton_version", "git_commit", "date"}


@pytest.mark.parametrize("impl_name", [name for name in registry.REGISTRY if name != "compiled"])
def test_benchmarked_impl_matches_reference(benchmark, impl_name):
    try:
        loss_fn = registry.REGISTRY[impl_name].build(TINY, DEVICE)
    except registry.Unavailable as why:
        assert str(why).strip()  # a column that cannot run says why
        pytest.skip(str(why))
    student, teacher = registry.make_inputs(TINY, DEVICE)
    step = registry.make_step(loss_fn, student, teacher, TINY.mode)
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)

    s64 = student.detach().double().requires_grad_(True)
    exact = trd_loss_reference(s64, teacher.double(), TINY.margin, TINY.relation, TINY.num_frames)
    exact.backward()
    assert torch.allclose(loss.double(), exact.detach(), rtol=1e-3, atol=1e-7)
    assert torch.allclose(student.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("relation", ["full", "spatial", "temporal"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_useful_flops_counts_the_librarys_kept_pairs(relation, mode):
    case = Case(batch=3, frames=5, tokens_per_frame=7, ds=48, dt=16, relation=relation, mode=mode)
    s, t = registry.make_inputs(case, torch.device("cpu"))
    _, _, spec = canonicalize(s, t, relation=relation, num_frames=case.num_frames)
    per_pair = (48 + 16) + (2 * 48 if mode == "fwd+bwd" else 0)
    assert useful_flops(case) == 3 * spec.pairs_per_sample * per_pair


def _cli(tmp_path, *extra, ns=("64", "128")):
    return run.main(["--n", *ns, "--d", "16", "--frames", "4", "--out", str(tmp_path), "--min-reps", "2",
                     "--min-time", "0", "--max-time", "1", "--no-progress", *extra])


def test_cli_writes_complete_records_table_and_plots(tmp_path, capsys):
    records = _cli(tmp_path, "--impls", "naive", "torch", "triton", "--relation", "full", "spatial")
    for name in ("results.json", "results.md", "time_vs_n.png", "memory_vs_n.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == len(records) == 2 * 2 * 4  # 2 N x 2 relations x (3 impls + limit)
    for rec in saved:
        assert REQUIRED_KEYS <= rec.keys(), REQUIRED_KEYS - rec.keys()
    by = {(r["impl"], r["N"], r["relation"]): r for r in saved}
    naive, fast, limit = by["naive", 128, "spatial"], by["torch", 128, "spatial"], by["limit", 128, "spatial"]
    assert naive["status"] == fast["status"] == limit["status"] == "ok"
    assert fast["time_ms_median"] > 0 and fast["peak_mem_mb"] is not None
    assert fast["speedup_vs_naive"] == pytest.approx(naive["time_ms_median"] / fast["time_ms_median"])
    assert fast["loss_rel_diff_vs_naive"] < 1e-4
    assert fast["is_default"] == (fast["default_impl"] == "torch")
    if DEVICE.type == "cpu":
        assert by["triton", 64, "full"]["status"] == "skipped" and by["triton", 64, "full"]["reason"]
    printed = capsys.readouterr().out
    assert "| case | impl |" in printed and "speed-up vs naive" in printed


def test_cli_refuses_cpu_shapes_over_the_memory_budget(tmp_path):
    if DEVICE.type != "cpu":
        pytest.skip("the memory budget applies to CPU runs")
    records = _cli(tmp_path, "--impls", "naive", "torch", "--mem-budget-gb", "1e-6", "--no-plots", ns=["64"])
    naive = [r for r in records if r["impl"] == "naive"]
    assert all(r["status"] == "skipped" and "would need" in r["reason"] for r in naive)
    assert all(r["status"] == "ok" for r in records if r["impl"] == "torch")


def test_cli_records_out_of_memory_instead_of_crashing(tmp_path, monkeypatch):
    def exhausted(case, device):
        def loss_fn(s, t):
            raise RuntimeError("CUDA out of memory. Tried to allocate 11.50 GiB")
        return loss_fn

    monkeypatch.setitem(registry.REGISTRY, "naive", registry.Impl("naive", "always OOM", exhausted))
    records = _cli(tmp_path, "--impls", "naive", "torch", "--no-plots", ns=["64"])
    assert {r["status"] for r in records if r["impl"] == "naive"} == {"oom"}
    assert all("speedup_vs_naive" not in r for r in records if r["impl"] == "torch")


def test_cli_reports_the_cases_done_when_interrupted(tmp_path, monkeypatch):
    calls = []

    def interrupted_at_second_case(case, device):
        calls.append(case.n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGTERM (e.g. from `timeout`) raises inside run.py
        return registry.REGISTRY["torch"].build(case, device)

    monkeypatch.setitem(registry.REGISTRY, "naive", registry.Impl("naive", "stops", interrupted_at_second_case))
    records = _cli(tmp_path, "--impls", "naive", "--no-plots", ns=["64", "128", "256"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["N"], r["status"]) for r in saved] == [(64, "ok"), (64, "ok"), (128, "skipped"), (256, "skipped")]
    assert saved[2]["reason"] == saved[3]["reason"] == "interrupted (SIGTERM or Ctrl-C)" and len(records) == 4


def test_target_check_reports_misses_with_their_size():
    base = dict(device="cpu", dtype="fp32", B=1, N=4096, Ds=256, Dt=256, mode="fwd+bwd", relation="full",
                F=16, status="ok")
    records = [dict(base, impl="naive", time_ms_median=400.0),
               dict(base, impl="torch", is_default=True, time_ms_median=200.0),
               dict(base, impl="limit", time_ms_median=100.0)]
    (line,) = report.targets(records)
    assert "speed-up vs naive 2.00× (target ≥ 3×: MISSED by 33%)" in line
    assert "time / limit 2.00× (target ≤ 1.3×: MISSED by 54%)" in line


def test_gpu_target_checks_name_the_issue_goals_and_oom():
    cog = dict(device="cuda", dtype="bf16", B=1, N=17550, Ds=768, Dt=768, mode="fwd+bwd", relation="full", F=13)
    big = dict(cog, N=75600, F=21)
    records = [dict(cog, impl="naive", status="ok", time_ms_median=30.0),
               dict(cog, impl="triton", status="ok", time_ms_median=10.0, frac_of_limit=0.7, extra_mem_mb=80.0),
               dict(cog, impl="cuda", status="ok", time_ms_median=16.0),
               dict(big, impl="naive", status="oom"),
               dict(big, impl="triton-minimal", status="ok", time_ms_median=45.0)]
    lines = report.targets(records)
    assert lines[0] == ("bf16 N=17550 D=768 fwd+bwd, triton (two-pass): vs naive 3.00× (target ≥ 3.5×: MISSED by "
                        "14%); of limit 70.00% (target ≥ 75%: MISSED by 7%); peak memory beyond the gradient "
                        "80.00 MiB (target ≤ 100.717 MiB: met)")
    assert lines[1] == ("bf16 N=17550 D=768 fwd+bwd, cuda (two-pass): vs naive 1.88× (target ≥ 2.5×: MISSED by "
                        "25%); time / triton 1.60× (target ≤ 1.5×: MISSED by 7%)")
    assert lines[2] == ("N=75600 fwd+bwd, best fused (triton-minimal): time 45.00 ms (target ≤ 40 ms: MISSED by "
                        "12%); naive: oom")


def test_gpu_preset_times_the_issue_shapes_and_acqrel_once():
    cases = PRESETS["gpu"]("cuda")
    assert [(c.batch, c.n, c.ds, c.dt, c.dtype, c.mode) for c in cases] == [
        (1, 17550, 768, 768, "bf16", "fwd+bwd"), (2, 3600, 768, 768, "bf16", "fwd+bwd"),
        (1, 32400, 768, 768, "bf16", "fwd+bwd"), (1, 75600, 768, 768, "bf16", "fwd+bwd")]
    timed = {c.n: [impl.name for impl in registry.select(None, c.extra_impls)] for c in cases}
    assert [n for n, names in timed.items() if "triton-acqrel" in names] == [17550]
    for names in timed.values():
        assert {"naive", "compiled", "torch", "triton", "triton-minimal", "cuda", "cuda-minimal"} <= set(names)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_default_column_follows_the_map_budget(backend, monkeypatch):
    monkeypatch.setattr(registry, "resolve_backend", lambda *args: backend)
    for n, column in ((1024, backend), (100_000, backend + "-minimal")):  # a 1.25 GB map exceeds 1 GiB
        case = Case(batch=1, frames=1, tokens_per_frame=n, ds=1, dt=1, dtype="bf16")
        assert registry.default_impl(case, *registry.make_inputs(case, torch.device("cpu"))) == column
        assert registry.default_impl(replace(case, mode="fwd"), *registry.make_inputs(case, DEVICE)) == backend


@pytest.mark.parametrize("relation", ["full", "temporal"])
def test_kernel_loss_wrapper_matches_the_reference(relation):
    # triton-acqrel's wrapper around a bare pair_sums, checked here with the torch backend's.
    from vrepa_kernels.backends.torch_backend import pair_sums

    case = Case(batch=2, frames=3, tokens_per_frame=8, ds=24, dt=16, relation=relation)
    student, teacher = registry.make_inputs(case, torch.device("cpu"))
    loss_fn = registry.kernel_loss(case, lambda fs, ft, spec: pair_sums(fs, ft, spec, True, False))
    loss = registry.make_step(loss_fn, student, teacher, case.mode)()
    s64 = student.detach().double().requires_grad_(True)
    exact = trd_loss_reference(s64, teacher.double(), case.margin, relation, case.num_frames)
    exact.backward()
    assert torch.allclose(loss.double(), exact.detach(), rtol=1e-5)
    assert torch.allclose(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)


def test_sequence_parallel_simulation_agrees_with_one_process(tmp_path, capsys):
    # Uneven slices (19 + 29 tokens, frames of 12 straddle the ranks), Ds != Dt.
    records = run.main(["--world-size", "2", "--n", "48", "--ds", "24", "--dt", "16", "--frames", "4",
                        "--relation", "temporal", "--shards", "19,29", "--min-reps", "2", "--min-time", "0",
                        "--max-time", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sequence_parallel.json").read_text())
    assert len(saved) == len(records) == 2 and [r["rank"] for r in saved] == [0, 1]
    assert [r["tokens"] for r in saved] == [19, 29]
    for rec in saved:
        assert rec["analytic_gathered_bytes"] == 2 * 29 * (24 + 16) * 4  # padded to the longest slice
        assert rec["loss_max_abs_diff"] < 1e-6 and rec["grad_max_abs_diff"] < 1e-6
        assert rec["time_ms_median"] > 0 and rec["single_time_ms_median"] > 0
    assert sum(r["pair_share"] for r in saved) == pytest.approx(1.0)
    assert "| case | W | rank |" in capsys.readouterr().out
    assert (tmp_path / "sequence_parallel.md").stat().st_size > 0


def test_sequence_parallel_formula_matches_the_docstring_for_even_slices():
    case = Case(batch=3, frames=4, tokens_per_frame=10, ds=24, dt=8, dtype="bf16")
    sizes = sequence_parallel.shard_sizes(case.n, 4, "even")
    assert sizes == [10, 10, 10, 10]
    formula = sequence_parallel.analytic_bytes(case, sizes)
    assert formula["gathered_bytes"] == formula["docstring_gathered_bytes"] == 3 * 40 * 32 * 2
    assert formula["allreduced_bytes"] == 3 * 4 + 3 * 40 * 24 * 4  # fp32 partial sums and gradients
    assert sum(sequence_parallel.shard_sizes(41, 4, "uneven")) == 41
    with pytest.raises(ValueError, match="--shards"):
        sequence_parallel.shard_sizes(40, 2, "10,20")
