"""Sequence-parallel TRD: the exact loss over token-sharded features with torch.distributed.

Each rank holds a contiguous slice ``[B, N_r, D]`` of every sample's tokens, in rank order (slices may
differ in length; ``num_frames`` refers to the whole sequence, so a frame may straddle ranks).

Per step, with N tokens in all:

1. all-gather each rank's shapes (5 int64 values) and the raw features, every slice padded to the
   longest: ``W * B * max(N_r) * (Ds + Dt)`` elements (``B * N * (Ds + Dt)`` for even slices);
2. each rank runs the blockwise kernel on its balanced share of the symmetric triangle of strips
   (``schedule.balance``), producing partial sums and partial gradients for every token;
3. all-reduce the ``B`` partial sums and, when a gradient is needed, the ``B * N * D`` fp32 partial
   gradients; each rank keeps its own rows.

No N x N data ever moves. Every rank returns the loss of the whole sequence; each rank's gradient is the
gradient of its own slice. Combine with data parallelism by passing one process group per
sequence-parallel group.
"""
from __future__ import annotations

import inspect
from typing import List, Optional

import torch
import torch.distributed as dist

from . import backends
from .features import Features, normalize_backward
from .function import reduce_sums
from .relation import canonicalize


def _gather_rows(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """All-gather ``[B, N_r, D]`` slices of uneven length into ``[B, N, D]`` in rank order."""
    padded = x.new_zeros(x.shape[0], max(sizes), x.shape[2])
    padded[:, : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


class _SequenceParallelTRD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec, sizes, backend, need_s, need_t, deterministic, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        offset = sum(sizes[:rank])
        rows = slice(offset, offset + student.shape[1])
        feats_s = Features.of(_gather_rows(student.detach(), sizes, group))
        feats_t = Features.of(_gather_rows(teacher.detach(), sizes, group))
        kernel = backends.pair_kernel(backend)
        split = "part" in inspect.signature(kernel).parameters
        if split:
            sums, g_s, g_t = kernel(feats_s, feats_t, spec, need_s, need_t, deterministic, part=(rank, world))
        else:  # a backend without work splitting computes everything on every rank: exact, no reduction
            sums, g_s, g_t = kernel(feats_s, feats_t, spec, need_s, need_t, deterministic)
        sums = sums.to(feats_s.norm.dtype)
        if split:
            dist.all_reduce(sums, group=group)
        loss, scale = reduce_sums(sums, spec)
        grads = []
        for need, g, feats in ((need_s, g_s, feats_s), (need_t, g_t, feats_t)):
            if not need:
                grads.append(None)
                continue
            if split:
                dist.all_reduce(g, group=group)
            local = Features(feats.values[:, rows], feats.norm[:, rows])
            grads.append(normalize_backward(g[:, rows] * scale, local.unit(), local.norm))
        ctx.grads = grads
        ctx.dtypes = (student.dtype, teacher.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        out = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            if g is None:
                out.append(None)
                continue
            scale = grad_loss.to(g.dtype)
            out.append((g * (scale.reshape(-1, 1, 1) if scale.dim() == 1 else scale)).to(dtype))
        return (out[0], out[1]) + (None,) * 7


def sequence_parallel_trd_loss(student, teacher, margin, relation, num_frames, reduction, backend,
                               deterministic, process_group, check_finite: bool = False) -> torch.Tensor:
    """:func:`vrepa_kernels.trd_loss` over token shards; see the module docstring."""
    from .dispatch import resolve_backend

    group = process_group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group= needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    # Validate the local shard, then agree on shapes; every rank raises together, so none hangs.
    error: Optional[Exception] = None
    meta = [0, 0, 0, 0]
    try:
        if isinstance(student, torch.Tensor) and student.dim() == 4:
            raise ValueError("with process_group=, pass [B, N_r, D] token shards and num_frames= "
                             f"(got 4-D student of shape {tuple(student.shape)})")
        student, teacher, _ = canonicalize(student, teacher, margin, "full", None, reduction)
        meta = [student.shape[0], student.shape[1], student.shape[2], teacher.shape[2]]
        if check_finite:
            for arg, x in (("student", student), ("teacher", teacher)):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{arg} holds NaN or Inf values (check_finite=True)")
    except (TypeError, ValueError) as exc:
        error = exc
    device = student.device if isinstance(student, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local_meta = torch.tensor(meta + [error is None], dtype=torch.int64, device=device)
    metas = [torch.empty_like(local_meta) for _ in range(world)]
    dist.all_gather(metas, local_meta, group=group)
    metas = [m.tolist() for m in metas]
    if error is not None:
        raise error
    bad = [r for r, m in enumerate(metas) if not m[4]]
    if bad:
        raise ValueError(f"rank(s) {bad} rejected their shards; see the error raised there")
    if len({(m[0], m[2], m[3]) for m in metas}) != 1:
        raise ValueError(f"ranks disagree on (batch, Ds, Dt): {[(m[0], m[2], m[3]) for m in metas]}")
    sizes = [m[1] for m in metas]
    # The relation and frames refer to the whole sequence.
    whole = torch.empty(meta[0], sum(sizes), 1, device="meta")
    _, _, spec = canonicalize(whole, whole, margin, relation, num_frames, reduction)
    name = resolve_backend(backend, student.device, student.dtype, spec)
    if name == "reference":
        raise ValueError("backend='reference' materialises N x N and has no sequence-parallel form")
    grad_on = torch.is_grad_enabled()
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    return _SequenceParallelTRD.apply(student, teacher, spec, sizes, name, grad_on and student.requires_grad,
                                      grad_on and teacher.requires_grad, deterministic, group)
