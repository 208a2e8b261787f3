"""The oracle itself, checked against a plain Python loop over pairs."""
import math

import pytest
import torch

from vrepa_kernels import trd_loss_reference


def loop_loss(s, t, margin, relation, frames, reduction):
    per_sample = []
    for sb, tb in zip(s.tolist(), t.tolist()):
        unit = lambda v: [x / max(math.sqrt(sum(y * y for y in v)), 1e-12) for x in v]
        sb, tb = [unit(v) for v in sb], [unit(v) for v in tb]
        n, tpf = len(sb), len(sb) // (frames or 1)
        total, count = 0.0, 0
        for i in range(n):
            for j in range(n):
                same = i // tpf == j // tpf
                if (relation == "spatial" and not same) or (relation == "temporal" and same):
                    continue
                gs = sum(a * b for a, b in zip(sb[i], sb[j]))
                gt = sum(a * b for a, b in zip(tb[i], tb[j]))
                total += max(abs(gs - gt) - margin, 0.0)
                count += 1
        per_sample.append((total, count))
    if reduction == "sum":
        return sum(x for x, _ in per_sample)
    if reduction == "none":
        return [x / c for x, c in per_sample]
    return sum(x for x, _ in per_sample) / sum(c for _, c in per_sample)


@pytest.mark.parametrize("relation, frames", [("full", None), ("spatial", 3), ("temporal", 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_pair_loop(relation, frames, reduction):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    s[1, 2] = 0.0  # a zero token stays zero
    got = trd_loss_reference(s, t, 0.1, relation, frames, reduction)
    want = torch.tensor(loop_loss(s, t, 0.1, relation, frames, reduction), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
