"""Test helpers: inputs, runs, and the comparison against the float64 reference.

The comparison rule (:func:`reference_failures`) allows exactly what rounding may do, derived below, and
nothing more; :mod:`tests.test_tolerance` shows that it accepts either side of a tie and rejects a margin
off by 1% or a flipped sign.

Rounding model. Let ``u_in`` be the unit roundoff of the input dtype (normalised features, Gram tiles and
``P x`` products may be rounded to it, as a GEMM in that dtype does) and ``u_acc`` that of the accumulation
dtype (fp32, or fp64 for fp64 input). ``gamma(n) = n u / (1 - n u)`` bounds a sum of ``n`` products, taken
for ``2n`` to cover accumulators that truncate (tensor cores).

* Unit features: each element is off by at most ``dn = (d/2 + 3) u_acc + u_in`` relative (sum of squares,
  sqrt, division, rounding to the input dtype).
* Relation ``D_ij = s_i.s_j - t_i.t_j``: with ``|s_i||s_j| <= 1``, each Gram entry is off by at most
  ``2 dn + dn^2 + gamma(2d) (1 + dn)^2``; rounding the difference and the margin adds
  ``2 u_in + (4 + 2 m) u_acc``. Call the total ``eps`` (:func:`relation_rounding_bound`); the float64
  reference is itself rounded, so its own ``eps`` is added.
* Each element ``max(|D| - m, 0)`` is 1-Lipschitz in ``D``, so it moves by at most ``eps``, and only where
  ``|D| >= m - eps``; the loss of sample b moves by ``c_b * eps * #{kept pairs with |D| >= m - eps}`` plus
  the summation's own rounding: ``gamma(16 min(N, 64) + 4 + N/16 + log2(pairs))`` of the loss (fp32
  chains: 16 lane sums per row of a 64 x 64 tile, column tiles in sequence; then trees and float64).
* A *tie* is a kept pair with ``| |D| - m | <= eps``: its sign ``P_ij = sign(D)[|D| > m]`` may come out as
  any value in ``S_ij`` (``0``, ``sign D``, and ``-sign D`` when ``|D| + m < eps``). The gradient of the sums
  w.r.t. the unit feature ``s_i`` is ``2 sum_j P_ij s_j``, and the normalisation's backward maps ``g`` to
  ``(g - s_i (s_i.g)) / |x_i|``. So a tie moves token i's input gradient by exactly
  ``2 c_b w_b span(S_ij) (s_j - s_i (s_i.s_j)) / |x_i|`` (``w_b``: the upstream gradient) and token j
  symmetrically; the allowance takes the absolute value of that vector, element by element. Rows below
  ``F.normalize``'s eps are divided by eps, unprojected.
* Everything else in the gradient (pairs whose sign rounding cannot change) is off by at most
  ``kappa (H_ik + |s_ik| R_i) 2 c_b w_b / |x_i|`` with ``H = sum_j |P_ij| |s_j|`` (elementwise; ties counted
  with ``|P| = 1``), ``R_i = sum_k |s_ik| H_ik`` and ``kappa = 3 dn + gamma(2N) + gamma(2d) + u_in +
  6 u_acc``, then rounding to the input dtype adds ``u_in`` relative.
* bf16/fp16 also keep flash-attention's rule: up to twice the error of the naive PyTorch run in the same
  precision, added to the above.
"""
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vrepa_kernels import trd_loss, trd_loss_reference
from vrepa_kernels.backends import triton_backend
from vrepa_kernels.features import NORMALIZE_EPS
from vrepa_kernels.relation import canonicalize, relation_mask

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not triton_backend.HAS_TRITON, reason="triton is not installed")


def cpu_backends():
    """Backends that can run on CPU tensors in this session."""
    names = ["torch"]
    if triton_backend.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def route_torch_backend(monkeypatch, kernel):
    """Route backend='torch' through ``kernel`` (a pair_sums, e.g. the CUDA kernel's CPU twin) for the test."""
    from vrepa_kernels import backends

    if hasattr(backends, "REGISTRY"):
        monkeypatch.setitem(backends.REGISTRY, "torch", dataclasses.replace(backends.REGISTRY["torch"], kernel=kernel))
    else:
        monkeypatch.setattr(backends, "pair_kernel", lambda name: kernel)
    return "torch"


def cuda_cpu_kernels():
    """The CUDA kernel's CPU stand-ins that are built here: name -> pair_sums (the twin walks the kernel's
    schedule with its epilogue; the emulator runs the kernel's own code, slowly)."""
    from vrepa_kernels.backends import cuda_backend as cuda

    kernels = {}
    if getattr(cuda, "cpu_module", None) is not None:
        kernels["cuda-twin"] = lambda *args, **kw: cuda.cpu_twin_pair_sums(*args, threads=2, **kw)
    if getattr(cuda, "emulator_module", None) is not None:
        kernels["cuda-emulated"] = cuda.emulated_pair_sums
    return kernels


def make_pair(shape_s, dt, dtype=torch.float32, device="cpu", seed=0, grad_teacher=False):
    """Random student/teacher features with a correlated teacher, so that relation gaps straddle the margin."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape_s, generator=gen, dtype=torch.float64)
    mix = torch.randn(shape_s[-1], dt, generator=gen, dtype=torch.float64) / shape_s[-1] ** 0.5
    teacher = student @ mix + 0.5 * torch.randn(*shape_s[:-1], dt, generator=gen, dtype=torch.float64)
    student = student.to(device=device, dtype=dtype).requires_grad_(True)
    teacher = teacher.to(device=device, dtype=dtype).requires_grad_(grad_teacher)
    return student, teacher


def upstream_for(loss, upstream_seed=1):
    """The random upstream gradient (0.5 to 1.5) that :func:`loss_and_grads` applies to ``loss``."""
    gen = torch.Generator().manual_seed(upstream_seed)
    return (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype).to(loss.device)


def loss_and_grads(fn, student, teacher, upstream_seed=1, **kwargs):
    """Loss and input gradients of ``fn`` under a random upstream gradient (tests backward's rescale)."""
    s = student.detach().clone().requires_grad_(student.requires_grad)
    t = teacher.detach().clone().requires_grad_(teacher.requires_grad)
    loss = fn(s, t, **kwargs)
    wrt = [x for x in (s, t) if x.requires_grad]
    grads = torch.autograd.grad((loss * upstream_for(loss, upstream_seed)).sum(), wrt)
    return loss.detach(), [g.detach() for g in grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# The rounding allowance
# ---------------------------------------------------------------------------------------------------------

def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _gamma(n: float, u: float) -> float:
    return n * u / (1 - n * u)


def _roundoffs(dtype, tf32=False):
    u_acc = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    u_in = 2.0 ** -11 if tf32 and dtype == torch.float32 else unit_roundoff(dtype)  # TF32 keeps 10+1 bits
    return u_in, u_acc


def _unit_error(d, u_in, u_acc):
    return (d / 2 + 3) * u_acc + u_in


def relation_rounding_bound(dtype, ds, dt, margin, tf32=False) -> float:
    """Most that any backend's ``|D_ij| - margin`` may differ from the exact value, for ``dtype`` inputs."""
    u_in, u_acc = _roundoffs(dtype, tf32)

    def gram(d):
        dn = _unit_error(d, u_in, u_acc)
        return 2 * dn + dn * dn + _gamma(2 * d, u_acc) * (1 + dn) ** 2

    return gram(ds) + gram(dt) + 2 * u_in + (4 + 2 * margin) * u_acc


def tie_band(dtype, ds, dt, margin, tf32=False) -> float:
    """Pairs with ``| |D| - margin | <=`` this (float64 D) are ties: the backend's and the float64
    reference's rounding together may put them on either side."""
    return relation_rounding_bound(dtype, ds, dt, margin, tf32) + relation_rounding_bound(torch.float64, ds, dt,
                                                                                         margin)


def _reduction_scales(spec, upstream):
    """``c_b * w_b`` per sample: d(loss * upstream)/d(sum of sample b's elements)."""
    up = upstream.double().reshape(-1).expand(spec.batch)
    if spec.reduction == "sum":
        return up
    if spec.reduction == "none":
        return up / spec.pairs_per_sample
    return up / (spec.pairs_per_sample * spec.batch)


def _sign_sets(d, margin, eps):
    """Lowest and highest sign each pair's ``P`` may take under rounding of ``D`` by up to ``eps``."""
    can_pos = d + eps > margin
    can_neg = d - eps < -margin
    can_zero = d.abs() - eps <= margin
    high = torch.where(can_pos, 1.0, torch.where(can_zero, 0.0, -1.0)).double()
    low = torch.where(can_neg, -1.0, torch.where(can_zero, 0.0, 1.0)).double()
    return low, high


class Allowance:
    """The float64 relation of one call and what rounding may do to its loss and gradients."""

    def __init__(self, student, teacher, upstream, tf32=False, margin=0.1, relation="full", num_frames=None,
                 reduction="mean"):
        dtype = student.dtype
        s, t, spec = canonicalize(student.detach().double(), teacher.detach().double(), margin, relation,
                                  num_frames, reduction)
        self.spec, self.dtype = spec, dtype
        ds, dt = s.shape[-1], t.shape[-1]
        self.u_in, self.u_acc = _roundoffs(dtype, tf32)
        self.eps = tie_band(dtype, ds, dt, spec.margin, tf32)
        self.units = [F.normalize(x, dim=-1) for x in (s, t)]
        self.norms = [x.norm(dim=-1).clamp_min(NORMALIZE_EPS) for x in (s, t)]
        self.projects = [x.norm(dim=-1) >= NORMALIZE_EPS for x in (s, t)]
        self.dims = (ds, dt)
        gram_s, gram_t = (torch.bmm(x, x.transpose(1, 2)) for x in self.units)
        self.grams = (gram_s, gram_t)
        self.d = gram_s - gram_t
        keep = relation_mask(spec, device=s.device)
        self.keep = keep
        self.low, self.high = _sign_sets(self.d, spec.margin, self.eps)  # the signs rounding may produce
        self.span = torch.where(keep, self.high - self.low, 0.0)  # > 0 exactly on ties
        self.may_act = keep & (self.d.abs() >= spec.margin - self.eps)  # pairs whose element may be nonzero
        self.scales = _reduction_scales(spec, upstream)  # c_b w_b
        self.loss_scales = _reduction_scales(spec, torch.ones(1, dtype=torch.float64, device=s.device))

    @property
    def ties(self) -> torch.Tensor:
        """``[B, N, N]`` mask of the kept pairs within rounding of the margin."""
        return self.span > 0

    def loss(self, exact_loss: torch.Tensor) -> torch.Tensor:
        """Allowed ``|got - exact|`` for the loss, in the loss's shape."""
        spec = self.spec
        per_sample = self.loss_scales * self.eps * self.may_act.sum(dim=(1, 2)).double()
        # fp32 chains: a 64 x 64 tile's rows add 16 lane sums each in sequence (the CUDA kernel's CPU twin),
        # column tiles of 16 or more add in sequence (Triton); then trees, float64 or exact.
        n = spec.num_tokens
        pairs = spec.pairs_per_sample * spec.batch
        steps = 16 * min(n, 64) + 4 + math.ceil(n / 16) + math.ceil(math.log2(max(2, pairs)))
        summation = _gamma(steps, self.u_acc)
        if spec.reduction == "none":
            per = per_sample.reshape(exact_loss.shape) if exact_loss.dim() else per_sample[0]
            return per + summation * exact_loss.abs()
        return per_sample.sum() + summation * exact_loss.abs()

    def grad(self, which: int, exact_grad: torch.Tensor) -> torch.Tensor:
        """Allowed ``|got - exact|`` per element of the student (0) or teacher (1) input gradient."""
        unit, norm, project = self.units[which], self.norms[which], self.projects[which]
        d_feat, n = self.dims[which], self.spec.num_tokens
        dn = _unit_error(d_feat, self.u_in, self.u_acc)
        kappa = 3 * dn + _gamma(2 * n, self.u_acc) + _gamma(2 * d_feat, self.u_acc) + self.u_in + 6 * self.u_acc
        radial = unit * project[..., None]  # the projection's x_hat; none below F.normalize's eps
        front = (2 * self.scales[:, None, None] / norm[..., None])  # 2 c_b w_b / |x_i|
        weight = (self.may_act | self.ties).double()
        h = torch.bmm(weight, unit.abs())  # sum_j |P_ij| |s_j|
        r = (radial.abs() * h).sum(dim=-1, keepdim=True)
        base = front * kappa * (h + radial.abs() * r)
        ties = front * self._tie_moves(unit, radial, self.grams[which])
        allowed = (base + ties) * (1 + self.u_in) + self.u_in * exact_grad.double().reshape(base.shape).abs()
        return allowed.reshape(exact_grad.shape)

    def _tie_moves(self, unit, radial, gram, chunk=1 << 24):
        """``sum_j span_ij |s_j - s_i (s_i . s_j)|`` per token i and element, over the tie pairs only."""
        out = torch.zeros_like(unit)
        b, i, j = torch.nonzero(self.span, as_tuple=True)
        step = max(1, chunk // unit.shape[-1])
        for k in range(0, b.numel(), step):
            bb, ii, jj = b[k:k + step], i[k:k + step], j[k:k + step]
            move = unit[bb, jj] - radial[bb, ii] * gram[bb, ii, jj][:, None]
            flat = out.view(-1, unit.shape[-1])
            flat.index_add_(0, bb * unit.shape[1] + ii, self.span[bb, ii, jj][:, None] * move.abs())
        return out


def reference_failures(got_loss, got_grads, student, teacher, upstream_seed=1, ignore_ties=False, **kwargs):
    """What in ``got`` is beyond rounding of the float64 reference: a list of messages, empty when none.

    ``got_grads`` are the gradients w.r.t. those of ``student``, ``teacher`` that require grad, under the
    upstream gradient of :func:`loss_and_grads`. ``ignore_ties`` drops the tie allowance (tests show it is
    needed).
    """
    exact_loss, exact_grads = loss_and_grads(trd_loss_reference, student.double(), teacher.double(),
                                             upstream_seed=upstream_seed, **kwargs)
    tf32 = student.is_cuda and student.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    rule = Allowance(student, teacher, upstream_for(exact_loss, upstream_seed), tf32, **kwargs)
    if ignore_ties:
        rule.span = torch.zeros_like(rule.span)
    loss_allow = rule.loss(exact_loss)
    grad_allows = [rule.grad(w, e) for w, e in zip([w for w, x in enumerate((student, teacher)) if x.requires_grad],
                                                  exact_grads)]
    if student.dtype in (torch.float16, torch.bfloat16):
        naive_loss, naive_grads = loss_and_grads(trd_loss_reference, student, teacher, upstream_seed=upstream_seed,
                                                 **kwargs)
        loss_allow = loss_allow + 2 * max_err(naive_loss, exact_loss)
        grad_allows = [a + 2 * max_err(n, e) for a, n, e in zip(grad_allows, naive_grads, exact_grads)]
    failures = []
    if got_loss.shape != exact_loss.shape:
        return [f"loss shape {tuple(got_loss.shape)}, expected {tuple(exact_loss.shape)}"]
    names = ["loss"] + [n for n, x in (("student grad", student), ("teacher grad", teacher)) if x.requires_grad]
    for name, got, exact, allow in zip(names, [got_loss, *got_grads], [exact_loss, *exact_grads],
                                       [loss_allow, *grad_allows]):
        err = (got.double() - exact).abs()
        bad = ~(err <= allow)  # NaN fails too
        if bad.any():
            ratio = (err / allow.clamp_min(1e-300)).max().item()
            failures.append(f"{name}: {int(bad.sum())} element(s) beyond rounding, worst error {err.max().item():.3g} "
                            f"is {ratio:.3g}x its allowance ({rule.ties.sum().item()} tie pairs)")
    return failures


def assert_matches_reference(backend, student, teacher, deterministic=False, **kwargs):
    """Backend vs the float64 reference on the same inputs, within :func:`reference_failures`' rule."""
    got_loss, got_grads = loss_and_grads(trd_loss, student, teacher, backend=backend,
                                         deterministic=deterministic, **kwargs)
    assert got_loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    for g, x in zip(got_grads, [x for x in (student, teacher) if x.requires_grad]):
        assert g.dtype == x.dtype and g.shape == x.shape
    kwargs.pop("algorithm", None)
    failures = reference_failures(got_loss, got_grads, student, teacher, **kwargs)
    assert not failures, failures


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
