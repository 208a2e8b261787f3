"""The implementations the benchmarks time. Every TRD one goes through the library: the naive form is
``vrepa_kernels.trd_loss_reference`` itself, never a copy of it.

``Impl.build(case, device)`` returns ``loss_fn(student, teacher) -> scalar tensor`` or raises
:class:`Unavailable` with the reason it cannot run here.
"""
from __future__ import annotations

import importlib
import inspect
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
from vrepa_kernels.features import Features, normalize_backward  # noqa: E402
from vrepa_kernels.relation import canonicalize  # noqa: E402

from cases import Case  # noqa: E402

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Peak bytes per (i, j) pair that the materialising forms need in fwd+bwd, measured on CPU fp32 (see
# benchmarks/README.md); used to refuse CPU shapes that would not fit instead of swapping.
QUADRATIC_BYTES_PER_PAIR = 28


class Unavailable(Exception):
    """This implementation cannot run for this case here; the message says why."""


@dataclass(frozen=True)
class Impl:
    name: str
    description: str
    build: Callable[[Case, torch.device], LossFn]
    quadratic_memory: bool = False  # materialises B x N x N tensors
    default: bool = True  # timed unless --impls names others; opt-in ones also run where a preset asks


def _naive(case: Case, device: torch.device) -> LossFn:
    return lambda s, t: trd_loss_reference(s, t, case.margin, case.relation, case.num_frames)


class _CompiledReference:
    """``torch.compile(trd_loss_reference)``, default settings, compiled afresh per (device, dtype, relation,
    mode); hitting the recompile limit raises instead of silently timing eager code."""

    def __init__(self):
        self.group, self.fn = None, None

    def __call__(self, case: Case, device: torch.device) -> LossFn:
        if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
            raise Unavailable("torch.compile on CPU needs a C++ compiler, and none was found")
        import torch._dynamo as dynamo

        group = (device.type, case.dtype, case.relation, case.mode)
        if group != self.group:
            for knob, value in (("cache_size_limit", 64), ("recompile_limit", 64),  # older and newer torch
                                ("fail_on_cache_limit_hit", True), ("fail_on_recompile_limit_hit", True)):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, value)
            dynamo.reset()
            self.fn, self.group = torch.compile(trd_loss_reference), group
        fn = self.fn
        return lambda s, t: fn(s, t, case.margin, case.relation, case.num_frames)


def _check_backend(backend: str, case: Case, device: torch.device) -> None:
    if backend == "triton" and device.type == "cpu":
        raise Unavailable("Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1), no speed path")
    try:
        resolve_backend(backend, device, case.torch_dtype)
    except (RuntimeError, TypeError) as err:
        raise Unavailable(str(err)) from None


def _library(backend: str, algorithm: Optional[str] = None):
    """``trd_loss(backend=..., algorithm=...)``; without ``algorithm`` the keyword is left out."""
    def build(case: Case, device: torch.device) -> LossFn:
        _check_backend(backend, case, device)
        kw = {}
        if algorithm is not None:
            if "algorithm" not in inspect.signature(trd_loss).parameters:
                raise Unavailable("trd_loss takes no algorithm= keyword in this checkout")
            kw["algorithm"] = algorithm
        return lambda s, t: trd_loss(s, t, case.margin, case.relation, case.num_frames, backend=backend, **kw)

    return build


class _KernelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec, pair_sums):
        feats_s = Features.of(student)
        sums, g_hat, _ = pair_sums(feats_s, Features.of(teacher), spec)
        scale = 1.0 / (spec.pairs_per_sample * spec.batch)
        ctx.grad = normalize_backward(g_hat * scale, feats_s.unit(), feats_s.norm).to(student.dtype)
        return sums.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        return ctx.grad * grad_loss.to(ctx.grad.dtype), None, None, None


def kernel_loss(case: Case, pair_sums) -> LossFn:
    """The loss (reduction "mean", student gradient) from ``pair_sums(feats_s, feats_t, spec)``, for a kernel
    setting that trd_loss does not expose; normalisation and its backward are the library's."""
    def loss_fn(s, t):
        s, t, spec = canonicalize(s, t, case.margin, case.relation, case.num_frames)
        return _KernelLoss.apply(s, t.detach(), spec, pair_sums)

    return loss_fn


def _triton_acqrel(case: Case, device: torch.device) -> LossFn:
    """The memory-minimal Triton kernel with the acq_rel atomics it shipped with (one run settles a model)."""
    from vrepa_kernels.backends import triton_backend as tk

    if case.mode != "fwd+bwd":
        raise Unavailable("the atomics run in training passes only")
    takes = lambda k, name: name in (getattr(k, "arg_names", None) or getattr(getattr(k, "fn", None), "arg_names", ()))
    if not any(takes(k, "ATOMIC_SEM") for k in vars(tk).values()):
        raise Unavailable("no Triton kernel in this checkout takes the ATOMIC_SEM config key")
    if "algorithm" not in inspect.signature(tk.pair_sums).parameters:
        raise Unavailable("triton_backend.pair_sums takes no algorithm= keyword in this checkout")
    _check_backend("triton", case, device)
    config = {**tk.default_config(case.torch_dtype), "ATOMIC_SEM": "acq_rel"}
    return kernel_loss(case, lambda fs, ft, spec: tk.pair_sums(fs, ft, spec, True, False, algorithm="memory_minimal",
                                                               config=config))


REGISTRY: Dict[str, Impl] = {impl.name: impl for impl in [
    Impl("naive", "vrepa_kernels.trd_loss_reference, eager (VideoREPA's materialising form)", _naive,
         quadratic_memory=True),
    Impl("compiled", "torch.compile(trd_loss_reference), default settings", _CompiledReference(),
         quadratic_memory=True),
    Impl("torch", 'trd_loss(backend="torch"): blockwise PyTorch strips', _library("torch")),
    Impl("triton", 'trd_loss(backend="triton", algorithm="two_pass"): sign map, no atomics',
         _library("triton", "two_pass")),
    Impl("triton-minimal", 'trd_loss(backend="triton", algorithm="memory_minimal"): fused, no sign map',
         _library("triton", "memory_minimal")),
    Impl("triton-acqrel", "triton-minimal's kernel with acq_rel atomics (ATOMIC_SEM), via pair_sums",
         _triton_acqrel, default=False),
    Impl("cuda", 'trd_loss(backend="cuda", algorithm="two_pass"): sign map, no atomics', _library("cuda", "two_pass")),
    Impl("cuda-minimal", 'trd_loss(backend="cuda", algorithm="memory_minimal"): fused, no sign map',
         _library("cuda", "memory_minimal")),
]}


def select(names: Optional[List[str]], extra: tuple = ()) -> List[Impl]:
    """The named implementations (default: the default ones plus ``extra``), in registry order."""
    unknown = [n for n in list(names or []) + list(extra) if n not in REGISTRY]
    if unknown:
        raise ValueError(f"impls must be among {tuple(REGISTRY)}, got unknown {unknown}")
    return [impl for name, impl in REGISTRY.items() if (name in names if names else impl.default or name in extra)]


def default_impl(case: Case, student: torch.Tensor, teacher: torch.Tensor) -> str:
    """The column that ``trd_loss``'s defaults run for these inputs: the backend "auto" picks and, for a
    training pass of a kernel backend, the path its algorithm "auto" picks ("-minimal" or not)."""
    _, _, spec = canonicalize(student, teacher, case.margin, case.relation, case.num_frames)
    backend = resolve_backend("auto", student.device, student.dtype, spec)
    if backend not in ("triton", "cuda") or case.mode == "fwd":
        return backend
    module = importlib.import_module(f"vrepa_kernels.backends.{backend}_backend")
    extra = (student.dtype, student.device) if backend == "triton" else ()
    return backend + ("-minimal" if module.choose_algorithm("auto", spec, None, *extra) == "memory_minimal" else "")


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
    def step():
        if mode == "fwd":
            with torch.no_grad():
                return loss_fn(student, teacher).detach()
        student.grad = None
        loss = loss_fn(student, teacher)
        loss.backward()
        return loss.detach()

    return step
