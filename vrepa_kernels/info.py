"""``python -m vrepa_kernels.info``: versions, the backends usable here, and the compiled extensions' state.

The last line reads ``cuda_extension: built (<archs>)`` or ``cuda_extension: not built (<reason>)``.
"""
from __future__ import annotations

import platform
from typing import List

import torch

from . import __version__
from .backends import REGISTRY, cuda_backend


def _triton_version() -> str:
    from .backends import triton_backend

    if not triton_backend.HAS_TRITON:
        return f"not installed ({triton_backend.IMPORT_ERROR})"
    import triton

    return triton.__version__


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code else "none"


def usable_backends(device: torch.device) -> List[str]:
    """Concrete backends that can run on ``device`` now ("reference" and "torch" run anywhere)."""
    return ["reference"] + [name for name, backend in REGISTRY.items() if backend.unavailable_reason(device) is None]


def report() -> List[str]:
    lines = [
        f"vrepa_kernels: {__version__}",
        f"python: {platform.python_version()}",
        f"torch: {torch.__version__} (CUDA runtime: {torch.version.cuda or 'none, CPU build'})",
        f"triton: {_triton_version()}",
    ]
    ext = cuda_backend.cuda_module
    if ext is not None:
        lines.append(f"extension CUDA runtime: {_cuda_version(ext.cuda_runtime_version)} (static); "
                     f"driver supports: {_cuda_version(ext.driver_version())}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"gpu {index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        lines.append("gpu: none")
    lines.append(f"backends on cpu: {', '.join(usable_backends(torch.device('cpu')))}")
    if torch.cuda.is_available():
        lines.append(f"backends on cuda: {', '.join(usable_backends(torch.device('cuda')))}")
        reason = cuda_backend.unavailable_reason(torch.device("cuda"))
        if reason is not None:
            lines.append(f"backend cuda unavailable: {reason}")
    lines.append(cuda_backend.cpu_twin_line())
    lines.append(cuda_backend.emulator_line())
    lines.append(cuda_backend.cuda_extension_line())
    return lines


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
