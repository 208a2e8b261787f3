"""The implementations the benchmarks time. Every TRD one goes through the library: the naive form is
``vrepa_kernels.trd_loss_reference`` itself, never a copy of it.

``Impl.build(case, device)`` returns ``loss_fn(student, teacher) -> scalar tensor`` or raises
:class:`Unavailable` with the reason it cannot run here.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

try:
    import vrepa_kernels  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vrepa_kernels import trd_loss, trd_loss_reference  # noqa: E402
from vrepa_kernels.api import resolve_backend  # noqa: E402
from vrepa_kernels.relation import canonicalize  # noqa: E402

from cases import Case  # noqa: E402

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Peak bytes per kept-or-not (i, j) pair that the materialising forms need in fwd+bwd, measured on CPU
# fp32 (see benchmarks/README.md); used to refuse CPU shapes that would not fit instead of swapping.
QUADRATIC_BYTES_PER_PAIR = 28


class Unavailable(Exception):
    """This implementation cannot run for this case here; the message says why."""


@dataclass(frozen=True)
class Impl:
    name: str
    description: str
    build: Callable[[Case, torch.device], LossFn]
    kind: str = "trd"  # "trd", or "attention" for reference columns that compute something else
    quadratic_memory: bool = False  # materialises B x N x N tensors


def _naive(case: Case, device: torch.device) -> LossFn:
    return lambda s, t: trd_loss_reference(s, t, case.margin, case.relation, case.num_frames)


class _CompiledReference:
    """``torch.compile(trd_loss_reference)`` with default settings, recompiled fresh per group of cases.

    Dynamo's caches are reset whenever (device, dtype, relation, mode) changes, and hitting the recompile
    limit raises instead of silently running eager code, so the column always times compiled code.
    """

    def __init__(self):
        self.group = None
        self.fn = None

    def __call__(self, case: Case, device: torch.device) -> LossFn:
        if not hasattr(torch, "compile"):
            raise Unavailable(f"torch {torch.__version__} has no torch.compile")
        if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
            raise Unavailable("torch.compile on CPU needs a C++ compiler, and none was found")
        import torch._dynamo as dynamo

        group = (device.type, case.dtype, case.relation, case.mode)
        if group != self.group:
            for knob, value in (("cache_size_limit", 64), ("recompile_limit", 64),
                                ("fail_on_cache_limit_hit", True), ("fail_on_recompile_limit_hit", True)):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, value)
            dynamo.reset()
            try:
                self.fn = torch.compile(trd_loss_reference)
            except Exception as err:  # noqa: BLE001 - e.g. an unsupported Python version
                raise Unavailable(f"torch.compile failed: {err}") from None
            self.group = group
        fn = self.fn
        return lambda s, t: fn(s, t, case.margin, case.relation, case.num_frames)


def _library(backend: str, deterministic: bool = False):
    def build(case: Case, device: torch.device) -> LossFn:
        if backend == "triton" and device.type == "cpu":
            raise Unavailable("Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1), no speed path")
        try:
            resolve_backend(backend, device, case.torch_dtype)
        except (RuntimeError, TypeError) as err:
            raise Unavailable(str(err)) from None
        return lambda s, t: trd_loss(s, t, case.margin, case.relation, case.num_frames, backend=backend,
                                     deterministic=deterministic)

    return build


def _head_dim(case: Case, device: torch.device) -> int:
    if device.type != "cuda":
        raise Unavailable("attention reference columns run on CUDA only")
    if case.dtype not in ("bf16", "fp16"):
        raise Unavailable("flash attention kernels take bf16/fp16 only")
    for head_dim in (128, 64):
        if case.ds % head_dim == 0:
            return head_dim
    raise Unavailable(f"Ds={case.ds} is not a multiple of a flash-attention head size (64, 128)")


def _flash_attn(case: Case, device: torch.device) -> LossFn:
    head_dim = _head_dim(case, device)
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise Unavailable(f"flash-attn is not installed ({err})") from None

    def attention(s, t):
        q = s.view(case.batch, case.n, case.ds // head_dim, head_dim)  # q = k = v = the student features
        return flash_attn_func(q, q, q).sum(dtype=torch.float32)

    return attention


def _sdpa_flash(case: Case, device: torch.device) -> LossFn:
    head_dim = _head_dim(case, device)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as err:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel ({err})") from None

    def attention(s, t):
        q = s.view(case.batch, case.n, case.ds // head_dim, head_dim).transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return out.sum(dtype=torch.float32)

    return attention


REGISTRY: Dict[str, Impl] = {impl.name: impl for impl in [
    Impl("naive", "vrepa_kernels.trd_loss_reference, eager (VideoREPA's materialising form)", _naive,
         quadratic_memory=True),
    Impl("compiled", "torch.compile(trd_loss_reference), default settings", _CompiledReference(),
         quadratic_memory=True),
    Impl("torch", 'trd_loss(backend="torch"): blockwise PyTorch strips', _library("torch")),
    Impl("triton", 'trd_loss(backend="triton"): fused Triton kernel', _library("triton")),
    Impl("triton-det", 'trd_loss(backend="triton", deterministic=True): row-owned tiles, no atomics',
         _library("triton", deterministic=True)),
    Impl("cuda", 'trd_loss(backend="cuda"): CUDA C++ extension', _library("cuda")),
    Impl("cuda-det", 'trd_loss(backend="cuda", deterministic=True): no atomics', _library("cuda", deterministic=True)),
    Impl("flash-attn", "flash_attn_func(q, q, q), q = student features: attention reference (not TRD)",
         _flash_attn, kind="attention"),
    Impl("sdpa-flash", "torch SDPA, flash backend, q = k = v = student: attention reference (not TRD)",
         _sdpa_flash, kind="attention"),
]}


def select(names: Optional[List[str]]) -> List[Impl]:
    """The named implementations (all by default), in registry order."""
    if not names:
        return list(REGISTRY.values())
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"impls must be among {tuple(REGISTRY)}, got unknown {unknown}")
    return [impl for name, impl in REGISTRY.items() if name in names]


def default_backend(case: Case, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """The backend ``trd_loss(backend="auto")`` picks for these inputs."""
    _, _, spec = canonicalize(student, teacher, case.margin, case.relation, case.num_frames)
    return resolve_backend("auto", student.device, student.dtype, spec)


def quadratic_footprint_bytes(case: Case) -> int:
    return QUADRATIC_BYTES_PER_PAIR * case.batch * case.n ** 2


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Student ``[B, N, Ds]`` (requires grad in fwd+bwd) and frozen teacher ``[B, N, Dt]``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(case.batch, case.n, case.ds, generator=gen).to(device=device, dtype=case.torch_dtype)
    teacher = torch.randn(case.batch, case.n, case.dt, generator=gen).to(device=device, dtype=case.torch_dtype)
    return student.requires_grad_(case.mode == "fwd+bwd"), teacher


def make_step(loss_fn: LossFn, student: torch.Tensor, teacher: torch.Tensor, mode: str):
    """One timed call: the loss alone under no_grad ("fwd"), or loss plus student gradient ("fwd+bwd")."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return loss_fn(student, teacher).detach()
    else:
        def step():
            student.grad = None
            loss = loss_fn(student, teacher)
            loss.backward()
            return loss.detach()
    return step
