"""The CUDA C++ backend (csrc/): error paths, the logic it shares with its CPU twin, the twin and the
emulated kernels against the reference (both training paths: two-pass and the fused memory-minimal kernel),
the sign map against its Python definition and the Triton map, the compiled code (SASS), and (with a GPU)
the kernels themselves.

Without a GPU only the CPU part runs: the twin walks the kernels' schedules with their epilogues, the
emulator runs the kernels' own code, and fragment_selftest checks the tensor-core lane/address arithmetic
by emulating ldmatrix and mma.sync.
"""
import dataclasses
import itertools
import math
import types

import pytest
import torch

from vrepa_kernels import backends, sign_map, trd_loss
from vrepa_kernels.backends import cuda as cuda_backend
from vrepa_kernels.features import Features
from vrepa_kernels.relation import RelationSpec, canonicalize, relation_mask

from utils import HAS_CUDA, assert_matches_reference, make_pair, requires_cuda, tie_band

cpu_ext = cuda_backend._cpu_ext
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
    monkeypatch.setattr(cuda_backend, "_cuda_ext", None)
    monkeypatch.setattr(cuda_backend, "build_info", lambda: {"cuda": {"built": False, "reason": "nvcc was not found"}})
    reason = cuda_backend.unavailable_reason(torch.device("cuda", 0))
    assert "vrepa_kernels._C_cuda is not built: nvcc was not found" in reason
    assert cuda_backend.cuda_extension_line() == "cuda_extension: not built (nvcc was not found)"
    monkeypatch.setattr(cuda_backend, "build_info", lambda: {})
    assert "installed without building it" in cuda_backend.cuda_extension_line()


def test_cpu_tensors_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_backend, "_cuda_ext", types.SimpleNamespace(sass_archs="80", ptx_arch="80"))
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
    monkeypatch.setattr(cuda_backend, "_cuda_ext", types.SimpleNamespace(sass_archs=sass, ptx_arch=ptx))
    problem = cuda_backend.arch_problem(capability)
    assert (problem is None) == runs
    if not runs:
        major, minor = capability
        assert f"this GPU is sm_{major}{minor}" in problem and f"VREPA_CUDA_ARCHS={major}{minor}" in problem


def test_cuda_extension_line_format():
    line = cuda_backend.cuda_extension_line()
    if cuda_backend.cuda_extension_built():
        assert line.startswith("cuda_extension: built (sm_") and line.endswith(")")
        assert cuda_backend._cuda_ext.cuda_runtime_version >= 11000
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

requires_emulator = pytest.mark.skipif(cuda_backend._emulator_ext is None,
                                       reason="vrepa_kernels._C_emulator is not built (it is built with _C_cuda)")


@pytest.fixture
def emulated_as_torch_backend(monkeypatch):
    return route_torch_backend(monkeypatch, cuda_backend.emulated_pair_sums)


@requires_emulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("algorithm, deterministic", PATHS)
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
    # The two-pass kernels: 260 tokens, 3 map tiles per side, so both map orientations are decoded.
    s, t = make_pair((1, 260, 24), 16, dtype=dtype, grad_teacher=True)
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
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_relations_dtypes(dtype, relation, frames, deterministic):
    s, t = make_pair((2, 325, 40), 24, dtype=dtype, device="cuda", grad_teacher=True)
    assert_matches_reference("cuda", s, t, relation=relation, num_frames=frames, deterministic=deterministic)


@gpu_kernel_test
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape, dt", [((1, 1, 3), 2), ((3, 130, 33), 17), ((37, 20), 12)])
def test_gpu_odd_shapes_and_reductions(reduction, shape, dt):
    s, t = make_pair(shape, dt, device="cuda", grad_teacher=True)
    assert_matches_reference("cuda", s, t, reduction=reduction)


@gpu_kernel_test
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_zero_tokens_and_nan(deterministic):
    s, t = make_pair((2, 100, 64), 32, dtype=torch.bfloat16, device="cuda", grad_teacher=True)
    check_zero_tokens_and_nan("cuda", s, t, deterministic)


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
