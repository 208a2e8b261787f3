"""Every backend usable on CPU against the float64 reference: loss and gradients.

The Triton backend runs here under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay small.
"""
import pytest
import torch

from vrepa_kernels import trd_loss, trd_loss_reference

from utils import assert_bitwise_repeatable, assert_matches_reference, cpu_backends, make_pair

BACKENDS = cpu_backends()
RELATIONS = [("full", None), ("spatial", 5), ("temporal", 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relation, frames", RELATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_relations_and_reductions(backend, relation, frames, reduction):
    # N = 65 is no multiple of any tile; Ds != Dt; teacher gradient on.
    s, t = make_pair((2, 65, 40), 24, grad_teacher=True)
    assert_matches_reference(backend, s, t, relation=relation, num_frames=frames, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 20), (1, 50, 33), (2, 4, 9, 16)])
def test_input_ranks(backend, shape):
    s, t = make_pair(shape, 12)
    relation = "spatial" if len(shape) == 4 else "full"
    assert_matches_reference(backend, s, t, relation=relation, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [0.0, 0.35])
def test_margins(backend, margin):
    s, t = make_pair((2, 45, 24), 24)
    assert_matches_reference(backend, s, t, margin=margin, relation="temporal", num_frames=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_margin_gives_zero_loss_and_gradient(backend):
    s, t = make_pair((2, 30, 16), 8)
    loss = trd_loss(s, t, margin=2.5, backend=backend)  # |Gs - Gt| <= 2 always
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_token(backend):
    s, t = make_pair((2, 33, 16), 16, grad_teacher=True)
    with torch.no_grad():
        s[0, 3].zero_()
        t[1, 7].zero_()
        s[1, 8].mul_(1e-14)  # below F.normalize's eps: the g / eps branch of the backward
    assert_matches_reference(backend, s, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    s, t = make_pair((40, 2, 48), 24)
    s_view = s.detach().transpose(0, 1)[..., ::2].requires_grad_(True)  # [2, 40, 24], strided
    t_view = t.detach().transpose(0, 1)
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    assert_matches_reference(backend, s_view, t_view, relation="spatial", num_frames=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relation, frames", RELATIONS)
def test_bfloat16_within_twice_naive_error(backend, relation, frames):
    s, t = make_pair((2, 60, 32), 24, dtype=torch.bfloat16)
    assert_matches_reference(backend, s, t, relation=relation, num_frames=frames)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_exact(backend):
    if backend == "triton":
        pytest.skip("the triton backend takes fp16/bf16/fp32 (tested in test_triton_backend.py)")
    s, t = make_pair((2, 21, 9), 7, dtype=torch.float64, grad_teacher=True)
    assert_matches_reference(backend, s, t, relation="temporal", num_frames=3, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_not_hidden(backend, where, bad):
    s, t = make_pair((2, 70, 16), 16)  # 70 tokens span several tiles and strips
    with torch.no_grad():
        (s if where == "student" else t)[1, 66, 3] = bad
    loss = trd_loss(s, t, backend=backend)
    naive = trd_loss_reference(s, t)
    assert not torch.isfinite(loss) and not torch.isfinite(naive)
    loss.backward()
    assert not torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_teacher_gets_no_gradient_work(backend, monkeypatch):
    from dataclasses import replace

    from vrepa_kernels import backends

    calls = []
    real = backends.REGISTRY[backend]

    def spy(s_hat, t_hat, spec, need_s, need_t, deterministic, **kwargs):
        calls.append((need_s, need_t))
        return real.pair_sums(s_hat, t_hat, spec, need_s, need_t, deterministic, **kwargs)

    monkeypatch.setitem(backends.REGISTRY, backend, replace(real, kernel=spy))
    s, t = make_pair((1, 20, 8), 8)
    trd_loss(s, t, backend=backend).backward()
    with torch.no_grad():
        trd_loss(s, t, backend=backend)
    assert calls == [(True, False), (False, False)]
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_bitwise_repeatable(backend):
    s, t = make_pair((2, 50, 24), 16, grad_teacher=True)
    assert_bitwise_repeatable(backend, s, t, deterministic=True)


def test_gradcheck_float64_torch_backend():
    s, t = make_pair((2, 12, 5), 4, dtype=torch.float64, grad_teacher=True)
    for relation, frames in RELATIONS:
        fn = lambda a, b: trd_loss(a, b, margin=0.05, relation=relation, num_frames=frames and 3,
                                   reduction="none", backend="torch")
        assert torch.autograd.gradcheck(fn, (s.detach().requires_grad_(), t.detach().requires_grad_()))


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_registry_matches_each_backends_pair_sums(name):
    import inspect

    from vrepa_kernels import backends

    backend = backends.get(name)
    params = inspect.signature(backend.pair_sums).parameters
    assert list(params)[:6] == ["student", "teacher", "spec", "need_s", "need_t", "deterministic"]
    assert params["algorithm"].default == "auto"
    assert "part" in params or not backend.splits_across_ranks
    assert backend.second_order
    with pytest.raises(ValueError, match="no blockwise backend 'nope'"):
        backends.get("nope")
