"""The naive, materialising TRD loss: the oracle shared by tests and benchmarks.

It follows VideoREPA's definition literally and holds several B x N x N tensors, so use it only
where that fits in memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .relation import RelationSpec, canonicalize, relation_mask


def trd_loss_reference(student, teacher, margin=0.1, relation="full", num_frames=None, reduction="mean"):
    """The naive TRD loss, with the same arguments and input contract as :func:`vrepa_kernels.trd_loss`."""
    s, t, spec = canonicalize(student, teacher, margin, relation, num_frames, reduction)
    return reference_loss(s, t, spec)


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, spec: RelationSpec) -> torch.Tensor:
    """TRD loss of canonical ``[B, N, D]`` inputs, reduced as ``spec.reduction`` asks."""
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    gram_s = torch.bmm(s, s.transpose(1, 2))
    gram_t = torch.bmm(t, t.transpose(1, 2))
    elem = (torch.abs(gram_s - gram_t) - spec.margin).clamp(min=0)
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    elem = elem.to(acc_dtype)
    if spec.relation != "full":
        keep = relation_mask(spec, device=elem.device)
        elem = elem[:, keep]  # [B, kept pairs]; NaN outside the kept pairs stays out, as in VideoREPA
    per_sample = elem.reshape(elem.shape[0], -1).sum(dim=1)
    if spec.reduction == "sum":
        return per_sample.sum()
    if spec.reduction == "none":
        out = per_sample / spec.pairs_per_sample
        return out[0] if spec.single_sample else out
    return per_sample.sum() / (spec.pairs_per_sample * elem.shape[0])
