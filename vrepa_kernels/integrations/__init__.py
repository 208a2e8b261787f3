"""Glue between ``trd_loss`` and training frameworks.

- :mod:`vrepa_kernels.integrations.diffusers`: the :class:`VideoREPA` helper, which hooks one block of a
  diffusers video transformer and turns its tokens into VideoREPA's TRD loss.
- :mod:`vrepa_kernels.integrations.videomae`: the VideoMAEv2 teacher (transformers' ``VideoMAEModel``
  loaded from the official checkpoint), its input preparation and an on-disk token cache.

diffusers, transformers, accelerate and peft are optional: importing this package imports none of them.
The submodules import them only where a function needs them, and say which extra to install when they
are missing (``pip install vrepa-kernels[diffusers]``).
"""
from __future__ import annotations

import importlib

EXTRA_HINT = "pip install vrepa-kernels[diffusers]"


def require(module: str, what: str):
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised only where the extra is missing
        raise ImportError(
            f"{what} needs the optional package '{module.split('.')[0]}', which is not installed "
            f"({err}). Install the extra with `{EXTRA_HINT}`."
        ) from err


_LAZY = {
    "VideoREPA": "diffusers",
    "TeacherInput": "diffusers",
    "aligned_grid": "diffusers",
    "student_token_grid": "diffusers",
    "load_videomae_teacher": "videomae",
    "prepare_teacher_pixels": "videomae",
    "encode_teacher": "videomae",
    "TeacherTokenCache": "videomae",
}

__all__ = sorted(_LAZY) + ["require"]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
