#!/usr/bin/env python
"""VideoREPA finetuning of CogVideoX: the diffusers CogVideoX LoRA training step plus the TRD loss.

    # offline, anywhere: tiny random CogVideoX + VAE + VideoMAE teacher on rendered bouncing balls
    python examples/cogvideox/train_cogvideox_videorepa.py --tiny --max_train_steps 3 --output_dir /tmp/run
    # real scale (local paths only)
    accelerate launch --num_processes 8 examples/cogvideox/train_cogvideox_videorepa.py \
        --pretrained_model_name_or_path /models/CogVideoX-2b --teacher_ckpt /models/vit_b_k710_dl_from_giant.pth \
        --data_root /data/openvid --output_dir runs/videorepa-2b

The step is diffusers' (examples/cogvideo/train_cogvideox_lora.py): VAE latents, DPM-scheduler noise,
v-prediction loss weighted by 1/(1 - alpha_bar_t). VideoREPA adds ``--trd_weight * loss_trd`` computed by
:class:`vrepa_kernels.integrations.diffusers.VideoREPA` on block ``--align_layer`` (counted from 1) against
VideoMAEv2 tokens of the same clip. See README.md in this folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

try:
    import vrepa_kernels  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vrepa_kernels.integrations import require  # noqa: E402
from vrepa_kernels.integrations.diffusers import VideoREPA, aligned_grid, student_token_grid  # noqa: E402
from vrepa_kernels.integrations.videomae import (  # noqa: E402
    TeacherTokenCache,
    encode_teacher,
    load_videomae_teacher,
    prepare_teacher_pixels,
    random_videomae_v2_checkpoint,
    teacher_fingerprint,
)

# Tiny sizes follow the diffusers and transformers unit tests of these models.
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                        text_embed_dim=8, num_layers=2, patch_size=2, max_text_seq_length=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
TINY_TEACHER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8,
                    tubelet_size=2)
TINY_TEACHER_SOURCE = dict(source_num_frames=4, source_image_size=16)  # position table it was "pre-trained" with


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="offline default: tiny random models on rendered clips")
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="local CogVideoX folder (transformer/, vae/, scheduler/, tokenizer/, text_encoder/)")
    p.add_argument("--teacher_ckpt", type=str, default=None, help="local VideoMAEv2 checkpoint (.pth, official layout)")
    p.add_argument("--data_root", type=str, default=None,
                   help="folder with --caption_column and --video_column files (diffusers example layout)")
    p.add_argument("--caption_column", type=str, default="prompts.txt")
    p.add_argument("--video_column", type=str, default="videos.txt")
    p.add_argument("--output_dir", type=str, default="videorepa-cogvideox")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny: 96)")
    p.add_argument("--width", type=int, default=None, help="default 720 (tiny: 144)")
    p.add_argument("--num_frames", type=int, default=None, help="4k+1 frames per clip; default 49 (tiny: 9)")
    p.add_argument("--train_batch_size", type=int, default=None, help="per device; default 4 (tiny: 2)")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 with --use_lora, else 2e-6")
    p.add_argument("--lr_scheduler", type=str, default="constant_with_warmup")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.95)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="default bf16 (tiny: no)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of the whole transformer")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=64)
    p.add_argument("--align_layer", type=int, default=None, help="block to align, counted from 1; default 18 (tiny: 1)")
    p.add_argument("--trd_weight", type=float, default=0.5)
    p.add_argument("--trd_margin", type=float, default=0.1)
    p.add_argument("--trd_relation", type=str, default="full", choices=["full", "spatial", "temporal"])
    p.add_argument("--projector_dim", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--trd_backend", type=str, default="auto", choices=["auto", "reference", "torch", "triton", "cuda"])
    p.add_argument("--teacher_cache_dir", type=str, default=None, help="cache teacher tokens here, once per clip")
    p.add_argument("--attention_backend", type=str, default="native",
                   help="diffusers attention backend: native (torch SDPA), flash (needs flash-attn), ...")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--tiny_num_clips", type=int, default=8)
    args = p.parse_args(argv)

    tiny = args.tiny
    defaults = dict(height=96 if tiny else 480, width=144 if tiny else 720, num_frames=9 if tiny else 49,
                    train_batch_size=2 if tiny else 4, align_layer=1 if tiny else 18,
                    projector_dim=64 if tiny else 2048, mixed_precision="no" if tiny else "bf16",
                    learning_rate=1e-4 if args.use_lora else 2e-6)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not tiny:
        required = ("pretrained_model_name_or_path", "teacher_ckpt", "data_root")
        missing = [f for f in required if getattr(args, f) is None]
        if missing:
            p.error(f"without --tiny, pass {', '.join('--' + m for m in missing)} (local paths)")
    if (args.num_frames - 1) % 4:
        p.error(f"--num_frames must be 4k+1 for the CogVideoX VAE, got {args.num_frames}")
    return args


# ----------------------------------------------------------------------------------------- tiny assets
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


# ----------------------------------------------------------------------------------------- data
def _read_video_file(path: Path) -> torch.Tensor:
    """uint8 [F, H, W, 3] frames of a video file via decord, torchvision or imageio, whichever is installed."""
    if importlib.util.find_spec("decord") is not None:
        import decord

        decord.bridge.set_bridge("torch")
        reader = decord.VideoReader(str(path))
        return reader.get_batch(list(range(len(reader))))
    if importlib.util.find_spec("torchvision") is not None:
        from torchvision.io import read_video

        return read_video(str(path), pts_unit="sec", output_format="THWC")[0]
    if importlib.util.find_spec("imageio") is not None:
        import imageio.v3 as iio

        return torch.from_numpy(iio.imread(str(path)))
    raise ImportError(f"reading {path.name} needs a video decoder: pip install decord "
                      "(or torchvision, or imageio[pyav])")


def load_clip(path: Path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """[num_frames, 3, height, width] in [-1, 1] from a .pt/.npy tensor or a video file (evenly spaced frames,
    bicubic resize of the short side and a center crop, as the diffusers example does)."""
    if path.suffix in (".pt", ".pth"):
        clip = torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".npy":
        import numpy as np

        clip = torch.from_numpy(np.load(path))
    else:
        clip = _read_video_file(path)
    if clip.dim() != 4:
        raise ValueError(f"{path}: expected a 4-D clip, got shape {tuple(clip.shape)}")
    if clip.dtype == torch.uint8:  # [F, H, W, C] in 0..255
        clip = clip.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    clip = clip.float()
    if clip.shape[1] != 3:
        raise ValueError(f"{path}: expected [F, 3, H, W] or uint8 [F, H, W, 3], got shape {tuple(clip.shape)}")
    if clip.shape[0] < num_frames:
        raise ValueError(f"{path}: has {clip.shape[0]} frames, needs at least --num_frames={num_frames}")
    index = torch.linspace(0, clip.shape[0] - 1, num_frames).round().long()
    clip = clip[index]
    h, w = clip.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bicubic", align_corners=False)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        clip = clip[:, :, top:top + height, left:left + width]
    return clip.clamp(-1, 1).contiguous()


class ClipDataset(torch.utils.data.Dataset):
    """Clips and prompts listed line by line in ``data_root/caption_column`` and ``data_root/video_column``."""

    def __init__(self, root, caption_column, video_column, num_frames, height, width):
        self.root = Path(root)
        prompt_file, video_file = self.root / caption_column, self.root / video_column
        for f, flag in ((prompt_file, "--caption_column"), (video_file, "--video_column")):
            if not f.is_file():
                raise ValueError(f"{flag}: {f} is not a file of line-separated entries in --data_root")
        self.prompts = [l.strip() for l in prompt_file.read_text(encoding="utf-8").splitlines() if l.strip()]
        self.videos = [l.strip() for l in video_file.read_text(encoding="utf-8").splitlines() if l.strip()]
        if len(self.prompts) != len(self.videos) or not self.videos:
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.videos)} videos in {self.root}")
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        clip = load_clip(self.root / self.videos[index], self.num_frames, self.height, self.width)
        return {"frames": clip, "prompt": self.prompts[index], "key": self.videos[index]}


def collate(examples):
    return {"frames": torch.stack([e["frames"] for e in examples]),  # [B, F, 3, H, W] in [-1, 1]
            "prompts": [e["prompt"] for e in examples], "keys": [e["key"] for e in examples]}


# ----------------------------------------------------------------------------------------- text
class RandomTextEmbeddings:
    """Fixed random embeddings per prompt (seeded by its CRC32): stands in for T5 in --tiny."""

    def __init__(self, seq_len: int, dim: int):
        self.seq_len, self.dim = seq_len, dim

    def __call__(self, prompts, device, dtype):
        rows = [torch.randn(self.seq_len, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows).to(device=device, dtype=dtype)


class T5Embeddings:
    def __init__(self, model_path: str, seq_len: int, device, dtype):
        transformers = require("transformers", "the T5 text encoder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer")
        self.encoder = transformers.T5EncoderModel.from_pretrained(model_path, subfolder="text_encoder")
        self.encoder.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.seq_len = seq_len

    @torch.no_grad()
    def __call__(self, prompts, device, dtype):
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.seq_len, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        return self.encoder(ids.to(device))[0].to(dtype=dtype)


# ----------------------------------------------------------------------------------------- attention
class DispatchCogVideoXAttnProcessor:
    """CogVideoX's joint text+video attention, with the attention itself done by diffusers' dispatcher, so
    that ``--attention_backend`` (flash, sage, ...) applies; diffusers' own CogVideoX processor always calls
    torch SDPA."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("DispatchCogVideoXAttnProcessor does not take an attention mask")
        text_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = joint.shape[0]
        split = lambda x: x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        query, key, value = split(attn.to_q(joint)), split(attn.to_k(joint)), split(attn.to_v(joint))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    backend=self.backend)  # [B, S, H, D] in and out
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        return out[:, text_len:], out[:, :text_len]


def configure_attention(transformer, backend: str) -> None:
    """``native`` keeps diffusers' CogVideoX processor (torch SDPA); any other name routes through the dispatcher."""
    if backend == "native":
        return
    if backend.startswith("flash") and "hub" not in backend and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(f"--attention_backend {backend} needs flash-attn: pip install vrepa-kernels[flash]")
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        name = AttentionBackendName(backend)
    except ValueError as err:
        valid = ", ".join(sorted(b.value for b in AttentionBackendName))
        raise ValueError(f"--attention_backend {backend!r} is not one of diffusers' backends: {valid}") from err
    transformer.set_attn_processor(DispatchCogVideoXAttnProcessor(name))


# ----------------------------------------------------------------------------------------- models
def build_components(args, accelerator, weight_dtype):
    """transformer, vae, scheduler, teacher, text embedder, dataset and the teacher's (frames, height, width)."""
    diffusers = require("diffusers", "the CogVideoX example")
    device = accelerator.device
    vae_spatial, vae_temporal = 8, 4
    if args.tiny:
        root = Path(args.output_dir) / "tiny_assets"
        data_root = Path(args.data_root) if args.data_root else root / "data"
        teacher_path = Path(args.teacher_ckpt) if args.teacher_ckpt else root / "videomae_v2_tiny.pth"
        if accelerator.is_main_process:
            if not args.data_root:
                write_tiny_dataset(data_root, args.tiny_num_clips, args.num_frames, args.height, args.width, args.seed)
            if not args.teacher_ckpt:
                root.mkdir(parents=True, exist_ok=True)
                torch.save(random_videomae_v2_checkpoint(TINY_TEACHER, seed=args.seed, num_classes=2), teacher_path)
        accelerator.wait_for_everyone()
        torch.manual_seed(args.seed)
        latent_h, latent_w = args.height // vae_spatial, args.width // vae_spatial
        transformer = diffusers.CogVideoXTransformer3DModel(
            **TINY_TRANSFORMER, sample_height=latent_h, sample_width=latent_w, sample_frames=args.num_frames)
        vae = diffusers.AutoencoderKLCogVideoX(**TINY_VAE)
        scheduler = diffusers.CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                    timestep_spacing="trailing")
        text = RandomTextEmbeddings(transformer.config.max_text_seq_length, transformer.config.text_embed_dim)
        teacher_arch, teacher_source = TINY_TEACHER, TINY_TEACHER_SOURCE
    else:
        path = args.pretrained_model_name_or_path
        data_root, teacher_path = Path(args.data_root), Path(args.teacher_ckpt)
        transformer = diffusers.CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                            torch_dtype=weight_dtype)
        vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=weight_dtype)
        scheduler = diffusers.CogVideoXDPMScheduler.from_pretrained(path, subfolder="scheduler")
        text = T5Embeddings(path, transformer.config.max_text_seq_length, device, weight_dtype)
        teacher_arch, teacher_source = None, {}
        vae_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        vae_temporal = vae.config.temporal_compression_ratio

    # The teacher sees the frames after the first at the student's aligned grid x its patch size.
    latent_frames = (args.num_frames - 1) // vae_temporal + 1
    latent_shape = (1, latent_frames, 1, args.height // vae_spatial, args.width // vae_spatial)
    config = transformer.config
    grid = aligned_grid(student_token_grid(latent_shape, config.patch_size, config.patch_size_t))
    patch = (teacher_arch or {}).get("patch_size", 16)
    teacher_frames, teacher_size = args.num_frames - 1, (grid[1] * patch, grid[2] * patch)
    teacher = load_videomae_teacher(teacher_path, num_frames=teacher_frames, image_size=teacher_size,
                                    architecture=teacher_arch, **teacher_source)
    dataset = ClipDataset(data_root, args.caption_column, args.video_column, args.num_frames, args.height, args.width)
    return transformer, vae, scheduler, teacher, text, dataset, (teacher_frames, teacher_size, teacher_path)


def rotary_embeddings(transformer_config, height, width, num_frames, vae_spatial, device):
    """3-D RoPE for CogVideoX-5B (``use_rotary_positional_embeddings``), as the diffusers example prepares it."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = transformer_config.patch_size
    grid_h, grid_w = height // (vae_spatial * p), width // (vae_spatial * p)
    base_w, base_h = 720 // (vae_spatial * p), 480 // (vae_spatial * p)
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
    return get_3d_rotary_pos_embed(embed_dim=transformer_config.attention_head_dim, crops_coords=crops,
                                   grid_size=(grid_h, grid_w), temporal_size=num_frames, device=device)


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def save_checkpoint(accelerator, transformer, helper, args, step: int) -> Path:
    out = Path(args.output_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        h = accelerator.unwrap_model(helper)
        torch.save({"config": h.config_dict(), "state_dict": h.state_dict()}, out / "videorepa_helper.pt")
        model = accelerator.unwrap_model(transformer)
        if args.use_lora:
            from diffusers import CogVideoXPipeline
            from peft.utils import get_peft_model_state_dict

            CogVideoXPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model))
        else:
            model.save_pretrained(out / "transformer")
    accelerator.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------------------- training
def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    accelerate = require("accelerate", "the CogVideoX example")
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    accelerator = accelerate.Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    components = build_components(args, accelerator, weight_dtype)
    transformer, vae, scheduler, teacher, text, dataset, teacher_info = components
    device = accelerator.device
    vae_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    for model in (vae, teacher, transformer):
        model.to(device)
        if next(model.parameters()).dtype != weight_dtype:
            model.to(dtype=weight_dtype)
    vae.requires_grad_(False).eval()
    configure_attention(transformer, args.attention_backend)
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    else:
        transformer.requires_grad_(True)
    for param in transformer.parameters():  # trainable weights stay fp32 under mixed precision (as VideoREPA)
        if param.requires_grad:
            param.data = param.data.float()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    helper = VideoREPA(transformer, teacher_dim=teacher.config.hidden_size, align_layer=args.align_layer,
                       projector_dim=args.projector_dim, margin=args.trd_margin, relation=args.trd_relation,
                       backend=args.trd_backend).to(device)
    params = helper.trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} clips give no full batch of --train_batch_size={args.train_batch_size}")
    from diffusers.optimization import get_scheduler

    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    transformer, helper_ddp, optimizer, loader, lr_scheduler = accelerator.prepare(
        transformer, helper, optimizer, loader, lr_scheduler)
    model_config = accelerator.unwrap_model(transformer).config

    cache = None
    if args.teacher_cache_dir:
        frames, size, path = teacher_info
        cache = TeacherTokenCache(args.teacher_cache_dir, teacher_fingerprint(path, frames, size))

    metrics_path = out_dir / "metrics.jsonl"
    metrics_file = open(metrics_path, "w") if accelerator.is_main_process else None
    if accelerator.is_main_process:
        trainable = sum(p.numel() for p in params)
        name = type(accelerator.unwrap_model(transformer)).__name__
        print(f"VideoREPA: {name} block {args.align_layer} -> teacher width {teacher.config.hidden_size}; "
              f"{trainable:,} trainable parameters; {accelerator.num_processes} process(es); "
              f"mixed precision {accelerator.mixed_precision}", flush=True)
    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_local_main_process)
    step, last = 0, {}
    tick = time.perf_counter()
    epoch = 0
    while step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(transformer, helper_ddp):
                frames = batch["frames"].to(device=device, dtype=weight_dtype)  # [B, F, 3, H, W]
                with torch.no_grad():
                    latents = vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.sample() * vae.config.scaling_factor
                    latents = latents.permute(0, 2, 1, 3, 4).to(weight_dtype)  # [B, F', C, H', W']

                    def teacher_tokens_of(indices):
                        pixels = prepare_teacher_pixels(frames[indices], teacher_info[1], dtype=weight_dtype)
                        return encode_teacher(teacher, pixels)

                    if cache is None:
                        teacher_tokens = teacher_tokens_of(list(range(frames.shape[0])))
                    else:
                        teacher_tokens = cache.get_or_compute(batch["keys"], teacher_tokens_of, device=device)
                prompt_embeds = text(batch["prompts"], device, weight_dtype)
                noise = torch.randn_like(latents)
                bsz, num_latent_frames = latents.shape[:2]
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
                noisy = scheduler.add_noise(latents, noise, timesteps)
                rope = (rotary_embeddings(model_config, args.height, args.width, num_latent_frames, vae_spatial, device)
                        if model_config.use_rotary_positional_embeddings else None)

                with accelerator.unwrap_model(helper_ddp).capture():
                    model_output = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds,
                                               timestep=timesteps, image_rotary_emb=rope, return_dict=False)[0]
                    loss_trd = helper_ddp(teacher_tokens, noisy.shape)
                model_pred = scheduler.get_velocity(model_output, noisy, timesteps)
                weights = 1.0 / (1.0 - scheduler.alphas_cumprod.to(device)[timesteps].float())
                per_sample = ((model_pred.float() - latents.float()) ** 2).reshape(bsz, -1).mean(dim=1)
                loss_diffusion = (weights * per_sample).mean()
                loss = loss_diffusion + args.trd_weight * loss_trd
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    unwrapped = accelerator.unwrap_model(helper_ddp)
                    grad_projector = _grad_norm(unwrapped.projector.parameters())
                    grad_downsampler = _grad_norm(unwrapped.downsampler.parameters())
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                losses = accelerator.reduce(torch.stack([loss.detach().float(), loss_diffusion.detach().float(),
                                                         loss_trd.detach().float()]), reduction="mean")
                step += 1
                last = {"step": step, "loss": float(losses[0]), "loss_diffusion": float(losses[1]),
                        "loss_trd": float(losses[2]), "lr": float(lr_scheduler.get_last_lr()[0]),
                        "step_time_s": now - tick, "grad_norm": float(grad_norm),
                        "grad_norm_projector": grad_projector, "grad_norm_downsampler": grad_downsampler,
                        "epoch": epoch}
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{last['loss']:.4f}", trd=f"{last['loss_trd']:.4f}")
                if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
                    save_checkpoint(accelerator, transformer, helper_ddp, args, step)
                tick = time.perf_counter()
            if step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()
    save_checkpoint(accelerator, transformer, helper_ddp, args, step)
    # Per-process fingerprint of the trained weights: equal on every rank when gradients were synchronised.
    checksum = sum(float(p.detach().double().sum()) for p in params)
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "trainable_checksum": checksum, "steps": step}))
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last


if __name__ == "__main__":
    main()
