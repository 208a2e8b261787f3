"""The autograd op shared by every blockwise backend.

A backend only maps normalised features to per-sample sums of the element loss and, on request, the
gradient of those sums with respect to the normalised features. This module does the rest: the
normalisation and its exact backward, the reduction, and a backward that only rescales (the student
gradient is computed inside the forward, as Liger-Kernel's fused losses do).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .features import Features, accumulation_dtype, normalize_backward
from .relation import RelationSpec


def reduce_sums(sums: torch.Tensor, spec: RelationSpec) -> Tuple[torch.Tensor, float]:
    """Apply the reduction to per-sample sums; also return the factor d(loss)/d(sum_b)."""
    if spec.reduction == "sum":
        return sums.sum(), 1.0
    if spec.reduction == "none":
        out = sums / spec.pairs_per_sample
        return (out[0] if spec.single_sample else out), 1.0 / spec.pairs_per_sample
    return sums.sum() / (spec.pairs_per_sample * spec.batch), 1.0 / (spec.pairs_per_sample * spec.batch)


def _loss_shape(batch: int, reduction: str, single_sample: bool):
    return (batch,) if reduction == "none" and not single_sample else ()


# Registered as a custom op so that torch.compile sees one opaque node (no graph break) whose forward
# returns the loss and the unscaled input gradients; the registered backward only rescales them.
@torch.library.custom_op("vrepa_kernels::trd_loss_forward", mutates_args=())
def trd_loss_forward(
    student: torch.Tensor, teacher: torch.Tensor, margin: float, relation: str, tokens_per_frame: int,
    reduction: str, single_sample: bool, backend: str, need_s: bool, need_t: bool, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import backends

    spec = RelationSpec(student.shape[0], student.shape[1], relation, tokens_per_frame, margin, reduction,
                        single_sample)
    acc = accumulation_dtype(student.dtype)
    with torch.autocast(student.device.type, enabled=False):
        feats_s, feats_t = Features.of(student), Features.of(teacher)
        sums, g_s_hat, g_t_hat = backends.pair_kernel(backend)(feats_s, feats_t, spec, need_s, need_t, deterministic)
        loss, scale = reduce_sums(sums.to(acc), spec)
        grads = []
        for need, g_hat, feats in ((need_s, g_s_hat, feats_s), (need_t, g_t_hat, feats_t)):
            if need:
                grads.append(normalize_backward(g_hat * scale, feats.unit(), feats.norm))
            else:
                grads.append(student.new_empty(0, dtype=acc))
    return loss, grads[0], grads[1]


@trd_loss_forward.register_fake
def _trd_loss_forward_fake(student, teacher, margin, relation, tokens_per_frame, reduction, single_sample, backend,
                           need_s, need_t, deterministic):
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty(_loss_shape(student.shape[0], reduction, single_sample), dtype=acc)
    g_s = student.new_empty(student.shape if need_s else (0,), dtype=acc)
    g_t = teacher.new_empty(teacher.shape if need_t else (0,), dtype=acc)
    return loss, g_s, g_t


def _setup_context(ctx, inputs, output):
    student, teacher = inputs[0], inputs[1]
    ctx.dtypes = (student.dtype, teacher.dtype)
    ctx.needs = (inputs[8], inputs[9])
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _grad_g_s, _grad_g_t):
    grads = []
    for need, g, dtype in zip(ctx.needs, ctx.saved_tensors, ctx.dtypes):
        if not need:
            grads.append(None)
            continue
        scale = grad_loss.to(g.dtype)
        if scale.dim() == 1:  # reduction="none": one scale per sample
            scale = scale.reshape(-1, 1, 1)
        grads.append((g * scale).to(dtype))
    return (grads[0], grads[1]) + (None,) * 9


trd_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def blockwise_trd_loss(student: torch.Tensor, teacher: torch.Tensor, spec: RelationSpec, backend: str,
                       need_s: bool, need_t: bool, deterministic: bool) -> torch.Tensor:
    """The loss of canonical inputs through the custom op; gradients flow where ``need_*`` is set."""
    loss, _, _ = trd_loss_forward(student, teacher, spec.margin, spec.relation, spec.tokens_per_frame,
                                  spec.reduction, spec.single_sample, backend, need_s, need_t, deterministic)
    return loss
