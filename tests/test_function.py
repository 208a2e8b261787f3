"""The shared autograd op: exact normalisation backward, reductions, and the rescaling backward."""
import pytest
import torch
import torch.nn.functional as F

from vrepa_kernels.function import NORMALIZE_EPS, normalize_backward, normalize_rows


@pytest.mark.parametrize("scale", [1.0, 1e-11, 1e-12, 1e-13, 0.0])
def test_normalize_matches_torch_in_every_eps_regime(scale):
    x = torch.randn(6, 5, dtype=torch.float64)
    x[2] *= scale
    x[4] = NORMALIZE_EPS / 5 ** 0.5  # norm exactly eps, up to rounding
    x_hat, x_hat_acc, norm = normalize_rows(x)
    upstream = torch.randn_like(x)
    x_ref = x.clone().requires_grad_(True)
    y = F.normalize(x_ref, dim=-1)
    y.backward(upstream)
    torch.testing.assert_close(x_hat, y.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(normalize_backward(upstream, x_hat_acc, norm), x_ref.grad, rtol=1e-10, atol=0)


def test_low_precision_normalisation_is_done_in_fp32():
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    x_hat, x_hat_acc, _ = normalize_rows(x)
    assert x_hat.dtype == torch.bfloat16 and x_hat_acc.dtype == torch.float32
    torch.testing.assert_close(x_hat_acc, F.normalize(x.float(), dim=-1))
