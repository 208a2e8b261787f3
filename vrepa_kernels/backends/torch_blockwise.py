"""Blockwise PyTorch backend: runs on any device and holds one strip of the relation at a time.

For each strip of rows ``I`` it forms ``D = [s|t]_I [s|-t]_C^T = Gs - Gt`` for the columns ``C >= I``
only (the relation is symmetric), soft-shrinks it by the margin, and folds the strip into the loss and into the
gradient ``2 P s`` through both ``P_IC s_C`` and ``P_IC^T s_I``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..features import Features
from ..relation import RelationSpec
from ..schedule import strips_for

# Elements of one strip (B x rows x columns); 4M fp32 elements = 16 MiB.
STRIP_ELEMENTS = 1 << 22
MIN_ROWS, MAX_ROWS = 32, 512


def strip_rows(batch: int, n: int, budget: int = STRIP_ELEMENTS) -> int:
    rows = budget // max(1, batch * n)
    return int(max(MIN_ROWS, min(MAX_ROWS, rows)))


def _keep_mask(spec: RelationSpec, r0: int, r1: int, c1: int, device) -> Optional[torch.Tensor]:
    if spec.relation == "full":
        return None
    tpf = spec.tokens_per_frame
    row_frame = torch.arange(r0, r1, device=device) // tpf
    col_frame = torch.arange(r0, c1, device=device) // tpf
    same = row_frame[:, None] == col_frame[None, :]
    return same if spec.relation == "spatial" else ~same


def l1(x: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of |x| over the last two dims. torch.sum's cascade summation keeps fp32 exact to
    ~1e-7 here, where linalg.vector_norm(ord=1) drifts by ~1e-4 over millions of elements."""
    return x.abs().sum(dim=(1, 2)).to(torch.float64)  # fp32 cascade: 5x faster than dtype=float64


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == out.dtype:
        out.baddbmm_(a, b)
    else:  # low-precision GEMM on GPU, fp32 accumulator
        out += torch.bmm(a, b).to(out.dtype)


def _spatial_as_full(student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool,
                     part: Optional[Tuple[int, int]]):
    """Same-frame pairs of B samples are all pairs of B * F one-frame samples: no masked-out work."""
    frames, tpf = spec.num_frames, spec.tokens_per_frame
    per_frame = [Features(f.values.reshape(spec.batch * frames, tpf, -1), f.norm.reshape(spec.batch * frames, tpf, 1))
                 for f in (student, teacher)]
    frame_spec = replace(spec, batch=spec.batch * frames, num_tokens=tpf, relation="full", tokens_per_frame=0)
    sums, g_s, g_t = pair_sums(*per_frame, frame_spec, need_s, need_t, part=part)
    unflatten = lambda g: None if g is None else g.reshape(spec.batch, spec.num_tokens, -1)
    return sums.reshape(spec.batch, frames).sum(dim=1), unflatten(g_s), unflatten(g_t)


def pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,  # always deterministic: no atomics
    part: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample sums and gradients w.r.t. the unit features; ``part=(rank, world)`` visits only that
    rank's share of the strips (sums and gradients are then partial, for an all-reduce)."""
    if spec.relation == "spatial":
        return _spatial_as_full(student, teacher, spec, need_s, need_t, part)
    acc = student.norm.dtype
    # CPU BLAS is fastest (and exact) in fp32; on GPU keep the tensor-core dtype, as naive PyTorch does.
    gemm_dtype = acc if student.values.device.type == "cpu" else student.values.dtype
    s = student.unit(gemm_dtype)
    t = teacher.unit(gemm_dtype)
    left = torch.cat([s, t], dim=-1)
    right = torch.cat([s, -t], dim=-1)
    batch, n, ds = s.shape
    rows = strip_rows(batch, n)
    margin = spec.margin

    sums = torch.zeros(batch, dtype=torch.float64, device=s.device)  # across strips: no drift at huge N
    g_s = torch.zeros(batch, n, ds, dtype=acc, device=s.device) if need_s else None
    g_t = torch.zeros(batch, n, t.shape[-1], dtype=acc, device=s.device) if need_t else None

    for _, (r0, r1, _, c1) in strips_for(spec, rows, part):
        diff = torch.bmm(left[:, r0:r1], right[:, r0:c1].transpose(1, 2)).to(acc)  # Gs - Gt, [B, R, C]
        shrunk = F.softshrink(diff, margin)  # sign(D) * max(|D| - m, 0)
        del diff
        keep = _keep_mask(spec, r0, r1, c1, s.device)
        if keep is not None:
            shrunk = shrunk.masked_fill_(~keep, 0.0)
        width = r1 - r0  # the diagonal block counts once, the blocks right of it twice (symmetry)
        sums += 2 * l1(shrunk) - l1(shrunk[:, :, :width])
        if not (need_s or need_t):
            continue
        sign = shrunk.sign_().to(gemm_dtype)  # dL/dD in {-1, 0, +1}; NaN is restored below
        for g, feats in ((g_s, s), (g_t, t)):
            if g is None:
                continue
            _add_product(g[:, r0:r1], sign, feats[:, r0:c1])
            if c1 > r1:
                _add_product(g[:, r1:c1], sign[:, :, width:].transpose(1, 2), feats[:, r0:r1])
    # torch.sign(nan) is 0. A sample whose sum is not finite had a NaN among its kept pairs: its
    # gradient is poisoned whole, so that NaN is never hidden.
    poisoned = ~torch.isfinite(sums)[:, None, None]
    for g in (g_s, g_t):
        if g is not None:
            g.masked_fill_(poisoned, float("nan"))
    if g_s is not None:
        g_s.mul_(2.0)
    if g_t is not None:
        g_t.mul_(-2.0)
    return sums.to(acc), g_s, g_t
