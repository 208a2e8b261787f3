"""Backend selection, the module form, and dtype policy of the public API."""
import pytest
import torch

from vrepa_kernels import TRDLoss, trd_loss, trd_loss_reference
from vrepa_kernels.dispatch import resolve_backend

from conftest import make_pair


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
