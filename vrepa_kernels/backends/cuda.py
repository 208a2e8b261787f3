"""Slot for the CUDA C++ backend (csrc/, a later issue). Until it is built it reports why it can't run."""
from __future__ import annotations

from typing import Optional

import torch

NOT_BUILT_REASON = "the CUDA C++ extension is not part of this build yet (csrc/ lands with the CUDA backend issue)"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when backend='cuda' can run on ``device``, else what is missing."""
    return NOT_BUILT_REASON


def preferred(spec, dtype: torch.dtype) -> bool:
    """Whether backend='auto' should pick CUDA over Triton for this call (measured per shape)."""
    return False


def pair_sums(s_hat, t_hat, spec, need_s, need_t, deterministic=False):
    raise RuntimeError(f"backend='cuda' is unavailable: {NOT_BUILT_REASON}")
