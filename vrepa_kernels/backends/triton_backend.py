"""Triton backend: the TRD loss and its gradient, tile by tile, never holding an N x N float tensor.

Every kernel forms ``D_IJ = s_I s_J^T - t_I t_J^T`` for a tile of pairs with ``tl.dot`` on the raw inputs
(fp32 accumulation), scaled by the inverse row norms in fp32: the normalisation is fused, and the unit
vectors are never rounded to bf16. Then the margin clip, the relation mask and the sums happen in
registers. ``P_IJ = dL/dD_IJ`` is -1, 0, +1 (or NaN for a non-finite pair): exact in bf16/fp16.

Training runs one of two paths (``algorithm=``):

* two-pass (default): the *relation pass* visits the upper-triangle tiles ``I <= J`` of 128 x 128 pairs,
  one tile per program over a linearised triangle (balanced), adds the loss partials and writes ``P`` as
  2-bit codes, the sign map of :mod:`vrepa_kernels.sign_map` (``N^2 / 8`` bytes per sample). The
  *gradient pass* computes ``G = P X_hat`` as a GEMM whose left operand is decoded from the map as it is
  loaded (tile ``(J, I)`` read transposed for ``J < I``); each program owns a block of rows and a chunk of
  the feature dim, accumulates on chip and writes its output once. No atomics: bitwise deterministic.
* memory-minimal: one fused kernel, no map. A program owns a row block and streams column tiles; the
  gradient is added to rows I and J with relaxed fp32 atomics (symmetric schedule), or, for
  ``deterministic=True``, each program visits every column and updates only its own rows (row-owned).

The loss alone is the relation pass without the map. The spatial relation runs as the full relation of
``B * F`` one-frame samples in the two-pass path, so no masked-out tile is visited.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from .. import sign_map
from ..features import Features
from ..relation import RELATION_CODES, RelationSpec
from ..schedule import strips_for
from ..sign_map import ALGORITHMS, MAP_BUDGET_BYTES

try:
    import triton
    import triton.language as tl

    HAS_TRITON, IMPORT_ERROR = True, None
except ImportError as exc:  # pragma: no cover - depends on the machine
    HAS_TRITON, IMPORT_ERROR = False, repr(exc)
    # Stand-ins so that the kernels below are still defined (never launched) without triton.
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)

MAP_TILE = sign_map.MAP_TILE


# ---------------------------------------------------------------------------------------------------------
# Shared tile maths
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _add_raw_gram(acc, X, rows, cols, row_ok, col_ok, dim, stride_n, NEGATE: tl.constexpr,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc +/- X[rows] @ X[cols]^T`` of the raw inputs, fp32 accumulation, streamed over the feature dim."""
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < dim
        a = tl.load(X + rows[:, None] * stride_n + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(X + cols[:, None] * stride_n + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if NEGATE:
            b = -b  # exact in every dtype (after the upcast: the interpreter negates bf16 wrongly)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gap_tile(S_b, T_b, S_INV_b, T_INV_b, rows, cols, row_ok, col_ok, DS, DT, s_stride_n, t_stride_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    """``D = Gs - Gt`` of one tile from raw-input dot products and the inverse norms ``a`` (student) and
    ``b`` (teacher), in fp32. One accumulator serves both Grams (half the registers of two):
    ``D = (s_i.s_j (a_i a_j) / (b_i b_j) - t_i.t_j) b_i b_j``."""
    s_inv_rows = tl.load(S_INV_b + rows, mask=row_ok, other=1.0)
    t_inv_rows = tl.load(T_INV_b + rows, mask=row_ok, other=1.0)
    s_inv_cols = tl.load(S_INV_b + cols, mask=col_ok, other=1.0)
    t_inv_cols = tl.load(T_INV_b + cols, mask=col_ok, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _add_raw_gram(acc, S_b, rows, cols, row_ok, col_ok, DS, s_stride_n, False, BLOCK_K, UPCAST, PRECISION)
    acc = acc * ((s_inv_rows / t_inv_rows)[:, None] * (s_inv_cols / t_inv_cols)[None, :])
    acc = _add_raw_gram(acc, T_b, rows, cols, row_ok, col_ok, DT, t_stride_n, True, BLOCK_K, UPCAST, PRECISION)
    return acc * (t_inv_rows[:, None] * t_inv_cols[None, :])


@triton.jit
def _kept(rows, cols, row_ok, col_ok, TPF, RELATION: tl.constexpr):
    keep = row_ok[:, None] & col_ok[None, :]
    if RELATION == 1:
        keep = keep & ((rows // TPF)[:, None] == (cols // TPF)[None, :])
    if RELATION == 2:
        keep = keep & ((rows // TPF)[:, None] != (cols // TPF)[None, :])
    return keep


@triton.jit
def _clipped(gap, keep, margin):
    """``max(|D| - margin, 0)`` on kept pairs; NaN stays NaN."""
    elem = tl.maximum(tl.abs(gap) - margin, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(keep, elem, 0.0)


@triton.jit
def _load_unit(X, inv_norm, idx, idx_ok, d, d_ok, stride_n, UPCAST: tl.constexpr):
    """Normalised rows ``X[idx] * inv_norm`` in the dot dtype (fp32 scaling, one rounding)."""
    x = tl.load(X + idx[:, None] * stride_n + d[None, :], mask=idx_ok[:, None] & d_ok[None, :], other=0.0)
    unit = x.to(tl.float32) * inv_norm[:, None]
    if not UPCAST:
        unit = unit.to(X.dtype.element_ty)
    return unit


@triton.jit
def _tile_index(i, j, n_tiles):
    """Linear index of map tile ``(i, j)``, ``i <= j``, in the row-major upper triangle."""
    return i * n_tiles - (i * (i - 1)) // 2 + (j - i)


@triton.jit
def _triangle_coords(linear, n_tiles):
    """``(i, j)`` of the ``linear``-th upper-triangle tile (inverse of :func:`_tile_index`)."""
    b = 2 * n_tiles + 1
    i = ((b - tl.sqrt((b * b - 8 * linear).to(tl.float32))) * 0.5).to(tl.int32)
    i = tl.where(_tile_index(i, i, n_tiles) > linear, i - 1, i)  # fp32 rounding, either way
    i = tl.where(_tile_index(i + 1, i + 1, n_tiles) <= linear, i + 1, i)
    return i, linear - _tile_index(i, i, n_tiles) + i


# ---------------------------------------------------------------------------------------------------------
# Two-pass path: the relation pass, then the gradient pass
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def relation_pass_kernel(S, T, S_INV, T_INV, MAP, PARTIAL,
                   N, DS, DT, TPF, margin, n_tiles,
                   s_stride_b, s_stride_n, t_stride_b, t_stride_n,
                   RELATION: tl.constexpr, STORE_MAP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One upper-triangle tile: its loss partial (off-diagonal tiles count twice) and, with STORE_MAP, its
    block of the sign map."""
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_map_tiles = tl.num_programs(0)
    ti, tj = _triangle_coords(tile, n_tiles)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    col_ok = cols < N
    gap = _gap_tile(S + batch * s_stride_b, T + batch * t_stride_b, S_INV + batch * N, T_INV + batch * N,
                    rows, cols, row_ok, col_ok, DS, DT, s_stride_n, t_stride_n, BLOCK, BLOCK, BLOCK_K, UPCAST,
                    PRECISION)
    keep = _kept(rows, cols, row_ok, col_ok, TPF, RELATION)
    total = tl.sum(tl.sum(_clipped(gap, keep, margin), axis=1), axis=0)
    total = tl.where(ti == tj, total, 2.0 * total)
    tl.store(PARTIAL + batch * num_map_tiles + tile, total)
    if STORE_MAP:
        finite = tl.abs(gap) < float("inf")  # False for NaN and +-Inf
        codes = tl.where(gap > margin, 1, 0) + tl.where(gap < -margin, 2, 0)
        codes = tl.where(finite, codes, 3)
        codes = tl.where(keep, codes, 0)
        shifts = 2 * tl.arange(0, 16)
        fields = tl.reshape(codes, [BLOCK, BLOCK // 16, 16]) << shifts[None, None, :]
        words = tl.sum(fields, axis=2)  # disjoint bit fields: the sum is their OR
        word_cols = tl.arange(0, BLOCK // 16)
        offsets = tl.arange(0, BLOCK)[:, None] * (BLOCK // 16) + word_cols[None, :]
        tl.store(MAP + (batch * num_map_tiles + tile) * (BLOCK * BLOCK // 16) + offsets, words)


@triton.jit
def _decode_signs(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS // 16]`` int32 words to ``P`` ``[ROWS, COLS]`` in fp32: +1, -1, 0 or NaN."""
    shifts = 2 * tl.arange(0, 16)
    codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 3, [ROWS, COLS])
    p = tl.where(codes == 1, 1.0, 0.0) - tl.where(codes == 2, 1.0, 0.0)
    return tl.where(codes == 3, float("nan"), p)


@triton.jit
def gradient_pass_kernel(X, X_INV, MAP, G,
                   N, DIM, n_tiles, num_map_tiles,
                   x_stride_b, x_stride_n, g_stride_b, g_stride_n,
                   MAP_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """``G[rows, d] = sum_J P[rows, J] X_hat[J, d]`` for one block of rows and one chunk of the features."""
    tile_i = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    rows = tile_i * MAP_TILE + tl.arange(0, MAP_TILE)
    row_ok = rows < N
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    X_b = X + batch * x_stride_b
    X_INV_b = X_INV + batch * N
    map_b = MAP + batch * num_map_tiles * (MAP_TILE * MAP_TILE // 16)
    words_per_row: tl.constexpr = MAP_TILE // 16
    acc = tl.zeros([MAP_TILE, BLOCK_D], dtype=tl.float32)
    row0 = tile_i * MAP_TILE
    # Columns left of the diagonal: pairs (rows, cols) live in tile (J, I), read transposed.
    for c0 in range(0, row0, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        stored = map_b + _tile_index(c0 // MAP_TILE, tile_i, n_tiles) * (MAP_TILE * words_per_row)
        words = tl.load(stored + (cols % MAP_TILE)[:, None] * words_per_row
                        + tl.arange(0, words_per_row)[None, :])
        p = tl.trans(_decode_signs(words, BLOCK_N, MAP_TILE))
        x = _load_unit(X_b, tl.load(X_INV_b + cols), cols, cols < N, d, d_ok, x_stride_n, UPCAST)
        if not UPCAST:
            p = p.to(X.dtype.element_ty)
        acc = tl.dot(p, x, acc, input_precision=PRECISION)
    # The diagonal tile and the columns right of it: tile (I, J).
    for c0 in range(row0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        stored = map_b + _tile_index(tile_i, c0 // MAP_TILE, n_tiles) * (MAP_TILE * words_per_row)
        word_cols = (c0 % MAP_TILE) // 16 + tl.arange(0, BLOCK_N // 16)
        words = tl.load(stored + tl.arange(0, MAP_TILE)[:, None] * words_per_row + word_cols[None, :])
        p = _decode_signs(words, MAP_TILE, BLOCK_N)
        x = _load_unit(X_b, tl.load(X_INV_b + cols, mask=col_ok, other=0.0), cols, col_ok, d, d_ok, x_stride_n,
                       UPCAST)
        if not UPCAST:
            p = p.to(X.dtype.element_ty)
        acc = tl.dot(p, x, acc, input_precision=PRECISION)
    g = G + batch * g_stride_b + rows[:, None] * g_stride_n + d[None, :]
    tl.store(g, acc, mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# Memory-minimal path: one fused kernel, no map
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _accumulate_grad(p, X, inv_rows, inv_cols, G, rows, cols, row_ok, col_ok, dim, x_stride_n, g_stride_n,
                     off_diagonal, SYMMETRIC: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, ATOMIC_SEM: tl.constexpr):
    """G[rows] += p @ X_hat[cols]; in the symmetric schedule also G[cols] += p^T @ X_hat[rows]."""
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        contrib = tl.dot(p, _load_unit(X, inv_cols, cols, col_ok, d, d_ok, x_stride_n, UPCAST),
                         input_precision=PRECISION)
        g_rows = G + rows[:, None] * g_stride_n + d[None, :]
        rows_mask = row_ok[:, None] & d_ok[None, :]
        if SYMMETRIC:
            tl.atomic_add(g_rows, contrib, mask=rows_mask, sem=ATOMIC_SEM)
            if off_diagonal:
                x_rows = _load_unit(X, inv_rows, rows, row_ok, d, d_ok, x_stride_n, UPCAST)
                contrib_t = tl.dot(tl.trans(p), x_rows, input_precision=PRECISION)
                tl.atomic_add(G + cols[:, None] * g_stride_n + d[None, :], contrib_t,
                              mask=col_ok[:, None] & d_ok[None, :], sem=ATOMIC_SEM)
        else:
            tl.store(g_rows, tl.load(g_rows, mask=rows_mask, other=0.0) + contrib, mask=rows_mask)


@triton.jit
def fused_kernel(S, T, S_INV, T_INV, GS, GT, PARTIAL, ROW_BLOCKS,
                  N, DS, DT, TPF, margin,
                  s_stride_b, s_stride_n, t_stride_b, t_stride_n,
                  gs_stride_b, gs_stride_n, gt_stride_b, gt_stride_n,
                  RELATION: tl.constexpr, SYMMETRIC: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
                  BLOCK_LIST: tl.constexpr, ATOMIC_SEM: tl.constexpr):
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

    row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        cols_idx = cols.to(tl.int64) if WIDE_OFFSETS else cols
        s_inv_cols = tl.load(S_INV_b + cols_idx, mask=col_ok, other=0.0)
        t_inv_cols = tl.load(T_INV_b + cols_idx, mask=col_ok, other=0.0)
        gap = _gap_tile(S_b, T_b, S_INV_b, T_INV_b, rows_idx, cols_idx, row_ok, col_ok, DS, DT, s_stride_n,
                        t_stride_n, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        keep = _kept(rows, cols, row_ok, col_ok, TPF, RELATION)
        tile_sum = tl.sum(_clipped(gap, keep, margin), axis=1)
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
                                 BLOCK_D, UPCAST, PRECISION, ATOMIC_SEM)
            if GRAD_T:
                _accumulate_grad(p, T_b, t_inv_rows, t_inv_cols, GT + batch * gt_stride_b, rows_idx, cols_idx,
                                 row_ok, col_ok, DT, t_stride_n, gt_stride_n, off_diagonal, SYMMETRIC,
                                 BLOCK_D, UPCAST, PRECISION, ATOMIC_SEM)
    tl.store(PARTIAL + batch * tl.num_programs(0) + tl.program_id(0), tl.sum(row_sums, axis=0))


# ---------------------------------------------------------------------------------------------------------
# Configs: pinned, never autotuned at run time, so that runs are reproducible
# ---------------------------------------------------------------------------------------------------------

# Measured by benchmarks/tune_triton.py on a GPU, keyed by device name and dtype; absent entries fall back
# to the defaults below, whose registers, spills and shared memory benchmarks/static_report.py reports.
TUNED_CONFIGS = Path(__file__).with_name("triton_configs.json")
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, num_warps=4, num_stages=1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(dtype: torch.dtype, symmetric: bool = True) -> dict:
    """The memory-minimal kernel's untuned GPU config."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, num_warps=4, num_stages=2)
    # 128 x 128 tiles spill registers in the fused gradient (sm_80 and sm_90); 64 x 64 do not.
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=3)


def default_two_pass_config(dtype: torch.dtype, arch: int = 90) -> dict:
    """Untuned configs of the two passes for ``sm_<arch>``: 128 x 128 pair tiles (the map tile)."""
    if dtype == torch.float32:  # FMA products: narrow K chunks and 16 warps keep a 128 x 128 tile unspilled
        return dict(relation=dict(BLOCK_K=8, num_warps=16, num_stages=1),
                    gradient=dict(BLOCK_N=16, BLOCK_D=64, num_warps=8 if arch >= 90 else 16, num_stages=2))
    # Three stages of two 128 x 64 bf16 operands fit Hopper's 227 KiB; Ampere's 163 KiB takes two.
    stages = 3 if arch >= 90 else 2
    return dict(relation=dict(BLOCK_K=64, num_warps=8, num_stages=stages),
                gradient=dict(BLOCK_N=64, BLOCK_D=128, num_warps=8, num_stages=stages))


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str, dtype_name: str) -> dict:
    if not TUNED_CONFIGS.exists():
        return {}
    return json.loads(TUNED_CONFIGS.read_text()).get(device_name, {}).get(dtype_name, {})


def tuned_for(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return tuned_table(torch.cuda.get_device_name(device), str(dtype).replace("torch.", ""))


def default_schedule(dtype: torch.dtype, device: torch.device) -> str:
    """The memory-minimal path's training schedule: "symmetric" (atomics) or "row_owned" (none)."""
    return tuned_for(dtype, device).get("fastest", "symmetric")


def kernel_config(dtype: torch.dtype, device: torch.device, symmetric: bool = True) -> dict:
    """The memory-minimal kernel's config: tuned for this GPU, else the default."""
    if device.type != "cuda":  # the interpreter: small tiles keep numpy fast
        return dict(INTERPRETER_CONFIG)
    tuned = tuned_for(dtype, device).get("symmetric" if symmetric else "row_owned")
    return dict(tuned) if tuned else default_config(dtype, symmetric)


def two_pass_config(dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(relation=dict(BLOCK_K=32, num_warps=4, num_stages=1),
                    gradient=dict(BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=1))
    tuned = tuned_for(dtype, device).get("two_pass")
    return dict(tuned) if tuned else default_two_pass_config(dtype, torch.cuda.get_device_capability(device)[0] * 10)


def needs_wide_offsets(num_tokens: int, *row_strides: int) -> bool:
    """Whether offsets within one sample can pass 2^31 elements (then the kernels index in int64)."""
    return num_tokens * max(row_strides) >= 2**31


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # bf16 tl.dot is wrong under the CPU interpreter; fp32 operands are exact there.
    return interpreting() and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError(f"backend='triton' is unavailable: triton is not installed ({IMPORT_ERROR})")


def choose_algorithm(algorithm: str, spec: RelationSpec, part: Optional[Tuple[int, int]],
                     dtype: torch.dtype = torch.bfloat16, device: torch.device = torch.device("cpu")) -> str:
    """"two_pass" or "memory_minimal" for a training call: "auto" is two-pass where the map fits
    :data:`MAP_BUDGET_BYTES`, unless a GPU measurement pinned in ``triton_configs.json`` found the
    memory-minimal path faster on this device."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if part is not None:  # sequence parallelism splits the fused kernel's strips between ranks
        return "memory_minimal"
    if algorithm != "auto":
        return algorithm
    if tuned_for(dtype, device).get("fastest_algorithm") == "memory_minimal":
        return "memory_minimal"
    tokens = spec.tokens_per_frame if spec.relation == "spatial" else spec.num_tokens
    return "two_pass" if sign_map.map_bytes(1, tokens) <= MAP_BUDGET_BYTES else "memory_minimal"


def _operands(features: Features) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the kernels read: the values, contiguous, and the fp32 inverse norms."""
    return features.values.contiguous(), features.inv_norm.float().contiguous()


def _checked_inputs(student: Features, teacher: Features):
    _require_triton()
    (s, s_inv), (t, t_inv) = _operands(student), _operands(teacher)
    if needs_wide_offsets(s.shape[1], s.shape[2], t.shape[2]):
        raise ValueError(f"the two-pass path indexes a sample in int32: N * D must stay below 2^31, got "
                         f"N={s.shape[1]}, Ds={s.shape[2]}, Dt={t.shape[2]}; use algorithm='memory_minimal'")
    return s, t, s_inv, t_inv


def relation_pass(student: Features, teacher: Features, spec: RelationSpec, store_map: bool = True,
                  config: Optional[dict] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample sums ``[B]`` (fp32) and the sign map (int32, :mod:`vrepa_kernels.sign_map`) of the
    full or temporal relation (spatial: see :func:`pair_sums`); ``store_map=False`` for the loss alone."""
    s, t, s_inv, t_inv = _checked_inputs(student, teacher)
    batch, n, ds = s.shape
    cfg = dict(config or two_pass_config(s.dtype, s.device)["relation"])
    tiles = sign_map.num_map_tiles(n)
    partial = torch.empty(batch, tiles, dtype=torch.float32, device=s.device)
    words = (torch.empty(batch, tiles, MAP_TILE, sign_map.WORDS_PER_ROW, dtype=torch.int32, device=s.device)
             if store_map else partial)
    relation_pass_kernel[(tiles, batch)](
        s, t, s_inv, t_inv, words, partial,
        n, ds, t.shape[2], spec.tokens_per_frame or 1, spec.margin, sign_map.num_tiles(n),
        s.stride(0), s.stride(1), t.stride(0), t.stride(1),
        RELATION=RELATION_CODES[spec.relation], STORE_MAP=store_map, BLOCK=MAP_TILE,
        UPCAST=_upcast(s.dtype), PRECISION=_dot_precision(s.dtype), **cfg,
    )
    sums = partial.to(torch.float64).sum(dim=1).to(torch.float32)
    return sums, (words if store_map else None)


def gradient_pass(features: Features, words: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """``P X_hat`` ``[B, N, D]`` (fp32) from the sign map of :func:`relation_pass`."""
    x, x_inv = _operands(features)
    batch, n, dim = x.shape
    cfg = dict(config or two_pass_config(x.dtype, x.device)["gradient"])
    out = torch.empty(batch, n, dim, dtype=torch.float32, device=x.device)
    grid = (sign_map.num_tiles(n), triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    gradient_pass_kernel[grid](
        x, x_inv, words, out, n, dim, sign_map.num_tiles(n), sign_map.num_map_tiles(n),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        MAP_TILE=MAP_TILE, UPCAST=_upcast(x.dtype), PRECISION=_dot_precision(x.dtype), **cfg,
    )
    return out


def _per_frame(features: Features, spec: RelationSpec) -> Features:
    frames = spec.batch * spec.num_frames
    return Features(features.values.reshape(frames, spec.tokens_per_frame, -1),
                    features.norm.reshape(frames, spec.tokens_per_frame, 1))


def _two_pass(student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool):
    if spec.relation == "spatial":  # same-frame pairs of B samples = all pairs of B * F one-frame samples
        frame_spec = replace(spec, batch=spec.batch * spec.num_frames, num_tokens=spec.tokens_per_frame,
                             relation="full", tokens_per_frame=0)
        sums, g_s, g_t = _two_pass(_per_frame(student, spec), _per_frame(teacher, spec), frame_spec, need_s,
                                   need_t)
        unflatten = lambda g: None if g is None else g.reshape(spec.batch, spec.num_tokens, -1)
        return sums.reshape(spec.batch, spec.num_frames).sum(dim=1), unflatten(g_s), unflatten(g_t)
    # Samples in chunks whose maps fit the budget together.
    per_chunk = max(1, MAP_BUDGET_BYTES // sign_map.map_bytes(1, spec.num_tokens))
    sums, grads_s, grads_t = [], [], []
    for b0 in range(0, spec.batch, per_chunk):
        chunk = slice(b0, b0 + per_chunk)
        s_c = Features(student.values[chunk], student.norm[chunk])
        t_c = Features(teacher.values[chunk], teacher.norm[chunk])
        chunk_sums, words = relation_pass(s_c, t_c, spec, store_map=need_s or need_t)
        sums.append(chunk_sums)
        if need_s:
            grads_s.append(gradient_pass(s_c, words).mul_(2.0))
        if need_t:
            grads_t.append(gradient_pass(t_c, words).mul_(-2.0))
    cat = lambda parts: torch.cat(parts) if parts else None
    return cat(sums), cat(grads_s), cat(grads_t)


def _memory_minimal(student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool,
                    deterministic: bool, part: Optional[Tuple[int, int]], config: Optional[dict]):
    (s, s_inv), (t, t_inv) = _operands(student), _operands(teacher)
    batch, n, ds = s.shape
    dt = t.shape[-1]
    grad = need_s or need_t
    symmetric = not grad or (not deterministic and default_schedule(s.dtype, s.device) == "symmetric")
    cfg = dict(config or kernel_config(s.dtype, s.device, symmetric))
    cfg.setdefault("ATOMIC_SEM", "relaxed")  # no ordering needed; "acq_rel" fences before every atomic
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
    if row_blocks.numel():
        fused_kernel[(row_blocks.numel(), batch)](
            s, t, s_inv, t_inv, g_s, g_t, partial, row_blocks,
            n, ds, dt, spec.tokens_per_frame or 1, spec.margin,
            s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            g_s.stride(0) if need_s else 0, g_s.stride(1) if need_s else 0,
            g_t.stride(0) if need_t else 0, g_t.stride(1) if need_t else 0,
            RELATION=RELATION_CODES[spec.relation], SYMMETRIC=symmetric, GRAD_S=need_s, GRAD_T=need_t,
            UPCAST=_upcast(s.dtype), PRECISION=_dot_precision(s.dtype),
            WIDE_OFFSETS=needs_wide_offsets(n, s.stride(1), t.stride(1), ds, dt), BLOCK_LIST=part is not None,
            **cfg,
        )
    sums = partial.to(torch.float64).sum(dim=1).to(torch.float32)
    return sums, (g_s.mul_(2.0) if need_s else None), (g_t.mul_(-2.0) if need_t else None)


def pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,
    part: Optional[Tuple[int, int]] = None,
    algorithm: str = "auto",
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample sums ``[B]`` and the gradients of the sums w.r.t. the unit features (fp32, or None).

    ``algorithm`` picks the training path (module docstring); ``part=(rank, world)`` runs only that rank's
    share of the memory-minimal kernel's strips (sums and gradients are then partial, for an all-reduce);
    ``config`` overrides the memory-minimal kernel's tile config.
    """
    _require_triton()
    path = choose_algorithm(algorithm, spec, part, student.values.dtype, student.values.device)
    wide = needs_wide_offsets(spec.num_tokens, student.values.shape[-1], teacher.values.shape[-1])
    if part is not None or wide or (path == "memory_minimal" and (need_s or need_t)):
        return _memory_minimal(student, teacher, spec, need_s, need_t, deterministic, part, config)
    return _two_pass(student, teacher, spec, need_s, need_t)  # the loss alone: the relation pass, no map
