"""Backend selection, the module form, and dtype policy of the public API."""
import pytest
import torch

from vrepa_kernels import TRDLoss, trd_loss, trd_loss_reference
from vrepa_kernels.api import resolve_backend

from utils import make_pair


def test_auto_uses_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch"


def test_triton_on_cpu_without_interpreter_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), torch.float32)


def test_cuda_backend_unavailable_says_why():
    s, t = make_pair((1, 8, 4), 4)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        trd_loss(s, t, backend="cuda")


def test_reference_backend_is_the_reference():
    s, t = make_pair((2, 3, 5, 8), 6)
    kwargs = dict(margin=0.05, relation="temporal", reduction="none")
    assert torch.equal(trd_loss(s, t, backend="reference", **kwargs), trd_loss_reference(s, t, **kwargs))


def test_module_equals_function():
    s, t = make_pair((2, 24, 8), 8)
    module = TRDLoss(margin=0.05, relation="spatial", num_frames=4, reduction="sum", backend="torch")
    assert "spatial" in repr(module)
    torch.testing.assert_close(module(s, t), trd_loss(s, t, 0.05, "spatial", 4, "sum", backend="torch"))


@pytest.mark.parametrize("dtype, loss_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_dtype_policy(dtype, loss_dtype):
    s, t = make_pair((2, 20, 8), 8, dtype=dtype, grad_teacher=True)
    loss = trd_loss(s, t)
    loss.backward()
    assert loss.dtype == loss_dtype
    assert s.grad.dtype == dtype and t.grad.dtype == dtype


def test_matches_videorepa_formula_for_full_relation():
    # VideoREPA's full-relation TRD: mean over all pairs of relu(|Gs - Gt| - margin).
    s, t = make_pair((2, 30, 12), 10, dtype=torch.float64)
    sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    naive = torch.relu((sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)).abs() - 0.1).mean()
    torch.testing.assert_close(trd_loss(s, t), naive)


@pytest.mark.parametrize("relation", ["full", "spatial"])
def test_autocast_equals_explicit_bfloat16(relation):
    s, t = make_pair((2, 30, 16), 12, grad_teacher=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = trd_loss(s, t, relation=relation, num_frames=3)
    amp.backward()
    explicit = trd_loss(s.detach().bfloat16(), t.detach().bfloat16(), relation=relation, num_frames=3)
    assert torch.equal(amp, explicit)
    assert s.grad.dtype == torch.float32 and t.grad.dtype == torch.float32


def test_check_finite_raises_naming_the_argument():
    s, t = make_pair((1, 10, 4), 4)
    with torch.no_grad():
        t[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="teacher"):
        trd_loss(s, t, check_finite=True)
    assert torch.isinf(trd_loss_reference(s, t)) or torch.isnan(trd_loss_reference(s, t))
    assert not torch.isfinite(trd_loss(s, t))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_use_deterministic_algorithms_is_bitwise_repeatable(backend):
    from utils import assert_bitwise_repeatable, cpu_backends

    if backend not in cpu_backends():
        pytest.skip(f"{backend} is not usable on CPU here")
    s, t = make_pair((2, 40, 16), 16, grad_teacher=True)
    torch.use_deterministic_algorithms(True)
    try:
        assert_bitwise_repeatable(backend, s, t)
    finally:
        torch.use_deterministic_algorithms(False)


def test_without_triton_auto_still_works_and_triton_says_why(monkeypatch):
    from vrepa_kernels.backends import triton_backend

    monkeypatch.setattr(triton_backend, "HAS_TRITON", False)
    monkeypatch.setattr(triton_backend, "IMPORT_ERROR", "ModuleNotFoundError('triton')")
    s, t = make_pair((1, 12, 4), 4)
    assert torch.isfinite(trd_loss(s, t))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        trd_loss(s, t, backend="triton")


@pytest.mark.parametrize("bad", ["fused", "", None, "TWO_PASS"])
def test_unknown_algorithm_raises_naming_it(bad):
    s, t = make_pair((1, 8, 4), 4)
    with pytest.raises(ValueError, match=f"algorithm must be one of .*got {bad!r}"):
        trd_loss(s, t, algorithm=bad)
    with pytest.raises(ValueError, match="algorithm"):
        TRDLoss(algorithm=bad)


@pytest.mark.parametrize("algorithm", ["auto", "two_pass", "memory_minimal"])
def test_algorithm_reaches_the_backend(monkeypatch, algorithm):
    from dataclasses import replace

    from vrepa_kernels import backends

    seen = []
    real = backends.REGISTRY["torch"]

    def spy(*args, **kwargs):
        seen.append(kwargs.get("algorithm"))
        return real.pair_sums(*args, **kwargs)

    monkeypatch.setitem(backends.REGISTRY, "torch", replace(real, kernel=spy))
    s, t = make_pair((1, 12, 4), 4)
    module = TRDLoss(backend="torch", algorithm=algorithm)
    assert f"algorithm={algorithm!r}" in repr(module)
    module(s, t).backward()
    trd_loss(s, t, backend="torch", algorithm=algorithm)
    assert seen == [algorithm, algorithm]


def test_float64_on_a_low_precision_backend_points_to_torch(monkeypatch):
    from dataclasses import replace

    from vrepa_kernels import backends

    available = replace(backends.REGISTRY["triton"], unavailable=lambda device: None)
    monkeypatch.setitem(backends.REGISTRY, "triton", available)
    with pytest.raises(TypeError, match="backend='triton' takes .* got torch.float64; use backend='torch' for float64"):
        resolve_backend("triton", torch.device("cpu"), torch.float64)
