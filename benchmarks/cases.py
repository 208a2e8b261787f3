"""What one measurement is (a :class:`Case`), how many FLOPs it usefully needs, and the named presets."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One shape/dtype/mode/relation to time every implementation on."""

    batch: int
    frames: int  # the token grid is frames x tokens_per_frame; frames only matters for relation != "full"
    tokens_per_frame: int
    ds: int  # student feature dim
    dt: int  # teacher feature dim
    dtype: str = "fp32"
    mode: str = "fwd+bwd"
    relation: str = "full"
    margin: float = 0.1
    label: str = ""  # preset name shown in the report, e.g. "videorepa"
    extra_impls: Tuple[str, ...] = ()  # opt-in implementations this case also times (unless --impls is given)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("batch", "frames", "tokens_per_frame", "ds", "dt"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def n(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_frames(self) -> Optional[int]:
        """What the loss's ``num_frames`` argument gets: None for the full relation."""
        return None if self.relation == "full" else self.frames

    @property
    def kept_pairs(self) -> int:
        """Kept (i, j) pairs per sample, as :class:`vrepa_kernels.relation.RelationSpec` counts them."""
        same_frame = self.frames * self.tokens_per_frame ** 2
        return {"full": self.n ** 2, "spatial": same_frame, "temporal": self.n ** 2 - same_frame}[self.relation]

    def describe(self) -> str:
        dims = f"D={self.ds}" if self.ds == self.dt else f"Ds={self.ds},Dt={self.dt}"
        rel = "" if self.relation == "full" else f" {self.relation} F={self.frames}"
        return f"B={self.batch} N={self.n} {dims} {self.dtype} {self.mode}{rel}"

    def as_record(self) -> Dict:
        return dict(B=self.batch, F=self.frames, T=self.tokens_per_frame, N=self.n, D=self.ds, Ds=self.ds,
                    Dt=self.dt, dtype=self.dtype, mode=self.mode, relation=self.relation, margin=self.margin,
                    label=self.label)


def useful_flops(case: Case) -> int:
    """FLOPs the loss cannot avoid (the definition the "limit" uses; see benchmarks/README.md).

    Forward: Gs - Gt over the kept pairs costs 2 * (Ds + Dt) per pair, halved because the relation is
    symmetric. Backward (student only, teacher frozen): the gradient GEMM 2 P s, 2 * Ds per kept pair.
    """
    per_sample = case.kept_pairs * (case.ds + case.dt)
    if case.mode == "fwd+bwd":
        per_sample += 2 * case.kept_pairs * case.ds
    return case.batch * per_sample


def add_case_args(parser) -> None:
    """The options of a custom case, shared by run.py and sequence_parallel.py."""
    parser.add_argument("--n", type=int, nargs="+", help="custom case: token counts N")
    parser.add_argument("--d", type=int, default=256, help="custom case: feature dim (student and teacher)")
    parser.add_argument("--ds", type=int, help="custom case: student dim (default --d)")
    parser.add_argument("--dt", type=int, help="custom case: teacher dim (default --d)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=1, help="custom case: frames per sample (must divide N)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["fwd+bwd"])
    parser.add_argument("--relation", nargs="+", choices=("full", "spatial", "temporal"), default=["full"])


def custom_cases(args, label: str = "custom") -> List[Case]:
    """The cases that :func:`add_case_args`' options name: every N x dtype x mode x relation."""
    cases = []
    for n in args.n or []:
        if n % args.frames:
            raise ValueError(f"--frames {args.frames} must divide every --n, got N={n}")
        base = Case(batch=args.batch, frames=args.frames, tokens_per_frame=n // args.frames,
                    ds=args.ds or args.d, dt=args.dt or args.d, label=label)
        cases += [replace(base, dtype=d, mode=m, relation=r)
                  for d in args.dtype for m in args.mode for r in args.relation]
    return cases


def _grid(n: int, frames: int = 16) -> Dict[str, int]:
    """A frames x tokens_per_frame grid of n tokens (frames only shapes the spatial/temporal relations)."""
    while n % frames:
        frames //= 2
    return dict(frames=frames, tokens_per_frame=n // frames)


def _sweep(ns, d, **kw) -> List[Case]:
    return [Case(batch=1, ds=d, dt=d, **_grid(n), **kw) for n in ns]


# The shapes the issues name: VideoREPA's training shape, CogVideoX's 480x720 latent grid, 720p at 33
# and 81 frames (latent 45 x 80 per frame).
VIDEOREPA = Case(batch=2, frames=24, tokens_per_frame=150, ds=768, dt=768, label="videorepa")
COGVIDEOX_FULL = Case(batch=1, frames=13, tokens_per_frame=30 * 45, ds=768, dt=768, label="cogvideox-full")
HD_720P_SHORT = Case(batch=1, frames=9, tokens_per_frame=45 * 80, ds=768, dt=768, label="720p-9f")
HD_720P = Case(batch=1, frames=21, tokens_per_frame=45 * 80, ds=768, dt=768, label="720p")
CPU_TARGET = Case(batch=1, frames=16, tokens_per_frame=256, ds=256, dt=256, label="cpu-target")


def _quick(device: str) -> List[Case]:
    if device == "cpu":
        cases = _sweep([1024, 2048], 256, label="cpu-sweep") + [CPU_TARGET]
        return cases + [Case(batch=1, ds=256, dt=256, relation="spatial", label="relation", **_grid(2048))]
    cases = _sweep([4096, 8192], 768, dtype="bf16", label="gpu-sweep") + [replace(COGVIDEOX_FULL, dtype="bf16")]
    return cases + [replace(VIDEOREPA, dtype="bf16", relation="spatial")]


def _cpu(device: str) -> List[Case]:
    cases = _sweep([1024, 2048], 256, label="cpu-sweep") + [CPU_TARGET]
    cases += _sweep([8192], 256, label="cpu-sweep")
    cases += [replace(c, mode="fwd") for c in _sweep([1024, 2048, 4096, 8192], 256, label="cpu-sweep")]
    cases += [replace(c, dtype="bf16") for c in _sweep([1024, 2048, 4096], 256, label="cpu-sweep")]
    cases += [replace(CPU_TARGET, relation=r, label="relation") for r in ("spatial", "temporal")]
    cases += [Case(batch=1, ds=ds, dt=768, label="Ds!=Dt", **_grid(2048)) for ds in (1920, 3072)]
    cases += [replace(VIDEOREPA, relation=r) for r in ("full", "spatial", "temporal")]
    return cases + [COGVIDEOX_FULL]


def _gpu(device: str) -> List[Case]:
    """bf16 fwd+bwd at N = 17,550 (with the acq_rel variant; first, so that a short time budget still
    measures the issues' target shape), 3,600 (B = 2), 32,400 and 75,600."""
    cases = [replace(COGVIDEOX_FULL, extra_impls=("triton-acqrel",))] + [VIDEOREPA, HD_720P_SHORT, HD_720P]
    return [replace(c, dtype="bf16") for c in cases]


def _gpu_extra(device: str) -> List[Case]:
    """What --gpu left out: loss only, fp32, Ds != Dt and the relations."""
    bf16 = dict(dtype="bf16")
    cases = [replace(COGVIDEOX_FULL, mode="fwd", **bf16), replace(COGVIDEOX_FULL, dtype="fp32")]
    cases += [replace(COGVIDEOX_FULL, ds=ds, label="Ds!=Dt", **bf16) for ds in (1920, 3072)]
    return cases + [replace(VIDEOREPA, relation=r, **bf16) for r in ("spatial", "temporal")]


PRESETS = {
    "quick": _quick,
    "cpu": _cpu,
    "gpu": _gpu,
    "gpu-extra": _gpu_extra,
    "videorepa": lambda device: [replace(VIDEOREPA, relation=r, dtype=d)
                                 for d in ("fp32", "bf16") for r in ("full", "spatial", "temporal")],
    "cogvideox-full": lambda device: [replace(COGVIDEOX_FULL, dtype=d) for d in ("fp32", "bf16")],
    "720p": lambda device: [replace(HD_720P, dtype="bf16")] if device == "cuda" else [],
}
