"""The comparison rule of utils.reference_failures: it accepts what rounding may do (either side of a tie)
and nothing more (a margin off by 1%, a flipped sign); and every CPU backend passes it on inputs built to
put relation gaps exactly on the margin.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

from vrepa_kernels import trd_loss
from vrepa_kernels.relation import canonicalize, relation_mask

from utils import (
    Allowance,
    assert_matches_reference,
    cpu_backends,
    cuda_cpu_kernels,
    loss_and_grads,
    make_pair,
    reference_failures,
    route_torch_backend,
    upstream_for,
)

CASES = [dict(relation="full"), dict(relation="spatial", num_frames=2), dict(relation="temporal", num_frames=4)]


def signed_loss(student, teacher, signs, margin=0.1, relation="full", num_frames=None, reduction="mean"):
    """A float64 TRD loss whose gradient uses the given sign ``P`` ``[B, N, N]`` of each pair (the value is
    the exact one, zeroed where ``P = 0``): an implementation that resolves ties, or errs, as told."""
    s, t, spec = canonicalize(student, teacher, margin, relation, num_frames, reduction)
    s_hat, t_hat = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    d = torch.bmm(s_hat, s_hat.transpose(1, 2)) - torch.bmm(t_hat, t_hat.transpose(1, 2))
    value = ((d.abs() - spec.margin).clamp(min=0) * (signs != 0)).detach()
    elem = (value + signs * (d - d.detach())) * relation_mask(spec, device=d.device)
    per_sample = elem.sum(dim=(1, 2))
    if spec.reduction == "sum":
        return per_sample.sum()
    if spec.reduction == "none":
        out = per_sample / spec.pairs_per_sample
        return out[0] if spec.single_sample else out
    return per_sample.sum() / (spec.pairs_per_sample * spec.batch)


def rule_of(student, teacher, **kwargs):
    exact = trd_loss(student.detach().double(), teacher.detach().double(), backend="reference", **kwargs)
    return Allowance(student, teacher, upstream_for(exact), **kwargs)


def failures_with_signs(student, teacher, signs, ignore_ties=False, **kwargs):
    """The rule's verdict on :func:`signed_loss` with ``signs``, run in float64 on the same inputs."""
    got = loss_and_grads(lambda s, t: signed_loss(s, t, signs, **kwargs), student.double(), teacher.double())
    return reference_failures(*got, student, teacher, ignore_ties=ignore_ties, **kwargs)


def exact_signs(rule):
    d = rule.d
    return torch.sign(d) * (d.abs() > rule.spec.margin) * rule.keep


def tie_inputs(dtype=torch.float32, batch=2, frames=4):
    """Tokens that are integer 2-D vectors of norm 5 (times powers of two): every relation gap is a multiple
    of 1/25 in exact arithmetic, so many pairs share a gap, and the margin is set to one of them as float64
    computes it. All values are exact in bf16."""
    points = torch.tensor([[5, 0], [4, 3], [3, 4], [0, 5], [-3, 4], [-4, 3], [-5, 0], [-4, -3]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 2 * frames
    s = torch.stack([points[torch.randperm(8, generator=gen)[:n]] for _ in range(batch)])
    t = torch.stack([points[torch.randperm(8, generator=gen)[:n]] for _ in range(batch)])
    s = s * 2.0 ** torch.randint(-2, 3, (batch, n, 1), generator=gen)  # |x_i| varies, the unit vectors don't
    t = torch.cat([t, torch.zeros(batch, n, 1, dtype=torch.float64)], dim=-1)  # Dt = 3
    return s.to(dtype).requires_grad_(True), t.to(dtype).requires_grad_(True)


def tie_margin(student, teacher, which, **kwargs):
    """A margin that float64 puts exactly on kept off-diagonal pairs: the ``|D|`` of a pair whose gap is
    0 (``"zero"``), the most frequent positive gap (``"common"``) or the largest below 1 (``"large"``)."""
    rule = rule_of(student, teacher, **kwargs)
    n = rule.spec.num_tokens
    d = rule.d.abs()[(rule.keep & ~torch.eye(n, dtype=torch.bool)).expand_as(rule.d)]
    in_25ths = torch.round(d * 25)
    if which == "zero":
        gap = 0.0
    elif which == "common":
        gaps, counts = torch.unique(in_25ths[in_25ths > 0], return_counts=True)
        gap = gaps[counts.argmax()].item()
    else:
        gap = in_25ths[in_25ths < 25].max().item()
    return d[in_25ths == gap][0].item()


def cpu_kernels():
    """Every CPU implementation of the loss: name -> (backend, pair_sums override or None, trd_loss options)."""
    kernels = {name: (name, None, {}) for name in cpu_backends()}
    if "triton" in kernels:
        kernels.update({f"triton-{a}": ("triton", None, {"algorithm": a}) for a in ("two_pass", "memory_minimal")})
    kernels.update({name: ("torch", kernel, {}) for name, kernel in cuda_cpu_kernels().items()})
    return kernels


KERNELS = cpu_kernels()


@pytest.fixture(params=list(KERNELS))
def kernel(request, monkeypatch):
    """(backend, options) that run one CPU implementation through trd_loss."""
    backend, override, options = KERNELS[request.param]
    if "algorithm" in options and "algorithm" not in inspect.signature(trd_loss).parameters:
        pytest.skip("trd_loss has no algorithm argument yet")
    if override is not None:
        route_torch_backend(monkeypatch, override)
    return backend, options


# ---------------------------------------------------------------------------------------------------------
# The rule accepts rounding and rejects errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("margin, reduction", [(0.01, "mean"), (0.1, "none"), (0.5, "sum")])
def test_margin_off_by_one_percent_fails(kernel, margin, reduction):
    backend, options = kernel
    s, t = make_pair((2, 40, 24), 16)
    assert_matches_reference(backend, s, t, margin=margin, reduction=reduction, **options)
    wrong = loss_and_grads(trd_loss, s, t, backend=backend, margin=margin * 1.01, reduction=reduction, **options)
    failures = reference_failures(*wrong, s, t, margin=margin, reduction=reduction)
    assert failures and failures[0].startswith("loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flipped_gradient_sign_fails(kernel, dtype):
    backend, options = kernel
    s, t = make_pair((2, 40, 24), 16, dtype=dtype, grad_teacher=True)
    loss, grads = loss_and_grads(trd_loss, s, t, backend=backend, **options)
    assert not reference_failures(loss, grads, s, t)
    flipped = reference_failures(loss, [-g for g in grads], s, t)
    assert [f.split(":")[0] for f in flipped] == ["student grad", "teacher grad"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("margin", [0.01, 0.1])
def test_one_flipped_pair_fails(case, margin):
    # One active, non-tie pair (and its mirror) with the wrong sign: beyond rounding in fp32.
    s, t = make_pair((2, 24, 16), 12, seed=3)
    rule = rule_of(s, t, margin=margin, **case)
    signs = exact_signs(rule)
    assert not failures_with_signs(s, t, signs, margin=margin, **case)
    b, i, j = [int(x) for x in torch.nonzero((signs != 0) & ~rule.ties & (rule.d.abs() > 2 * margin))[0]]
    assert i != j
    signs[b, i, j] = signs[b, j, i] = -signs[b, i, j]
    assert "student grad" in " ".join(failures_with_signs(s, t, signs, margin=margin, **case))


def test_allowance_is_tight_for_fp32():
    # The allowance is the worst case of fp32 rounding, so it is loose against a typical run (whose errors
    # cancel), but it stays far below what a real error moves: 3e-4 of the loss, 1e-4 of the gradient.
    s, t = make_pair((2, 64, 32), 32)
    exact_loss, (exact_grad,) = loss_and_grads(trd_loss, s.double(), t.double(), backend="reference")
    rule = Allowance(s, t, upstream_for(exact_loss))
    assert rule.loss(exact_loss).item() < 3e-4 * exact_loss.item()
    assert rule.grad(0, exact_grad).max().item() < 1e-4 * exact_grad.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# Pairs exactly at the margin
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("gap", ["zero", "common", "large"])
def test_either_side_of_a_tie_and_nothing_else(case, gap):
    s, t = tie_inputs()
    margin = tie_margin(s, t, gap, **case)
    rule = rule_of(s, t, margin=margin, **case)
    ties = rule.ties & (rule.d.abs() - margin).abs().lt(1e-12)
    off_diagonal = ties & ~torch.eye(rule.spec.num_tokens, dtype=torch.bool)
    assert off_diagonal.any()  # the inputs put pairs exactly on the margin
    exact = exact_signs(rule)
    for side in (rule.low, rule.high):  # every tie resolved downwards, or upwards
        signs = torch.where(rule.ties, side, exact)
        assert not failures_with_signs(s, t, signs, margin=margin, **case)
    # Without the tie allowance the same results fail: ties do move the gradients.
    moved = [failures_with_signs(s, t, torch.where(rule.ties, side, exact), ignore_ties=True, margin=margin, **case)
             for side in (rule.low, rule.high)]
    assert any(moved)
    # Nothing else: a sign that rounding cannot produce on a tie (-1 where only {0, 1} may come out, or the
    # reverse), and a wrong sign on a pair away from the margin.
    wrong_tie = off_diagonal & (rule.span == 1)
    away = (exact != 0) & ~rule.ties & ~torch.eye(rule.spec.num_tokens, dtype=torch.bool)
    for pairs, value in ((wrong_tie, lambda b, i, j: -1.0 if rule.low[b, i, j] == 0 else 1.0),
                         (away, lambda b, i, j: -exact[b, i, j])):
        if not pairs.any():
            continue  # margin 0: every sign may come out on a tie
        b, i, j = [int(x) for x in torch.nonzero(pairs)[0]]
        wrong = exact.clone()
        wrong[b, i, j] = wrong[b, j, i] = value(b, i, j)
        assert failures_with_signs(s, t, wrong, margin=margin, **case)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gap", ["zero", "common", "large"])
def test_backends_pass_at_the_margin(kernel, dtype, gap):
    backend, options = kernel
    s, t = tie_inputs(dtype)
    for case in CASES:
        margin = tie_margin(s, t, gap, **case)
        for reduction in ("mean", "sum", "none"):
            assert_matches_reference(backend, s, t, margin=margin, reduction=reduction, **case, **options)


def test_ties_do_round_the_other_way_in_a_real_run():
    # The torch backend (unit features rounded to fp32, then a GEMM) puts some exact ties on the other side:
    # those runs pass only with the tie allowance.
    s, t = tie_inputs()
    need_ties = 0
    for gap in ("zero", "common", "large"):
        for case in CASES:
            margin = tie_margin(s, t, gap, **case)
            got = loss_and_grads(trd_loss, s, t, backend="torch", margin=margin, **case)
            assert not reference_failures(*got, s, t, margin=margin, **case)
            need_ties += bool(reference_failures(*got, s, t, ignore_ties=True, margin=margin, **case))
    assert need_ties > 0


@pytest.mark.skipif("cuda-twin" not in cuda_cpu_kernels(), reason="vrepa_kernels._C_cpu is not built")
def test_sequential_sums_of_the_cuda_kernel_are_allowed(monkeypatch):
    # Found by the fuzz: Ds = Dt = 1 makes every gap 0 or 2, so hundreds of equal elements are added in
    # sequence by one thread of the CUDA kernel's fused path (its CPU twin here); the loss errs by ~37 fp32
    # ulps, beyond a tree-summation allowance.
    backend = route_torch_backend(monkeypatch, cuda_cpu_kernels()["cuda-twin"])
    options = {"algorithm": "memory_minimal"} if "algorithm" in inspect.signature(trd_loss).parameters else {}
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, 27, 1, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    t = torch.randn(1, 27, 1, generator=gen, dtype=torch.float64).float()
    assert_matches_reference(backend, s, t, margin=0.01, **options)
