"""Shared fixtures and oracles for the test suite.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is imported, so it is set here, before any test module imports the library.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from vrepa_kernels import trd_loss, trd_loss_reference  # noqa: E402
from vrepa_kernels.backends import triton_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not triton_kernels.HAS_TRITON, reason="triton is not installed")


def cpu_backends():
    """Backends that can run on CPU tensors in this session."""
    names = ["torch"]
    if triton_kernels.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def make_pair(shape_s, dt, dtype=torch.float32, device="cpu", seed=0, grad_teacher=False):
    """Random student/teacher features with a correlated teacher, so that relation gaps straddle the margin."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape_s, generator=gen, dtype=torch.float64)
    mix = torch.randn(shape_s[-1], dt, generator=gen, dtype=torch.float64) / shape_s[-1] ** 0.5
    teacher = student @ mix + 0.5 * torch.randn(*shape_s[:-1], dt, generator=gen, dtype=torch.float64)
    student = student.to(device=device, dtype=dtype).requires_grad_(True)
    teacher = teacher.to(device=device, dtype=dtype).requires_grad_(grad_teacher)
    return student, teacher


def loss_and_grads(fn, student, teacher, upstream_seed=1, **kwargs):
    """Loss and input gradients of ``fn`` under a random upstream gradient (tests backward's rescale)."""
    s = student.detach().clone().requires_grad_(student.requires_grad)
    t = teacher.detach().clone().requires_grad_(teacher.requires_grad)
    loss = fn(s, t, **kwargs)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype).to(loss.device)
    wrt = [x for x in (s, t) if x.requires_grad]
    grads = torch.autograd.grad((loss * upstream).sum(), wrt)
    return loss.detach(), [g.detach() for g in grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(backend, student, teacher, tol=None, deterministic=False, **kwargs):
    """Backend vs the float64 reference on the same inputs.

    fp32/fp64: max error within ``tol`` of the largest reference value (at least 1e-2). bf16/fp16: flash-attention's rule,
    error vs float64 at most twice that of the naive PyTorch run in the same precision.
    """
    got_loss, got_grads = loss_and_grads(trd_loss, student, teacher, backend=backend,
                                         deterministic=deterministic, **kwargs)
    exact_loss, exact_grads = loss_and_grads(trd_loss_reference, student.double(), teacher.double(), **kwargs)
    assert got_loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert got_loss.shape == exact_loss.shape
    for g, x in zip(got_grads, [x for x in (student, teacher) if x.requires_grad]):
        assert g.dtype == x.dtype and g.shape == x.shape
    if student.dtype in (torch.float16, torch.bfloat16):
        naive_loss, naive_grads = loss_and_grads(trd_loss_reference, student, teacher, **kwargs)
        assert max_err(got_loss, exact_loss) <= 2 * max_err(naive_loss, exact_loss) + 1e-7
        for g, n, e in zip(got_grads, naive_grads, exact_grads):
            assert max_err(g, e) <= 2 * max_err(n, e) + 1e-7
        return
    tol = tol or (1e-10 if student.dtype == torch.float64 else 2e-5)
    for got, exact in zip([got_loss, *got_grads], [exact_loss, *exact_grads]):
        scale = max(exact.abs().max().item(), 1e-2)  # floor: an exact 0 still allows rounding noise
        assert max_err(got, exact) <= tol * scale, (max_err(got, exact), scale)


def assert_bitwise_repeatable(backend, student, teacher, **kwargs):
    """Two runs of loss + backward give bitwise identical loss and input gradients."""
    runs = []
    for _ in range(2):
        s = student.detach().clone().requires_grad_(student.requires_grad)
        t = teacher.detach().clone().requires_grad_(teacher.requires_grad)
        loss = trd_loss(s, t, backend=backend, **kwargs)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in (s, t) if x.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
