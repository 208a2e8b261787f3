"""CUDA C++ backend: the kernels of ``csrc/`` behind ``vrepa_kernels._C_cuda``.

The compiled modules take raw pointers, sizes, strides and the CUDA stream from here, and never link
libtorch: one build serves any torch version. ``_C_cuda`` holds the GPU kernels; ``_C_cpu`` holds their
CPU twin (same tile schedule, masks, epilogue and sign map, plain C++ products), exposed as
:func:`cpu_twin_pair_sums` with the ``pair_sums`` signature; ``_C_emulator`` runs the kernels' own code on
the CPU for tests (:func:`emulated_pair_sums`).

Two training paths (``algorithm=``):

* ``"two_pass"``: a relation pass over the 128 x 128 tiles I <= J writes per-tile loss sums and the 2-bit
  sign map (:mod:`vrepa_kernels.sign_map`, the format the Triton backend writes too); a gradient pass
  computes ``G = P U`` from the map, each output written once. No atomics, bitwise deterministic. Extra
  memory: the map (``sign_map.map_bytes``, about N^2/8 bytes per sample) plus one unit-row copy of each
  operand that needs a gradient (B N D in the input dtype).
* ``"memory_minimal"``: the fused kernel (one pass, fp32 gradient atomics, or the row-owned schedule when
  ``deterministic``); O(B N D) memory.
* ``"auto"``: two-pass unless the map exceeds :data:`MAP_BUDGET_BYTES` (1 GiB).

A loss-only call (no gradient) runs the fused kernel without atomics whatever ``algorithm`` says.
Sequence parallelism (``part=(rank, world)``) runs the fused kernel on that rank's share of the work items.

All return what every backend returns: per-sample sums ``[B]`` (fp32), ``d sum / d s_hat = 2 P s_hat`` and
``d sum / d t_hat = -2 P t_hat`` (fp32, or None), with ``P_ij = sign(D_ij) [|D_ij| > margin] keep_ij``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from functools import lru_cache
from typing import Optional, Tuple

import torch

from .. import sign_map
from ..features import Features
from ..relation import RELATION_CODES, RelationSpec
from ..sign_map import ALGORITHMS, MAP_BUDGET_BYTES

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BUILD_INFO_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")


def _import_extension(name: str):
    try:
        return importlib.import_module(f"vrepa_kernels.{name}"), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


cuda_module, _cuda_import_error = _import_extension("_C_cuda")
cpu_module, _cpu_import_error = _import_extension("_C_cpu")
emulator_module, _emulator_import_error = _import_extension("_C_emulator")


def build_info() -> dict:
    """What setup.py recorded when it built (or skipped) the extensions; {} when it did not run."""
    try:
        with open(BUILD_INFO_FILE, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _not_built_reason(kind: str, import_error: Optional[str]) -> str:
    recorded = build_info().get(kind, {})
    if recorded.get("reason"):
        return recorded["reason"]
    if import_error and "No module named" not in import_error:
        return f"it is built but does not import ({import_error})"
    return ("the package was installed without building it "
            "(run `pip install --no-build-isolation -e .` with nvcc on PATH)")


def _not_built(description: str, kind: str, import_error: Optional[str]) -> str:
    return f"{description} is not built: {_not_built_reason(kind, import_error)}"


def _status_line(label: str, ext, kind: str, import_error: Optional[str], built: str = "built") -> str:
    """``<label>: <built>`` or ``<label>: not built (<reason>)``, as ``python -m vrepa_kernels.info`` prints it."""
    if ext is not None:
        return f"{label}: {built}"
    return f"{label}: not built ({_not_built_reason(kind, import_error)})"


def cuda_extension_built() -> bool:
    return cuda_module is not None


def cuda_extension_archs() -> str:
    """The compiled targets, e.g. ``sm_80, sm_90a, PTX compute_80``."""
    if cuda_module is None:
        return ""
    archs = [f"sm_{a}" for a in cuda_module.sass_archs.split(",") if a]
    if cuda_module.ptx_arch:
        archs.append(f"PTX compute_{cuda_module.ptx_arch}")
    return ", ".join(archs)


def cuda_extension_line() -> str:
    """``cuda_extension: built (<archs>)`` or ``cuda_extension: not built (<reason>)``."""
    return _status_line("cuda_extension", cuda_module, "cuda", _cuda_import_error, f"built ({cuda_extension_archs()})")


def cpu_twin_line() -> str:
    return _status_line("cpu_twin", cpu_module, "cpu", _cpu_import_error)


def emulator_line() -> str:
    return _status_line("kernel_emulator", emulator_module, "emulator", _emulator_import_error)


def _arch_runs(entry: str, major: int, minor: int) -> bool:
    """Whether SASS compiled for ``entry`` (e.g. "80", "90a") runs on a device of capability major.minor."""
    arch_specific = entry[-1].isalpha()
    number = int(entry.rstrip("af"))
    want_major, want_minor = divmod(number, 10)
    if arch_specific:
        return (major, minor) == (want_major, want_minor)
    return major == want_major and minor >= want_minor


def arch_problem(capability: Tuple[int, int]) -> Optional[str]:
    """None when the build has a kernel image (SASS or PTX) for a device of this capability."""
    major, minor = capability
    sass = [a for a in cuda_module.sass_archs.split(",") if a]
    if any(_arch_runs(a, major, minor) for a in sass):
        return None
    ptx = cuda_module.ptx_arch
    if ptx and major * 10 + minor >= int(ptx):
        return None
    return (f"this GPU is sm_{major}{minor} but the CUDA extension was built for {cuda_extension_archs()}; "
            f"rebuild with VREPA_CUDA_ARCHS={major}{minor}")


@lru_cache(maxsize=None)
def _device_problem(index: int) -> Optional[str]:
    problem = arch_problem(torch.cuda.get_device_capability(index))
    if problem is None:
        with torch.cuda.device(index):
            problem = cuda_module.device_problem(index) or None
    return problem


@lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return int(cuda_module.multiprocessor_count(index))


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when backend='cuda' can run on ``device``, else everything that is missing."""
    device = torch.device(device)
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available (torch.cuda.is_available() is False)")
    elif device.type != "cuda":
        missing.append(f"the inputs are on {device}, not on a CUDA device")
    if cuda_module is None:
        missing.append(_not_built("the CUDA extension vrepa_kernels._C_cuda", "cuda", _cuda_import_error))
    if missing:
        return "; ".join(missing)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_problem(index)


def preferred(spec, dtype: torch.dtype) -> bool:
    """Whether backend='auto' should pick CUDA over Triton for this call.

    Not measured on a GPU yet (the kernels were only compiled in the session that wrote them), so Triton
    stays the default everywhere until benchmarks/gpu_check.sh shows the CUDA kernel faster for a shape.
    """
    return False


def _kernel_args(s: torch.Tensor, t: torch.Tensor, s_inv: torch.Tensor, t_inv: torch.Tensor,
                 g_s: Optional[torch.Tensor], g_t: Optional[torch.Tensor], partial: torch.Tensor,
                 spec: RelationSpec, symmetric: bool, splits: int, part: Optional[Tuple[int, int]] = None) -> dict:
    batch, n, ds = s.shape
    return dict(
        s=s.data_ptr(), t=t.data_ptr(), s_inv=s_inv.data_ptr(), t_inv=t_inv.data_ptr(),
        grad_s=g_s.data_ptr() if g_s is not None else 0, grad_t=g_t.data_ptr() if g_t is not None else 0,
        partial=partial.data_ptr(), dtype=DTYPE_CODES[s.dtype], batch=batch, n=n, ds=ds, dt=t.shape[-1],
        s_strides=(s.stride(0), s.stride(1)), t_strides=(t.stride(0), t.stride(1)),
        gs_strides=(g_s.stride(0), g_s.stride(1)) if g_s is not None else (0, 0),
        gt_strides=(g_t.stride(0), g_t.stride(1)) if g_t is not None else (0, 0),
        relation=RELATION_CODES[spec.relation], tokens_per_frame=spec.tokens_per_frame or 1,
        margin=float(spec.margin), symmetric=symmetric, splits=splits, work=tuple(part) if part else (0, 1),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can read it through strides (contiguous rows), else a contiguous copy."""
    if x.stride(2) == 1 and x.stride(1) >= x.shape[2] and x.stride(0) >= 0:
        return x
    return x.contiguous()


def _prepare(student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool,
             deterministic: bool, backend: str):
    if student.values.dtype not in DTYPE_CODES:
        raise TypeError(f"backend={backend!r} takes float16, bfloat16 or float32 inputs, "
                        f"got {student.values.dtype}; use backend='torch' for float64")
    s = _rows(student.values)
    t = _rows(teacher.values)
    s_inv = student.inv_norm.float().contiguous()
    t_inv = teacher.inv_norm.float().contiguous()
    symmetric = not (need_s or need_t) or not deterministic
    batch, n, ds = s.shape
    g_s = torch.zeros(batch, n, ds, dtype=torch.float32, device=s.device) if need_s else None
    g_t = torch.zeros(batch, n, t.shape[-1], dtype=torch.float32, device=s.device) if need_t else None
    return s, t, s_inv, t_inv, g_s, g_t, symmetric


def _check_part(part: Optional[Tuple[int, int]]) -> None:
    if part is None:
        return
    if (not isinstance(part, (tuple, list)) or len(part) != 2 or not all(isinstance(x, int) for x in part)
            or not 0 <= part[0] < part[1]):
        raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part!r}")


def _run(ext, student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool,
         deterministic: bool, backend: str, parallel_units: int, splits: Optional[int],
         part: Optional[Tuple[int, int]] = None, **launch):
    """The fused kernel: allocate with torch, plan the launch, call ``ext.pair_sums``; sums come back in fp32.
    With ``part=(rank, world)`` only that rank's work items run (round-robin): partial sums and gradients."""
    _check_part(part)
    s, t, s_inv, t_inv, g_s, g_t, symmetric = _prepare(student, teacher, spec, need_s, need_t, deterministic, backend)
    batch, n = s.shape[:2]
    row_blocks, planned = ext.plan(batch, n, symmetric, parallel_units)
    splits = planned if splits is None else int(splits)
    # Zeros: another rank's work items leave their slots unwritten.
    partial = (torch.zeros if part else torch.empty)(batch, row_blocks * splits, dtype=torch.float64, device=s.device)
    ext.pair_sums(**_kernel_args(s, t, s_inv, t_inv, g_s, g_t, partial, spec, symmetric, splits, part), **launch)
    return partial.sum(dim=1).to(torch.float32), g_s, g_t


def map_bytes(spec: RelationSpec) -> int:
    """Bytes of the two-pass sign map for ``spec`` (spatial: that of the B * F one-frame samples)."""
    if spec.relation == "spatial":
        return sign_map.map_bytes(spec.batch * spec.num_frames, spec.tokens_per_frame)
    return sign_map.map_bytes(spec.batch, spec.num_tokens)


def choose_algorithm(algorithm: str, spec: RelationSpec, part: Optional[Tuple[int, int]] = None) -> str:
    """``"two_pass"`` or ``"memory_minimal"`` for a training call (the same arguments as Triton's): ``part``
    (sequence parallelism) takes the memory-minimal path; ``"auto"`` is two-pass unless the whole call's map
    (:func:`map_bytes`) exceeds :data:`MAP_BUDGET_BYTES`."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if part is not None:
        return "memory_minimal"
    if algorithm == "auto":
        return "two_pass" if map_bytes(spec) <= MAP_BUDGET_BYTES else "memory_minimal"
    return algorithm


def per_frame_samples(student: Features, teacher: Features, spec: RelationSpec):
    """Same-frame pairs of B samples are all pairs of B * F one-frame samples (as the torch backend runs them):
    the features and spec of those samples."""
    frames, tpf = spec.num_frames, spec.tokens_per_frame
    if tpf < 1 or spec.num_tokens % tpf:
        raise ValueError(f"tokens_per_frame={tpf} must be >= 1 and divide n={spec.num_tokens}")
    per_frame = [Features(f.values.reshape(spec.batch * frames, tpf, -1), f.norm.reshape(spec.batch * frames, tpf, 1))
                 for f in (student, teacher)]
    frame_spec = dataclasses.replace(spec, batch=spec.batch * frames, num_tokens=tpf, relation="full",
                                     tokens_per_frame=0)
    return per_frame[0], per_frame[1], frame_spec


def _relation_pass(ext, student: Features, teacher: Features, spec: RelationSpec, backend: str, **launch):
    """Pass 1 on ``spec`` as given (spatial already flattened): per-sample fp64 sums and the int32 map."""
    if student.values.dtype not in DTYPE_CODES:
        raise TypeError(f"backend={backend!r} takes float16, bfloat16 or float32 inputs, "
                        f"got {student.values.dtype}; use backend='torch' for float64")
    s, t = _rows(student.values), _rows(teacher.values)
    s_inv = student.inv_norm.float().contiguous()
    t_inv = teacher.inv_norm.float().contiguous()
    batch, n, ds = s.shape
    tiles = sign_map.num_map_tiles(n)
    words = torch.empty(batch, tiles, sign_map.MAP_TILE, sign_map.WORDS_PER_ROW, dtype=torch.int32, device=s.device)
    partial = torch.empty(batch, tiles, dtype=torch.float64, device=s.device)
    ext.relation_pass(s=s.data_ptr(), t=t.data_ptr(), s_inv=s_inv.data_ptr(), t_inv=t_inv.data_ptr(),
                      map=words.data_ptr(), partial=partial.data_ptr(), dtype=DTYPE_CODES[s.dtype], batch=batch, n=n,
                      ds=ds, dt=t.shape[-1], s_strides=(s.stride(0), s.stride(1)),
                      t_strides=(t.stride(0), t.stride(1)), relation=RELATION_CODES[spec.relation],
                      tokens_per_frame=spec.tokens_per_frame or 1, margin=float(spec.margin), **launch)
    return partial.sum(dim=1), words


def launch_gradient_pass(ext, words: torch.Tensor, feats: Features, scale: float, **launch) -> torch.Tensor:
    """Pass 2 for one operand: ``scale * P U`` in fp32, U the unit rows rounded once to the input dtype."""
    values = feats.values
    unit = (values.float() * feats.inv_norm.float().unsqueeze(-1)).to(values.dtype).contiguous()
    batch, n, dim = unit.shape
    g = torch.empty(batch, n, dim, dtype=torch.float32, device=values.device)  # every element written once
    ext.gradient_pass(map=words.data_ptr(), x=unit.data_ptr(), g=g.data_ptr(), dtype=DTYPE_CODES[values.dtype],
                      batch=batch, n=n, dim=dim, x_strides=(unit.stride(0), unit.stride(1)),
                      g_strides=(g.stride(0), g.stride(1)), scale=scale, **launch)
    return g


def _map_samples(student: Features, teacher: Features, spec: RelationSpec):
    """The samples the map is made of: the call's own, or for spatial its B * F one-frame samples."""
    if spec.relation == "spatial":
        return per_frame_samples(student, teacher, spec)
    return student, teacher, spec


def _two_pass(ext, student: Features, teacher: Features, spec: RelationSpec, need_s: bool, need_t: bool,
              backend: str, **launch):
    batch = spec.batch
    student, teacher, spec = _map_samples(student, teacher, spec)
    sums, words = _relation_pass(ext, student, teacher, spec, backend, **launch)
    g_s = launch_gradient_pass(ext, words, student, 2.0, **launch) if need_s else None
    g_t = launch_gradient_pass(ext, words, teacher, -2.0, **launch) if need_t else None
    unflatten = lambda g: None if g is None else g.reshape(batch, -1, g.shape[-1])
    return sums.reshape(batch, -1).sum(dim=1).to(torch.float32), unflatten(g_s), unflatten(g_t)


def _relation_pass_public(ext, student: Features, teacher: Features, spec: RelationSpec, backend: str, **launch):
    """(per-sample fp32 sums, int32 map); spatial: the map of the B * F one-frame samples."""
    batch = spec.batch
    sums, words = _relation_pass(ext, *_map_samples(student, teacher, spec), backend, **launch)
    return sums.reshape(batch, -1).sum(dim=1).to(torch.float32), words


def _device_launch(device: torch.device):
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index


def pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,
    part: Optional[Tuple[int, int]] = None,
    algorithm: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The CUDA kernels on torch's current stream of the inputs' device (``algorithm``: see the module docstring).

    ``part=(rank, world)`` (sequence parallelism) runs the fused kernel on that rank's share of the work items:
    the sums and gradients are then partial, for an all-reduce over the ranks.
    """
    path = choose_algorithm(algorithm, spec, part)
    device = student.values.device
    index = _device_launch(device)
    with torch.cuda.device(index):
        stream = torch.cuda.current_stream(device).cuda_stream
        if path == "two_pass" and (need_s or need_t):
            return _two_pass(cuda_module, student, teacher, spec, need_s, need_t, "cuda", device=index, stream=stream)
        return _run(cuda_module, student, teacher, spec, need_s, need_t, deterministic, "cuda", _multiprocessors(index),
                    None, part, device=index, stream=stream)


def relation_pass(student: Features, teacher: Features, spec: RelationSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 alone on the GPU: per-sample loss sums (fp32) and the sign map (int32, :mod:`sign_map` layout)."""
    index = _device_launch(student.values.device)
    with torch.cuda.device(index):
        stream = torch.cuda.current_stream(student.values.device).cuda_stream
        return _relation_pass_public(cuda_module, student, teacher, spec, "cuda", device=index, stream=stream)


def _host_extension(ext, description: str, kind: str, import_error: Optional[str], caller: str, student: Features):
    """``ext`` when it is built and the inputs are CPU tensors; else the error that says which is not so."""
    if ext is None:
        raise RuntimeError(_not_built(description, kind, import_error))
    if student.values.device.type != "cpu":
        raise ValueError(f"{caller} takes CPU tensors, got {student.values.device}")
    return ext


def _twin(caller: str, student: Features):
    return _host_extension(cpu_module, "the CPU twin vrepa_kernels._C_cpu", "cpu", _cpu_import_error, caller, student)


def _emulator(caller: str, student: Features):
    return _host_extension(emulator_module, "the kernel emulator vrepa_kernels._C_emulator", "emulator",
                           _emulator_import_error, caller, student)


def _twin_threads(threads: Optional[int]) -> int:
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _check_fused_only(path: str, need_grad: bool, splits: Optional[int]) -> None:
    if splits is not None and path == "two_pass" and need_grad:
        raise ValueError(f"splits={splits} applies to the memory-minimal (fused) kernel, not to algorithm='two_pass'")


def cpu_twin_pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,
    threads: Optional[int] = None,
    splits: Optional[int] = None,
    algorithm: str = "auto",
    part: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The CPU twin of the CUDA kernels (same schedule, epilogue and sign map), for CPU tensors.

    ``threads`` defaults to ``torch.get_num_threads()``; ``splits`` (fused kernel, symmetric schedule only) to
    what the GPU launch plan would pick for that many parallel units. Bitwise reproducible for fixed arguments.
    """
    ext = _twin("cpu_twin_pair_sums", student)
    threads = _twin_threads(threads)
    path = choose_algorithm(algorithm, spec, part)
    _check_fused_only(path, need_s or need_t, splits)
    if path == "two_pass" and (need_s or need_t):
        return _two_pass(ext, student, teacher, spec, need_s, need_t, "cpu_twin", threads=threads)
    return _run(ext, student, teacher, spec, need_s, need_t, deterministic, "cpu_twin", threads, splits, part,
                threads=threads)


def cpu_twin_relation_pass(student: Features, teacher: Features, spec: RelationSpec,
                           threads: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The twin's relation pass: per-sample loss sums (fp32) and the sign map (int32, :mod:`sign_map` layout)."""
    ext = _twin("cpu_twin_relation_pass", student)
    return _relation_pass_public(ext, student, teacher, spec, "cpu_twin", threads=_twin_threads(threads))


def emulated_pair_sums(
    student: Features,
    teacher: Features,
    spec: RelationSpec,
    need_s: bool,
    need_t: bool,
    deterministic: bool = False,
    splits: Optional[int] = None,
    multiprocessors: int = 132,
    order: int = 0,
    algorithm: str = "auto",
    part: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The CUDA kernels' own code run on CPU tensors by the warp/barrier emulator (tests; tiny shapes).

    The fused launch is planned as for a GPU with ``multiprocessors`` SMs (an H100 has 132) unless ``splits`` is
    given. ``order`` picks the order in which the emulator resumes threads (0 forward, 1 reverse, else a seeded
    shuffle).
    """
    ext = _emulator("emulated_pair_sums", student)
    path = choose_algorithm(algorithm, spec, part)
    _check_fused_only(path, need_s or need_t, splits)
    if path == "two_pass" and (need_s or need_t):
        return _two_pass(ext, student, teacher, spec, need_s, need_t, "emulator", order=order)
    return _run(ext, student, teacher, spec, need_s, need_t, deterministic, "emulator", multiprocessors,
                splits, part, order=order)


def emulated_relation_pass(student: Features, teacher: Features, spec: RelationSpec,
                           order: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The relation-pass kernel's own code, emulated: per-sample loss sums (fp32) and the sign map (int32)."""
    ext = _emulator("emulated_relation_pass", student)
    return _relation_pass_public(ext, student, teacher, spec, "emulator", order=order)
