#!/usr/bin/env python
"""VideoREPA finetuning of Wan 2.1/2.2 (text-to-video): a flow-matching training step plus the TRD loss.

    # offline, anywhere: tiny random Wan transformer + VAE + VideoMAE teacher on rendered bouncing balls
    python examples/wan/train_wan_videorepa.py --tiny --max_train_steps 3 --output_dir /tmp/run
    # real scale (local paths only): see README.md here
    accelerate launch --num_processes 8 examples/wan/train_wan_videorepa.py \\
        --pretrained_model_name_or_path /models/Wan2.1-T2V-1.3B-Diffusers \\
        --teacher_ckpt /models/vit_b_k710_dl_from_giant.pth --data_root /data/openvid --output_dir runs/wan-1.3b

The step: latents from diffusers' ``AutoencoderKLWan`` (the posterior mean, normalised by the VAE's
``latents_mean``/``latents_std`` as the official ``WanVAE.encode`` does), rectified-flow noising
``x_t = (1 - s) x_0 + s eps`` at a shifted uniform ``s`` and the velocity target ``eps - x_0`` (Wan's flow-matching
objective; the model is called with ``timestep = 1000 s`` as the Wan pipelines do). The VideoREPA change is
marked ``# VideoREPA``. Flags, data, teacher, schedule and the loop are shared with the CogVideoX example
(examples/videorepa_common.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/: videorepa_common and the CogVideoX example's tiny fixtures

import videorepa_common as common  # noqa: E402
from cogvideox.tiny import RandomTextEmbeddings  # noqa: E402

from vrepa_kernels.integrations import require  # noqa: E402

TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                        out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_TEXT_LEN = 8
# 96x144 -> latents 12x18 -> tokens 6x9 -> teacher grid 2x3 (stride 3); 9 frames -> 3 latent frames
TINY_DEFAULTS = dict(height=96, width=144, num_frames=9, train_batch_size=2, align_layers=1, projector_dim=64,
                     mixed_precision="no")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="local Wan diffusers folder (transformer/, vae/, tokenizer/, text_encoder/)")
    p.add_argument("--output_dir", type=str, default="videorepa-wan")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny: 96)")
    p.add_argument("--width", type=int, default=None, help="default 832 (tiny: 144)")
    p.add_argument("--num_frames", type=int, default=None, help="4k+1 frames per clip; default 81 (tiny: 9)")
    p.add_argument("--train_batch_size", type=int, default=None, help="per device; default 1 (tiny: 2)")
    p.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 with --use_lora, else 2e-6")
    p.add_argument("--flow_shift", type=float, default=5.0,
                   help="sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1): the shift of Wan's flow-matching schedule "
                        "(its pipelines sample with 5.0 at 720p, 3.0 at 480p)")
    p.add_argument("--max_text_len", type=int, default=512, help="UMT5 tokens per prompt (Wan pipelines: 512)")
    # 480x832: latents 60x104, tokens 30x52 per frame; 52 is no multiple of 3, so VideoREPA's stride-3
    # downsampler needs --native_grid (or a width whose token grid is, e.g. 864 -> 54 -> 18).
    full = dict(height=480, width=832, num_frames=81, train_batch_size=1, align_layers=18, projector_dim=2048,
                mixed_precision="bf16")
    return common.finish_args(p, p.parse_args(argv), full, TINY_DEFAULTS,
                       ["pretrained_model_name_or_path", "teacher_ckpt", "data_root"])


def build_models(args, accelerator, weight_dtype):
    """transformer, vae, text embedder, data root and teacher checkpoint path."""
    data_root, teacher_path = common.tiny_assets(args, accelerator)
    diffusers = require("diffusers", "the Wan example")
    if args.tiny:
        torch.manual_seed(args.seed)
        transformer = diffusers.WanTransformer3DModel(**TINY_TRANSFORMER)
        vae = diffusers.AutoencoderKLWan(**TINY_VAE)
        text = RandomTextEmbeddings(TINY_TEXT_LEN, TINY_TRANSFORMER["text_dim"])
        return transformer, vae, text, data_root, teacher_path
    path = args.pretrained_model_name_or_path
    transformer = diffusers.WanTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                  torch_dtype=weight_dtype)
    # The Wan VAE stays fp32, as diffusers' Wan docs load it; only the transformer runs in bf16.
    vae = diffusers.AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    text = common.TextEmbeddings(path, "UMT5EncoderModel", args.max_text_len, accelerator.device, weight_dtype,
                                 zero_padding=True)  # as WanPipeline
    return transformer, vae, text, data_root, teacher_path


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels s = shift*u / (1 + (shift - 1)*u) (the time shift of Wan's flow-matching scheduler)."""
    return shift * u / (1 + (shift - 1) * u)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    require("accelerate", "the Wan example")
    accelerator, weight_dtype, out_dir = common.make_accelerator(args)
    device = accelerator.device

    transformer, vae, text, data_root, teacher_path = build_models(args, accelerator, weight_dtype)
    vae_spatial, vae_temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    vae.to(device).requires_grad_(False).eval()
    # No blanket .to(weight_dtype): from_pretrained(torch_dtype=...) keeps Wan's norms, RoPE and time embedder in
    # fp32 (its _keep_in_fp32_modules), which a cast would undo; trainable weights become fp32 below anyway.
    transformer.to(device)
    common.set_trainable(transformer, args, LORA_TARGETS)
    latents_mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    latents_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)

    # VideoREPA: the helper reads Wan's `blocks`, patch (1, 2, 2) and [B, C, F, H, W] latents by itself.
    latent_frames = (args.num_frames - 1) // vae_temporal + 1
    latent_shape = (1, 1, latent_frames, args.height // vae_spatial, args.width // vae_spatial)  # [B, C, F, H, W]
    helper, teacher = common.build_helper_and_teacher(args, transformer, latent_shape, teacher_path, device)

    params = helper.trainable_parameters(transformer)
    optimizer, loader = common.make_optimizer_and_loader(args, params, data_root)
    lr_scheduler = common.make_lr_scheduler(args, optimizer, loader, accelerator.num_processes)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    if accelerator.is_main_process:
        print(f"VideoREPA: WanTransformer3DModel block(s) {args.align_layers} -> teacher width {helper.teacher_dim} "
              f"({args.teacher_dtype}, {teacher.describe()}); {sum(p.numel() for p in params):,} trainable "
              f"parameters; {accelerator.num_processes} process(es); mixed precision {accelerator.mixed_precision}",
              flush=True)

    def losses_of(batch):
        frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1], fp32
        with torch.no_grad():
            video = frames.permute(0, 2, 1, 3, 4).to(vae.dtype)  # Wan's VAE takes [B, 3, F, H, W]
            latents = (vae.encode(video).latent_dist.mode().float() - latents_mean) / latents_std
        teacher_tokens = teacher.tokens(frames, batch["keys"], device)  # VideoREPA
        prompt_embeds = text(batch["prompts"], device, weight_dtype)
        bsz = latents.shape[0]
        sigmas = shifted_sigmas(torch.rand(bsz, device=device), args.flow_shift).view(bsz, 1, 1, 1, 1)
        noise = torch.randn_like(latents)
        noisy = ((1 - sigmas) * latents + sigmas * noise).to(weight_dtype)  # [B, C, F', H', W']
        with helper.capture():  # VideoREPA: keep the aligned blocks' tokens of this forward
            pred = transformer(hidden_states=noisy, timestep=sigmas.flatten() * 1000,
                               encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            with accelerator.autocast():
                loss_trd = helper(teacher_tokens, noisy.shape)  # VideoREPA
        loss_diffusion = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        return loss_diffusion, loss_trd

    def save(step):
        return common.save_checkpoint(accelerator, transformer, helper, args, step, "WanPipeline")

    return common.train(args, accelerator, transformer, helper, optimizer, lr_scheduler, loader, params,
                        losses_of, save)


if __name__ == "__main__":
    main()
