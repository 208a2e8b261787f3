"""The input contract: argument validation, canonical ``[B, N, D]`` views and which token pairs count."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

RELATIONS = ("full", "spatial", "temporal")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
RELATION_CODES = {"full": 0, "spatial": 1, "temporal": 2}  # C++ twin: enum Relation in csrc/trd_shared.h


@dataclass(frozen=True)
class RelationSpec:
    """Everything about one call except the tensors themselves."""

    batch: int
    num_tokens: int
    relation: str = "full"
    tokens_per_frame: int = 0  # 0 when the relation is "full"
    margin: float = 0.1
    reduction: str = "mean"
    single_sample: bool = False  # 2-D input: "none" returns a 0-d tensor

    @property
    def num_frames(self) -> int:
        return self.num_tokens // self.tokens_per_frame if self.tokens_per_frame else 1

    @property
    def pairs_per_sample(self) -> int:
        """Exact count of kept (i, j) pairs in one sample, as a Python int."""
        full = self.num_tokens * self.num_tokens
        same_frame = self.num_frames * self.tokens_per_frame * self.tokens_per_frame
        if self.relation == "spatial":
            return same_frame
        if self.relation == "temporal":
            return full - same_frame
        return full


def relation_mask(spec: RelationSpec, device=None) -> torch.Tensor:
    """The N x N boolean mask of kept pairs. Materialises N^2 booleans: reference and tests only."""
    n = spec.num_tokens
    if spec.relation == "full":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    frame = torch.arange(n, device=device) // spec.tokens_per_frame
    same = frame[:, None] == frame[None, :]
    return same if spec.relation == "spatial" else ~same


def _shape(x: torch.Tensor) -> str:
    return "x".join(str(d) for d in x.shape) or "scalar"


def canonicalize(
    student,
    teacher,
    margin=0.1,
    relation: str = "full",
    num_frames: Optional[int] = None,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor, RelationSpec]:
    """Validate every argument and return ``[B, N, D]`` views plus the call's :class:`RelationSpec`.

    Raises ``TypeError`` or ``ValueError`` naming the offending argument and the shapes involved.
    """
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"{name} must be [N, D], [B, N, D] or [B, F, T, D]; got {x.dim()}-D shape {_shape(x)}"
            )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"student and teacher must share a dtype, got student {student.dtype} and teacher {teacher.dtype}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student and teacher must be on one device, got student on {student.device} "
            f"and teacher on {teacher.device}"
        )
    if student.dim() != teacher.dim() or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            "student and teacher must agree on every dim but the last (the feature dim); "
            f"got student {_shape(student)} and teacher {_shape(teacher)}"
        )
    if student.shape[-1] == 0 or teacher.shape[-1] == 0:
        raise ValueError(f"feature dims must be > 0; got student {_shape(student)} and teacher {_shape(teacher)}")

    if isinstance(margin, torch.Tensor):
        if margin.numel() != 1:
            raise ValueError(f"margin must be a scalar, got a tensor of shape {_shape(margin)}")
        margin = margin.item()
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {type(margin).__name__}")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral)):
        raise TypeError(f"num_frames must be an int or None, got {type(num_frames).__name__}")

    single = student.dim() == 2
    if student.dim() == 4:
        b, f, t = student.shape[:3]
        if num_frames is not None and num_frames != f:
            raise ValueError(f"num_frames={num_frames} disagrees with the 4-D input's {f} frames "
                             f"(shape {_shape(student)})")
        num_frames = f
        student = student.reshape(b, f * t, student.shape[-1])
        teacher = teacher.reshape(b, f * t, teacher.shape[-1])
    elif single:
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
    batch, n = student.shape[:2]
    if batch == 0 or n == 0:
        raise ValueError(f"inputs hold no tokens: student {_shape(student)}, teacher {_shape(teacher)}")

    tokens_per_frame = 0
    if relation != "full":
        if num_frames is None:
            raise ValueError(
                f"relation={relation!r} needs frames: pass 4-D [B, F, T, D] input or num_frames= "
                f"(student shape {_shape(student)})"
            )
        if num_frames <= 0 or n % num_frames:
            raise ValueError(f"num_frames={num_frames} must be > 0 and divide the token count N={n}")
        tokens_per_frame = n // num_frames
        if relation == "temporal" and num_frames == 1:
            raise ValueError("relation='temporal' with num_frames=1 keeps no token pair")
    elif num_frames is not None and (num_frames <= 0 or n % num_frames):
        raise ValueError(f"num_frames={num_frames} must be > 0 and divide the token count N={n}")

    spec = RelationSpec(batch, n, relation, tokens_per_frame, margin, reduction, single)
    return student, teacher, spec
