"""Slot for the CUDA C++ backend (csrc/, a later issue). Until it is built it reports why it can't run."""
from __future__ import annotations

UNAVAILABLE_REASON = "the CUDA C++ extension is not part of this build yet (csrc/ lands with the CUDA backend issue)"


def is_available() -> bool:
    return False


def pair_sums(*args, **kwargs):
    raise RuntimeError(f"backend='cuda' is unavailable: {UNAVAILABLE_REASON}")
