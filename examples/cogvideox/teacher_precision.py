#!/usr/bin/env python
"""How much a bf16 VideoMAEv2 teacher (or bf16-stored tokens) changes the TRD targets, on CPU.

    python examples/cogvideox/teacher_precision.py            # random-weight ViT-B and the tiny teacher

Random weights (no download) on a rendered bouncing-ball clip, so the numbers show the rounding of the
architecture, not of the trained VideoMAEv2. Compared with the fp32 teacher (VideoREPA's): relative error
of the tokens, their cosine similarity, and the change of the normalised Gram matrix that TRD compares
against the student's (mean and max |dG|; TRD ignores differences below the margin, 0.1).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import vrepa_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parents[1]))

from tiny import TINY_TEACHER, render_bouncing_balls  # noqa: E402

from vrepa_kernels.integrations.videomae import (  # noqa: E402
    encode_teacher,
    load_videomae_teacher,
    prepare_teacher_pixels,
    random_videomae_v2_checkpoint,
)


def _gram(tokens):
    t = torch.nn.functional.normalize(tokens.flatten(1, 3).double(), dim=-1)
    return t @ t.transpose(1, 2)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    ref, oth = reference.double(), other.double()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 3), oth.flatten(0, 3), dim=-1)
    dg = (_gram(ref) - _gram(oth)).abs()
    return {"relative_error": float((oth - ref).norm() / ref.norm()), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()), "gram_mean_abs_diff": float(dg.mean()),
            "gram_max_abs_diff": float(dg.max()), "gram_pairs_over_0.01": float((dg > 0.01).double().mean())}


def measure(name: str, architecture, num_frames: int, size, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "teacher.pth"
        torch.save(random_videomae_v2_checkpoint(architecture, seed=seed), path)
        teacher = load_videomae_teacher(path, num_frames=num_frames, image_size=size)
    clip, _ = render_bouncing_balls(num_frames + 1, size[0], size[1], seed=seed)
    pixels = prepare_teacher_pixels(clip[None], size)
    fp32 = encode_teacher(teacher, pixels)
    bf16 = encode_teacher(teacher.to(torch.bfloat16), pixels.bfloat16()).float()
    return {"teacher": name, "tokens": list(fp32.shape[1:4]), "width": fp32.shape[-1],
            "bf16_teacher": compare(fp32, bf16), "bf16_stored_tokens": compare(fp32, fp32.bfloat16().float())}


def main():
    torch.manual_seed(0)
    results = [measure("random ViT-B (VideoMAEv2-B sizes)", None, 16, (64, 96)),
               measure("tiny (width 32, 2 blocks)", TINY_TEACHER, 8, (32, 48))]
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
