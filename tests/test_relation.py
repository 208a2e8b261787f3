"""The input contract: every bad argument gets a clear error naming it; pair counts are exact."""
import pytest
import torch

from vrepa_kernels import TRDLoss, trd_loss
from vrepa_kernels.relation import RelationSpec, canonicalize, relation_mask


def pair(n=12, ds=5, dt=4, b=2):
    return torch.randn(b, n, ds), torch.randn(b, n, dt)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(margin=-0.1), ValueError, "margin"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(margin=float("inf")), ValueError, "margin"),
        (dict(margin=True), TypeError, "margin"),
        (dict(margin="0.1"), TypeError, "margin"),
        (dict(relation="diagonal"), ValueError, "relation"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(backend="numpy"), ValueError, "backend"),
        (dict(relation="spatial"), ValueError, "num_frames"),
        (dict(relation="temporal", num_frames=5), ValueError, "num_frames=5"),
        (dict(relation="temporal", num_frames=1), ValueError, "temporal"),
        (dict(relation="spatial", num_frames=0), ValueError, "num_frames"),
        (dict(relation="spatial", num_frames=2.0), TypeError, "num_frames"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    s, t = pair()
    with pytest.raises(error, match=words):
        trd_loss(s, t, **kwargs)


@pytest.mark.parametrize(
    "student, teacher, error, words",
    [
        ([[1.0]], torch.randn(3, 2), TypeError, "student"),
        (torch.randn(3, 2), None, TypeError, "teacher"),
        (torch.randint(0, 3, (2, 3, 4)), torch.randn(2, 3, 4), TypeError, "student"),
        (torch.randn(3), torch.randn(3), ValueError, "student"),
        (torch.randn(1, 1, 1, 2, 3), torch.randn(1, 1, 1, 2, 3), ValueError, "student"),
        (torch.randn(2, 6, 4), torch.randn(3, 6, 4), ValueError, "2x6x4"),
        (torch.randn(2, 6, 4), torch.randn(2, 5, 4), ValueError, "2x5x4"),
        (torch.randn(2, 6, 4), torch.randn(6, 4), ValueError, "teacher"),
        (torch.randn(2, 6, 0), torch.randn(2, 6, 4), ValueError, "feature"),
        (torch.randn(2, 0, 4), torch.randn(2, 0, 4), ValueError, "no tokens"),
        (torch.randn(0, 6, 4), torch.randn(0, 6, 4), ValueError, "no tokens"),
        (torch.randn(2, 6, 4), torch.randn(2, 6, 4, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(2, 6, 4), torch.randn(2, 6, 4, device="meta"), ValueError, "device"),
    ],
)
def test_bad_tensors_name_the_argument(student, teacher, error, words):
    with pytest.raises(error, match=words):
        trd_loss(student, teacher)


def test_four_d_frames_must_agree_with_num_frames():
    s, t = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="num_frames=2"):
        trd_loss(s, t, relation="spatial", num_frames=2)
    assert torch.isfinite(trd_loss(s, t, relation="spatial", num_frames=3))


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="relation"):
        TRDLoss(relation="cross")
    with pytest.raises(ValueError, match="margin"):
        TRDLoss(margin=-1)
    with pytest.raises(ValueError, match="backend"):
        TRDLoss(backend="cuda-graph")


@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 3), ("temporal", 3), ("spatial", 1)])
def test_pair_count_matches_mask(relation, frames):
    s, t = torch.randn(2, 12, 5), torch.randn(2, 12, 5)
    _, _, spec = canonicalize(s, t, relation=relation, num_frames=frames)
    assert spec.pairs_per_sample == int(relation_mask(spec).sum())


def test_pair_count_is_exact_past_int32():
    # 720p CogVideoX-style grid: N = 21 * 45 * 80 = 75,600 tokens, B * N^2 > 2^31.
    n, frames, batch = 75_600, 21, 8
    for relation, expected in [
        ("full", n * n),
        ("spatial", frames * (n // frames) ** 2),
        ("temporal", n * n - frames * (n // frames) ** 2),
    ]:
        spec = RelationSpec(batch, n, relation, 0 if relation == "full" else n // frames)
        assert spec.pairs_per_sample == expected
        assert spec.pairs_per_sample * batch > 2**31


def test_shapes_of_outputs():
    s, t = torch.randn(10, 6), torch.randn(10, 3)
    assert trd_loss(s, t, reduction="none").shape == ()
    s, t = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 3)
    assert trd_loss(s, t, reduction="none").shape == (2,)
    assert trd_loss(s, t, reduction="sum").shape == ()
