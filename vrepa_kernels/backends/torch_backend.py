"""Blockwise PyTorch backend: runs on any device and holds one strip of the relation at a time.

For each strip of rows ``I`` it forms ``D = [s|t]_I [s|-t]_C^T = Gs - Gt`` for the columns ``C >= I``
only (the relation is symmetric), soft-shrinks it by the margin, and folds the strip into the loss and into the
gradient ``2 P s`` through both ``P_IC s_C`` and ``P_IC^T s_I``. :func:`sign_product` runs the same
sweep for any operands ``x`` (``P x``), which the op uses for second-order gradients.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

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


def _per_frame(spec: RelationSpec, student: Features, teacher: Features, operands: Sequence[torch.Tensor]):
    """Same-frame pairs of B samples are all pairs of B * F one-frame samples: no masked-out work."""
    frames, tpf = spec.num_frames, spec.tokens_per_frame
    per_frame = [Features(f.values.reshape(spec.batch * frames, tpf, -1), f.norm.reshape(spec.batch * frames, tpf, 1))
                 for f in (student, teacher)]
    frame_spec = replace(spec, batch=spec.batch * frames, num_tokens=tpf, relation="full", tokens_per_frame=0)
    return frame_spec, per_frame, [x.reshape(spec.batch * frames, tpf, -1) for x in operands]


def _sweep(student: Features, teacher: Features, spec: RelationSpec, operands: Sequence[torch.Tensor],
           part: Optional[Tuple[int, int]]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per-sample sums of the element loss (float64) and ``P x`` for each operand ``x`` ``[B, N, Dx]``.

    ``P = sign(D) [|D| > margin]`` on kept pairs. A sample with a NaN among its kept pairs gets NaN sums
    and NaN products (``torch.sign(nan)`` is 0, so that NaN is restored here and never hidden).
    """
    if spec.relation == "spatial":
        frame_spec, per_frame, frame_operands = _per_frame(spec, student, teacher, operands)
        sums, products = _sweep(*per_frame, frame_spec, frame_operands, part)
        return (sums.reshape(spec.batch, spec.num_frames).sum(dim=1),
                [p.reshape(spec.batch, spec.num_tokens, -1) for p in products])
    acc = student.norm.dtype
    # CPU BLAS is fastest (and exact) in fp32; on GPU keep the tensor-core dtype, as naive PyTorch does.
    gemm_dtype = acc if student.values.device.type == "cpu" else student.values.dtype
    s = student.unit(gemm_dtype)
    t = teacher.unit(gemm_dtype)
    left = torch.cat([s, t], dim=-1)
    right = torch.cat([s, -t], dim=-1)
    batch, n, _ = s.shape
    rows = strip_rows(batch, n)

    sums = torch.zeros(batch, dtype=torch.float64, device=s.device)  # across strips: no drift at huge N
    products = [torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, acc), device=s.device) for x in operands]
    for _, (r0, r1, _, c1) in strips_for(spec, rows, part):
        diff = torch.bmm(left[:, r0:r1], right[:, r0:c1].transpose(1, 2)).to(acc)  # Gs - Gt, [B, R, C]
        shrunk = F.softshrink(diff, spec.margin)  # sign(D) * max(|D| - m, 0)
        del diff
        keep = _keep_mask(spec, r0, r1, c1, s.device)
        if keep is not None:
            shrunk = shrunk.masked_fill_(~keep, 0.0)
        width = r1 - r0  # the diagonal block counts once, the blocks right of it twice (symmetry)
        sums += 2 * l1(shrunk) - l1(shrunk[:, :, :width])
        if not operands:
            continue
        sign = shrunk.sign_()  # dL/dD in {-1, 0, +1}
        for out, x in zip(products, operands):
            p = sign.to(x.dtype)
            _add_product(out[:, r0:r1], p, x[:, r0:c1])
            if c1 > r1:
                _add_product(out[:, r1:c1], p[:, :, width:].transpose(1, 2), x[:, r0:r1])
    poisoned = ~torch.isfinite(sums)[:, None, None]
    for out in products:
        out.masked_fill_(poisoned, float("nan"))
    return sums, products


def pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,  # always deterministic: no atomics
    part: Optional[Tuple[int, int]] = None,
    algorithm: str = "auto",  # one path here: the strip sweep
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample sums and gradients w.r.t. the unit features; ``part=(rank, world)`` visits only that
    rank's share of the strips (sums and gradients are then partial, for an all-reduce)."""
    acc = student.norm.dtype
    gemm_dtype = acc if student.values.device.type == "cpu" else student.values.dtype
    wanted = [f.unit(gemm_dtype) for f, need in ((student, need_s), (teacher, need_t)) if need]
    sums, products = _sweep(student, teacher, spec, wanted, part)
    grads = iter(products)
    g_s = next(grads).mul_(2.0) if need_s else None  # dL/dŝ = 2 P ŝ, dL/dt̂ = -2 P t̂
    g_t = next(grads).mul_(-2.0) if need_t else None
    return sums.to(acc), g_s, g_t


def sign_product(student: Features, teacher: Features, spec: RelationSpec,
                 operands: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``P x`` for each operand ``x`` ``[B, N, Dx]``, with ``P_ij = sign(D_ij) [|D_ij| > margin]`` on kept pairs.

    ``D`` is recomputed strip by strip as in :func:`pair_sums` (never N x N in memory); ``P`` is symmetric.
    The gradient of the loss sums is ``2 P ŝ`` (student) and ``-2 P t̂`` (teacher), and ``P`` is piecewise
    constant, so these products also give the second derivatives (vrepa_kernels.op).
    """
    return _sweep(student, teacher, spec, list(operands), None)[1]
