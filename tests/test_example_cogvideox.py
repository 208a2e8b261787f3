"""The CogVideoX example end to end on its tiny offline default (CPU), including a 2-process accelerate run."""
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "cogvideox" / "train_cogvideox_videorepa.py"
METRIC_KEYS = {"step", "loss", "loss_diffusion", "loss_trd", "lr", "step_time_s"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return env


def _load_script(name="train_cogvideox_videorepa"):
    """The training script, or one of the modules beside it (tiny, data, attention)."""
    spec = importlib.util.spec_from_file_location(f"cogvideox_example_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _run(cmd, timeout=300):
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def _metrics(out_dir, steps):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert METRIC_KEYS <= set(row)
        for key in ("loss", "loss_diffusion", "loss_trd", "lr", "step_time_s", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
        assert row["loss_trd"] > 0
        assert row["grad_norm_projector"] > 0 and row["grad_norm_downsampler"] > 0
        assert row["loss"] == pytest.approx(row["loss_diffusion"] + 0.5 * row["loss_trd"], rel=1e-5)
    return rows


def test_tiny_full_finetuning_two_steps(tmp_path):
    out_dir = tmp_path / "run"
    _run([sys.executable, str(SCRIPT), "--tiny", "--max_train_steps", "2", "--output_dir", str(out_dir),
          "--lr_warmup_steps", "0", "--learning_rate", "1e-3"])
    rows = _metrics(out_dir, 2)
    # warmup_decay with --lr_warmup_steps 0 (DeepSpeed warms up over at least 2 steps): the first update runs at
    # lr 0, the second at log(2)/log(2) = 1 x lr; after the last step the lr is 0.
    assert [r["lr"] for r in rows] == [pytest.approx(1e-3), 0.0]
    ckpt = out_dir / "checkpoint-2"
    saved = torch.load(ckpt / "videorepa_helper.pt", weights_only=True)
    assert saved["config"]["align_layer"] == 1
    assert set(saved["state_dict"]) >= {"projector.0.weight", "downsampler.weight"}
    assert (ckpt / "transformer" / "config.json").is_file()
    # The rendered dataset is in the diffusers example layout and the teacher in the official layout.
    data = out_dir / "tiny_assets" / "data"
    assert len((data / "videos.txt").read_text().split()) == 8
    raw = torch.load(out_dir / "tiny_assets" / "videomae_v2_tiny.pth", weights_only=True)
    assert "module.blocks.0.attn.qkv.weight" in raw["module"]


def test_tiny_lora_bf16_with_teacher_cache(tmp_path):
    out_dir, cache = tmp_path / "run", tmp_path / "cache"
    _run([sys.executable, str(SCRIPT), "--tiny", "--max_train_steps", "2", "--output_dir", str(out_dir),
          "--use_lora", "--rank", "4", "--lora_alpha", "4", "--mixed_precision", "bf16",
          "--trd_relation", "temporal", "--teacher_cache_dir", str(cache), "--no-gradient_checkpointing",
          # the example's earlier behaviour, each still reachable by a flag
          "--teacher_dtype", "bf16", "--frame_sampling", "linspace", "--resize", "bicubic_crop",
          "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4", "--adam_beta2", "0.95"])
    rows = _metrics(out_dir, 2)
    assert [r["lr"] for r in rows] == [pytest.approx(1e-4 * 1 / 4), pytest.approx(1e-4 * 2 / 4)]  # after steps 1, 2
    assert (out_dir / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    files = list(cache.rglob("*.pt"))
    assert len(files) == 4  # 2 steps x batch 2, one file per clip
    assert torch.load(files[0], weights_only=True)["tokens"].dtype == torch.bfloat16  # --teacher_dtype bf16


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(tmp_path):
    out_dir = tmp_path / "run"
    # On a machine without GPUs, --multi_gpu is what makes accelerate start torchrun; the script then picks gloo.
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_free_port()), str(SCRIPT), "--tiny", "--max_train_steps", "2",
          "--output_dir", str(out_dir), "--lr_warmup_steps", "0", "--learning_rate", "1e-3"], timeout=400)
    _metrics(out_dir, 2)
    ranks = [json.loads((out_dir / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    # Each rank saw other clips; equal weights after 2 steps mean the gradients were all-reduced.
    assert ranks[0]["trainable_checksum"] == ranks[1]["trainable_checksum"]
    assert ranks[0]["helper_checksum"] == ranks[1]["helper_checksum"]  # the helper synced its own gradients


def test_dispatch_attention_processor_matches_diffusers_processor():
    import diffusers
    from diffusers.models.attention_dispatch import AttentionBackendName

    script, tiny, attention = _load_script(), _load_script("tiny"), _load_script("attention")
    torch.manual_seed(0)
    config = dict(tiny.TINY_TRANSFORMER, attention_head_dim=16)  # 3-D RoPE splits the head dim 4:6:6
    transformer = diffusers.CogVideoXTransformer3DModel(
        **config, sample_height=12, sample_width=18, sample_frames=9, use_rotary_positional_embeddings=True)
    latents = torch.randn(2, 3, 4, 12, 18)
    text = torch.randn(2, 8, 8)
    rope = script.rotary_embeddings(transformer.config, 96, 144, 3, 8, "cpu")
    kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([3, 900]),
                  image_rotary_emb=rope, return_dict=False)
    with torch.no_grad():
        expected = transformer(**kwargs)[0]
        transformer.set_attn_processor(attention.DispatchCogVideoXAttnProcessor(AttentionBackendName.NATIVE))
        got = transformer(**kwargs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_backend_errors():
    import diffusers

    tiny, attention = _load_script("tiny"), _load_script("attention")
    transformer = diffusers.CogVideoXTransformer3DModel(**tiny.TINY_TRANSFORMER)
    with pytest.raises(ValueError, match="not one of diffusers' backends"):
        attention.configure_attention(transformer, "no-such-backend")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match=r"vrepa-kernels\[flash\]"):
            attention.configure_attention(transformer, "flash")


def test_rendered_balls_fall_and_stay_in_range():
    script = _load_script("tiny")
    clip, prompt = script.render_bouncing_balls(num_frames=6, height=48, width=72, seed=3)
    assert clip.shape == (6, 3, 48, 72) and clip.min() >= -1 and clip.max() <= 1
    assert "bouncing" in prompt
    background = script.ball_background(48, 72)
    rows = torch.arange(48, dtype=torch.float32)
    heights = []
    for frame in clip[:3]:
        ball = ((frame - background).abs().sum(0) > 1e-6).float()
        assert ball.sum() > 0
        heights.append(float((ball.sum(1) * rows).sum() / ball.sum()))
    assert heights[0] < heights[1] < heights[2]  # under gravity the balls move down first


def test_arguments_need_local_paths_without_tiny():
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", "x"])
    with pytest.raises(SystemExit):
        script.parse_args(["--tiny", "--num_frames", "10"])
    paths = ["--pretrained_model_name_or_path", "m", "--teacher_ckpt", "t", "--data_root", "d"]
    args = script.parse_args(paths)
    assert (args.align_layers, args.projector_dim, args.trd_weight, args.trd_margin) == ([18], 2048, 0.5, 0.1)
    assert not args.native_grid
    assert script.parse_args(paths + ["--align_layers", "8", "16"]).align_layers == [8, 16]
    assert script.parse_args(paths + ["--align_layer", "5"]).align_layers == [5]  # the earlier flag
    assert (args.height, args.width, args.num_frames, args.mixed_precision) == (480, 720, 49, "bf16")
    # VideoREPA's recipe (finetune/configs/zero2.yaml, datasets/utils.py, datasets/data_transform.py, lora_trainer.py)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.adam_weight_decay) == (0.9, 0.999, 1e-8, 1e-4)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.lr_warmup_type) == ("warmup_decay", 100, "log")
    assert (args.frame_sampling, args.resize, args.teacher_dtype, args.max_grad_norm) == (
        "stride", "crop_bilinear", "fp32", 1.0)


def test_warmup_decay_is_deepspeeds_warmup_decay_lr():
    script = _load_script()
    total, warmup = 1000, 100
    factor = script.warmup_decay_lambda(warmup, total)
    # DeepSpeed's WarmupDecayLR gamma, written out: log warm-up, then linear decay to 0 at total_num_steps.
    assert factor(0) == 0.0 and factor(9) == pytest.approx(math.log(10) / math.log(100))
    assert factor(99) == pytest.approx(1.0) and factor(100) == 1.0
    assert factor(550) == pytest.approx(0.5) and factor(total - 1) == pytest.approx(1 / 900)
    assert factor(total) == 0.0 and factor(total + 5) == 0.0
    assert all(factor(k) >= factor(k + 1) for k in range(100, total))
    assert script.warmup_decay_lambda(warmup, total, "linear")(25) == 0.25


def test_frame_sampling_of_videorepa():
    data = _load_script("data")
    # every (n // num_frames)-th frame from frame 0 (finetune/datasets/utils.py)
    assert data.frame_indices(100, 49) == list(range(0, 98, 2))
    assert data.frame_indices(150, 49) == list(range(0, 147, 3))
    assert data.frame_indices(30, 49) == list(range(30)) + [29] * 19  # short clip: repeat the last frame
    assert data.frame_indices(100, 49, "linspace")[::48] == [0, 99]  # the earlier behaviour
    with pytest.raises(ValueError, match="needs at least num_frames=49"):
        data.frame_indices(30, 49, "linspace")
    with pytest.raises(ValueError, match="frame_sampling must be one of"):
        data.frame_indices(30, 49, "random")


def test_aspect_crop_then_antialiased_bilinear_resize(tmp_path):
    data = _load_script("data")
    frames = torch.randint(0, 256, (2, 3, 72, 128), generator=torch.Generator().manual_seed(0)).float()
    crop = data.crop_to_aspect(frames, 48, 72)  # 72x128 (16:9) to 2:3: keep the height, 108 columns from 10
    assert crop.shape[-2:] == (72, 108) and torch.equal(crop, frames[..., :, 10:118])
    assert data.crop_to_aspect(frames, 36, 128).shape[-2:] == (36, 128)  # wider target: keep the width
    # VideoREPA resizes 0..255 frames and maps to [-1, 1] after; the resize is linear, so the order is immaterial.
    theirs = F.interpolate(crop, size=(48, 72), mode="bilinear", align_corners=True, antialias=True) / 127.5 - 1
    ours = data.resize_clip(frames / 127.5 - 1, 48, 72)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert ours.min() >= -1 and ours.max() <= 1
    old = data.resize_clip(frames / 127.5 - 1, 48, 72, "bicubic_crop")
    assert old.shape == ours.shape and not torch.allclose(old, ours)
    # a short uint8 clip on disk: padded by its last frame
    clip = torch.randint(0, 256, (5, 72, 128, 3), dtype=torch.uint8)
    torch.save(clip, tmp_path / "short.pt")
    loaded = data.load_clip(tmp_path / "short.pt", 9, 48, 72)
    assert loaded.shape == (9, 3, 48, 72) and loaded.dtype == torch.float32
    assert all(torch.equal(loaded[i], loaded[4]) for i in range(5, 9)) and not torch.equal(loaded[3], loaded[4])


def test_train_step_benchmark_runs_on_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT.parent / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--iters", "1", "--out", str(tmp_path)])
    assert set(report["results"]) == {"none", "naive", "fused"}
    for variant, row in report["results"].items():
        assert row["step_s"] > 0 and row["grid"] == [4, 2, 3]
        assert ("trd_share" in row) == (variant != "none")
    assert (tmp_path / "train_step_tiny.json").is_file() and (tmp_path / "train_step_tiny.md").is_file()


def test_teacher_precision_measurement_on_the_tiny_teacher():
    precision = _load_script("teacher_precision")
    tiny = _load_script("tiny")
    result = precision.measure("tiny", tiny.TINY_TEACHER, 8, (32, 48))
    bf16, stored = result["bf16_teacher"], result["bf16_stored_tokens"]
    assert result["tokens"] == [4, 2, 3]
    assert 0 < stored["relative_error"] < bf16["relative_error"] < 0.05  # bf16 changes the tokens, a little
    assert 0 < bf16["gram_max_abs_diff"] < 0.1  # below the TRD margin
