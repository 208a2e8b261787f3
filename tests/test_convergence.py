"""Training with the blockwise loss follows the reference's trajectory."""
import pytest
import torch

from vrepa_kernels import trd_loss, trd_loss_reference

from utils import cpu_backends, make_pair


def trajectory(loss_fn, student, teacher, steps=50):
    feats = torch.nn.Parameter(student.detach().clone())
    opt = torch.optim.Adam([feats], lr=2e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(feats, teacher)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), feats.detach()


@pytest.mark.parametrize("backend", cpu_backends())
def test_fifty_steps_follow_the_reference(backend):
    student, teacher = make_pair((2, 36, 24), 16)
    teacher = teacher.detach()
    kwargs = dict(margin=0.05, relation="temporal", num_frames=4)
    fused, fused_feats = trajectory(lambda s, t: trd_loss(s, t, backend=backend, **kwargs), student, teacher)
    naive, naive_feats = trajectory(lambda s, t: trd_loss_reference(s, t, **kwargs), student, teacher)
    assert naive[-1] < 0.5 * naive[0]  # the run actually learns
    torch.testing.assert_close(fused, naive, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(fused_feats, naive_feats, rtol=1e-3, atol=1e-3)
