"""The shared autograd op: exact normalisation backward, reductions, and the rescaling backward."""
import pytest
import torch
import torch.nn.functional as F

from vrepa_kernels import trd_loss
from vrepa_kernels.features import NORMALIZE_EPS, Features, normalize_backward
from vrepa_kernels.op import sign_product_op, trd_loss_forward

from utils import cpu_backends


@pytest.mark.parametrize("scale", [1.0, 1e-11, 1e-12, 1e-13, 0.0])
def test_normalize_matches_torch_in_every_eps_regime(scale):
    x = torch.randn(6, 5, dtype=torch.float64)
    x[2] *= scale
    x[4] = NORMALIZE_EPS / 5 ** 0.5  # norm exactly eps, up to rounding
    feats = Features.of(x)
    x_hat_acc, norm = feats.unit(), feats.norm
    upstream = torch.randn_like(x)
    x_ref = x.clone().requires_grad_(True)
    y = F.normalize(x_ref, dim=-1)
    y.backward(upstream)
    torch.testing.assert_close(x_hat_acc, y.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(normalize_backward(upstream, x_hat_acc, norm), x_ref.grad, rtol=1e-10, atol=0)


def test_low_precision_normalisation_is_done_in_fp32():
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    feats = Features.of(x)
    assert feats.norm.dtype == torch.float32 and feats.unit().dtype == torch.float32
    assert feats.unit(torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(feats.unit(), F.normalize(x.float(), dim=-1))
    torch.testing.assert_close(feats.inv_norm, 1 / x.float().norm(dim=-1))


class _Head(torch.nn.Module):
    """A module that calls trd_loss, as a trainer would."""

    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(12, 16)
        self.backend = backend

    def forward(self, student, teacher):
        return trd_loss(self.proj(student), teacher, relation="temporal", num_frames=4, backend=self.backend)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_matches_eager(compiler, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 24, 12, generator=gen), torch.randn(2, 24, 10, generator=gen)
    head = _Head(backend)
    eager = head(student, teacher)
    eager.backward()
    eager_grad = head.proj.weight.grad.clone()
    head.zero_grad()
    compiled = torch.compile(head, fullgraph=True, backend=compiler)(student, teacher)  # raises on a graph break
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.proj.weight.grad, eager_grad, rtol=1e-5, atol=1e-8)


def test_custom_op_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s, t = torch.empty(3, 10, 6), torch.empty(3, 10, 4, dtype=torch.float32)
        loss, g_s, g_t = trd_loss_forward(s, t, 0.1, "spatial", 5, "none", False, "torch", True, False, False,
                                          "auto")
    assert loss.shape == (3,) and g_s.shape == (3, 10, 6) and g_t.numel() == 0


def test_custom_op_passes_opcheck():
    s = torch.randn(2, 10, 6, requires_grad=True)
    t = torch.randn(2, 10, 4)
    torch.library.opcheck(trd_loss_forward, (s, t, 0.1, "full", 0, "mean", False, "torch", True, False, False, "auto"),
                          test_utils=("test_schema", "test_faketensor"))


def test_sign_product_op_passes_opcheck_and_is_p_times_x():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 12, 6, generator=gen, dtype=torch.float64), torch.randn(2, 12, 4, generator=gen,
                                                                                   dtype=torch.float64)
    x = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    args = (s, t, [x], 0.1, "temporal", 3)
    torch.library.opcheck(sign_product_op, args, test_utils=("test_schema", "test_faketensor"))
    sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    d = sn @ sn.transpose(1, 2) - tn @ tn.transpose(1, 2)
    frame = torch.arange(12) // 3
    p = torch.sign(d) * (d.abs() > 0.1) * (frame[:, None] != frame[None, :])
    (got,) = sign_product_op(*args)
    assert p.abs().sum() > 0
    torch.testing.assert_close(got, p @ x, rtol=1e-12, atol=1e-12)
