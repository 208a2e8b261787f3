"""Public API: ``trd_loss`` and ``TRDLoss``. Validates, picks a backend, and calls the shared op."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .function import blockwise_trd_loss
from .reference import reference_loss
from .relation import canonicalize

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton backend can run on ``device``, else why it can't."""
    from .backends import triton_kernels

    if not triton_kernels.HAS_TRITON:
        return f"triton is not installed ({triton_kernels.IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    return f"device {device} is not supported by triton"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, spec=None) -> str:
    """Map ``backend`` (possibly "auto") to a concrete, usable backend, or raise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from .backends import cuda

    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            cuda_ok = cuda.unavailable_reason(device) is None
            triton_ok = triton_unavailable_reason(device) is None
            if cuda_ok and (not triton_ok or cuda.preferred(spec, dtype)):
                return "cuda"
            if triton_ok:
                return "triton"
        return "torch"
    if backend in ("triton", "cuda"):
        reason = triton_unavailable_reason(device) if backend == "triton" else cuda.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
        if dtype == torch.float64:
            raise TypeError(f"backend={backend!r} takes float16, bfloat16 or float32 inputs, got torch.float64; "
                            "use backend='torch' for float64")
    return backend


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

    Under ``torch.autocast`` fp32 inputs are cast to the autocast dtype first, so the result equals
    that of explicit low-precision inputs; gradients still come back in the inputs' own dtype.
    """
    if process_group is not None:
        from .distributed import sequence_parallel_trd_loss

        if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
            student, teacher = _autocast_inputs(student, teacher)
        return sequence_parallel_trd_loss(student, teacher, margin, relation, num_frames, reduction, backend,
                                          deterministic, process_group, check_finite)
    s, t, spec = canonicalize(student, teacher, margin, relation, num_frames, reduction)
    s, t = _autocast_inputs(s, t)
    if check_finite:
        for arg, x in (("student", s), ("teacher", t)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{arg} holds NaN or Inf values (check_finite=True)")
    name = resolve_backend(backend, s.device, s.dtype, spec)
    if name == "reference":
        return reference_loss(s, t, spec)
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and s.requires_grad
    need_t = grad_on and t.requires_grad
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    return blockwise_trd_loss(s, t, spec, name, need_s, need_t, deterministic)


class TRDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`trd_loss` with the same arguments."""

    def __init__(self, margin: float = 0.1, relation: str = "full", num_frames: Optional[int] = None,
                 reduction: str = "mean", backend: str = "auto", deterministic: bool = False,
                 check_finite: bool = False):
        super().__init__()
        # Validate the static arguments now, so a typo fails at construction.
        probe = torch.zeros(1, 2 if relation == "temporal" else 1, 1, 1)
        canonicalize(probe, probe, margin, relation, None, reduction)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.margin, self.relation, self.num_frames = margin, relation, num_frames
        self.reduction, self.backend, self.deterministic = reduction, backend, deterministic
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return trd_loss(student, teacher, self.margin, self.relation, self.num_frames, self.reduction,
                        self.backend, self.deterministic, self.check_finite)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, relation={self.relation!r}, num_frames={self.num_frames}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
