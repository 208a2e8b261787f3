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


def _load_script():
    spec = importlib.util.spec_from_file_location("train_cogvideox_videorepa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    _metrics(out_dir, 2)
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
          "--trd_relation", "temporal", "--teacher_cache_dir", str(cache), "--no-gradient_checkpointing"])
    _metrics(out_dir, 2)
    assert (out_dir / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list(cache.rglob("*.pt"))) == 4  # 2 steps x batch 2, one file per clip


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


def test_dispatch_attention_processor_matches_diffusers_processor():
    import diffusers
    from diffusers.models.attention_dispatch import AttentionBackendName

    script = _load_script()
    torch.manual_seed(0)
    config = dict(script.TINY_TRANSFORMER, attention_head_dim=16)  # 3-D RoPE splits the head dim 4:6:6
    transformer = diffusers.CogVideoXTransformer3DModel(
        **config, sample_height=12, sample_width=18, sample_frames=9, use_rotary_positional_embeddings=True)
    latents = torch.randn(2, 3, 4, 12, 18)
    text = torch.randn(2, 8, 8)
    rope = script.rotary_embeddings(transformer.config, 96, 144, 3, 8, "cpu")
    kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([3, 900]),
                  image_rotary_emb=rope, return_dict=False)
    with torch.no_grad():
        expected = transformer(**kwargs)[0]
        transformer.set_attn_processor(script.DispatchCogVideoXAttnProcessor(AttentionBackendName.NATIVE))
        got = transformer(**kwargs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_backend_errors():
    import diffusers

    script = _load_script()
    transformer = diffusers.CogVideoXTransformer3DModel(**script.TINY_TRANSFORMER)
    with pytest.raises(ValueError, match="not one of diffusers' backends"):
        script.configure_attention(transformer, "no-such-backend")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match=r"vrepa-kernels\[flash\]"):
            script.configure_attention(transformer, "flash")


def test_rendered_balls_fall_and_stay_in_range():
    script = _load_script()
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
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--teacher_ckpt", "t", "--data_root", "d"])
    assert (args.align_layer, args.projector_dim, args.trd_weight, args.trd_margin) == (18, 2048, 0.5, 0.1)
    assert (args.height, args.width, args.num_frames, args.mixed_precision) == (480, 720, 49, "bf16")


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
