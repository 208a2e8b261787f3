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

The autograd rules are the single-process op's (:class:`vrepa_kernels.op.TRDLossFunction`) with this
forward (:class:`ShardedLossCall`); second-order and forward-mode derivatives raise here, since each rank
holds only its own slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import backends
from .features import Features, accumulation_dtype
from .op import LossCall, blockwise_trd_loss, check_finite_inputs, input_gradients, reduce_sums
from .relation import canonicalize


def _gather_rows(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """All-gather ``[B, N_r, D]`` slices of uneven length into ``[B, N, D]`` in rank order."""
    padded = x.new_zeros(x.shape[0], max(sizes), x.shape[2])
    padded[:, : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


@dataclass(frozen=True)
class ShardedLossCall(LossCall):
    """A :class:`~vrepa_kernels.op.LossCall` over token shards: the op's autograd rules, this forward."""

    sizes: Tuple[int, ...] = ()
    group: object = None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, need_s: bool, need_t: bool):
        group, sizes = self.group, list(self.sizes)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        offset = sum(sizes[:rank])
        rows = slice(offset, offset + student.shape[1])
        feats_s = Features.of(_gather_rows(student, sizes, group))
        feats_t = Features.of(_gather_rows(teacher, sizes, group))
        backend = backends.get(self.backend)
        # A backend without work splitting computes everything on every rank: exact, nothing to reduce.
        split = dict(part=(rank, world)) if backend.splits_across_ranks else {}
        sums, g_s, g_t = backend.pair_sums(feats_s, feats_t, self.spec, need_s, need_t, self.deterministic,
                                           algorithm=self.algorithm, **split)
        sums = sums.to(accumulation_dtype(student.dtype))
        if split:
            for x in (sums, g_s, g_t):
                if x is not None:
                    dist.all_reduce(x, group=group)
        loss, scale = reduce_sums(sums, self.spec)
        g_s, g_t = input_gradients(g_s, g_t, feats_s, feats_t, scale, rows)
        return loss, g_s, g_t

    def unsupported(self, derivative: str) -> Optional[str]:
        return (f"trd_loss(..., process_group=...) computes first-order reverse-mode gradients only; for "
                f"{derivative} call trd_loss without process_group on the whole sequence")


def sequence_parallel_trd_loss(student, teacher, margin, relation, num_frames, reduction, backend,
                               deterministic, process_group, check_finite: bool = False,
                               algorithm: str = "auto") -> torch.Tensor:
    """:func:`vrepa_kernels.trd_loss` over token shards; see the module docstring."""
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
            check_finite_inputs(student, teacher)
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
    if backend == "reference":
        raise ValueError("backend='reference' materialises N x N and has no sequence-parallel form")
    name = backends.resolve(backend, student.device, student.dtype, spec)
    call = ShardedLossCall.of(student, teacher, spec, name, deterministic, algorithm, sizes=tuple(sizes), group=group)
    return blockwise_trd_loss(student, teacher, call)
