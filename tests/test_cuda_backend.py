"""The CUDA C++ backend (csrc/): error paths, the logic it shares with its CPU twin, the twin and the
emulated kernels against the reference (both training paths: two-pass and the fused memory-minimal kernel),
the sign map against its Python definition and the Triton map, the compiled code (SASS), and (with a GPU)
the kernels themselves.

Without a GPU only the CPU part runs: the twin walks the kernels' schedules with their epilogues, the
emulator runs the kernels' own code, and fragment_selftest checks the tensor-core lane/address arithmetic
by emulating ldmatrix and mma.sync.
"""
import dataclasses
import functools
import importlib.util
import itertools
import math
import os
import re
import shutil
import subprocess
import types

import pytest
import torch

from vrepa_kernels import backends, sign_map, trd_loss
from vrepa_kernels.backends import cuda_backend
from vrepa_kernels.features import Features
from vrepa_kernels.relation import RelationSpec, canonicalize, relation_mask

from utils import HAS_CUDA, assert_matches_reference, cpu_backends, make_pair, requires_cuda, tie_band

cpu_ext = cuda_backend.cpu_module
requires_twin = pytest.mark.skipif(cpu_ext is None, reason="vrepa_kernels._C_cpu is not built")
RELATIONS = [("full", None), ("spatial", 5), ("temporal", 5)]
CODES = cuda_backend.RELATION_CODES
# (algorithm, deterministic): the two-pass path (always deterministic) and both schedules of the fused kernel.
PATHS = [("two_pass", False), ("memory_minimal", False), ("memory_minimal", True)]


def features(s, t, **kwargs):
    s3, t3, spec = canonicalize(s.detach(), t.detach(), **kwargs)
    return Features.of(s3), Features.of(t3), spec


def route_torch_backend(monkeypatch, kernel):
    """Route backend='torch' through ``kernel``, so the full op (normalisation, reductions) runs on it."""
    monkeypatch.setitem(backends.REGISTRY, "torch", dataclasses.replace(backends.REGISTRY["torch"], kernel=kernel))
    return "torch"


@pytest.fixture
def twin_as_torch_backend(monkeypatch):
    return route_torch_backend(monkeypatch, lambda *args, **kw: cuda_backend.cpu_twin_pair_sums(*args, threads=2, **kw))


def assert_results_equal(got, want):
    """Two pair_sums results (sums, grad_s, grad_t) agree bit for bit."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def check_zero_tokens_and_nan(backend, s, t, deterministic=False, algorithm="auto"):
    """Zero rows (and one below F.normalize's eps) match the reference; a NaN spoils its own sample only."""
    with torch.no_grad():
        s[0, 3].zero_()
        t[1, 7].zero_()
        s[1, 8].mul_(1e-14)
    assert_matches_reference(backend, s, t, deterministic=deterministic, algorithm=algorithm)
    with torch.no_grad():
        s[0, 5, 3] = float("nan")
    s.grad = t.grad = None
    loss = trd_loss(s, t, reduction="none", backend=backend, deterministic=deterministic, algorithm=algorithm)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(s.grad[0]).any() and torch.isnan(t.grad[0]).any()
    assert torch.isfinite(s.grad[1]).all() and torch.isfinite(t.grad[1]).all()


# ---------------------------------------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_cuda_backend_without_gpu_says_no_gpu():
    s, t = make_pair((1, 8, 4), 4)
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: no CUDA GPU is available"):
        trd_loss(s, t, backend="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        cuda_backend.pair_sums(*features(s, t), True, False)


def test_unbuilt_extension_is_named(monkeypatch):
    monkeypatch.setattr(cuda_backend, "cuda_module", None)
    monkeypatch.setattr(cuda_backend, "build_info", lambda: {"cuda": {"built": False, "reason": "nvcc was not found"}})
    reason = cuda_backend.unavailable_reason(torch.device("cuda", 0))
    assert "vrepa_kernels._C_cuda is not built: nvcc was not found" in reason
    assert cuda_backend.cuda_extension_line() == "cuda_extension: not built (nvcc was not found)"
    monkeypatch.setattr(cuda_backend, "build_info", lambda: {})
    assert "installed without building it" in cuda_backend.cuda_extension_line()


def test_cpu_tensors_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_backend, "cuda_module", types.SimpleNamespace(sass_archs="80", ptx_arch="80"))
    assert cuda_backend.unavailable_reason(torch.device("cpu")) == "the inputs are on cpu, not on a CUDA device"


@pytest.mark.parametrize("capability, sass, ptx, runs", [
    ((8, 0), "80,90a", "80", True),
    ((8, 6), "80", "", True),      # sm_80 SASS runs on every 8.x
    ((9, 0), "80,90a", "", True),
    ((9, 0), "80", "", False),     # no 9.x image and no PTX
    ((10, 0), "80,90a", "80", True),  # the driver JITs compute_80 PTX
    ((8, 9), "90a", "", False),
    ((9, 1), "90a", "", False),    # arch-specific SASS runs on exactly 9.0
    ((7, 5), "80,90a", "80", False),
])
def test_arch_check(monkeypatch, capability, sass, ptx, runs):
    monkeypatch.setattr(cuda_backend, "cuda_module", types.SimpleNamespace(sass_archs=sass, ptx_arch=ptx))
    problem = cuda_backend.arch_problem(capability)
    assert (problem is None) == runs
    if not runs:
        major, minor = capability
        assert f"this GPU is sm_{major}{minor}" in problem and f"VREPA_CUDA_ARCHS={major}{minor}" in problem


def test_cuda_extension_line_format():
    line = cuda_backend.cuda_extension_line()
    if cuda_backend.cuda_extension_built():
        assert line.startswith("cuda_extension: built (sm_") and line.endswith(")")
        assert cuda_backend.cuda_module.cuda_runtime_version >= 11000
    else:
        assert line.startswith("cuda_extension: not built (") and line.endswith(")")


@requires_twin
def test_twin_rejects_bad_arguments():
    s, t = make_pair((1, 12, 8), 8)
    fs, ft, spec = features(s, t)
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.cpu_twin_pair_sums(*features(s.double(), t.double()), True, False)
    with pytest.raises(ValueError, match="threads"):
        cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, False, threads=0)
    with pytest.raises(ValueError, match=r"splits must be in \[1, row_blocks"):
        cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, False, splits=5, algorithm="memory_minimal")  # 1 block
    with pytest.raises(ValueError, match="deterministic schedule takes splits=1"):
        cuda_backend.cpu_twin_pair_sums(*features(*make_pair((1, 200, 8), 8)), True, False, deterministic=True,
                                        splits=2, algorithm="memory_minimal")
    with pytest.raises(ValueError, match="splits=2 applies to the memory-minimal"):
        cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, False, splits=2, algorithm="two_pass")
    with pytest.raises(ValueError, match="algorithm must be one of .* got 'fast'"):
        cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, False, algorithm="fast")
    bad_frames = RelationSpec(1, 12, "spatial", 5, 0.1)  # 5 does not divide 12
    with pytest.raises(ValueError, match="tokens_per_frame=5"):
        cuda_backend.cpu_twin_pair_sums(fs, ft, bad_frames, True, False)


# ---------------------------------------------------------------------------------------------------------
# Shared logic (trd_shared.h), probed through the twin's module
# ---------------------------------------------------------------------------------------------------------

@requires_twin
def test_epilogue_math():
    nan, inf = float("nan"), float("inf")
    assert cpu_ext.element_loss(0.5, 0.1) == pytest.approx(0.4)
    assert cpu_ext.element_loss(-0.5, 0.1) == pytest.approx(0.4)
    assert cpu_ext.element_loss(0.05, 0.1) == 0.0
    assert math.isnan(cpu_ext.element_loss(nan, 0.1))
    assert cpu_ext.element_loss(-inf, 0.1) == inf
    assert [cpu_ext.pair_sign(g, 0.1) for g in (0.5, -0.5, 0.1, -0.1, 0.0)] == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert [cpu_ext.pair_sign(g, 0.0) for g in (1e-30, -1e-30, 0.0)] == [1.0, -1.0, 0.0]
    assert math.isnan(cpu_ext.pair_sign(nan, 0.1)) and math.isnan(cpu_ext.pair_sign(inf, 0.1))


@requires_twin
@pytest.mark.parametrize("relation, tpf", [("full", 1), ("spatial", 7), ("temporal", 7), ("spatial", 1)])
def test_keep_pair_matches_relation_mask(relation, tpf):
    n = 35
    spec = RelationSpec(1, n, relation, tpf if relation != "full" else 0)
    mask = relation_mask(spec)
    got = torch.tensor([[cpu_ext.keep_pair(CODES[relation], tpf, i, j) for j in range(n)] for i in range(n)])
    assert torch.equal(got, mask)


@requires_twin
def test_tile_skipping_is_exact():
    # A tile is skipped iff it holds no kept pair (brute force over small tiles).
    tpf, n = 4, 24
    for relation in ("spatial", "temporal"):
        for r0, r1, c0, c1 in itertools.product(range(0, n, 3), range(n), range(0, n, 5), range(n)):
            if r1 < r0 or c1 < c0:
                continue
            brute = any(cpu_ext.keep_pair(CODES[relation], tpf, i, j)
                        for i in range(r0, r1 + 1) for j in range(c0, c1 + 1))
            assert cpu_ext.tile_has_kept_pairs(CODES[relation], tpf, r0, r1, c0, c1) == brute


COVERAGE_CASES = [  # (n, relation, frames, symmetric, splits), every split count a row-block count allows
    (n, relation, frames, symmetric, splits)
    for n, relation, frames in [(1, "full", None), (63, "spatial", 9), (64, "temporal", 8), (65, "full", None),
                                (65, "spatial", 5), (65, "temporal", 13), (200, "full", None), (200, "spatial", 8),
                                (200, "temporal", 40), (200, "spatial", 1), (200, "spatial", 200)]
    for symmetric, splits in [(True, 1), (True, 2), (True, 3), (False, 1)]
    if splits <= -(-n // 64)
]


@requires_twin
@pytest.mark.parametrize("n, relation, frames, symmetric, splits", COVERAGE_CASES)
def test_schedule_counts_every_kept_pair_once(n, relation, frames, symmetric, splits):
    tpf = n // frames if frames else 1
    counts = torch.frombuffer(bytearray(cpu_ext.schedule_coverage(n, CODES[relation], tpf, symmetric, splits)),
                              dtype=torch.uint8).reshape(n, n)
    spec = RelationSpec(1, n, relation, tpf if relation != "full" else 0)
    assert torch.equal(counts, relation_mask(spec).to(torch.uint8))


@requires_twin
def test_launch_plan():
    assert cpu_ext.plan(1, 8192, False, 132) == (128, 1)  # deterministic: never split
    blocks, splits = cpu_ext.plan(1, 8192, True, 132)
    assert blocks == 128 and 1 < splits <= 128 and blocks * splits >= 8 * 132
    assert cpu_ext.plan(64, 8192, True, 132) == (128, 1)  # enough work items already
    assert cpu_ext.plan(1, 10, True, 1000) == (1, 1)  # at most one split per column tile
    for linear in range(2 * 3 * 5):
        b, block, split = cpu_ext.decode_work(linear, 2, 3)
        assert linear == (block * 3 + split) * 2 + b


@requires_twin
def test_offsets_are_64_bit():
    assert cpu_ext.element_offset(3, 2**33, 5, 2**20, 7) == 3 * 2**33 + 5 * 2**20 + 7


@requires_twin
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensor_core_fragment_arithmetic(seed):
    # Emulated ldmatrix.x4 / mma.m16n8k16 driven by the kernel's lane -> address helpers: every product
    # (Gram S_I S_J^T, P X_J, P^T X_I) and the accumulator -> tile mapping must be exact.
    assert cpu_ext.fragment_selftest(seed) == {"nt": 0, "nn": 0, "tn": 0, "tile_coverage": 0}


# ---------------------------------------------------------------------------------------------------------
# The CPU twin against the reference (through the full op: normalisation and reductions)
# ---------------------------------------------------------------------------------------------------------

@requires_twin
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
def test_twin_relations_and_reductions(twin_as_torch_backend, relation, frames, reduction, algorithm, deterministic):
    s, t = make_pair((2, 65, 40), 24, grad_teacher=True)  # odd N, Ds != Dt, both gradients
    assert_matches_reference(twin_as_torch_backend, s, t, relation=relation, num_frames=frames,
                             reduction=reduction, deterministic=deterministic, algorithm=algorithm)


@requires_twin
@pytest.mark.parametrize("shape, dt", [((1, 1, 3), 2), ((1, 3, 5), 7), ((3, 130, 16), 33), ((1, 300, 70), 8)])
@pytest.mark.parametrize("algorithm", ["two_pass", "memory_minimal"])
def test_twin_odd_shapes(twin_as_torch_backend, shape, dt, algorithm):
    s, t = make_pair(shape, dt, grad_teacher=True)
    assert_matches_reference(twin_as_torch_backend, s, t, reduction="none", algorithm=algorithm)


@requires_twin
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("algorithm", ["two_pass", "memory_minimal"])
def test_twin_half_inputs(twin_as_torch_backend, dtype, relation, frames, algorithm):
    s, t = make_pair((2, 60, 32), 24, dtype=dtype)
    assert_matches_reference(twin_as_torch_backend, s, t, relation=relation, num_frames=frames, algorithm=algorithm)


@requires_twin
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
def test_twin_zero_tokens_and_nan(twin_as_torch_backend, algorithm, deterministic):
    s, t = make_pair((2, 140, 16), 12, grad_teacher=True)  # 3 row blocks / 2 map tiles: NaN reaches mirrored tiles
    check_zero_tokens_and_nan(twin_as_torch_backend, s, t, deterministic, algorithm)


@requires_twin
def test_twin_schedules_and_splits_agree():
    s, t = make_pair((2, 300, 24), 16, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=5)
    base = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, deterministic=True, threads=1,
                                           algorithm="memory_minimal")
    for kwargs in (dict(threads=2, algorithm="memory_minimal"), dict(threads=3, splits=2, algorithm="memory_minimal"),
                   dict(threads=1, splits=5, algorithm="memory_minimal"), dict(threads=2, algorithm="two_pass")):
        got = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, **kwargs)
        for a, b in zip(got, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loss_only = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, False, False, threads=2)
    assert loss_only[1] is None and loss_only[2] is None
    torch.testing.assert_close(loss_only[0], base[0], rtol=1e-5, atol=1e-5)


@requires_twin
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
def test_twin_is_bitwise_repeatable(algorithm, deterministic):
    s, t = make_pair((2, 257, 40), 24, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="spatial", num_frames=1)
    runs = [cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, deterministic, threads=3, algorithm=algorithm)
            for _ in range(3)]
    for run in runs[1:]:
        assert_results_equal(run, runs[0])


@requires_twin
def test_twin_strided_input_rows():
    # Rows that do not start on 16-byte boundaries and a batch stride with padding.
    base = torch.randn(3, 70, 41)
    s = base[:, :, 1:34]  # [3, 70, 33], row stride 41
    t = torch.randn(3, 70, 20)
    fs, ft, spec = features(s, t)
    assert fs.values.stride() == (70 * 41, 41, 1)
    for algorithm in ("two_pass", "memory_minimal"):
        got = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, False, threads=2, algorithm=algorithm)
        ref = cuda_backend.cpu_twin_pair_sums(Features(s.contiguous(), fs.norm), ft, spec, True, False, threads=2,
                                              algorithm=algorithm)
        assert_results_equal(got, ref)


# ---------------------------------------------------------------------------------------------------------
# The CUDA kernel's own code, run on the CPU by the warp/barrier emulator (_C_emulator)
# ---------------------------------------------------------------------------------------------------------

requires_emulator = pytest.mark.skipif(cuda_backend.emulator_module is None,
                                       reason="vrepa_kernels._C_emulator is not built (it is built with _C_cuda)")


@pytest.fixture
def emulated_as_torch_backend(monkeypatch):
    return route_torch_backend(monkeypatch, cuda_backend.emulated_pair_sums)


# The fused kernel for every (dtype, relation, schedule); the two-pass kernels for one dtype per relation (the map
# tests below run every dtype through them).
EMULATED_CASES = [(dtype, relation, frames, "memory_minimal", deterministic)
                  for dtype in (torch.float32, torch.bfloat16, torch.float16)
                  for relation, frames in RELATIONS for deterministic in (False, True)] + [
    (torch.float32, "spatial", 5, "two_pass", False), (torch.bfloat16, "full", None, "two_pass", False),
    (torch.float16, "temporal", 5, "two_pass", False)]


@requires_emulator
@pytest.mark.parametrize("dtype, relation, frames, algorithm, deterministic", EMULATED_CASES)
def test_emulated_kernel_relations_dtypes(emulated_as_torch_backend, dtype, relation, frames, algorithm, deterministic):
    # 130 tokens: three row blocks, a ragged last one, and split work items in the symmetric schedule; two map
    # tiles per side in the two-pass path (one read transposed).
    s, t = make_pair((2, 130, 40), 24, dtype=dtype, grad_teacher=True)
    assert_matches_reference(emulated_as_torch_backend, s, t, relation=relation, num_frames=frames,
                             deterministic=deterministic, algorithm=algorithm)


@requires_emulator
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("shape, dt, dtype", [((1, 1, 3), 2, torch.float32), ((3, 70, 33), 17, torch.float32),
                                              ((1, 3, 5), 7, torch.bfloat16), ((2, 66, 72), 130, torch.float16)])
@pytest.mark.parametrize("algorithm", ["two_pass", "memory_minimal"])
def test_emulated_kernel_odd_shapes(emulated_as_torch_backend, reduction, shape, dt, dtype, algorithm):
    if algorithm == "two_pass" and reduction == "sum":
        pytest.skip("the reduction is the op's, not the kernel's: one reduction per shape for the two-pass kernels")
    # Ds = 33 fp32 / 72 fp16: rows off 16-byte boundaries or chunks past 64, element-wise staging paths.
    s, t = make_pair(shape, dt, dtype=dtype, grad_teacher=True)
    assert_matches_reference(emulated_as_torch_backend, s, t, reduction=reduction, algorithm=algorithm)


@requires_emulator
@pytest.mark.parametrize("algorithm", ["two_pass", "memory_minimal"])
def test_emulated_kernel_zero_tokens_and_nan(emulated_as_torch_backend, algorithm):
    s, t = make_pair((2, 140, 16), 24, grad_teacher=True)
    check_zero_tokens_and_nan(emulated_as_torch_backend, s, t, algorithm=algorithm)


@requires_emulator
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_kernel_staging_paths_agree(dtype):
    # Same values through 16-byte cp.async staging (contiguous) and element-wise staging (rows 130 bytes apart).
    padded = torch.randn(2, 150, 65).to(dtype)
    s = padded[:, :, :64]
    t = torch.randn(2, 150, 40).to(dtype)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=3)
    assert fs.values.stride(1) == 65
    for algorithm in ("two_pass", "memory_minimal"):
        strided = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, algorithm=algorithm)
        contiguous = cuda_backend.emulated_pair_sums(Features(s.contiguous(), fs.norm), ft, spec, True, True,
                                                     algorithm=algorithm)
        assert_results_equal(strided, contiguous)


@requires_emulator
@pytest.mark.parametrize("order", [1, 7, 12345])
@pytest.mark.parametrize("dtype, deterministic", [(torch.bfloat16, False), (torch.float32, True)])
def test_emulated_kernel_is_order_independent(order, dtype, deterministic):
    # Threads resumed in reverse or shuffled order: a shared-memory read that is not ordered by a barrier (or a
    # cp.async not yet waited for) would see other data in some order.
    s, t = make_pair((1, 140, 72), 40, dtype=dtype, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=7)
    forward = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, deterministic, splits=2 - deterministic,
                                              algorithm="memory_minimal")
    other = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, deterministic, splits=2 - deterministic,
                                            order=order, algorithm="memory_minimal")
    assert_results_equal(forward, other)
    if dtype != torch.bfloat16:
        return
    # The two-pass kernels: 259 tokens, 3 map tiles per side, so both map orientations are decoded.
    s, t = make_pair((1, 259, 16), 8, dtype=dtype, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=7)
    forward = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, algorithm="two_pass")
    other = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, order=order, algorithm="two_pass")
    assert_results_equal(forward, other)
    assert_results_equal(cuda_backend.emulated_relation_pass(fs, ft, spec),
                         cuda_backend.emulated_relation_pass(fs, ft, spec, order=order))


@requires_emulator
def test_emulated_kernel_matches_twin_for_every_split():
    s, t = make_pair((1, 200, 48), 32, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="spatial", num_frames=4)
    twin = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, threads=1, algorithm="memory_minimal")
    for kwargs in (dict(splits=1), dict(splits=2), dict(splits=4), dict(deterministic=True)):
        emulated = cuda_backend.emulated_pair_sums(fs, ft, spec, True, True, algorithm="memory_minimal", **kwargs)
        for a, b in zip(emulated, twin):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loss_only = cuda_backend.emulated_pair_sums(fs, ft, spec, False, False)
    torch.testing.assert_close(loss_only[0], twin[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The two-pass path: the sign map (format, codes, orientation), its linearised triangle, the algorithm choice
# ---------------------------------------------------------------------------------------------------------

RUNNERS = {
    "twin": (requires_twin, lambda fs, ft, spec: cuda_backend.cpu_twin_relation_pass(fs, ft, spec, threads=2)),
    "emulator": (requires_emulator, cuda_backend.emulated_relation_pass),
}


def relation_pass_of(runner):
    skip, run = RUNNERS[runner]
    if skip.args[0]:
        pytest.skip(skip.kwargs["reason"])
    return run


def float64_gap(fs: Features, ft: Features) -> torch.Tensor:
    u, v = fs.unit(torch.float64), ft.unit(torch.float64)
    return u @ u.transpose(1, 2) - v @ v.transpose(1, 2)


def expected_map_codes(fs: Features, ft: Features, spec: RelationSpec):
    """(float64 gap, codes) per sample of the map: spatial maps hold the B * F one-frame samples."""
    gap = float64_gap(fs, ft)
    if spec.relation != "spatial":
        return gap, sign_map.codes_of(gap, spec.margin, relation_mask(spec))
    tpf = spec.tokens_per_frame
    frames = [gap[:, f * tpf:(f + 1) * tpf, f * tpf:(f + 1) * tpf] for f in range(spec.num_frames)]
    gap = torch.stack(frames, dim=1).reshape(-1, tpf, tpf)
    return gap, sign_map.codes_of(gap, spec.margin)


def one_hot_pair(batch, n, ds, dt, dtype, seed=0):
    """Tokens that are signed one-hot vectors: every Gram entry is exactly -1, 0 or +1, every gap -2 .. 2."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(dim):
        x = torch.zeros(batch, n, dim)
        idx = torch.randint(0, min(dim, 3), (batch, n, 1), generator=gen)  # few directions: many +-1 gaps
        sign = torch.randint(0, 2, (batch, n, 1), generator=gen).float() * 2 - 1
        return x.scatter_(2, idx, sign).to(dtype)

    return tokens(ds), tokens(dt)


@requires_twin
@pytest.mark.parametrize("side", [1, 2, 3, 7, 64, 600])
def test_map_triangle_linearisation_inverts_tile_index(side):
    total = side * (side + 1) // 2
    linears = range(total) if total < 5000 else list(range(0, total, 97)) + [total - 2, total - 1]
    for linear in linears:
        i, j = cpu_ext.map_tile_of(linear, side)
        assert 0 <= i <= j < side and sign_map.tile_index(i, j, side) == linear
        assert cpu_ext.map_tile_index(i, j, side) == linear
    assert cpu_ext.map_tile_of(total - 1, side) == (side - 1, side - 1)


@requires_twin
def test_pair_codes_and_their_signs():
    nan, inf = float("nan"), float("inf")
    gaps = [0.5, -0.5, 0.1, -0.1, 0.0, 1e-30, nan, inf, -inf]
    assert [cpu_ext.pair_code(g, 0.1) for g in gaps] == [1, 2, 0, 0, 0, 0, 3, 3, 3]
    assert [cpu_ext.pair_code(g, 0.0) for g in (1e-30, -1e-30, 0.0)] == [1, 2, 0]
    expected = sign_map.codes_of(torch.tensor(gaps, dtype=torch.float64), 0.1)
    assert [cpu_ext.pair_code(g, 0.1) for g in gaps] == expected.tolist()
    assert [cpu_ext.code_sign(c) for c in range(3)] == [0.0, 1.0, -1.0] and math.isnan(cpu_ext.code_sign(3))
    assert cpu_ext.map_tile == sign_map.MAP_TILE == 128


MAP_CASES = [(300, "full", None, 0.1), (261, "temporal", 3, 0.1), (261, "spatial", 3, 0.05)]


@pytest.mark.parametrize("runner, dtype", [("twin", torch.float32), ("twin", torch.bfloat16), ("twin", torch.float16),
                                           ("emulator", torch.float32), ("emulator", torch.bfloat16)])
@pytest.mark.parametrize("n, relation, frames, margin", MAP_CASES)
def test_map_codes_equal_float64_codes_away_from_ties(runner, dtype, n, relation, frames, margin):
    # N > 256: three map tiles per side, a ragged last one; Ds != Dt. Sums against the float64 loss.
    relation_pass = relation_pass_of(runner)
    s, t = make_pair((1 if runner == "emulator" else 2, n, 24), 16, dtype=dtype)
    fs, ft, spec = features(s, t, relation=relation, num_frames=frames, margin=margin)
    sums, words = relation_pass(fs, ft, spec)
    gap, expected = expected_map_codes(fs, ft, spec)
    assert words.dtype == torch.int32 and words.shape == (gap.shape[0], sign_map.num_map_tiles(gap.shape[1]), 128, 8)
    got = sign_map.unpack(words, gap.shape[1])
    far = (gap.abs() - margin).abs() > tie_band(dtype, 24, 16, margin)
    assert torch.equal(got[far], expected[far])
    assert far.float().mean() > 0.8  # the comparison covers most pairs
    loss64 = ((gap.abs() - margin).clamp_min(0) * (expected != 0)).sum(dim=(1, 2))  # kept pairs past the margin
    loss64 = loss64.reshape(s.shape[0], -1).sum(dim=1)
    assert sums.dtype == torch.float32 and sums.shape == (s.shape[0],)
    torch.testing.assert_close(sums.double(), loss64, rtol=1e-3 if dtype == torch.float32 else 3e-2, atol=1e-3)


@pytest.mark.parametrize("runner", ["twin", "emulator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relation, frames", [("full", None), ("temporal", 3), ("spatial", 3)])
def test_map_is_exact_for_exact_gaps_ties_and_non_finite_pairs(runner, dtype, relation, frames):
    # Gaps exactly 0, +-1 or +-2: margin 1 makes the +-1 gaps ties (code 0, no loss), margin 0.5 has none. One NaN
    # token and one infinite token give code 3 on their rows and columns, and a NaN sum for their sample.
    if runner == "emulator" and (dtype, relation) not in {(torch.float32, "full"), (torch.bfloat16, "temporal"),
                                                           (torch.float16, "spatial")}:
        pytest.skip("the emulator runs one dtype per relation (time)")
    relation_pass = relation_pass_of(runner)
    s, t = one_hot_pair(2, 174, 40, 24, dtype)  # two map tiles per side, the second ragged
    for margin in (1.0, 0.5):
        fs, ft, spec = features(s, t, relation=relation, num_frames=frames, margin=margin)
        sums, words = relation_pass(fs, ft, spec)
        gap, expected = expected_map_codes(fs, ft, spec)
        assert torch.equal(sign_map.unpack(words, gap.shape[1]), expected)
        want = ((gap.abs() - margin).clamp_min(0) * (expected != 0)).reshape(2, -1).sum(dim=1)
        assert torch.equal(sums.double(), want)  # sums of halves and integers: exact
        if margin == 1.0:  # the ties exist and carry no gradient
            ties = gap.abs() == 1.0
            assert ties.any() and (sign_map.unpack(words, gap.shape[1])[ties] == sign_map.CODE_NONE).all()
    s[0, 150, 1] = float("nan")
    t[1, 7, 0] = float("inf")
    fs, ft, spec = features(s, t, relation=relation, num_frames=frames, margin=0.5)
    sums, words = relation_pass(fs, ft, spec)
    gap, expected = expected_map_codes(fs, ft, spec)
    got = sign_map.unpack(words, gap.shape[1])
    assert torch.equal(got, expected) and (got == sign_map.CODE_NONFINITE).any()
    assert sums.isnan().all()


@pytest.mark.parametrize("runner", ["twin", "emulator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_pass_decodes_both_map_orientations(runner, dtype):
    # A map packed by sign_map.pack from random symmetric codes (two NaN pairs included): tiles right of the
    # diagonal are read as stored, tiles left of it transposed; G = scale P X against float64.
    skip = requires_twin if runner == "twin" else requires_emulator
    if skip.args[0]:
        pytest.skip(skip.kwargs["reason"])
    ext = cpu_ext if runner == "twin" else cuda_backend.emulator_module
    launch = dict(threads=2) if runner == "twin" else dict(order=0)
    batch, n, dim = 2, 260, 40
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 3, (batch, n, n), generator=gen)
    codes = torch.triu(codes) + torch.triu(codes, 1).transpose(1, 2)
    codes[0, 5, 259] = codes[0, 259, 5] = sign_map.CODE_NONFINITE  # a NaN pair in tiles (0, 2) and (2, 0)
    codes[1, 140, 150] = codes[1, 150, 140] = sign_map.CODE_NONFINITE
    words = sign_map.pack(codes)
    x = torch.randn(batch, n, dim, generator=gen).to(dtype)
    g = cuda_backend.launch_gradient_pass(ext, words, Features(x, torch.ones(batch, n, 1)), -2.0, **launch)
    want = -2.0 * sign_map.signs(codes) @ x.double()
    assert torch.isnan(g).any(dim=-1).tolist() == torch.isnan(want).any(dim=-1).tolist()
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-4, equal_nan=True)


@requires_twin
def test_relation_and_gradient_pass_reject_bad_arguments():
    s, t = make_pair((1, 12, 8), 8)
    fs, ft, spec = features(s, t)
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.cpu_twin_relation_pass(*features(s.double(), t.double()))
    words = torch.zeros(1, 1, 128, 8, dtype=torch.int32)
    x = torch.zeros(1, 12, 8)
    g = torch.zeros(1, 12, 8)
    good = dict(map=words.data_ptr(), x=x.data_ptr(), g=g.data_ptr(), dtype=0, batch=1, n=12, dim=8,
                x_strides=(96, 8), g_strides=(96, 8), scale=2.0, threads=1)
    for change, message in [(dict(map=0), "null map"), (dict(dim=0), "dim=0"), (dict(dtype=7), "got 7"),
                            (dict(x_strides=(96, 4)), "strides"), (dict(scale=float("inf")), "scale must be finite")]:
        with pytest.raises(ValueError, match=message):
            cpu_ext.gradient_pass(**{**good, **change})
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        cpu_ext.gradient_pass(**{**good, "threads": 0})
    with pytest.raises(ValueError, match="null sign-map pointer"):
        cpu_ext.relation_pass(s=s.data_ptr(), t=t.data_ptr(), s_inv=g.data_ptr(), t_inv=g.data_ptr(), map=0,
                              partial=g.data_ptr(), dtype=0, batch=1, n=12, ds=8, dt=8, s_strides=(96, 8),
                              t_strides=(96, 8), relation=0, tokens_per_frame=1, margin=0.1, threads=1)


@pytest.mark.parametrize("runner, deterministic", [("twin", False), ("twin", True), ("emulator", False)])
def test_fused_kernel_splits_work_across_ranks(runner, deterministic):
    # Sequence parallelism: rank r of `world` runs work items r, r + world, ...; the ranks' partial sums and
    # gradients add up to the whole call's. "auto" and "two_pass" both take the fused kernel for a part.
    skip = requires_twin if runner == "twin" else requires_emulator
    if skip.args[0]:
        pytest.skip(skip.kwargs["reason"])
    run = (functools.partial(cuda_backend.cpu_twin_pair_sums, threads=2) if runner == "twin"
           else cuda_backend.emulated_pair_sums)
    s, t = make_pair((2, 200 if runner == "twin" else 130, 16), 8, grad_teacher=True)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=5)
    whole = run(fs, ft, spec, True, True, deterministic, algorithm="memory_minimal")
    parts = [run(fs, ft, spec, True, True, deterministic, part=(rank, 3)) for rank in range(3)]
    assert all((p[0] != 0).all() and (p[1] != 0).any() for p in parts)  # every rank has work
    for i in range(3):
        torch.testing.assert_close(sum(p[i] for p in parts), whole[i], rtol=1e-5, atol=1e-5)
    assert_results_equal(run(fs, ft, spec, True, True, deterministic, part=(0, 1)), whole)
    idle = run(fs, ft, spec, True, True, deterministic, part=(99, 100))  # more ranks than work items
    assert all((x == 0).all() for x in idle)
    for bad in ((3, 3), (-1, 2), (0,)):
        with pytest.raises(ValueError, match="part must be"):
            run(fs, ft, spec, True, True, deterministic, part=bad)


def test_cuda_algorithm_choice_follows_the_budget_and_the_argument(monkeypatch):
    spec = RelationSpec(2, 1000)
    choose = cuda_backend.choose_algorithm
    assert choose("auto", spec) == "two_pass" and choose("memory_minimal", spec) == "memory_minimal"
    assert choose("two_pass", spec, (0, 2)) == "memory_minimal"  # sequence parallelism: the fused kernel
    assert cuda_backend.map_bytes(spec) == sign_map.map_bytes(2, 1000)
    assert cuda_backend.map_bytes(RelationSpec(2, 1000, "spatial", 100)) == sign_map.map_bytes(20, 100)
    assert cuda_backend.MAP_BUDGET_BYTES == 2**30
    monkeypatch.setattr(cuda_backend, "MAP_BUDGET_BYTES", sign_map.map_bytes(2, 1000))
    assert choose("auto", spec) == "two_pass"
    monkeypatch.setattr(cuda_backend, "MAP_BUDGET_BYTES", sign_map.map_bytes(2, 1000) - 1)
    assert choose("auto", spec) == "memory_minimal" and choose("two_pass", spec) == "two_pass"
    with pytest.raises(ValueError, match="algorithm must be one of .* got 'fast'"):
        choose("fast", spec)
    if cpu_ext is not None:  # over budget, "auto" runs the fused kernel, which takes splits
        s, t = make_pair((1, 150, 8), 8)
        monkeypatch.setattr(cuda_backend, "MAP_BUDGET_BYTES", 0)
        fused = cuda_backend.cpu_twin_pair_sums(*features(s, t), True, False, threads=1, splits=2)
        two_pass = cuda_backend.cpu_twin_pair_sums(*features(s, t), True, False, threads=1, algorithm="two_pass")
        torch.testing.assert_close(fused[1], two_pass[1], rtol=1e-5, atol=1e-5)


@requires_twin
@pytest.mark.parametrize("relation, frames", RELATIONS)
def test_two_pass_agrees_with_the_fused_kernel_and_repeats_bitwise(relation, frames):
    s, t = make_pair((2, 300, 24), 40, grad_teacher=True)
    fs, ft, spec = features(s, t, relation=relation, num_frames=frames)
    two_pass = [cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, threads=t, algorithm="two_pass")
                for t in (1, 3)]
    assert_results_equal(two_pass[0], two_pass[1])  # thread count does not change a bit
    fused = cuda_backend.cpu_twin_pair_sums(fs, ft, spec, True, True, deterministic=True, threads=2,
                                            algorithm="memory_minimal")
    for a, b in zip(two_pass[0], fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


requires_triton_interpreter = pytest.mark.skipif(
    "triton" not in cpu_backends() or not hasattr(importlib.import_module("vrepa_kernels.backends.triton_backend"),
                                                  "relation_pass"),
    reason="needs triton under TRITON_INTERPRET=1 and vrepa_kernels.backends.triton_backend.relation_pass")


@requires_emulator
@requires_triton_interpreter
@pytest.mark.parametrize("dtype, relation, frames", [
    (torch.float32, "full", None), (torch.float16, "temporal", 3), (torch.float32, "spatial", 3),
    (torch.bfloat16, "full", None)])
def test_cuda_and_triton_maps_are_identical(dtype, relation, frames):
    # Exact gaps (signed one-hot tokens) plus a NaN token: no pair is a tie, so both maps must agree word for
    # word. Spatial: both run the B * F one-frame samples (Triton's relation_pass takes full/temporal specs).
    from vrepa_kernels.backends import triton_backend

    s, t = one_hot_pair(2, 174, 40, 24, dtype, seed=5)  # 2 map tiles per side, the second ragged
    s[1, 100, 2] = float("nan")  # code 3 on a row and a column
    fs, ft, spec = features(s, t, relation=relation, num_frames=frames, margin=0.5)
    cuda_sums, cuda_words = cuda_backend.emulated_relation_pass(fs, ft, spec)
    if relation == "spatial":
        fs, ft, spec = cuda_backend.per_frame_samples(fs, ft, spec)
    triton_sums, triton_words = triton_backend.relation_pass(fs, ft, spec)
    n = spec.num_tokens
    assert torch.equal(sign_map.unpack(cuda_words, n), sign_map.unpack(triton_words.cpu(), n))
    assert torch.equal(cuda_words, triton_words.cpu())
    assert (sign_map.unpack(cuda_words, n) == sign_map.CODE_NONFINITE).any()
    triton_sums = triton_sums.cpu().reshape(2, -1).sum(dim=1)
    torch.testing.assert_close(cuda_sums, triton_sums, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# The compiled kernels (SASS of the built _C_cuda, read with cuobjdump; no GPU needed)
# ---------------------------------------------------------------------------------------------------------

def find_cuobjdump():
    """cuobjdump on PATH, else the copy bundled with Triton (triton/backends/nvidia/bin)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(root, "backends", "nvidia", "bin", "cuobjdump")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def sass_opcodes(text: str) -> dict:
    """{kernel symbol: [opcode, ...]} from `cuobjdump -sass` output."""
    kernels = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        kernels[name] = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", chunk)
    return kernels


def resource_usage(text: str) -> dict:
    """{kernel symbol: {"REG": .., "STACK": .., "LOCAL": .., ...}} from `cuobjdump -res-usage` output."""
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(.*)", text):
        usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", fields)}
    return usage


GLOBAL_ATOMICS = {"ATOMG", "REDG", "RED", "ATOM"}  # ATOMS (shared memory) is not one


@pytest.fixture(scope="module")
def built_cubins(tmp_path_factory):
    ext = cuda_backend.cuda_module
    if ext is None:
        pytest.skip(f"the CUDA extension is not built: {cuda_backend.cuda_extension_line()}")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not on PATH and not bundled with an installed triton")
    out = tmp_path_factory.mktemp("cubins")
    subprocess.run([tool, "-xelf", "all", ext.__file__], cwd=out, check=True, capture_output=True)
    cubins = sorted(out.glob("*.cubin"))
    assert cubins, "cuobjdump extracted no cubin from " + ext.__file__
    return tool, cubins


def test_two_pass_kernels_compile_without_spills_atomics_or_gpu_fences(built_cubins):
    tool, cubins = built_cubins
    run = lambda *args: subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout
    seen = set()
    archs = {cubin.name.split(".")[-2] for cubin in cubins}  # ..._C_cuda.<k>.sm_90a.cubin
    sass_arch = "sm_90a" if "sm_90a" in archs else max(archs)  # disassembling is slow: one arch
    for cubin in cubins:
        arch = cubin.name.split(".")[-2]
        for name, usage in resource_usage(run("-res-usage", str(cubin))).items():
            role = next((r for r in ("relation_pass", "gradient_pass", "fused") if r in name), None)
            if role is None:
                continue
            seen.add((arch, role))
            if role != "fused":
                assert usage["STACK"] == 0 and usage["LOCAL"] == 0, (arch, name, usage)  # no spills
                assert usage["REG"] <= 255, (arch, name, usage)
        if arch != sass_arch:
            continue
        for name, ops in sass_opcodes(run("-sass", str(cubin))).items():
            bases = [op.split(".")[0] for op in ops]
            half = "bfloat16" in name or "half" in name
            if "fused" in name and half:  # the memory-minimal kernel's relaxed reductions: the parser sees them
                assert GLOBAL_ATOMICS & set(bases), name
            if "relation_pass" not in name and "gradient_pass" not in name:
                continue
            assert not {"STL", "LDL"} & set(bases), name
            assert not GLOBAL_ATOMICS & set(bases), (name, sorted(GLOBAL_ATOMICS & set(bases)))
            fences = [op for op in ops if op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op)]
            assert not fences, (name, fences)
            assert ("HMMA" in bases) == half, name  # tensor cores for bf16/fp16, FMA for fp32
            assert "LDGSTS" in bases, name  # cp.async staging
            if half:
                assert "LDSM" in bases, name  # ldmatrix
    built = {f"sm_{a}" for a in cuda_backend.cuda_module.sass_archs.split(",") if a}
    assert built <= archs, (built, archs)
    for arch in archs:
        assert {(arch, r) for r in ("relation_pass", "gradient_pass", "fused")} <= seen, seen


# ---------------------------------------------------------------------------------------------------------
# The CUDA kernels (GPU only; the VideoREPA-shaped, wide-student and 17,550-token cases of backend='cuda'
# are in test_gpu.py, with the other backends)
# ---------------------------------------------------------------------------------------------------------

requires_cuda_backend = pytest.mark.skipif(
    not HAS_CUDA or cuda_backend.unavailable_reason(torch.device("cuda")) is not None,
    reason="needs a CUDA device and the built extension")


def gpu_kernel_test(test):
    """Marks a test of the CUDA kernels: `gpu`, skipped without a device the built extension runs on."""
    return pytest.mark.gpu(requires_cuda(requires_cuda_backend(test)))


@gpu_kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
def test_gpu_relations_dtypes(dtype, relation, frames, algorithm, deterministic):
    s, t = make_pair((2, 325, 40), 24, dtype=dtype, device="cuda", grad_teacher=True)
    assert_matches_reference("cuda", s, t, relation=relation, num_frames=frames, deterministic=deterministic,
                             algorithm=algorithm)


@gpu_kernel_test
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape, dt", [((1, 1, 3), 2), ((3, 130, 33), 17), ((37, 20), 12)])
def test_gpu_odd_shapes_and_reductions(reduction, shape, dt):
    s, t = make_pair(shape, dt, device="cuda", grad_teacher=True)
    assert_matches_reference("cuda", s, t, reduction=reduction)


@gpu_kernel_test
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
def test_gpu_zero_tokens_and_nan(algorithm, deterministic):
    s, t = make_pair((2, 300, 64), 32, dtype=torch.bfloat16, device="cuda", grad_teacher=True)
    check_zero_tokens_and_nan("cuda", s, t, deterministic, algorithm)


@gpu_kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_two_pass_map_and_determinism(dtype):
    # The GPU's map equals the float64 codes away from ties and the twin's map on exact gaps; two runs
    # of the two-pass path are bitwise identical (no atomics anywhere).
    s, t = make_pair((2, 700, 96), 80, dtype=dtype, device="cuda", grad_teacher=True)
    fs, ft, spec = features(s, t, relation="temporal", num_frames=7)
    sums, words = cuda_backend.relation_pass(fs, ft, spec)
    gap, expected = expected_map_codes(fs, ft, spec)
    far = (gap.abs() - spec.margin).abs() > tie_band(dtype, 96, 80, spec.margin)
    assert torch.equal(sign_map.unpack(words.cpu(), 700)[far.cpu()], expected.cpu()[far.cpu()])
    runs = [cuda_backend.pair_sums(fs, ft, spec, True, True, algorithm="two_pass") for _ in range(2)]
    assert_results_equal(runs[0], runs[1])
    exact_s, exact_t = one_hot_pair(2, 300, 40, 24, dtype)
    fs, ft, spec = features(exact_s.cuda(), exact_t.cuda(), margin=0.5)
    cpu_fs, cpu_ft, _ = features(exact_s, exact_t, margin=0.5)
    assert torch.equal(cuda_backend.relation_pass(fs, ft, spec)[1].cpu(),
                       cuda_backend.cpu_twin_relation_pass(cpu_fs, cpu_ft, spec)[1])


@gpu_kernel_test
def test_gpu_matches_cpu_twin():
    s, t = make_pair((2, 700, 96), 80, device="cuda", grad_teacher=True)
    fs, ft, spec = features(s, t, relation="spatial", num_frames=7)
    gpu = cuda_backend.pair_sums(fs, ft, spec, True, True, deterministic=True)
    cs, ct, _ = features(s.cpu(), t.cpu(), relation="spatial", num_frames=7)
    twin = cuda_backend.cpu_twin_pair_sums(cs, ct, spec, True, True, deterministic=True)
    for a, b in zip(gpu, twin):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@gpu_kernel_test
def test_gpu_side_stream_and_graph_capture():
    s, t = make_pair((2, 1024, 256), 256, dtype=torch.bfloat16, device="cuda")
    eager = trd_loss(s.detach(), t, backend="cuda", deterministic=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = trd_loss(s.detach(), t, backend="cuda", deterministic=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(side, eager)
    s_static = s.detach().clone().requires_grad_(True)
    with torch.cuda.stream(stream):
        trd_loss(s_static, t, backend="cuda").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = trd_loss(s_static, t, backend="cuda", deterministic=True)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, eager)
