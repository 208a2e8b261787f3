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
beside this file (data.py, tiny.py, attention.py). Defaults follow the authors' recipe: see README.md here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import vrepa_kernels  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parents[1]))

from attention import configure_attention  # noqa: E402
from data import FRAME_SAMPLING, RESIZE, ClipDataset, collate  # noqa: E402
from tiny import TINY_DEFAULTS, TINY_TEACHER, build_tiny_models, write_tiny_dataset, write_tiny_teacher  # noqa: E402

from vrepa_kernels.integrations import require  # noqa: E402
from vrepa_kernels.integrations.diffusers import VideoREPA  # noqa: E402
from vrepa_kernels.integrations.videomae import (  # noqa: E402
    TeacherTokenCache,
    encode_teacher,
    load_videomae_teacher,
    prepare_teacher_pixels,
    teacher_fingerprint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    p.add_argument("--frame_sampling", choices=FRAME_SAMPLING, default="stride",
                   help="stride: VideoREPA's every (n // num_frames)-th frame, short clips padded; linspace: "
                        "spread over the whole clip (earlier default)")
    p.add_argument("--resize", choices=RESIZE, default="crop_bilinear",
                   help="crop_bilinear: VideoREPA's aspect crop then antialiased bilinear; bicubic_crop: earlier")
    p.add_argument("--train_batch_size", type=int, default=None, help="per device; default 4 (tiny: 2)")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 with --use_lora, else 2e-6")
    p.add_argument("--lr_scheduler", type=str, default="warmup_decay",
                   help="warmup_decay (VideoREPA's DeepSpeed WarmupDecayLR) or a diffusers schedule name, e.g. "
                        "constant_with_warmup (earlier default)")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--lr_warmup_type", choices=["log", "linear"], default="log",
                   help="warm-up curve of warmup_decay (DeepSpeed's default: log)")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999, help="VideoREPA (DeepSpeed AdamW): 0.999")
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
    p.add_argument("--teacher_dtype", choices=sorted(DTYPES), default="fp32",
                   help="VideoMAEv2 precision (VideoREPA: fp32); also the token cache's")
    p.add_argument("--teacher_cache_dir", type=str, default=None, help="cache teacher tokens here, once per clip")
    p.add_argument("--attention_backend", type=str, default="native",
                   help="diffusers attention backend: native (torch SDPA), flash (needs flash-attn), ...")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--tiny_num_clips", type=int, default=8)
    args = p.parse_args(argv)

    full = dict(height=480, width=720, num_frames=49, train_batch_size=4, align_layer=18, projector_dim=2048,
                mixed_precision="bf16")
    for name, value in (TINY_DEFAULTS if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 2e-6
    if not args.tiny:
        required = ("pretrained_model_name_or_path", "teacher_ckpt", "data_root")
        missing = [f for f in required if getattr(args, f) is None]
        if missing:
            p.error(f"without --tiny, pass {', '.join('--' + m for m in missing)} (local paths)")
    if (args.num_frames - 1) % 4:
        p.error(f"--num_frames must be 4k+1 for the CogVideoX VAE, got {args.num_frames}")
    return args


# ----------------------------------------------------------------------------------------- pieces
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


def warmup_decay_lambda(warmup_steps: int, total_steps: int, warmup_type: str = "log"):
    """LR factor of update k: DeepSpeed's WarmupDecayLR (VideoREPA's zero2.yaml), with its warm-up of at least 2
    steps: log(k + 1) / log(W) (or k / W) while k < W, then (T - k) / (T - W), 0 from the last step on."""
    warmup = max(2, int(warmup_steps))

    def factor(k: int) -> float:
        if k < warmup:
            return math.log(k + 1) / math.log(warmup) if warmup_type == "log" else k / warmup
        return max(0.0, (total_steps - k) / max(1.0, total_steps - warmup))

    return factor


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
    if args.tiny:
        root = Path(args.output_dir) / "tiny_assets"
        data_root = Path(args.data_root) if args.data_root else root / "data"
        teacher_path = Path(args.teacher_ckpt) if args.teacher_ckpt else root / "videomae_v2_tiny.pth"
        if accelerator.is_main_process:
            if not args.data_root:
                write_tiny_dataset(data_root, args.tiny_num_clips, args.num_frames, args.height, args.width, args.seed)
            if not args.teacher_ckpt:
                write_tiny_teacher(teacher_path, args.seed)
        accelerator.wait_for_everyone()
        return (*build_tiny_models(args.height, args.width, args.num_frames, args.seed), data_root, teacher_path)
    diffusers = require("diffusers", "the CogVideoX example")
    path = args.pretrained_model_name_or_path
    transformer = diffusers.CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                        torch_dtype=weight_dtype)
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=weight_dtype)
    scheduler = diffusers.CogVideoXDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text = T5Embeddings(path, transformer.config.max_text_seq_length, accelerator.device, weight_dtype)
    return transformer, vae, scheduler, text, Path(args.data_root), Path(args.teacher_ckpt)


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def save_checkpoint(accelerator, transformer, helper, args, step: int) -> Path:
    out = Path(args.output_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"config": helper.config_dict(), "state_dict": helper.state_dict()}, out / "videorepa_helper.pt")
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
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = accelerate.Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    transformer, vae, scheduler, text, data_root, teacher_path = build_models(args, accelerator, weight_dtype)
    vae_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    vae_temporal = vae.config.temporal_compression_ratio
    for model in (vae, transformer):
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

    # VideoREPA: the helper (projector + downsampler on block --align_layer) and the frozen teacher it needs.
    teacher_dim = TINY_TEACHER["hidden_size"] if args.tiny else 768  # VideoMAEv2 ViT-B
    helper = VideoREPA(transformer, teacher_dim=teacher_dim, align_layer=args.align_layer,
                       projector_dim=args.projector_dim, margin=args.trd_margin, relation=args.trd_relation,
                       backend=args.trd_backend).to(device)
    latent_frames = (args.num_frames - 1) // vae_temporal + 1
    need = helper.teacher_input((1, latent_frames, 1, args.height // vae_spatial, args.width // vae_spatial))
    teacher_dtype = DTYPES[args.teacher_dtype]
    teacher = load_videomae_teacher(teacher_path, num_frames=need.num_frames, image_size=need.image_size,
                                    device=device, dtype=teacher_dtype)
    if teacher.config.hidden_size != teacher_dim:
        raise ValueError(f"{teacher_path} has width {teacher.config.hidden_size}, expected {teacher_dim}")
    cache = None
    if args.teacher_cache_dir:
        fingerprint = teacher_fingerprint(teacher_path, need.num_frames, need.image_size, extra=args.teacher_dtype)
        cache = TeacherTokenCache(args.teacher_cache_dir, fingerprint, dtype=teacher_dtype)

    params = helper.trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = ClipDataset(data_root, args.caption_column, args.video_column, args.num_frames, args.height,
                          args.width, args.frame_sampling, args.resize)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} clips give no full batch of --train_batch_size={args.train_batch_size}")
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    # Stepped once per optimizer step below (not through accelerator.prepare, which steps it per process).
    if args.lr_scheduler == "warmup_decay":
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_decay_lambda(args.lr_warmup_steps, args.max_train_steps, args.lr_warmup_type))
    else:
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                     num_training_steps=args.max_train_steps)
    # The helper is not prepared: under DDP it syncs its own gradients (see vrepa_kernels.integrations.diffusers).
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    model_config = accelerator.unwrap_model(transformer).config

    metrics_file = open(out_dir / "metrics.jsonl", "w") if accelerator.is_main_process else None
    if accelerator.is_main_process:
        print(f"VideoREPA: {type(accelerator.unwrap_model(transformer)).__name__} block {args.align_layer} -> "
              f"teacher width {teacher_dim} ({args.teacher_dtype}, {need.num_frames} frames at "
              f"{need.image_size[0]}x{need.image_size[1]}); {sum(p.numel() for p in params):,} trainable parameters; "
              f"{accelerator.num_processes} process(es); mixed precision {accelerator.mixed_precision}", flush=True)
    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_local_main_process)
    step, epoch, last = 0, 0, {}
    tick = time.perf_counter()
    while step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(transformer):
                frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1], fp32
                with torch.no_grad():
                    video = frames.to(weight_dtype).permute(0, 2, 1, 3, 4)
                    latents = vae.encode(video).latent_dist.sample() * vae.config.scaling_factor
                    latents = latents.permute(0, 2, 1, 3, 4).to(weight_dtype)  # [B, F', C, H', W']

                    # VideoREPA: teacher tokens of the same clips (fp32 pixels, teacher at --teacher_dtype).
                    def teacher_tokens_of(indices):
                        pixels = prepare_teacher_pixels(frames[indices], need.image_size, dtype=teacher_dtype)
                        return encode_teacher(teacher, pixels, need.grid)

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

                with helper.capture():  # VideoREPA: keep block --align_layer's tokens of this forward
                    model_output = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds,
                                               timestep=timesteps, image_rotary_emb=rope, return_dict=False)[0]
                    with accelerator.autocast():
                        loss_trd = helper(teacher_tokens, noisy.shape)  # VideoREPA
                model_pred = scheduler.get_velocity(model_output, noisy, timesteps)
                weights = 1.0 / (1.0 - scheduler.alphas_cumprod.to(device)[timesteps].float())
                per_sample = ((model_pred.float() - latents.float()) ** 2).reshape(bsz, -1).mean(dim=1)
                loss_diffusion = (weights * per_sample).mean()
                loss = loss_diffusion + args.trd_weight * loss_trd  # VideoREPA
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_projector = _grad_norm(helper.projector.parameters())
                    grad_downsampler = _grad_norm(helper.downsampler.parameters())
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                lr_scheduler.step()
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
                    save_checkpoint(accelerator, transformer, helper, args, step)
                tick = time.perf_counter()
            if step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()
    save_checkpoint(accelerator, transformer, helper, args, step)
    # Per-process fingerprint of the trained weights: equal on every rank when gradients were synchronised.
    checksum = sum(float(p.detach().double().sum()) for p in params)
    helper_checksum = sum(float(p.detach().double().sum()) for p in helper.parameters())
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "trainable_checksum": checksum,
        "helper_checksum": helper_checksum, "steps": step}))
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last


if __name__ == "__main__":
    main()
