"""Blockwise torch backend: strip sizes, and exact indexing and counting past 2^31 pairs."""
import pytest
import torch

from vrepa_kernels import trd_loss, trd_loss_reference
from vrepa_kernels.backends import torch_backend
from vrepa_kernels.backends.torch_backend import strip_rows

from utils import make_pair


def test_strip_rows_bounds_the_strip():
    assert strip_rows(1, 4096) == 512
    assert strip_rows(8, 75_600) == torch_backend.MIN_ROWS
    assert strip_rows(1, 100) == torch_backend.MAX_ROWS


@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 4), ("temporal", 4)])
def test_any_strip_height_gives_the_same_result(monkeypatch, rows, relation, frames):
    monkeypatch.setattr(torch_backend, "strip_rows", lambda batch, n: rows)
    s, t = make_pair((2, 44, 12), 9, grad_teacher=True)
    loss = trd_loss(s, t, relation=relation, num_frames=frames, backend="torch")
    loss.backward()
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    want = trd_loss_reference(s64, t64, relation=relation, num_frames=frames)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-7)


def test_exact_past_two_to_the_31_pairs():
    # One-dimensional features normalise to +-1, so with c_i = sign(s_i) sign(t_i) every pair has
    # |Gs - Gt| = 2 when c_i != c_j and 0 otherwise: the exact loss is known in closed form at any N.
    # N = 46,341 gives N^2 = 2,147,488,281 > 2^31 pairs in one sample.
    n, frames, margin = 46_341, 3, 0.25
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, n, 1, generator=gen)
    t = torch.randn(1, n, 1, generator=gen)
    c = (torch.sign(s) * torch.sign(t)).reshape(frames, n // frames)
    plus = (c > 0).sum(dim=1).double()
    minus = (c < 0).sum(dim=1).double()
    differ_all = 2 * plus.sum() * minus.sum()
    differ_same_frame = (2 * plus * minus).sum()
    with torch.no_grad():
        full = trd_loss(s, t, margin=margin, reduction="sum", backend="torch")
        temporal = trd_loss(s, t, margin=margin, relation="temporal", num_frames=frames, backend="torch")
    torch.testing.assert_close(full.double(), differ_all * (2 - margin), rtol=1e-6, atol=0)
    temporal_pairs = n * n - frames * (n // frames) ** 2
    want = (differ_all - differ_same_frame) * (2 - margin) / temporal_pairs
    torch.testing.assert_close(temporal.double(), want, rtol=1e-6, atol=0)


def test_fp32_sum_stays_exact_over_millions_of_pairs():
    # 9M pairs: a naively accumulated fp32 sum drifts by ~1e-4 here; the loss must stay within ~1e-6.
    s, t = make_pair((1, 3000, 16), 16)
    with torch.no_grad():
        got = trd_loss(s, t, backend="torch")
        want = trd_loss_reference(s.double(), t.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
