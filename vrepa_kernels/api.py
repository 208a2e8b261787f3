"""Public API: ``trd_loss`` and ``TRDLoss``. Validates, picks a backend, and calls the shared op."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .distributed import sequence_parallel_trd_loss
from .op import LossCall, blockwise_trd_loss, check_finite_inputs
from .reference import reference_loss
from .relation import canonicalize
from .sign_map import ALGORITHMS

BACKENDS = ("auto", "reference") + tuple(backends.REGISTRY)


def check_choice(arg: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {choices}, got {value!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, spec=None) -> str:
    """Map ``backend`` (possibly "auto") to a concrete, usable backend, or raise."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return backend
    return backends.resolve(backend, device, dtype, spec)


def _autocast_inputs(student: torch.Tensor, teacher: torch.Tensor):
    device_type = student.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return student, teacher
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.dtype == torch.float32 else x for x in (student, teacher))


def trd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.1,
    relation: str = "full",
    num_frames: Optional[int] = None,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    check_finite: bool = False,
    process_group=None,
    algorithm: str = "auto",
) -> torch.Tensor:
    """Token Relation Distillation loss (VideoREPA, arXiv 2505.23656), computed blockwise.

    Args:
        student: ``[B, N, Ds]``, ``[N, Ds]`` or ``[B, F, T, Ds]`` student features.
        teacher: same leading shape, ``Dt`` features (``Dt`` may differ from ``Ds``).
        margin: pairs whose relation gap is at most ``margin`` cost nothing.
        relation: ``"full"`` (all pairs), ``"spatial"`` (same frame) or ``"temporal"`` (other frames).
        num_frames: frame count for 2-D/3-D input (4-D input carries it).
        reduction: ``"mean"`` over kept pairs, ``"sum"``, or ``"none"`` (per-sample mean).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        deterministic: forbid atomics so that repeated runs are bitwise identical.
        check_finite: raise ``ValueError`` on NaN/Inf inputs (costs a device sync) instead of
            returning a NaN/Inf loss.
        process_group: a ``torch.distributed`` group over which the tokens are sharded (sequence
            parallelism): each rank passes its contiguous ``[B, N_r, D]`` slice and gets the loss of the
            whole sequence; see :mod:`vrepa_kernels.distributed`.
        algorithm: the training path of the ``"triton"`` and ``"cuda"`` backends: ``"two_pass"`` (a
            relation pass writes a 2-bit sign map of about N²/8 bytes per sample, then a gradient pass
            without atomics; see :mod:`vrepa_kernels.sign_map`), ``"memory_minimal"`` (one fused pass,
            O(B·N·D) memory) or ``"auto"`` (two-pass unless the map exceeds the backend's memory budget).
            The torch backend has one path and ignores it.

    Gradients of any order: double backward (``create_graph=True``) and ``torch.func`` transforms
    (``grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``vmap``) are exact almost everywhere (the loss is
    piecewise linear in the relation gap). Second-order terms run the torch backend's blockwise sign
    product whatever the backend; see :mod:`vrepa_kernels.op`. With ``process_group=`` only first-order
    gradients are available.

    Under ``torch.autocast`` fp32 inputs are cast to the autocast dtype first, so the result equals
    that of explicit low-precision inputs; gradients still come back in the inputs' own dtype.
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    if process_group is not None:
        if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
            student, teacher = _autocast_inputs(student, teacher)
        return sequence_parallel_trd_loss(student, teacher, margin, relation, num_frames, reduction, backend,
                                          deterministic, process_group, check_finite, algorithm)
    s, t, spec = canonicalize(student, teacher, margin, relation, num_frames, reduction)
    s, t = _autocast_inputs(s, t)
    if check_finite:
        check_finite_inputs(s, t)
    name = resolve_backend(backend, s.device, s.dtype, spec)
    if name == "reference":
        return reference_loss(s, t, spec)
    return blockwise_trd_loss(s, t, LossCall.of(s, t, spec, name, deterministic, algorithm))



class TRDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`trd_loss` with the same arguments."""

    def __init__(self, margin: float = 0.1, relation: str = "full", num_frames: Optional[int] = None,
                 reduction: str = "mean", backend: str = "auto", deterministic: bool = False,
                 check_finite: bool = False, algorithm: str = "auto"):
        super().__init__()
        # Validate the static arguments now, so a typo fails at construction.
        probe = torch.zeros(1, 2 if relation == "temporal" else 1, 1, 1)
        canonicalize(probe, probe, margin, relation, None, reduction)
        check_choice("backend", backend, BACKENDS)
        check_choice("algorithm", algorithm, ALGORITHMS)
        self.margin, self.relation, self.num_frames = margin, relation, num_frames
        self.reduction, self.backend, self.deterministic = reduction, backend, deterministic
        self.check_finite, self.algorithm = check_finite, algorithm

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return trd_loss(student, teacher, self.margin, self.relation, self.num_frames, self.reduction,
                        self.backend, self.deterministic, self.check_finite, algorithm=self.algorithm)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, relation={self.relation!r}, num_frames={self.num_frames}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}, algorithm={self.algorithm!r}")
