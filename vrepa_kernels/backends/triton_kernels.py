"""Fused Triton backend: the TRD loss and its gradient, tile by tile, never holding an N x N tensor.

One program owns a block of rows ``I`` of one sample and streams column tiles ``J``:

* ``D_IJ = s_I s_J^T - t_I t_J^T`` is accumulated in fp32 registers by ``tl.dot`` over feature chunks of
  the raw inputs, then scaled by the inverse row norms in fp32 (normalisation fused, no bf16 rounding of
  the unit vectors);
* the margin clip, the relation mask and the row sums happen in registers;
* when a gradient is needed, ``P_IJ = dL/dD_IJ`` (exactly -1, 0 or +1, so exact in bf16/fp16) is
  multiplied into the gradient rows chunk by chunk of the feature dim.

Two schedules:

* symmetric (default): only tiles ``J >= I``; off-diagonal tiles count twice in the loss and add
  ``P_IJ s_J`` to rows I and ``P_IJ^T s_I`` to rows J with fp32 atomics;
* deterministic: every tile ``J`` of the row block, each program updating only its own rows, no atomics.

The loss alone (no gradient) always uses the symmetric schedule, which needs no atomics.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..features import Features
from ..relation import RelationSpec
from ..schedule import strips_for

try:
    import triton
    import triton.language as tl

    HAS_TRITON, IMPORT_ERROR = True, None
except Exception as exc:  # pragma: no cover - depends on the machine
    HAS_TRITON, IMPORT_ERROR = False, repr(exc)

RELATION_CODES = {"full": 0, "spatial": 1, "temporal": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if HAS_TRITON:

    @triton.jit
    def _raw_gram(X, rows, cols, row_ok, col_ok, dim, stride_n,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
        """X[rows] @ X[cols]^T of the raw inputs, fp32 accumulation, streamed over the feature dim."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < dim
            a = tl.load(X + rows[:, None] * stride_n + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(X + cols[:, None] * stride_n + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _load_unit(X, inv_norm, idx, idx_ok, d, d_ok, stride_n, UPCAST: tl.constexpr):
        """Normalised rows ``X[idx] * inv_norm`` in the dot dtype (fp32 scaling, one rounding)."""
        x = tl.load(X + idx[:, None] * stride_n + d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0)
        unit = x.to(tl.float32) * inv_norm[:, None]
        if not UPCAST:
            unit = unit.to(X.dtype.element_ty)
        return unit

    @triton.jit
    def _accumulate_grad(p, X, inv_rows, inv_cols, G, rows, cols, row_ok, col_ok, dim, x_stride_n, g_stride_n,
                         off_diagonal, SYMMETRIC: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr):
        """G[rows] += p @ X_hat[cols]; in the symmetric schedule also G[cols] += p^T @ X_hat[rows]."""
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < dim
            contrib = tl.dot(p, _load_unit(X, inv_cols, cols, col_ok, d, d_ok, x_stride_n, UPCAST),
                             input_precision=PRECISION)
            g_rows = G + rows[:, None] * g_stride_n + d[None, :]
            rows_mask = row_ok[:, None] & d_ok[None, :]
            if SYMMETRIC:
                tl.atomic_add(g_rows, contrib, mask=rows_mask)
                if off_diagonal:
                    x_rows = _load_unit(X, inv_rows, rows, row_ok, d, d_ok, x_stride_n, UPCAST)
                    contrib_t = tl.dot(tl.trans(p), x_rows, input_precision=PRECISION)
                    tl.atomic_add(G + cols[:, None] * g_stride_n + d[None, :], contrib_t,
                                  mask=col_ok[:, None] & d_ok[None, :])
            else:
                tl.store(g_rows, tl.load(g_rows, mask=rows_mask, other=0.0) + contrib, mask=rows_mask)

    @triton.jit
    def _trd_kernel(S, T, S_INV, T_INV, GS, GT, PARTIAL, ROW_BLOCKS,
                    N, DS, DT, TPF, margin,
                    s_stride_b, s_stride_n, t_stride_b, t_stride_n,
                    gs_stride_b, gs_stride_n, gt_stride_b, gt_stride_n,
                    RELATION: tl.constexpr, SYMMETRIC: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                    BLOCK_LIST: tl.constexpr):
        if BLOCK_LIST:  # a rank's share of the row blocks (sequence parallelism)
            pid_m = tl.load(ROW_BLOCKS + tl.program_id(0))
        else:  # every row block, no dependent load before the loop
            pid_m = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)  # sample offsets in int64; offsets within a sample below
        row0 = pid_m * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows_idx = rows.to(tl.int64) if WIDE_OFFSETS else rows  # 32-bit offsets keep registers free
        S_b = S + batch * s_stride_b
        T_b = T + batch * t_stride_b
        S_INV_b = S_INV + batch * N
        T_INV_b = T_INV + batch * N
        s_inv_rows = tl.load(S_INV_b + rows_idx, mask=row_ok, other=0.0)
        t_inv_rows = tl.load(T_INV_b + rows_idx, mask=row_ok, other=0.0)

        # Column range: J >= I in the symmetric schedule; spatial keeps only the frames the rows touch.
        col_start = 0
        col_end = N
        if SYMMETRIC:
            col_start = row0
        if RELATION == 1:
            last_row = tl.minimum(row0 + BLOCK_M, N) - 1
            col_end = (last_row // TPF + 1) * TPF
            if not SYMMETRIC:
                col_start = (row0 // TPF) * TPF
        if RELATION != 0:
            row_frame = rows // TPF

        row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(col_start, col_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < col_end
            cols_idx = cols.to(tl.int64) if WIDE_OFFSETS else cols
            s_inv_cols = tl.load(S_INV_b + cols_idx, mask=col_ok, other=0.0)
            t_inv_cols = tl.load(T_INV_b + cols_idx, mask=col_ok, other=0.0)
            # D = Gs - Gt from raw-input dot products scaled by the inverse norms in fp32.
            gram_s = _raw_gram(S_b, rows_idx, cols_idx, row_ok, col_ok, DS, s_stride_n,
                               BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
            gap = gram_s * (s_inv_rows[:, None] * s_inv_cols[None, :])
            gram_t = _raw_gram(T_b, rows_idx, cols_idx, row_ok, col_ok, DT, t_stride_n,
                               BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
            gap = gap - gram_t * (t_inv_rows[:, None] * t_inv_cols[None, :])
            keep = row_ok[:, None] & col_ok[None, :]
            if RELATION == 1:
                keep = keep & (row_frame[:, None] == (cols // TPF)[None, :])
            if RELATION == 2:
                keep = keep & (row_frame[:, None] != (cols // TPF)[None, :])
            elem = tl.maximum(tl.abs(gap) - margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
            elem = tl.where(keep, elem, 0.0)
            tile_sum = tl.sum(elem, axis=1)
            if SYMMETRIC:
                if c0 != row0:
                    tile_sum = tile_sum * 2.0
            row_sums += tile_sum
            if GRAD_S or GRAD_T:
                # dL/dD: +1, -1 or 0; "+ gap * 0" carries NaN/Inf into the gradient.
                p = (gap > margin).to(tl.float32) - (gap < -margin).to(tl.float32) + gap * 0.0
                p = tl.where(keep, p, 0.0)
                if not UPCAST:
                    p = p.to(S.dtype.element_ty)
                off_diagonal = c0 != row0
                if GRAD_S:
                    _accumulate_grad(p, S_b, s_inv_rows, s_inv_cols, GS + batch * gs_stride_b, rows_idx, cols_idx,
                                     row_ok, col_ok, DS, s_stride_n, gs_stride_n, off_diagonal, SYMMETRIC,
                                     BLOCK_D, UPCAST, PRECISION)
                if GRAD_T:
                    _accumulate_grad(p, T_b, t_inv_rows, t_inv_cols, GT + batch * gt_stride_b, rows_idx, cols_idx,
                                     row_ok, col_ok, DT, t_stride_n, gt_stride_n, off_diagonal, SYMMETRIC,
                                     BLOCK_D, UPCAST, PRECISION)
        tl.store(PARTIAL + batch * tl.num_programs(0) + tl.program_id(0), tl.sum(row_sums, axis=0))


# Tile configs measured by benchmarks/tune_triton.py on a GPU, keyed by device name and dtype; absent
# entries fall back to the defaults below.
TUNED_CONFIGS = Path(__file__).with_name("triton_configs.json")


@functools.lru_cache(maxsize=None)
def _tuned(device_name: str, dtype_name: str) -> dict:
    if not TUNED_CONFIGS.exists():
        return {}
    return json.loads(TUNED_CONFIGS.read_text()).get(device_name, {}).get(dtype_name, {})


def _tuned_for(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return _tuned(torch.cuda.get_device_name(device), str(dtype).replace("torch.", ""))


def default_schedule(dtype: torch.dtype, device: torch.device) -> str:
    """"symmetric" (atomics) or "row_owned" (no atomics) for training passes: whichever was measured faster."""
    return _tuned_for(dtype, device).get("fastest", "symmetric")


def kernel_config(dtype: torch.dtype, device: torch.device, symmetric: bool = True) -> dict:
    """Tile sizes and launch options: pinned (never autotuned at run time) so runs are reproducible."""
    if device.type != "cuda":  # the interpreter: small tiles keep numpy fast
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, num_warps=4, num_stages=1)
    tuned = _tuned_for(dtype, device).get("symmetric" if symmetric else "row_owned")
    return dict(tuned) if tuned else default_config(dtype, symmetric)


def default_config(dtype: torch.dtype, symmetric: bool = True) -> dict:
    """The untuned GPU config (see benchmarks/triton_resources.py for its registers and spills)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, num_warps=4, num_stages=2)
    # 128 x 128 tiles spill registers in the gradient pass (sm_80 and sm_90); 64 x 64 do not.
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=3)


def needs_wide_offsets(num_tokens: int, *row_strides: int) -> bool:
    """Whether offsets within one sample can pass 2^31 elements (then the kernel indexes in int64)."""
    return num_tokens * max(row_strides) >= 2**31


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,
    part: Optional[Tuple[int, int]] = None,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample sums and gradients w.r.t. the unit features; ``part=(rank, world)`` runs only that
    rank's share of the row blocks (sums and gradients are then partial, for an all-reduce)."""
    if not HAS_TRITON:
        raise RuntimeError(f"backend='triton' is unavailable: triton is not installed ({IMPORT_ERROR})")
    s = student.values.contiguous()
    t = teacher.values.contiguous()
    s_inv = student.inv_norm.float().contiguous()
    t_inv = teacher.inv_norm.float().contiguous()
    batch, n, ds = s.shape
    dt = t.shape[-1]
    grad = need_s or need_t
    symmetric = not grad or (not deterministic and default_schedule(s.dtype, s.device) == "symmetric")
    cfg = dict(config or kernel_config(s.dtype, s.device, symmetric))
    if symmetric and cfg["BLOCK_M"] != cfg["BLOCK_N"]:
        raise ValueError(f"the symmetric schedule needs BLOCK_M == BLOCK_N, got {cfg}")
    if part is None:  # every row block; arange is a device op, so CUDA-graph capture stays legal
        row_blocks = torch.arange(triton.cdiv(n, cfg["BLOCK_M"]), dtype=torch.int32, device=s.device)
    else:
        blocks = [i for i, _ in strips_for(spec, cfg["BLOCK_M"], part, symmetric)]
        row_blocks = torch.tensor(blocks, dtype=torch.int32).to(s.device)
    partial = torch.zeros(batch, row_blocks.numel(), dtype=torch.float32, device=s.device)
    g_s = torch.zeros(batch, n, ds, dtype=torch.float32, device=s.device) if need_s else partial
    g_t = torch.zeros(batch, n, dt, dtype=torch.float32, device=s.device) if need_t else partial
    # bf16 tl.dot is wrong under the CPU interpreter; fp32 operands are exact there.
    upcast = interpreting() and s.dtype == torch.bfloat16
    if row_blocks.numel():
        _trd_kernel[(row_blocks.numel(), batch)](
            s, t, s_inv, t_inv, g_s, g_t, partial, row_blocks,
            n, ds, dt, spec.tokens_per_frame or 1, spec.margin,
            s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            g_s.stride(0) if need_s else 0, g_s.stride(1) if need_s else 0,
            g_t.stride(0) if need_t else 0, g_t.stride(1) if need_t else 0,
            RELATION=RELATION_CODES[spec.relation], SYMMETRIC=symmetric, GRAD_S=need_s, GRAD_T=need_t,
            UPCAST=upcast, PRECISION=_dot_precision(s.dtype),
            WIDE_OFFSETS=needs_wide_offsets(n, s.stride(1), t.stride(1), ds, dt), BLOCK_LIST=part is not None,
            **cfg,
        )
    sums = partial.to(torch.float64).sum(dim=1).to(torch.float32)
    return sums, (g_s.mul_(2.0) if need_s else None), (g_t.mul_(-2.0) if need_t else None)
