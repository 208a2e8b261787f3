"""The autograd op shared by every blockwise backend and by the sequence-parallel path.

A backend maps normalised features to per-sample sums of the element loss and, on request, the gradient
of those sums with respect to the unit features. This module does the rest: the normalisation and its
exact backward, the reduction, and the derivative rules of :class:`TRDLossFunction`:

* first order: the forward already computes the input gradients (as Liger-Kernel's fused losses do),
  so the backward only rescales them by the upstream gradient;
* second order (the backward is recorded: ``create_graph=True``, nested ``torch.func.grad``): the
  gradient is rebuilt from differentiable torch ops. Almost everywhere ``dL/dŝ = 2 c P ŝ`` and
  ``dL/dt̂ = -2 c P t̂``, where ``c`` is the reduction's scale and ``P = sign(D) [|D| > margin]`` on kept
  pairs is piecewise constant, hence held constant. ``x -> P x`` is :class:`SignProduct`, linear in ``x``
  with backward ``P`` again (``P`` is symmetric). It runs the torch backend's blockwise sign product for
  every backend, so second order costs torch-backend passes over the relation;
* forward mode (``torch.func.jvp``, ``jacfwd``): the loss tangent is ``<g_s, ds> + <g_t, dt>``;
* ``torch.func.vmap``: the custom ops loop over the vmapped dim.

The loss itself is the custom op ``vrepa_kernels::trd_loss_forward``, so ``torch.compile`` sees one node.
The inputs are saved for the backward (second order recomputes ``P`` from them), beside the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import backends
from .backends.torch_backend import sign_product
from .features import NORMALIZE_EPS, Features, accumulation_dtype, normalize_backward
from .relation import RelationSpec


def reduction_scale(spec: RelationSpec) -> float:
    """d(loss)/d(sum_b): the factor ``c`` of the reduction."""
    if spec.reduction == "sum":
        return 1.0
    if spec.reduction == "none":
        return 1.0 / spec.pairs_per_sample
    return 1.0 / (spec.pairs_per_sample * spec.batch)


def reduce_sums(sums: torch.Tensor, spec: RelationSpec) -> Tuple[torch.Tensor, float]:
    """Apply the reduction to per-sample sums; also return the factor d(loss)/d(sum_b)."""
    scale = reduction_scale(spec)
    if spec.reduction == "sum":
        return sums.sum(), scale
    if spec.reduction == "none":
        out = sums / spec.pairs_per_sample
        return (out[0] if spec.single_sample else out), scale
    return sums.sum() / (spec.pairs_per_sample * spec.batch), scale


def _loss_shape(batch: int, reduction: str, single_sample: bool):
    return (batch,) if reduction == "none" and not single_sample else ()


def input_gradients(g_s_hat: Optional[torch.Tensor], g_t_hat: Optional[torch.Tensor], student: Features,
                    teacher: Features, scale: float, rows: slice = slice(None)) -> List[torch.Tensor]:
    """Gradients w.r.t. the unit features (None: not needed) -> ``scale`` times the gradients w.r.t. the
    inputs' rows ``rows``; an empty tensor where not needed (the op's outputs are always tensors)."""
    grads = []
    for g_hat, feats in ((g_s_hat, student), (g_t_hat, teacher)):
        if g_hat is not None:
            local = Features(feats.values[:, rows], feats.norm[:, rows])
            grads.append(normalize_backward(g_hat[:, rows] * scale, local.unit(), local.norm))
        else:
            grads.append(feats.values.new_empty(0, dtype=feats.norm.dtype))
    return grads


# The loss and the scaled input gradients in one opaque node: torch.compile never looks inside.
@torch.library.custom_op("vrepa_kernels::trd_loss_forward", mutates_args=())
def trd_loss_forward(
    student: torch.Tensor, teacher: torch.Tensor, margin: float, relation: str, tokens_per_frame: int,
    reduction: str, single_sample: bool, backend: str, need_s: bool, need_t: bool, deterministic: bool,
    algorithm: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = RelationSpec(student.shape[0], student.shape[1], relation, tokens_per_frame, margin, reduction,
                        single_sample)
    acc = accumulation_dtype(student.dtype)
    with torch.autocast(student.device.type, enabled=False):
        feats_s, feats_t = Features.of(student), Features.of(teacher)
        pair_sums = backends.get(backend).pair_sums
        sums, g_s_hat, g_t_hat = pair_sums(feats_s, feats_t, spec, need_s, need_t, deterministic, algorithm=algorithm)
        loss, scale = reduce_sums(sums.to(acc), spec)
        g_s, g_t = input_gradients(g_s_hat, g_t_hat, feats_s, feats_t, scale)
    return loss, g_s, g_t


@trd_loss_forward.register_fake
def _trd_loss_forward_fake(student, teacher, margin, relation, tokens_per_frame, reduction, single_sample, backend,
                           need_s, need_t, deterministic, algorithm):
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty(_loss_shape(student.shape[0], reduction, single_sample), dtype=acc)
    g_s = student.new_empty(student.shape if need_s else (0,), dtype=acc)
    g_t = teacher.new_empty(teacher.shape if need_t else (0,), dtype=acc)
    return loss, g_s, g_t


def _slices(info, in_dims, tensors):
    """The tensors at each index of the vmapped dim (unbatched ones as they are): a looping vmap rule."""
    moved = [x if d is None else x.movedim(d, 0) for x, d in zip(tensors, in_dims)]
    return [[x if d is None else x[i] for x, d in zip(moved, in_dims)] for i in range(info.batch_size)]


@trd_loss_forward.register_vmap
def _trd_loss_forward_vmap(info, in_dims, student, teacher, *rest):
    outs = [trd_loss_forward(s, t, *rest) for s, t in _slices(info, in_dims[:2], (student, teacher))]
    return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)


@torch.library.custom_op("vrepa_kernels::sign_product", mutates_args=())
def sign_product_op(student: torch.Tensor, teacher: torch.Tensor, operands: List[torch.Tensor], margin: float,
                    relation: str, tokens_per_frame: int) -> List[torch.Tensor]:
    """``P x`` for each operand (see :func:`vrepa_kernels.backends.torch_backend.sign_product`)."""
    spec = RelationSpec(student.shape[0], student.shape[1], relation, tokens_per_frame, margin)
    with torch.autocast(student.device.type, enabled=False):
        return sign_product(Features.of(student), Features.of(teacher), spec, operands)


@sign_product_op.register_fake
def _sign_product_fake(student, teacher, operands, margin, relation, tokens_per_frame):
    acc = accumulation_dtype(student.dtype)
    return [x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, acc)) for x in operands]


@sign_product_op.register_vmap
def _sign_product_vmap(info, in_dims, student, teacher, operands, *rest):
    slices = _slices(info, [in_dims[0], in_dims[1], *in_dims[2]], [student, teacher, *operands])
    outs = [sign_product_op(s, t, xs, *rest) for s, t, *xs in slices]
    return [torch.stack(o) for o in zip(*outs)], [0] * len(operands)


class SignProduct(torch.autograd.Function):
    """``(x_1, ..., x_k) -> (P x_1, ..., P x_k)`` with ``P`` of the (detached) ``student``/``teacher`` held
    constant; linear in each ``x``, and ``P`` is symmetric, so the backward is the same product."""

    generate_vmap_rule = True

    @staticmethod
    def forward(student, teacher, spec: RelationSpec, *operands):
        return tuple(sign_product_op(student, teacher, list(operands), spec.margin, spec.relation,
                                     spec.tokens_per_frame))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.spec = inputs[2]
        ctx.shapes = [x.shape for x in inputs[3:]]

    @staticmethod
    def backward(ctx, *grads):
        student, teacher = ctx.saved_tensors
        grads = [g if g is not None else student.new_zeros(shape) for g, shape in zip(grads, ctx.shapes)]
        return (None, None, None, *SignProduct.apply(student, teacher, ctx.spec, *grads))

    @staticmethod
    def jvp(ctx, _d_student, _d_teacher, _d_spec, *tangents):
        student, teacher = ctx.saved_tensors
        tangents = [d if d is not None else student.new_zeros(shape) for d, shape in zip(tangents, ctx.shapes)]
        return SignProduct.apply(student, teacher, ctx.spec, *tangents)


@dataclass(frozen=True)
class LossCall:
    """One call of the op, everything but the tensors: what :class:`TRDLossFunction` runs."""

    spec: RelationSpec
    backend: str
    need_s: bool
    need_t: bool
    deterministic: bool = False
    algorithm: str = "auto"

    @classmethod
    def of(cls, student: torch.Tensor, teacher: torch.Tensor, spec: RelationSpec, backend: str,
           deterministic: bool, algorithm: str, **extra) -> "LossCall":
        """The call for these inputs: gradients where autograd wants them, global determinism honoured."""
        grad_on = torch.is_grad_enabled()
        deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        return cls(spec, backend, grad_on and student.requires_grad, grad_on and teacher.requires_grad,
                   deterministic, algorithm, **extra)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, need_s: bool, need_t: bool):
        """``(loss, grad_s, grad_t)``: gradients scaled by the reduction, empty where not needed."""
        spec = self.spec
        return trd_loss_forward(student, teacher, spec.margin, spec.relation, spec.tokens_per_frame,
                                spec.reduction, spec.single_sample, self.backend, need_s, need_t,
                                self.deterministic, self.algorithm)

    def unsupported(self, derivative: str) -> Optional[str]:
        """None, or the error message when this call cannot give ``derivative`` (beyond first-order reverse)."""
        return None


def check_finite_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """``check_finite=True``: ValueError naming the input that holds NaN or Inf (costs a device sync)."""
    for arg, x in (("student", student), ("teacher", teacher)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{arg} holds NaN or Inf values (check_finite=True)")


def _upstream(grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    g = grad_loss.to(dtype)
    return g.reshape(-1, 1, 1) if g.dim() == 1 else g  # reduction="none": one scale per sample


def _differentiable_gradients(student, teacher, call: LossCall, grad_loss, needs: Sequence[bool]):
    """The input gradients as differentiable torch ops of the inputs and ``grad_loss`` (P held constant)."""
    spec = call.spec
    acc = accumulation_dtype(student.dtype)
    upstream = _upstream(grad_loss, acc) * (2.0 * reduction_scale(spec))
    norms, units = [], []
    for x in (student, teacher):
        norm = torch.linalg.vector_norm(x.to(acc), dim=-1, keepdim=True)
        norms.append(norm)
        units.append(x.to(acc) / norm.clamp_min(NORMALIZE_EPS))
    wanted = [u for u, need in zip(units, needs) if need]
    products = iter(SignProduct.apply(student.detach(), teacher.detach(), spec, *wanted) if wanted else ())
    grads = []
    for need, sign, x, unit, norm in zip(needs, (1.0, -1.0), (student, teacher), units, norms):
        if not need:
            grads.append(None)
            continue
        g_hat = next(products) * (upstream * sign)
        grads.append(normalize_backward(g_hat, unit, norm).to(x.dtype))
    return grads


class TRDLossFunction(torch.autograd.Function):
    """``(student, teacher, call) -> (loss, grad_s, grad_t)``; only ``loss`` is differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(student, teacher, call: LossCall):
        return call.forward(student, teacher, call.need_s, call.need_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, call = inputs
        ctx.call = call
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(student, teacher, output[1], output[2])
        ctx.save_for_forward(student, teacher, output[1], output[2])

    @staticmethod
    def backward(ctx, grad_loss, _grad_g_s, _grad_g_t):
        call = ctx.call
        student, teacher, g_s, g_t = ctx.saved_tensors
        needs = [call.need_s and ctx.needs_input_grad[0], call.need_t and ctx.needs_input_grad[1]]
        # Autograd records the backward (create_graph=True, every torch.func.grad): build the gradient from
        # differentiable ops. torch.compile traces the plain rescale (it has no double backward anyway).
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            reason = call.unsupported("second-order gradients (create_graph=True, torch.func.grad)")
            if reason is not None:
                raise RuntimeError(reason)
            grads = _differentiable_gradients(student, teacher, call, grad_loss, needs)
            return grads[0], grads[1], None
        grads = []
        for need, g, x in zip(needs, (g_s, g_t), (student, teacher)):
            if not need:
                grads.append(None)
                continue
            grad = g * _upstream(grad_loss, g.dtype)
            if torch.compiler.is_compiling():
                # Read the input (+ 0 x), so that the compiled backward keeps it and AOTAutograd raises its
                # "does not support double backward" error instead of returning a gradient with no graph.
                grad = torch.add(grad, x, alpha=0)
            grads.append(grad.to(x.dtype))
        return grads[0], grads[1], None


class TRDLossFunctionWithJvp(TRDLossFunction):
    """:class:`TRDLossFunction` plus forward mode; torch.compile traces the class without a custom jvp."""

    @staticmethod
    def jvp(ctx, d_student, d_teacher, _d_call):
        call = ctx.call
        reason = call.unsupported("forward-mode derivatives (torch.func.jvp, jacfwd, torch.autograd.forward_ad)")
        if reason is not None:
            raise RuntimeError(reason)
        student, teacher, g_s, g_t = ctx.saved_tensors
        tangents = [(d, g, need) for d, g, need in ((d_student, g_s, call.need_s), (d_teacher, g_t, call.need_t))
                    if d is not None]
        if any(not need for _, _, need in tangents):  # a gradient the forward did not compute
            want = (d_student is not None, d_teacher is not None)
            _, g_s, g_t = call.forward(student, teacher, *want)
            tangents = [(d, g, True) for d, g in ((d_student, g_s), (d_teacher, g_t)) if d is not None]
        per_sample = sum((g * d.to(g.dtype)).sum(dim=(1, 2)) for d, g, _ in tangents)
        if call.spec.reduction != "none":
            d_loss = per_sample.sum()
        else:
            d_loss = per_sample[0] if call.spec.single_sample else per_sample
        return d_loss, None, None


def blockwise_trd_loss(student: torch.Tensor, teacher: torch.Tensor, call: LossCall) -> torch.Tensor:
    """The loss of canonical ``[B, N, D]`` inputs; gradients flow where ``call.need_*`` is set."""
    function = TRDLossFunction if torch.compiler.is_compiling() else TRDLossFunctionWithJvp
    return function.apply(student, teacher, call)[0]
