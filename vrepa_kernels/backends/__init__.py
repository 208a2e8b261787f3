"""The blockwise backends and what each can do.

Each backend module exposes ``pair_sums(student, teacher, spec, need_s, need_t, deterministic=False, ...,
algorithm="auto")``: from two :class:`~vrepa_kernels.features.Features` it returns the per-sample sums of
the element loss (``[B]``) and, where ``need_*`` is set, the gradients of those sums with respect to the
unit features (``[B, N, D]``, fp32 or fp64; ``None`` otherwise). Backends that split work across ranks
also take ``part=(rank, world)`` and then return that rank's partial sums and gradients.

:data:`REGISTRY` describes each backend; :func:`resolve` maps a requested name (or ``"auto"``) to a
usable one. Backend modules are imported only when used (Triton's import is slow and optional).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def _triton_unavailable(device: torch.device) -> Optional[str]:
    from . import triton_backend

    if not triton_backend.HAS_TRITON:
        return f"triton is not installed ({triton_backend.IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    return f"device {device} is not supported by triton"


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    from . import cuda_backend as cuda

    return cuda.unavailable_reason(device)


@dataclass(frozen=True)
class Backend:
    """One blockwise backend: where it runs and what it supports."""

    name: str
    module: str  # the module in vrepa_kernels.backends that defines pair_sums
    devices: Optional[Tuple[str, ...]]  # device types it runs on; None: any device torch runs on
    dtypes: Tuple[torch.dtype, ...]  # input dtypes it takes
    splits_across_ranks: bool  # pair_sums takes part=(rank, world) (sequence parallelism)
    # Double backward and torch.func second order: every backend supports them through the torch
    # backend's sign product (vrepa_kernels.op), which recomputes the relation's sign pattern.
    second_order: bool
    unavailable: Optional[Callable[[torch.device], Optional[str]]] = None
    kernel: Optional[Callable] = None  # pair_sums itself, overriding ``module`` (tests route a backend)

    @property
    def pair_sums(self) -> Callable:
        if self.kernel is not None:
            return self.kernel
        return importlib.import_module(f"{__name__}.{self.module}").pair_sums

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on ``device``, else what is missing."""
        if self.unavailable is not None:
            return self.unavailable(device)
        if self.devices is not None and device.type not in self.devices:
            return f"device {device} is not one of {self.devices}"
        return None


REGISTRY = {
    "torch": Backend("torch", "torch_backend", None, LOW_PRECISION + (torch.float64,),
                     splits_across_ranks=True, second_order=True),
    "triton": Backend("triton", "triton_backend", ("cuda", "cpu"), LOW_PRECISION, splits_across_ranks=True,
                      second_order=True, unavailable=_triton_unavailable),
    "cuda": Backend("cuda", "cuda_backend", ("cuda",), LOW_PRECISION, splits_across_ranks=True, second_order=True,
                    unavailable=_cuda_unavailable),
}


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise ValueError(f"no blockwise backend {name!r}; the blockwise backends are {tuple(REGISTRY)}")
    return REGISTRY[name]


def resolve(name: str, device: torch.device, dtype: torch.dtype, spec=None) -> str:
    """A blockwise backend name (``"auto"`` picks one) usable for ``device`` and ``dtype``, or raise."""
    if name == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            cuda_ok = get("cuda").unavailable_reason(device) is None
            triton_ok = get("triton").unavailable_reason(device) is None
            cuda_preferred = lambda: importlib.import_module(f"{__name__}.cuda_backend").preferred(spec, dtype)
            if cuda_ok and (not triton_ok or cuda_preferred()):
                return "cuda"
            if triton_ok:
                return "triton"
        return "torch"
    backend = get(name)
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
    if dtype not in backend.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        hint = "; use backend='torch' for float64" if dtype == torch.float64 else ""
        raise TypeError(f"backend={name!r} takes {names} inputs, got {dtype}{hint}")
    return name
