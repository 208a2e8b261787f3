"""Triton-specific behaviour (schedules, dtypes, tile configs), under the interpreter on CPU."""
import pytest
import torch

from vrepa_kernels import trd_loss
from vrepa_kernels.backends import triton_kernels
from vrepa_kernels.features import Features
from vrepa_kernels.relation import canonicalize

from conftest import HAS_CUDA, assert_matches_reference, cpu_backends, make_pair

pytestmark = pytest.mark.skipif("triton" not in cpu_backends() and not HAS_CUDA,
                                reason="triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def raw_sums(s, t, need_s=True, deterministic=False, config=None, relation="full", frames=None):
    s3, t3, spec = canonicalize(s, t, relation=relation, num_frames=frames)
    return triton_kernels.pair_sums(Features.of(s3), Features.of(t3), spec, need_s, False, deterministic,
                                    config=config)


@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 4), ("temporal", 4)])
def test_symmetric_and_deterministic_schedules_agree(relation, frames):
    s, t = make_pair((2, 72, 24), 16, device=DEVICE)
    sym = raw_sums(s.detach(), t.detach(), relation=relation, frames=frames)
    det = raw_sums(s.detach(), t.detach(), deterministic=True, relation=relation, frames=frames)
    no_grad = raw_sums(s.detach(), t.detach(), need_s=False, relation=relation, frames=frames)
    torch.testing.assert_close(sym[0], det[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_grad[0], det[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sym[1], det[1], rtol=1e-5, atol=1e-5)


def test_rectangular_tiles_in_the_deterministic_schedule():
    s, t = make_pair((1, 50, 40), 24, device=DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_D=16, num_warps=4, num_stages=1)
    det = raw_sums(s.detach(), t.detach(), deterministic=True, config=cfg)
    ref = raw_sums(s.detach(), t.detach(), deterministic=True)
    torch.testing.assert_close(det[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(det[1], ref[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="BLOCK_M == BLOCK_N"):
        raw_sums(s.detach(), t.detach(), config=cfg)


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
    monkeypatch.setattr(triton_kernels, "TUNED_CONFIGS", table)
    triton_kernels._tuned.cache_clear()
    try:
        assert triton_kernels._tuned("Fake GPU", "bfloat16")["fastest"] == "row_owned"
        assert triton_kernels._tuned("Fake GPU", "bfloat16")["row_owned"] == cfg
        assert triton_kernels._tuned("Other GPU", "bfloat16") == {}
        assert triton_kernels.default_schedule(torch.bfloat16, torch.device("cpu")) == "symmetric"
    finally:
        triton_kernels._tuned.cache_clear()
