"""Triton-specific behaviour (both training paths, the sign map, dtypes, tile configs), under the interpreter on CPU."""
import pytest
import torch

from vrepa_kernels import sign_map, trd_loss
from vrepa_kernels.backends import triton_backend
from vrepa_kernels.features import Features
from vrepa_kernels.relation import canonicalize, relation_mask

from utils import HAS_CUDA, assert_matches_reference, cpu_backends, make_pair

pytestmark = pytest.mark.skipif("triton" not in cpu_backends() and not HAS_CUDA,
                                reason="triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def canonical(s, t, relation="full", frames=None, margin=0.1):
    s3, t3, spec = canonicalize(s.detach(), t.detach(), margin, relation, frames)
    return Features.of(s3), Features.of(t3), spec


def raw_sums(s, t, need_s=True, need_t=False, deterministic=False, config=None, relation="full", frames=None,
             algorithm="memory_minimal", margin=0.1):
    fs, ft, spec = canonical(s, t, relation, frames, margin)
    return triton_backend.pair_sums(fs, ft, spec, need_s, need_t, deterministic, algorithm=algorithm, config=config)


def float64_gap(fs: Features, ft: Features) -> torch.Tensor:
    u, v = fs.unit(torch.float64), ft.unit(torch.float64)
    return u @ u.transpose(1, 2) - v @ v.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# The two-pass path
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, relation, frames", [(300, "full", None), (261, "temporal", 3), (300, "spatial", 4)])
def test_two_pass_matches_the_memory_minimal_path(n, relation, frames):
    # N > 256: tiles left of the diagonal are read transposed from the map; odd N leaves a ragged edge tile.
    s, t = make_pair((2, n, 24), 40, device=DEVICE)
    two_pass = raw_sums(s, t, need_t=True, relation=relation, frames=frames, algorithm="two_pass")
    minimal = raw_sums(s, t, need_t=True, relation=relation, frames=frames, deterministic=True)
    for a, b in zip(two_pass, minimal):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 3), ("temporal", 3)])
def test_two_pass_against_float64(relation, frames, reduction):
    s, t = make_pair((2, 135, 20), 12, device=DEVICE, grad_teacher=True)
    assert_matches_reference("triton", s, t, relation=relation, num_frames=frames, reduction=reduction,
                             algorithm="two_pass")


def test_two_pass_is_the_default_and_bitwise_repeatable():
    s, t = make_pair((1, 140, 16), 16, device=DEVICE)
    fs, ft, spec = canonical(s, t)
    assert triton_backend.choose_algorithm("auto", spec, None) == "two_pass"
    runs = [triton_backend.pair_sums(fs, ft, spec, True, True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("n, relation, frames", [(300, "full", None), (700, "full", None), (264, "temporal", 4)])
def test_map_codes_equal_float64_codes_away_from_ties(n, relation, frames):
    # 700 tokens: 6 tile rows, 21 map tiles, so every branch of the triangle's index inversion runs.
    dim = 8 if n > 500 else 24
    s, t = make_pair((2, n, dim), dim, device=DEVICE)
    fs, ft, spec = canonical(s, t, relation, frames)
    _, words = triton_backend.relation_pass(fs, ft, spec)
    assert words.shape == (2, sign_map.num_map_tiles(n), sign_map.MAP_TILE, sign_map.WORDS_PER_ROW)
    gap = float64_gap(fs, ft).cpu()
    expected = sign_map.codes_of(gap, spec.margin, relation_mask(spec))
    got = sign_map.unpack(words.cpu(), n)
    far = (gap.abs() - spec.margin).abs() > 1e-5
    assert torch.equal(got[far], expected[far])
    assert far.float().mean() > 0.99  # the comparison covers nearly every pair


def test_pairs_exactly_at_the_margin_may_round_either_way_and_nothing_else():
    # Unit vectors at chosen angles: D_ij = cos(a_i - a_j) - 0 hits the margin exactly for some pairs.
    angles = torch.tensor([0.0, 60.0, 120.0, 33.0, 200.0], dtype=torch.float64) * torch.pi / 180
    student = torch.stack([angles.cos(), angles.sin()], dim=-1)[None].float()
    teacher = torch.zeros(1, 5, 2)
    teacher[..., 0] = 1.0  # every teacher pair has Gt = 1
    fs, ft, spec = canonical(student, teacher, margin=0.5)
    gap = float64_gap(fs, ft)
    ties = ((gap.abs() - 0.5).abs() < 1e-6)[0]
    assert ties.sum() >= 4  # cos(60 deg) - 1 = -0.5 for the pairs 60 degrees apart
    codes = sign_map.unpack(triton_backend.relation_pass(fs, ft, spec)[1].cpu(), 5)[0]
    expected = sign_map.codes_of(gap, 0.5)[0]
    assert torch.equal(codes[~ties], expected[~ties])
    assert set(codes[ties].tolist()) <= {sign_map.CODE_NONE, sign_map.CODE_MINUS}


def test_one_non_finite_pair_makes_the_loss_and_the_affected_gradients_non_finite():
    s, t = make_pair((1, 150, 8), 8, device=DEVICE)
    s = s.detach().clone()
    s[0, 140, 3] = float("nan")
    fs, ft, spec = canonical(s, t)
    sums, g_s, _ = triton_backend.pair_sums(fs, ft, spec, True, False, algorithm="two_pass")
    assert torch.isnan(sums).all()
    assert not torch.isfinite(g_s[0]).all(dim=-1).any()  # every token pairs with token 140
    codes = sign_map.unpack(triton_backend.relation_pass(fs, ft, spec)[1].cpu(), 150)[0]
    assert (codes[140] == sign_map.CODE_NONFINITE).all() and (codes[:, 140] == sign_map.CODE_NONFINITE).all()
    assert (codes[:140, :140] != sign_map.CODE_NONFINITE).all()


def test_algorithm_choice_follows_the_budget_and_the_argument(monkeypatch):
    _, _, spec = canonical(torch.zeros(1, 1000, 4), torch.zeros(1, 1000, 4))
    assert triton_backend.choose_algorithm("auto", spec, None) == "two_pass"
    assert triton_backend.choose_algorithm("memory_minimal", spec, None) == "memory_minimal"
    assert triton_backend.choose_algorithm("two_pass", spec, (0, 2)) == "memory_minimal"  # sequence parallel
    monkeypatch.setattr(triton_backend, "MAP_BUDGET_BYTES", sign_map.map_bytes(1, 1000) - 1)
    assert triton_backend.choose_algorithm("auto", spec, None) == "memory_minimal"
    with pytest.raises(ValueError, match="algorithm must be one of .* got 'fast'"):
        triton_backend.choose_algorithm("fast", spec, None)
    monkeypatch.setattr(triton_backend, "MAP_BUDGET_BYTES", 1 << 30)
    # A GPU measurement pinned in triton_configs.json that found the memory-minimal path faster wins "auto".
    monkeypatch.setattr(triton_backend, "tuned_for", lambda dtype, device: {"fastest_algorithm": "memory_minimal"})
    assert triton_backend.choose_algorithm("auto", spec, None) == "memory_minimal"
    assert triton_backend.choose_algorithm("two_pass", spec, None) == "two_pass"


def test_samples_are_chunked_so_that_the_maps_fit_the_budget(monkeypatch):
    s, t = make_pair((3, 130, 8), 8, device=DEVICE)
    fs, ft, spec = canonical(s, t)
    whole = triton_backend.pair_sums(fs, ft, spec, True, False, algorithm="two_pass")
    monkeypatch.setattr(triton_backend, "MAP_BUDGET_BYTES", sign_map.map_bytes(1, 130))  # one sample a chunk
    calls = []
    real = triton_backend.relation_pass
    monkeypatch.setattr(triton_backend, "relation_pass", lambda f, *a, **k: calls.append(f.values.shape[0])
                        or real(f, *a, **k))
    chunked = triton_backend.pair_sums(fs, ft, spec, True, False, algorithm="two_pass")
    assert calls == [1, 1, 1]
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


# ----------------------------------------------------------------------------------------------------------
# The memory-minimal path
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 4), ("temporal", 4)])
def test_symmetric_and_deterministic_schedules_agree(relation, frames):
    s, t = make_pair((2, 72, 24), 16, device=DEVICE)
    sym = raw_sums(s, t, relation=relation, frames=frames)
    det = raw_sums(s, t, deterministic=True, relation=relation, frames=frames)
    no_grad = raw_sums(s, t, need_s=False, relation=relation, frames=frames)
    torch.testing.assert_close(sym[0], det[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_grad[0], det[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sym[1], det[1], rtol=1e-5, atol=1e-5)


def test_memory_minimal_against_float64():
    s, t = make_pair((2, 70, 24), 16, device=DEVICE, grad_teacher=True)
    assert_matches_reference("triton", s, t, relation="temporal", num_frames=5, algorithm="memory_minimal")


def test_rectangular_tiles_in_the_deterministic_schedule():
    s, t = make_pair((1, 50, 40), 24, device=DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_D=16, num_warps=4, num_stages=1)
    det = raw_sums(s, t, deterministic=True, config=cfg)
    ref = raw_sums(s, t, deterministic=True)
    torch.testing.assert_close(det[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(det[1], ref[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="BLOCK_M == BLOCK_N"):
        raw_sums(s, t, config=cfg)


# ----------------------------------------------------------------------------------------------------------
# Both paths
# ----------------------------------------------------------------------------------------------------------

def test_float16_within_twice_naive_error():
    s, t = make_pair((2, 48, 32), 32, dtype=torch.float16, device=DEVICE)
    assert_matches_reference("triton", s, t, relation="temporal", num_frames=4)


def test_float64_is_refused_with_a_pointer_to_torch():
    s, t = make_pair((1, 8, 4), 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='torch'"):
        trd_loss(s, t, backend="triton")


def test_spatial_frames_smaller_and_larger_than_a_tile():
    for frames in (2, 10):  # 40 and 8 tokens per frame against 32-token tiles
        s, t = make_pair((1, 80, 16), 16, device=DEVICE)
        assert_matches_reference("triton", s, t, relation="spatial", num_frames=frames)


def test_pinned_configs_are_read_per_device_and_dtype(monkeypatch, tmp_path):
    table = tmp_path / "triton_configs.json"
    cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_D=64, num_warps=4, num_stages=2)
    table.write_text('{"Fake GPU": {"bfloat16": {"row_owned": %s, "fastest": "row_owned"}}}'
                     % str(cfg).replace("'", '"'))
    monkeypatch.setattr(triton_backend, "TUNED_CONFIGS", table)
    triton_backend.tuned_table.cache_clear()
    try:
        assert triton_backend.tuned_table("Fake GPU", "bfloat16")["fastest"] == "row_owned"
        assert triton_backend.tuned_table("Fake GPU", "bfloat16")["row_owned"] == cfg
        assert triton_backend.tuned_table("Other GPU", "bfloat16") == {}
        assert triton_backend.default_schedule(torch.bfloat16, torch.device("cpu")) == "symmetric"
    finally:
        triton_backend.tuned_table.cache_clear()
