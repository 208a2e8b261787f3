#!/usr/bin/env python
"""Time a VideoREPA training step of CogVideoX-2B (random weights, no download) with the naive and fused TRD.

    python examples/cogvideox/bench_train_step.py                       # 49x480x720, bf16, on a GPU
    python examples/cogvideox/bench_train_step.py --sweep               # also: largest grid each TRD trains
    python examples/cogvideox/bench_train_step.py --tiny --device cpu   # smoke test of this script

One step = VideoREPA's: transformer forward with gradient checkpointing under bf16 autocast, v-prediction loss
weighted by 1/(1 - alpha_bar), TRD through the VideoREPA helper on block 18, backward, AdamW step. The teacher
forward is not timed (its tokens are random, as if read from the teacher-token cache). Three variants share
the model: no TRD (the diffusion step alone), TRD with backend="reference" (naive, materialising B x N x N)
and TRD with backend="auto" (fused). Reported: median step time, the TRD share of the step
((t_trd - t_none) / t_trd), peak memory, and with --sweep the largest aligned token grid each variant trains.
Results go to --out as JSON and Markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import vrepa_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vrepa_kernels.integrations import require  # noqa: E402
from vrepa_kernels.integrations.diffusers import VideoREPA, aligned_grid, student_token_grid  # noqa: E402

# CogVideoX-2B is diffusers' CogVideoXTransformer3DModel default configuration (30 blocks of 30 x 64 heads).
COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                    text_embed_dim=4096, num_layers=30, patch_size=2, max_text_seq_length=226, time_embed_dim=512)
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_embed_dim=8,
            num_layers=2, patch_size=2, max_text_seq_length=8, time_embed_dim=2)
VARIANTS = {"none": None, "naive": "reference", "fused": "auto"}
# (pixel frames, height, width, spatial_downsample): aligned grids from VideoREPA's 3,600 tokens upwards.
SWEEP = [(49, 480, 720, 3), (49, 480, 720, 1), (81, 480, 720, 1), (49, 768, 1360, 1), (81, 768, 1360, 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke test on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=None, help="pixel frames (default 49; tiny 9)")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny 96)")
    p.add_argument("--width", type=int, default=None, help="default 720 (tiny 144)")
    p.add_argument("--batch", type=int, default=1, help="per-GPU batch (VideoREPA trains 4 per GPU)")
    p.add_argument("--align_layer", type=int, default=None, help="default 18 (tiny 1)")
    p.add_argument("--teacher_dim", type=int, default=768)
    p.add_argument("--train", choices=["lora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", default="none,naive,fused")
    p.add_argument("--sweep", action="store_true", help="find the largest aligned grid each TRD variant trains")
    p.add_argument("--out", default="benchmarks/results/cogvideox_train_step")
    args = p.parse_args(argv)
    for name, full, tiny in (("frames", 49, 9), ("height", 480, 96), ("width", 720, 144), ("align_layer", 18, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def build(args, device):
    diffusers = require("diffusers", "the CogVideoX benchmark")
    config = dict(TINY if args.tiny else COGVIDEOX_2B)
    config.update(sample_height=args.height // 8, sample_width=args.width // 8, sample_frames=args.frames)
    with torch.device(device):
        transformer = diffusers.CogVideoXTransformer3DModel(**config)
    transformer.to(dtype=torch.bfloat16)
    if args.train == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    transformer.enable_gradient_checkpointing()
    scheduler = diffusers.CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    return transformer, scheduler


def make_helper(transformer, args, backend, spatial_downsample, device):
    teacher_dim = 32 if args.tiny else args.teacher_dim
    return VideoREPA(transformer, teacher_dim=teacher_dim, align_layer=args.align_layer,
                     projector_dim=64 if args.tiny else 2048, backend=backend or "auto",
                     spatial_downsample=spatial_downsample).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(transformer, scheduler, args, variant, frames, height, width, spatial_downsample, device,
                 warmup=None, iters=None):
    """Median step time (s), peak memory (bytes) and the aligned grid of one variant at one geometry."""
    backend = VARIANTS[variant]
    helper = make_helper(transformer, args, backend, spatial_downsample, device)
    config = transformer.config
    latent = (args.batch, (frames - 1) // 4 + 1, config.in_channels, height // 8, width // 8)
    grid = aligned_grid(student_token_grid(latent, config.patch_size), spatial_downsample=spatial_downsample)
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(*latent, generator=gen).to(device, torch.bfloat16)
    text = torch.randn(args.batch, config.max_text_seq_length, config.text_embed_dim, generator=gen).to(
        device, torch.bfloat16)
    teacher = torch.randn(args.batch, math.prod(grid), helper.teacher_dim, generator=gen).to(device, torch.bfloat16)
    params = helper.trainable_parameters(transformer) if backend else [
        p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    alphas = scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        timesteps = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = scheduler.add_noise(latents, torch.randn_like(latents), timesteps)
        with autocast, helper.capture():
            out = transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=timesteps,
                              return_dict=False)[0]
            loss_trd = helper(teacher, noisy.shape) if backend else None
        pred = scheduler.get_velocity(out, noisy, timesteps)
        weights = 1.0 / (1.0 - alphas[timesteps].float())
        loss = (weights * ((pred.float() - latents.float()) ** 2).reshape(args.batch, -1).mean(1)).mean()
        if loss_trd is not None:
            loss = loss + 0.5 * loss_trd
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(args.warmup if warmup is None else warmup):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters if iters is None else iters):
            start = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{variant}: non-finite loss {loss.item()}")
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return {"step_s": statistics.median(times), "peak_bytes": peak, "grid": list(grid),
                "tokens": math.prod(grid)}
    finally:
        helper.remove()
        optimizer.state.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    transformer, scheduler = build(args, device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "model": "tiny" if args.tiny else "CogVideoX-2B (random weights)",
              "train": args.train, "batch": args.batch, "geometry": [args.frames, args.height, args.width],
              "results": {}, "sweep": {}}
    for variant in variants:
        report["results"][variant] = time_variant(transformer, scheduler, args, variant, args.frames, args.height,
                                                  args.width, 3, device)
        print(variant, report["results"][variant], flush=True)
    base = report["results"].get("none")
    for variant, row in report["results"].items():
        if base and variant != "none":
            row["trd_share"] = (row["step_s"] - base["step_s"]) / row["step_s"]
    if args.sweep:
        for variant in [v for v in variants if v != "none"]:
            largest = None
            for frames, height, width, down in SWEEP:
                try:
                    row = time_variant(transformer, scheduler, args, variant, frames, height, width, down, device,
                                       warmup=1, iters=1)
                except (RuntimeError, ValueError) as err:
                    if not _is_oom(err):
                        raise
                    report["sweep"].setdefault(variant + "_oom_at", [frames, height, width, down])
                    break
                largest = {"geometry": [frames, height, width, down], **row}
                print("sweep", variant, largest, flush=True)
            report["sweep"][variant] = largest
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else device.type
    (out / f"train_step_{tag}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# VideoREPA training step, {report['model']}, {report['device']}", "",
             f"batch {args.batch}, {args.frames}x{args.height}x{args.width}, {args.train}, bf16 autocast, "
             f"gradient checkpointing, torch {torch.__version__}", "",
             "| TRD | step (s) | TRD share | peak memory (GiB) | aligned grid |", "| --- | --- | --- | --- | --- |"]
    for variant, row in report["results"].items():
        peak = f"{row['peak_bytes'] / 2**30:.2f}" if row["peak_bytes"] else "n/a"
        share = f"{row['trd_share']:.1%}" if "trd_share" in row else "-"
        lines.append(f"| {variant} | {row['step_s']:.3f} | {share} | {peak} | {'x'.join(map(str, row['grid']))} |")
    (out / f"train_step_{tag}.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
