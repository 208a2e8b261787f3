"""Shared types of every module: the features a backend receives, and the normalisation they carry.

A leaf module (it imports nothing from the package), so that the op, the public API, the
sequence-parallel path and every backend can import it without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Features:
    """Features as given plus their row norms: what every backend receives.

    Fused kernels multiply raw-input dot products by ``inv_norm`` in fp32, which is more accurate than
    rounding normalised features to bf16 first; other backends take :meth:`unit`.
    """

    values: torch.Tensor  # [B, N, D], the input dtype
    norm: torch.Tensor  # [B, N, 1], accumulation dtype

    @classmethod
    def of(cls, x: torch.Tensor) -> "Features":
        return cls(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=accumulation_dtype(x.dtype)))

    @property
    def inv_norm(self) -> torch.Tensor:
        """``1 / max(norm, eps)``, ``[B, N]``: F.normalize's denominator."""
        return 1.0 / self.norm.clamp_min(NORMALIZE_EPS).squeeze(-1)

    def unit(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The normalised features, computed in the accumulation dtype, returned in ``dtype``."""
        unit = self.values.to(self.norm.dtype) / self.norm.clamp_min(NORMALIZE_EPS)
        return unit if dtype is None else unit.to(dtype)


def normalize_backward(grad_hat: torch.Tensor, x_hat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Exact backward of ``x / norm.clamp_min(eps)``.

    Where ``norm >= eps`` the gradient is ``(g - x_hat (x_hat . g)) / norm``. Below eps the
    denominator is the constant eps, so it is ``g / eps`` (clamp_min passes gradient where x >= min).
    """
    above = norm >= NORMALIZE_EPS
    radial = (x_hat * grad_hat).sum(dim=-1, keepdim=True)
    through_norm = (grad_hat - x_hat * radial) / norm.clamp_min(NORMALIZE_EPS)
    return torch.where(above, through_norm, grad_hat / NORMALIZE_EPS)
