#!/usr/bin/env python
"""VideoREPA finetuning of CogVideoX: the diffusers CogVideoX training step plus the TRD loss.

    # offline, anywhere: tiny random CogVideoX + VAE + VideoMAE teacher on rendered bouncing balls
    python examples/cogvideox/train_cogvideox_videorepa.py --tiny --max_train_steps 3 --output_dir /tmp/run
    # real scale (local paths only)
    accelerate launch --num_processes 8 examples/cogvideox/train_cogvideox_videorepa.py \\
        --pretrained_model_name_or_path /models/CogVideoX-2b --teacher_ckpt /models/vit_b_k710_dl_from_giant.pth \\
        --data_root /data/openvid --output_dir runs/videorepa-2b

The step is diffusers' (examples/cogvideo/train_cogvideox_lora.py): VAE latents, DPM-scheduler noise,
v-prediction loss weighted by 1/(1 - alpha_bar_t). The VideoREPA change is marked ``# VideoREPA``: the
helper, the teacher tokens and ``+ trd_weight * loss_trd``. Data, tiny mode and the attention option live
beside this file (data.py, tiny.py, attention.py); flags, teacher, schedule and the loop shared with the Wan
example in examples/videorepa_common.py. Defaults follow the authors' recipe: see README.md here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/: the shared videorepa_common and this folder as `cogvideox`

from cogvideox.attention import configure_attention  # noqa: E402
from cogvideox.tiny import TINY_DEFAULTS, build_tiny_models  # noqa: E402
from videorepa_common import (  # noqa: E402
    TextEmbeddings,
    add_common_args,
    build_helper_and_teacher,
    finish_args,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer_and_loader,
    save_checkpoint,
    set_trainable,
    tiny_assets,
    train,
    warmup_decay_lambda,  # noqa: F401  (re-exported: the tests read it here)
)

from vrepa_kernels.integrations import require  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="local CogVideoX folder (transformer/, vae/, scheduler/, tokenizer/, text_encoder/)")
    p.add_argument("--output_dir", type=str, default="videorepa-cogvideox")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny: 96)")
    p.add_argument("--width", type=int, default=None, help="default 720 (tiny: 144)")
    p.add_argument("--num_frames", type=int, default=None, help="4k+1 frames per clip; default 49 (tiny: 9)")
    p.add_argument("--train_batch_size", type=int, default=None, help="per device; default 4 (tiny: 2)")
    p.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 with --use_lora, else 2e-6")
    p.add_argument("--attention_backend", type=str, default="native",
                   help="diffusers attention backend: native (torch SDPA), flash (needs flash-attn), ...")
    full = dict(height=480, width=720, num_frames=49, train_batch_size=4, align_layers=18, projector_dim=2048,
                mixed_precision="bf16")
    tiny = dict(TINY_DEFAULTS, align_layers=TINY_DEFAULTS["align_layer"])
    tiny.pop("align_layer")
    return finish_args(p, p.parse_args(argv), full, tiny,
                       ["pretrained_model_name_or_path", "teacher_ckpt", "data_root"])


# ----------------------------------------------------------------------------------------- pieces
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


def build_models(args, accelerator, weight_dtype):
    """transformer, vae, scheduler, text embedder, data root and teacher checkpoint path."""
    data_root, teacher_path = tiny_assets(args, accelerator)
    if args.tiny:
        return (*build_tiny_models(args.height, args.width, args.num_frames, args.seed), data_root, teacher_path)
    diffusers = require("diffusers", "the CogVideoX example")
    path = args.pretrained_model_name_or_path
    transformer = diffusers.CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                        torch_dtype=weight_dtype)
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=weight_dtype)
    scheduler = diffusers.CogVideoXDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text = TextEmbeddings(path, "T5EncoderModel", transformer.config.max_text_seq_length, accelerator.device,
                          weight_dtype, zero_padding=False)
    return transformer, vae, scheduler, text, data_root, teacher_path


# ----------------------------------------------------------------------------------------- training
def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    require("accelerate", "the CogVideoX example")
    accelerator, weight_dtype, out_dir = make_accelerator(args)
    device = accelerator.device

    transformer, vae, scheduler, text, data_root, teacher_path = build_models(args, accelerator, weight_dtype)
    vae_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    vae_temporal = vae.config.temporal_compression_ratio
    for model in (vae, transformer):
        model.to(device)
        if next(model.parameters()).dtype != weight_dtype:
            model.to(dtype=weight_dtype)
    vae.requires_grad_(False).eval()
    configure_attention(transformer, args.attention_backend)
    set_trainable(transformer, args, ["to_q", "to_k", "to_v", "to_out.0"])

    # VideoREPA: the helper (projector + downsampler per aligned block) and the frozen teacher it needs.
    latent_frames = (args.num_frames - 1) // vae_temporal + 1
    latent_shape = (1, latent_frames, 1, args.height // vae_spatial, args.width // vae_spatial)  # [B, F, C, H, W]
    helper, teacher = build_helper_and_teacher(args, transformer, latent_shape, teacher_path, device)

    params = helper.trainable_parameters(transformer)
    optimizer, loader = make_optimizer_and_loader(args, params, data_root)
    lr_scheduler = make_lr_scheduler(args, optimizer, loader, accelerator.num_processes)
    # The helper is not prepared: under DDP it syncs its own gradients (see vrepa_kernels.integrations.diffusers).
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    model_config = accelerator.unwrap_model(transformer).config
    if accelerator.is_main_process:
        print(f"VideoREPA: {type(accelerator.unwrap_model(transformer)).__name__} block(s) {args.align_layers} -> "
              f"teacher width {helper.teacher_dim} ({args.teacher_dtype}, {teacher.describe()}); "
              f"{sum(p.numel() for p in params):,} trainable parameters; {accelerator.num_processes} process(es); "
              f"mixed precision {accelerator.mixed_precision}", flush=True)

    def losses_of(batch):
        frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1], fp32
        with torch.no_grad():
            video = frames.to(weight_dtype).permute(0, 2, 1, 3, 4)
            latents = vae.encode(video).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.permute(0, 2, 1, 3, 4).to(weight_dtype)  # [B, F', C, H', W']
        teacher_tokens = teacher.tokens(frames, batch["keys"], device)  # VideoREPA
        prompt_embeds = text(batch["prompts"], device, weight_dtype)
        noise = torch.randn_like(latents)
        bsz, num_latent_frames = latents.shape[:2]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        rope = (rotary_embeddings(model_config, args.height, args.width, num_latent_frames, vae_spatial, device)
                if model_config.use_rotary_positional_embeddings else None)
        with helper.capture():  # VideoREPA: keep the aligned blocks' tokens of this forward
            model_output = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds,
                                       timestep=timesteps, image_rotary_emb=rope, return_dict=False)[0]
            with accelerator.autocast():
                loss_trd = helper(teacher_tokens, noisy.shape)  # VideoREPA
        model_pred = scheduler.get_velocity(model_output, noisy, timesteps)
        weights = 1.0 / (1.0 - scheduler.alphas_cumprod.to(device)[timesteps].float())
        per_sample = ((model_pred.float() - latents.float()) ** 2).reshape(bsz, -1).mean(dim=1)
        return (weights * per_sample).mean(), loss_trd

    return train(args, accelerator, transformer, helper, optimizer, lr_scheduler, loader, params, losses_of,
                 lambda step: save_checkpoint(accelerator, transformer, helper, args, step, "CogVideoXPipeline"))


if __name__ == "__main__":
    main()
