"""Second-order gradients and torch.func transforms against float64 autograd through the reference.

The loss is piecewise linear in the relation gap D, so its second derivative is exact almost everywhere;
the inputs here keep every kept pair's | |D| - margin | above 1e-4, so that the sign pattern of an fp32
backend equals the float64 one.
"""
import pytest
import torch
import torch.nn.functional as F

from vrepa_kernels import trd_loss, trd_loss_reference
from vrepa_kernels.relation import canonicalize, relation_mask

from utils import cpu_backends, cuda_cpu_kernels, make_pair, route_torch_backend

RELATIONS = [("full", None), ("spatial", 4), ("temporal", 4)]
REDUCTIONS = ["mean", "sum", "none"]
MARGIN = 0.1


def assert_clear_of_the_margin(s, t, relation, frames, gap=1e-4):
    """No kept pair's |D| lies within ``gap`` of the margin (else rounding may flip its sign)."""
    s3, t3, spec = canonicalize(s.detach().double(), t.detach().double(), MARGIN, relation, frames)
    sn, tn = F.normalize(s3, dim=-1), F.normalize(t3, dim=-1)
    d = (sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)).abs() - MARGIN
    closest = d[:, relation_mask(spec)].abs().min().item()
    assert closest > gap, f"a kept pair has | |D| - margin | = {closest:.2e}; pick other inputs"


def second_order(fn, student, teacher, reduction, seed=3):
    """Loss, first-order gradients (create_graph) and the Hessian-vector products of <g, v> w.r.t. the
    inputs and the upstream weights; every input receives a gradient."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype).requires_grad_(True)
    g_s, g_t = torch.autograd.grad((loss * w).sum(), (s, t), create_graph=True)
    v_s = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    v_t = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
    hv = torch.autograd.grad((g_s * v_s).sum() + (g_t * v_t).sum(), (s, t, w))
    return [x.detach().double() for x in (loss, g_s, g_t, *hv)]


def assert_second_order_matches_reference(backend, relation, frames, reduction, dtype, tol):
    s, t = make_pair((2, 20, 12), 9, dtype=dtype, seed=5)
    assert_clear_of_the_margin(s, t, relation, frames)
    kwargs = dict(margin=MARGIN, relation=relation, num_frames=frames, reduction=reduction)
    got = second_order(lambda a, b: trd_loss(a, b, backend=backend, **kwargs), s, t, reduction)
    want = second_order(lambda a, b: trd_loss_reference(a, b, **kwargs), s.double(), t.double(), reduction)
    names = ["loss", "grad_s", "grad_t", "hvp_s", "hvp_t", "hvp_upstream"]
    assert want[3].abs().max() > 0 and want[4].abs().max() > 0  # a real second derivative to match
    for name, a, b in zip(names, got, want):
        scale = max(b.abs().max().item(), 1e-12)
        assert (a - b).abs().max().item() <= tol * scale, (name, (a - b).abs().max().item(), scale)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_matches_reference(backend, relation, frames, reduction):
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_second_order_matches_reference(backend, relation, frames, reduction, dtype, tol)


@pytest.mark.skipif("cuda-twin" not in cuda_cpu_kernels(), reason="vrepa_kernels._C_cpu is not built")
@pytest.mark.parametrize("relation, frames", RELATIONS)
def test_double_backward_with_the_cuda_cpu_twin(monkeypatch, relation, frames):
    backend = route_torch_backend(monkeypatch, cuda_cpu_kernels()["cuda-twin"])
    assert_second_order_matches_reference(backend, relation, frames, "mean", torch.float32, 1e-4)


def test_first_order_gradient_is_the_same_with_and_without_create_graph():
    s, t = make_pair((2, 24, 8), 8, dtype=torch.float64, grad_teacher=True)
    loss = trd_loss(s, t, relation="temporal", num_frames=4)
    plain = torch.autograd.grad(loss, (s, t), retain_graph=True)
    recorded = torch.autograd.grad(loss, (s, t), create_graph=True)
    assert all(r.requires_grad for r in recorded)
    for a, b in zip(plain, recorded):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_a_kept_pair_gives_a_nan_second_derivative(where):
    s, t = make_pair((2, 20, 8), 8, dtype=torch.float64)
    with torch.no_grad():
        (s if where == "student" else t)[1, 3, 2] = float("nan")
    g, = torch.autograd.grad(trd_loss(s, t), s, create_graph=True)
    hv, = torch.autograd.grad(g.sum(), s)
    assert torch.isnan(g[1]).any() and torch.isnan(hv[1]).any()
    assert torch.isfinite(hv[0]).all()  # the other sample stays clean


def _transforms(f, f2, s, t, v):
    """Every torch.func transform of ``f(s)`` (a scalar) and ``f2(s, t)``, as name -> result."""
    func = torch.func
    return {
        "grad": lambda: func.grad(f)(s),
        "grad_and_value": lambda: func.grad_and_value(f)(s),
        "vjp": lambda: func.vjp(f, s)[1](torch.ones((), dtype=s.dtype)),
        "jacrev": lambda: func.jacrev(f2, argnums=(0, 1))(s, t),
        "jvp": lambda: func.jvp(f, (s,), (v,)),
        "jacfwd": lambda: func.jacfwd(f2, argnums=(0, 1))(s, t),
        "vmap": lambda: func.vmap(f)(torch.stack([s, 2 * s, -s])),
        "vmap_grad": lambda: func.vmap(func.grad(f))(torch.stack([s, 0.5 * s])),
        "grad_grad": lambda: func.grad(lambda a: (func.grad(f)(a) * v).sum())(s),
        "hvp_forward_over_reverse": lambda: func.jvp(func.grad(f), (s,), (v,)),
        "hessian": lambda: func.hessian(f)(s),
    }


# The Triton interpreter is slow under vmap's per-slice loop: one reduction there.
@pytest.mark.parametrize("backend, reduction", [("torch", "mean"), ("torch", "none")]
                         + [(b, "none") for b in cpu_backends() if b != "torch"])
def test_torch_func_transforms_match_reference(backend, reduction):
    dtype = torch.float64 if backend == "torch" else torch.float32
    s, t = make_pair((2, 10, 6), 5, dtype=dtype, seed=2)
    s, t = s.detach(), t.detach()
    assert_clear_of_the_margin(s, t, "temporal", 2)
    kwargs = dict(margin=MARGIN, relation="temporal", num_frames=2, reduction=reduction)
    v = torch.randn(s.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)

    def results(loss_fn, s, t, v):
        f2 = lambda a, b: loss_fn(a, b, **kwargs)
        f = lambda a: (f2(a, t) * torch.arange(1, 3, dtype=a.dtype)).sum()  # weights per sample
        return {name: run() for name, run in _transforms(f, f2, s, t, v).items()}

    got = results(lambda a, b, **kw: trd_loss(a, b, backend=backend, **kw), s, t, v)
    want = results(trd_loss_reference, s.double(), t.double(), v.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name in want:
        flat_got, flat_want = torch.utils._pytree.tree_leaves(got[name]), torch.utils._pytree.tree_leaves(want[name])
        assert len(flat_got) == len(flat_want), name
        for a, b in zip(flat_got, flat_want):
            scale = max(b.abs().max().item(), 1e-12)
            assert (a.double() - b).abs().max().item() <= tol * scale, (name, (a.double() - b).abs().max().item())
    assert want["hessian"].abs().max() > 0


def test_compiled_double_backward_raises_instead_of_dropping_the_second_derivative():
    torch._dynamo.reset()
    s, t = make_pair((1, 12, 6), 6, dtype=torch.float64)
    compiled = torch.compile(lambda a, b: trd_loss(a, b, backend="torch"), fullgraph=True, backend="aot_eager")
    g, = torch.autograd.grad(compiled(s, t), s, create_graph=True)
    torch.testing.assert_close(g, torch.autograd.grad(trd_loss(s, t), s)[0])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((g * g).sum() + s.sum(), s)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_ad_matches_reference(reduction):
    import torch.autograd.forward_ad as fwAD

    s, t = make_pair((2, 16, 6), 5, dtype=torch.float64, seed=7)
    ds, dt = torch.randn_like(s), torch.randn_like(t)
    tangents = []
    for fn in (trd_loss, trd_loss_reference):
        with fwAD.dual_level():
            loss = fn(fwAD.make_dual(s.detach(), ds), fwAD.make_dual(t.detach(), dt), reduction=reduction)
            tangents.append(fwAD.unpack_dual(loss).tangent)
    assert tangents[1].abs().max() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-14)
