"""The autograd op shared by every blockwise backend.

A backend only maps normalised features to per-sample sums of the element loss and, on request, the
gradient of those sums with respect to the normalised features. This module does the rest: the
normalisation and its exact backward, the reduction, and a backward that only rescales (the student
gradient is computed inside the forward, as Liger-Kernel's fused losses do).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .relation import RelationSpec

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default

# backend kernel: (s_hat, t_hat, spec, need_grad_s, need_grad_t, deterministic)
#   -> (per-sample sums [B], dsum/ds_hat or None, dsum/dt_hat or None); gradients in fp32 (fp64 for fp64)
PairKernel = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_hat in x.dtype, x_hat in the accumulation dtype, row norms)``, as F.normalize does."""
    x_acc = x.to(accumulation_dtype(x.dtype))
    norm = torch.linalg.vector_norm(x_acc, dim=-1, keepdim=True)
    x_hat_acc = x_acc / norm.clamp_min(NORMALIZE_EPS)
    return x_hat_acc.to(x.dtype), x_hat_acc, norm


def normalize_backward(grad_hat: torch.Tensor, x_hat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Exact backward of ``x / norm.clamp_min(eps)``.

    Where ``norm >= eps`` the gradient is ``(g - x_hat (x_hat . g)) / norm``. Below eps the
    denominator is the constant eps, so it is ``g / eps`` (clamp_min passes gradient where x >= min).
    """
    above = norm >= NORMALIZE_EPS
    radial = (x_hat * grad_hat).sum(dim=-1, keepdim=True)
    through_norm = (grad_hat - x_hat * radial) / norm.clamp_min(NORMALIZE_EPS)
    return torch.where(above, through_norm, grad_hat / NORMALIZE_EPS)


def reduce_sums(sums: torch.Tensor, spec: RelationSpec) -> Tuple[torch.Tensor, float]:
    """Apply the reduction to per-sample sums; also return the factor d(loss)/d(sum_b)."""
    if spec.reduction == "sum":
        return sums.sum(), 1.0
    if spec.reduction == "none":
        out = sums / spec.pairs_per_sample
        return (out[0] if spec.single_sample else out), 1.0 / spec.pairs_per_sample
    return sums.sum() / (spec.pairs_per_sample * spec.batch), 1.0 / (spec.pairs_per_sample * spec.batch)


class TRDFunction(torch.autograd.Function):
    """Forward computes the loss and, when needed, the input gradients; backward rescales them."""

    @staticmethod
    def forward(ctx, student, teacher, spec: RelationSpec, kernel: PairKernel, need_s: bool, need_t: bool,
                deterministic: bool):
        s_hat, s_hat_acc, s_norm = normalize_rows(student)
        t_hat, t_hat_acc, t_norm = normalize_rows(teacher)
        sums, g_s_hat, g_t_hat = kernel(s_hat, t_hat, spec, need_s, need_t, deterministic)
        loss, scale = reduce_sums(sums.to(accumulation_dtype(student.dtype)), spec)
        grads = []
        for need, g_hat, x_hat, norm in ((need_s, g_s_hat, s_hat_acc, s_norm), (need_t, g_t_hat, t_hat_acc, t_norm)):
            grads.append(normalize_backward(g_hat * scale, x_hat, norm) if need else None)
        ctx.spec = spec
        ctx.dtypes = (student.dtype, teacher.dtype)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.has = tuple(g is not None for g in grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        out = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            if not has:
                out.append(None)
                continue
            g = saved.pop(0)
            if grad_out.dim() == 0:
                scaled = g * grad_out.to(g.dtype)
            else:  # reduction="none": one scale per sample
                scaled = g * grad_out.to(g.dtype).reshape(-1, 1, 1)
            out.append(scaled.to(dtype))
        return out[0], out[1], None, None, None, None, None
