"""The example's offline ``--tiny`` mode: tiny random models and a rendered physics dataset (no downloads).

Sizes follow the diffusers and transformers unit tests of these models. The teacher is a random VideoMAEv2
written to disk in the official checkpoint layout, so the real loader and key mapping run.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from vrepa_kernels.integrations import require
from vrepa_kernels.integrations.videomae import random_videomae_v2_checkpoint

TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                        text_embed_dim=8, num_layers=2, patch_size=2, max_text_seq_length=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
# Patch 16 and tubelet 2 as VideoMAEv2-B; its position table is "pre-trained" on 4 frames at 32x32.
TINY_TEACHER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=16,
                    tubelet_size=2)
TINY_DEFAULTS = dict(height=96, width=144, num_frames=9, train_batch_size=2, align_layer=1, projector_dim=64,
                     mixed_precision="no")


class RandomTextEmbeddings:
    """Fixed random embeddings per prompt (seeded by its CRC32): stands in for T5."""

    def __init__(self, seq_len: int, dim: int):
        self.seq_len, self.dim = seq_len, dim

    def __call__(self, prompts, device, dtype):
        rows = [torch.randn(self.seq_len, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows).to(device=device, dtype=dtype)


def build_tiny_models(height: int, width: int, num_frames: int, seed: int):
    """Random tiny CogVideoX transformer, VAE, scheduler and text embedder."""
    diffusers = require("diffusers", "the CogVideoX example")
    torch.manual_seed(seed)
    transformer = diffusers.CogVideoXTransformer3DModel(**TINY_TRANSFORMER, sample_height=height // 8,
                                                        sample_width=width // 8, sample_frames=num_frames)
    vae = diffusers.AutoencoderKLCogVideoX(**TINY_VAE)
    scheduler = diffusers.CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                timestep_spacing="trailing")
    text = RandomTextEmbeddings(transformer.config.max_text_seq_length, transformer.config.text_embed_dim)
    return transformer, vae, scheduler, text


def write_tiny_teacher(path: Path, seed: int) -> Path:
    """A random tiny VideoMAEv2 checkpoint in the official layout (architecture stored beside the weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_videomae_v2_checkpoint(TINY_TEACHER, seed=seed, num_classes=2, source_num_frames=4,
                                             source_image_size=32), path)
    return path


# ----------------------------------------------------------------------------------------- rendered data
def ball_background(height: int, width: int) -> torch.Tensor:
    """[3, H, W] backdrop of the rendered clips: a vertical gradient."""
    ramp = torch.linspace(0, 0.4, height).view(height, 1).expand(height, width)
    return torch.stack([torch.full((height, width), -0.6), -0.6 + ramp, torch.full((height, width), -0.2)])


def render_bouncing_balls(num_frames: int, height: int, width: int, seed: int):
    """One clip of 1-3 balls falling under gravity and bouncing off the floor and walls; [F, 3, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    count = int(torch.randint(1, 4, (1,), generator=gen))
    radius = (0.06 + 0.06 * rand(count)) * min(height, width)
    pos = torch.stack([radius + rand(count) * (width - 2 * radius), radius + rand(count) * 0.5 * height], 1)
    vel = torch.stack([(rand(count) - 0.5) * 0.1 * width, torch.zeros(count)], 1)
    color = rand(count, 3) * 1.6 - 0.8
    gravity, restitution = 0.04 * height, 0.8
    ys = torch.arange(height, dtype=torch.float32).view(height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, width)
    background = ball_background(height, width)
    frames = []
    for _ in range(num_frames):
        frame = background.clone()
        for i in range(count):
            inside = (xs - pos[i, 0]) ** 2 + (ys - pos[i, 1]) ** 2 <= radius[i] ** 2
            frame[:, inside] = color[i].view(3, 1)
        frames.append(frame)
        vel[:, 1] += gravity
        pos += vel
        for i in range(count):
            if pos[i, 1] > height - radius[i]:
                pos[i, 1], vel[i, 1] = height - radius[i], -restitution * vel[i, 1]
            if pos[i, 0] < radius[i] or pos[i, 0] > width - radius[i]:
                vel[i, 0] = -vel[i, 0]
                pos[i, 0] = pos[i, 0].clamp(radius[i], width - radius[i])
    prompt = f"{count} colored ball{'s' if count > 1 else ''} falling and bouncing on the floor"
    return torch.stack(frames).clamp(-1, 1), prompt


def write_tiny_dataset(root: Path, num_clips: int, num_frames: int, height: int, width: int, seed: int) -> None:
    """Render clips into ``root`` in the diffusers example layout: prompts.txt, videos.txt, clips/*.pt."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    prompts, videos = [], []
    for i in range(num_clips):
        clip, prompt = render_bouncing_balls(num_frames, height, width, seed * 1000 + i)
        name = f"clips/balls_{i:03d}.pt"
        torch.save(clip, root / name)
        prompts.append(prompt)
        videos.append(name)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
