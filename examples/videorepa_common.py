"""What the VideoREPA finetuning examples share (CogVideoX in cogvideox/, Wan in wan/): flags, tiny assets,
data loader, optimizer schedule, teacher setup, metrics and the end-of-run fingerprint.

Each training script keeps what differs per model: loading the transformer, VAE and text encoder, the
diffusion loss, the latent layout. The rendered physics clips and the tiny VideoMAEv2 teacher come from
cogvideox/tiny.py, the clip loading from cogvideox/data.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

import torch

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
try:
    import vrepa_kernels  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(EXAMPLES.parent))

from cogvideox.data import FRAME_SAMPLING, RESIZE, ClipDataset, collate  # noqa: E402
from cogvideox.tiny import TINY_TEACHER, write_tiny_dataset, write_tiny_teacher  # noqa: E402

from vrepa_kernels.integrations.videomae import (  # noqa: E402
    TeacherTokenCache,
    encode_teacher,
    load_videomae_teacher,
    prepare_teacher_pixels,
    teacher_fingerprint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags both examples take (model paths, sizes and defaults are the scripts' own)."""
    p.add_argument("--tiny", action="store_true", help="offline default: tiny random models on rendered clips")
    p.add_argument("--teacher_ckpt", type=str, default=None, help="local VideoMAEv2 checkpoint (.pth, official layout)")
    p.add_argument("--data_root", type=str, default=None,
                   help="folder with --caption_column and --video_column files (diffusers example layout)")
    p.add_argument("--caption_column", type=str, default="prompts.txt")
    p.add_argument("--video_column", type=str, default="videos.txt")
    p.add_argument("--frame_sampling", choices=FRAME_SAMPLING, default="stride",
                   help="stride: VideoREPA's every (n // num_frames)-th frame, short clips padded; linspace: "
                        "spread over the whole clip (earlier default)")
    p.add_argument("--resize", choices=RESIZE, default="crop_bilinear",
                   help="crop_bilinear: VideoREPA's aspect crop then antialiased bilinear; bicubic_crop: earlier")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler", type=str, default="warmup_decay",
                   help="warmup_decay (VideoREPA's DeepSpeed WarmupDecayLR) or a diffusers schedule name, e.g. "
                        "constant_with_warmup")
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
    p.add_argument("--align_layers", "--align_layer", dest="align_layers", type=int, nargs="+", default=None,
                   help="block(s) to align, counted from 1; several get one projector each and their TRD losses "
                        "are averaged (e.g. --align_layers 8 16)")
    p.add_argument("--native_grid", action="store_true",
                   help="align at the student's own token grid (no stride-3 downsampler), teacher at the same "
                        "pixel size (not VideoREPA's recipe)")
    p.add_argument("--trd_weight", type=float, default=0.5)
    p.add_argument("--trd_margin", type=float, default=0.1)
    p.add_argument("--trd_relation", type=str, default="full", choices=["full", "spatial", "temporal"])
    p.add_argument("--projector_dim", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--trd_backend", type=str, default="auto", choices=["auto", "reference", "torch", "triton", "cuda"])
    p.add_argument("--teacher_dtype", choices=sorted(DTYPES), default="fp32",
                   help="VideoMAEv2 precision (VideoREPA: fp32); also the token cache's")
    p.add_argument("--teacher_cache_dir", type=str, default=None, help="cache teacher tokens here, once per clip")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--tiny_num_clips", type=int, default=8)


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace, full: Dict, tiny: Dict,
                required: List[str]) -> argparse.Namespace:
    """Fill the per-mode defaults, check the local paths and the 4k+1 frame count (both VAEs)."""
    for name, value in (tiny if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 2e-6
    if not args.tiny:
        missing = [f for f in required if getattr(args, f) is None]
        if missing:
            p.error(f"without --tiny, pass {', '.join('--' + m for m in missing)} (local paths)")
    if (args.num_frames - 1) % 4:
        p.error(f"--num_frames must be 4k+1 for the causal VAE (first frame alone, then 4 per latent frame), "
                f"got {args.num_frames}")
    if not isinstance(args.align_layers, list):
        args.align_layers = [args.align_layers]
    return args


def helper_align_layer(args):
    """``--align_layers`` as the helper takes it: an int for one layer (checkpoint config unchanged)."""
    return args.align_layers[0] if len(args.align_layers) == 1 else list(args.align_layers)


def warmup_decay_lambda(warmup_steps: int, total_steps: int, warmup_type: str = "log"):
    """LR factor of update k: DeepSpeed's WarmupDecayLR (VideoREPA's zero2.yaml), with its warm-up of at least 2
    steps: log(k + 1) / log(W) (or k / W) while k < W, then (T - k) / (T - W), 0 from the last step on."""
    warmup = max(2, int(warmup_steps))

    def factor(k: int) -> float:
        if k < warmup:
            return math.log(k + 1) / math.log(warmup) if warmup_type == "log" else k / warmup
        return max(0.0, (total_steps - k) / max(1.0, total_steps - warmup))

    return factor


def tiny_assets(args, accelerator):
    """(data root, teacher checkpoint): the rendered clips and random teacher under --tiny, else the given paths."""
    if not args.tiny:
        return Path(args.data_root), Path(args.teacher_ckpt)
    root = Path(args.output_dir) / "tiny_assets"
    data_root = Path(args.data_root) if args.data_root else root / "data"
    teacher_path = Path(args.teacher_ckpt) if args.teacher_ckpt else root / "videomae_v2_tiny.pth"
    if accelerator.is_main_process:
        if not args.data_root:
            write_tiny_dataset(data_root, args.tiny_num_clips, args.num_frames, args.height, args.width, args.seed)
        if not args.teacher_ckpt:
            write_tiny_teacher(teacher_path, args.seed)
    accelerator.wait_for_everyone()
    return data_root, teacher_path


def teacher_dim_of(args) -> int:
    return TINY_TEACHER["hidden_size"] if args.tiny else 768  # VideoMAEv2 ViT-B


class Teacher:
    """The frozen VideoMAEv2 at the geometry the helper needs, with the optional on-disk token cache."""

    def __init__(self, args, helper, latent_shape, teacher_path: Path, device):
        self.need = helper.teacher_input(latent_shape)
        self.dtype = DTYPES[args.teacher_dtype]
        # SDPA: at native-grid sizes (tens of thousands of tokens) eager attention would not fit.
        self.model = load_videomae_teacher(teacher_path, num_frames=self.need.num_frames,
                                           image_size=self.need.image_size, device=device, dtype=self.dtype,
                                           attn_implementation="sdpa")
        if self.model.config.hidden_size != helper.teacher_dim:
            raise ValueError(f"{teacher_path} has width {self.model.config.hidden_size}, expected {helper.teacher_dim}")
        self.cache = None
        if args.teacher_cache_dir:
            fingerprint = teacher_fingerprint(teacher_path, self.need.num_frames, self.need.image_size,
                                              extra=args.teacher_dtype)
            self.cache = TeacherTokenCache(args.teacher_cache_dir, fingerprint, dtype=self.dtype)

    @torch.no_grad()
    def tokens(self, frames: torch.Tensor, keys, device) -> torch.Tensor:
        """Teacher tokens of ``[B, F, 3, H, W]`` clips in [-1, 1] (fp32 pixels, teacher at --teacher_dtype)."""
        def compute(indices):
            pixels = prepare_teacher_pixels(frames[indices], self.need.image_size, dtype=self.dtype)
            return encode_teacher(self.model, pixels, self.need.grid)

        if self.cache is None:
            return compute(list(range(frames.shape[0])))
        return self.cache.get_or_compute(keys, compute, device=device)

    def describe(self) -> str:
        n = self.need
        return f"{n.num_frames} frames at {n.image_size[0]}x{n.image_size[1]}, grid {'x'.join(map(str, n.grid))}"


def make_optimizer_and_loader(args, params, data_root: Path):
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = ClipDataset(data_root, args.caption_column, args.video_column, args.num_frames, args.height,
                          args.width, args.frame_sampling, args.resize)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} clips give no full batch of --train_batch_size={args.train_batch_size}")
    return optimizer, loader


def make_lr_scheduler(args, optimizer, loader, num_processes: int):
    """Sets args.max_train_steps from the epochs if unset; the schedule is stepped once per optimizer step by the
    caller (not through accelerator.prepare, which steps it per process)."""
    from diffusers.optimization import get_scheduler

    steps_per_epoch = math.ceil(len(loader) / num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    if args.lr_scheduler == "warmup_decay":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_decay_lambda(args.lr_warmup_steps, args.max_train_steps, args.lr_warmup_type))
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                         num_training_steps=args.max_train_steps)


def set_trainable(transformer, args, lora_targets) -> None:
    """LoRA adapters or the whole transformer; trainable weights kept fp32 under mixed precision (as VideoREPA)."""
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                           target_modules=list(lora_targets)))
    else:
        transformer.requires_grad_(True)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()


def grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def head_grad_norms(helper):
    """Gradient norms of the helper's projectors and of its downsamplers (0 on the native grid: none)."""
    heads = helper.heads()
    return (grad_norm([p for proj, _ in heads for p in proj.parameters()]),
            grad_norm([p for _, down in heads for p in down.parameters()]))


def step_record(accelerator, step, epoch, loss, loss_diffusion, loss_trd, lr, step_time, grad_norms) -> Dict:
    """One metrics.jsonl row; losses averaged over processes. NaN/Inf are written as they are."""
    losses = accelerator.reduce(torch.stack([loss.detach().float(), loss_diffusion.detach().float(),
                                             loss_trd.detach().float()]), reduction="mean")
    total, projector, downsampler = grad_norms
    return {"step": step, "loss": float(losses[0]), "loss_diffusion": float(losses[1]),
            "loss_trd": float(losses[2]), "lr": float(lr), "step_time_s": step_time, "grad_norm": float(total),
            "grad_norm_projector": projector, "grad_norm_downsampler": downsampler, "epoch": epoch}


def save_helper(helper, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": helper.config_dict(), "state_dict": helper.state_dict()}, out / "videorepa_helper.pt")


def write_fingerprint(accelerator, out_dir: Path, params, helper, step: int) -> None:
    """Per-process fingerprint of the trained weights: equal on every rank when gradients were synchronised."""
    checksum = sum(float(p.detach().double().sum()) for p in params)
    helper_checksum = sum(float(p.detach().double().sum()) for p in helper.parameters())
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "trainable_checksum": checksum,
        "helper_checksum": helper_checksum, "steps": step}))


def make_accelerator(args):
    """The Accelerator (CPU when no GPU), seeded; the weight dtype of its mixed precision; the output folder."""
    import accelerate
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    accelerator = accelerate.Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    return accelerator, weight_dtype, out_dir


def train(args, accelerator, transformer, helper, optimizer, lr_scheduler, loader, params, losses_of, save) -> Dict:
    """The shared loop: ``losses_of(batch) -> (loss_diffusion, loss_trd)`` runs one forward (the script's own
    diffusion loss, the helper's TRD loss); ``save(step)`` writes a checkpoint. Writes metrics.jsonl and the
    per-rank fingerprint; returns the last metrics row."""
    import time

    from tqdm.auto import tqdm

    out_dir = Path(args.output_dir)
    metrics_file = open(out_dir / "metrics.jsonl", "w") if accelerator.is_main_process else None
    progress = tqdm(total=args.max_train_steps, desc="steps", disable=not accelerator.is_local_main_process)
    step, epoch, last = 0, 0, {}
    tick = time.perf_counter()
    while step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(transformer):
                loss_diffusion, loss_trd = losses_of(batch)
                loss = loss_diffusion + args.trd_weight * loss_trd  # VideoREPA
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_projector, grad_downsampler = head_grad_norms(helper)
                    total = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                lr_scheduler.step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                step += 1
                last = step_record(accelerator, step, epoch, loss, loss_diffusion, loss_trd,
                                   lr_scheduler.get_last_lr()[0], time.perf_counter() - tick,
                                   (total, grad_projector, grad_downsampler))
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{last['loss']:.4f}", trd=f"{last['loss_trd']:.4f}")
                if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
                    save(step)
                tick = time.perf_counter()
            if step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()
    save(step)
    write_fingerprint(accelerator, out_dir, params, helper, step)
    if metrics_file is not None:
        metrics_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last


class TextEmbeddings:
    """Prompt states of a local T5-family encoder (CogVideoX: T5EncoderModel, Wan: UMT5EncoderModel).

    ``zero_padding``: states past each prompt's length set to 0 (WanPipeline); otherwise the encoder sees the
    padded ids without a mask (CogVideoXPipeline).
    """

    def __init__(self, model_path: str, encoder_class: str, seq_len: int, device, dtype, zero_padding: bool):
        from vrepa_kernels.integrations import require

        transformers = require("transformers", "the text encoder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer")
        self.encoder = getattr(transformers, encoder_class).from_pretrained(model_path, subfolder="text_encoder")
        self.encoder.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.seq_len, self.zero_padding = seq_len, zero_padding

    @torch.no_grad()
    def __call__(self, prompts, device, dtype):
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.seq_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens.input_ids.to(device)
        if not self.zero_padding:
            return self.encoder(ids)[0].to(dtype=dtype)
        mask = tokens.attention_mask.to(device)
        states = self.encoder(ids, mask).last_hidden_state
        return (states * mask.unsqueeze(-1).to(states.dtype)).to(dtype=dtype)


def save_checkpoint(accelerator, transformer, helper, args, step: int, pipeline: str) -> Path:
    """checkpoint-<step>/: the helper, and the LoRA weights (through diffusers' ``pipeline`` class) or the
    whole transformer."""
    out = Path(args.output_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process:
        save_helper(helper, out)
        model = accelerator.unwrap_model(transformer)
        if args.use_lora:
            import diffusers
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(model)
            getattr(diffusers, pipeline).save_lora_weights(out, transformer_lora_layers=lora)
        else:
            model.save_pretrained(out / "transformer")
    accelerator.wait_for_everyone()
    return out


def build_helper_and_teacher(args, transformer, latent_shape, teacher_path: Path, device):
    """The VideoREPA helper (one projector + downsampler per --align_layers block) and the frozen teacher at the
    geometry it needs for latents of ``latent_shape`` (in the transformer's layout)."""
    from vrepa_kernels.integrations.diffusers import VideoREPA

    helper = VideoREPA(transformer, teacher_dim=teacher_dim_of(args), align_layer=helper_align_layer(args),
                       projector_dim=args.projector_dim, margin=args.trd_margin, relation=args.trd_relation,
                       native_grid=args.native_grid, backend=args.trd_backend).to(device)
    return helper, Teacher(args, helper, latent_shape, teacher_path, device)
