"""The Wan example on its tiny offline default (CPU): one short 2-process LoRA run with two aligned layers;
its flags and noise schedule."""
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
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "wan" / "train_wan_videorepa.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("wan_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_lora_run_with_two_aligned_layers_on_two_processes(tmp_path):
    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    # On a machine without GPUs, --multi_gpu makes accelerate start torchrun (gloo), as in the CogVideoX test.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(SCRIPT),
           "--tiny", "--max_train_steps", "2", "--output_dir", str(out_dir),
           "--use_lora", "--rank", "4", "--lora_alpha", "4", "--align_layers", "1", "2",
           "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert "WanTransformer3DModel block(s) [1, 2]" in out.stdout
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "loss_diffusion", "loss_trd", "lr", "step_time_s", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
        assert row["loss_trd"] > 0 and row["loss_diffusion"] > 0 and row["step_time_s"] > 0
        assert row["grad_norm_projector"] > 0 and row["grad_norm_downsampler"] > 0
        assert row["loss"] == pytest.approx(row["loss_diffusion"] + 0.5 * row["loss_trd"], rel=1e-5)
    assert [r["lr"] for r in rows] == [pytest.approx(1e-4 / 4), pytest.approx(2e-4 / 4)]
    ckpt = out_dir / "checkpoint-2"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    saved = torch.load(ckpt / "videorepa_helper.pt", weights_only=True)
    assert saved["config"]["align_layer"] == [1, 2] and saved["config"]["latent_layout"] == "BCFHW"
    assert {"projectors.0.0.weight", "projectors.1.0.weight", "downsamplers.1.weight"} <= set(saved["state_dict"])
    # Each rank saw other clips: equal weights mean the LoRA and both layers' heads were all-reduced.
    ranks = [json.loads((out_dir / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["trainable_checksum"] == ranks[1]["trainable_checksum"]
    assert ranks[0]["helper_checksum"] == ranks[1]["helper_checksum"]
    # the rendered clips of the CogVideoX example's tiny module
    assert len((out_dir / "tiny_assets" / "data" / "videos.txt").read_text().split()) == 8


def test_arguments_and_flow_matching_schedule():
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", "x"])
    with pytest.raises(SystemExit):
        script.parse_args(["--tiny", "--num_frames", "80"])
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--teacher_ckpt", "t", "--data_root", "d",
                              "--native_grid"])
    assert (args.height, args.width, args.num_frames, args.mixed_precision) == (480, 832, 81, "bf16")
    assert (args.align_layers, args.native_grid, args.flow_shift, args.max_text_len) == ([18], True, 5.0, 512)
    u = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(script.shifted_sigmas(u, 1.0), u)
    torch.testing.assert_close(script.shifted_sigmas(u, 5.0), torch.tensor([0.0, 2.5 / 3.0, 1.0]))
