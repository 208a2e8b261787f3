"""README.md's "In another trainer" snippet, executed as written on tiny models: one process and two (gloo).

The snippet's code block is read from README.md and run with only its model-size constants swapped for tiny
ones (each must occur exactly once, so an edited README fails here). Each process then checks what the issue
asked for (issue 11): the helper's weights stay identical across ranks; save_state/load_state with
diffusers-style model hooks (which reject unknown models) reproduces the next step's loss; and, as a control,
the same training with the helper's gradient sync off lets the ranks drift apart.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=16,
                    tubelet_size=2)
# README constant -> tiny value. Latents 3x12x18 (9 frames at 96x144) align to 4x2x3: the teacher sees 8 frames
# at 32x48 with patch 16.
def _replacements(teacher_path, checkpoint_dir):
    return {
        "teacher_dim=768, align_layer=18": "teacher_dim=32, align_layer=2, projector_dim=16",
        "(1, 13, 16, 60, 90)": "(1, 3, 4, 12, 18)",
        '"vit_b_k710_dl_from_giant.pth"': repr(str(teacher_path)),
        'accelerator.save_state("checkpoint")': f"accelerator.save_state({str(checkpoint_dir)!r})",
    }


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### In another trainer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def split_snippet(code: str):
    """(setup, loop header, loop body, tail) of the snippet."""
    lines = code.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("for "))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" "))
    body = textwrap.dedent("\n".join(lines[start + 1:end]))
    return "\n".join(lines[:start]), lines[start], body, "\n".join(lines[end:])


# ------------------------------------------------------------------------------------------ worker (per process)
def _tiny_transformer(seed):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=3, sample_width=18, sample_height=12, sample_frames=9, patch_size=2,
        max_text_seq_length=8)


def _dataset(world):
    gen = torch.Generator().manual_seed(7)
    count = 2 * 3 * world  # 3 batches of 2 per rank
    frames = torch.randint(0, 256, (count, 9, 3, 24, 36), dtype=torch.uint8, generator=gen)
    latents = torch.randn(count, 3, 4, 12, 18, generator=gen)
    text = torch.randn(count, 8, 8, generator=gen)
    return torch.utils.data.TensorDataset(frames, latents, text)


def _diffusers_style_hooks(accelerator, model_cls):
    """The save/load hooks of diffusers' training scripts: any model they do not know is an error."""

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if not isinstance(accelerator.unwrap_model(model), model_cls):
                raise ValueError(f"unexpected save model: {model.__class__}")
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "transformer"))
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            model = models.pop()
            if not isinstance(accelerator.unwrap_model(model), model_cls):
                raise ValueError(f"unexpected save model: {model.__class__}")
            loaded = model_cls.from_pretrained(input_dir, subfolder="transformer")
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def _digest(module):
    data = b"".join(p.detach().cpu().contiguous().numpy().tobytes() for p in module.parameters())
    return hashlib.sha256(data).hexdigest()


def worker(out_dir: Path) -> None:
    import diffusers
    import torch.nn.functional as F

    from vrepa_kernels.integrations.diffusers import VideoREPA
    from vrepa_kernels.integrations.videomae import random_videomae_v2_checkpoint

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    teacher_path = out_dir / "tiny_teacher.pth"
    if rank == 0:
        torch.save(random_videomae_v2_checkpoint(TINY_TEACHER, seed=3, source_num_frames=4, source_image_size=32),
                   teacher_path)
    code = readme_snippet()
    for old, new in _replacements(teacher_path, out_dir / "checkpoint").items():
        assert code.count(old) == 1, f"README snippet no longer contains {old!r} exactly once"
        code = code.replace(old, new)
    setup, loop, body, tail = split_snippet(code)
    scheduler = diffusers.CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                timestep_spacing="trailing")

    def diffusion_loss(pred, latents, noisy_latents, t):  # diffusers' CogVideoX loss, unweighted
        return F.mse_loss(scheduler.get_velocity(pred, noisy_latents, t).float(), latents.float())

    def namespace(seed):  # the trainer's own objects; init differs per rank (prepare and the helper broadcast)
        return {"transformer": _tiny_transformer(seed), "noise_scheduler": scheduler, "diffusion_loss": diffusion_loss,
                "loader": torch.utils.data.DataLoader(_dataset(world), batch_size=2, shuffle=False)}

    ns = namespace(100 + rank)
    exec(setup, ns)  # noqa: S102 - the README's code, as written
    accelerator = ns["accelerator"]
    accelerator.wait_for_everyone()
    _diffusers_style_hooks(accelerator, diffusers.CogVideoXTransformer3DModel)
    exec(loop + "\n" + textwrap.indent(body, "    ") + "\n" + tail, ns)  # noqa: S102
    helper = ns["helper"]
    result = {"rank": rank, "world": world, "helper": _digest(helper),
              "transformer": _digest(accelerator.unwrap_model(ns["transformer"])),
              "distributed": str(accelerator.distributed_type), "helper_ddp": helper._ddp is not None}

    # The next step after the checkpoint, then the same step after load_state into fresh objects.
    step_batch = [t[2 * rank:2 * rank + 2] for t in _dataset(world).tensors]

    def next_step(space):
        space["frames"], space["latents"], space["text"] = step_batch
        exec(body, space)  # noqa: S102
        return float(space["loss_trd"]), float(diffusion_loss(space["pred"], space["latents"],
                                                               space["noisy_latents"], space["t"]))

    result["next"] = next_step(ns)
    fresh = namespace(200 + rank)
    exec(setup, fresh)  # noqa: S102
    _diffusers_style_hooks(fresh["accelerator"], diffusers.CogVideoXTransformer3DModel)
    fresh["accelerator"].load_state(str(out_dir / "checkpoint"))
    result["resumed_helper_matches"] = _digest(fresh["helper"]) == result["helper"]
    result["resumed"] = next_step(fresh)

    # Control: identical init on every rank, gradient sync off -> the ranks drift apart on their own data.
    control = VideoREPA(_tiny_transformer(5), teacher_dim=32, align_layer=2, projector_dim=16, sync_gradients=False)
    opt = torch.optim.AdamW(control.parameters(), lr=1e-3)
    hidden = torch.randn(2, 3 * 6 * 9, 16, generator=torch.Generator().manual_seed(rank))
    loss = control.trd(control.align(hidden, (2, 3, 4, 12, 18)), torch.randn(2, 4, 2, 3, 32))
    loss.backward()
    opt.step()
    result["control"] = _digest(control)
    # A helper the caller wrapped in DDP (e.g. passed to accelerator.prepare) does not wrap itself a second time.
    if world > 1:
        transformer = _tiny_transformer(6)
        wrapped_helper = VideoREPA(transformer, teacher_dim=32, align_layer=2, projector_dim=16)
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped_helper)
        latents = torch.randn(2, 3, 4, 12, 18)
        with wrapped_helper.capture():
            transformer(hidden_states=latents, encoder_hidden_states=torch.randn(2, 8, 8),
                        timestep=torch.tensor([1, 2]))
            ddp(torch.randn(2, 4, 2, 3, 32), latents.shape).backward()
        result["outer_ddp_only"] = wrapped_helper._ddp is None
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ tests
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir, processes):
    # ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets: without it accelerate stays single-process
    # under torchrun on a machine without GPUs (DistributedType.NO, every rank its own main process).
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    env.pop("TRITON_INTERPRET", None)
    if processes == 1:
        cmd = [sys.executable, __file__, str(out_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(out_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(processes)]


def test_readme_snippet_parses_into_setup_loop_and_tail():
    setup, loop, body, tail = split_snippet(readme_snippet())
    assert "accelerator.prepare(transformer, optimizer, loader)" in setup and "register_for_checkpointing" in setup
    assert loop.startswith("for frames, latents, text in loader")
    assert "with helper.capture():" in body and "optimizer.step()" in body
    assert tail.startswith("accelerator.save_state(")


def test_readme_precomputed_latents_recipe(tmp_path):
    """The README's TeacherTokenCache recipe, run as written on a tiny teacher."""
    from vrepa_kernels.integrations.diffusers import VideoREPA
    from vrepa_kernels.integrations.videomae import (
        encode_teacher,
        load_videomae_teacher,
        prepare_teacher_pixels,
        random_videomae_v2_checkpoint,
    )

    pytest.importorskip("diffusers")
    section = (REPO / "README.md").read_text().split("### In another trainer", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    code = textwrap.dedent(blocks[1])
    path = tmp_path / "tiny.pth"
    torch.save(random_videomae_v2_checkpoint(TINY_TEACHER, seed=3, source_num_frames=4, source_image_size=32), path)
    for old, new in {'"vit_b_k710_dl_from_giant.pth"': repr(str(path)),
                     '"teacher_tokens"': repr(str(tmp_path / "teacher_tokens"))}.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    helper = VideoREPA(_tiny_transformer(0), teacher_dim=32, align_layer=2, projector_dim=16)
    need = helper.teacher_input((1, 3, 4, 12, 18))
    teacher = load_videomae_teacher(path, num_frames=need.num_frames, image_size=need.image_size)
    frames = torch.rand(1, 9, 3, 24, 36) * 2 - 1
    ns = {"torch": torch, "need": need, "teacher": teacher, "frames": frames, "key": "clip-0",
          "batch_keys": ["clip-0", "clip-0"], "accelerator": type("A", (), {"device": torch.device("cpu")})(),
          "encode_teacher": encode_teacher, "prepare_teacher_pixels": prepare_teacher_pixels}
    exec(code, ns)  # noqa: S102
    expected = encode_teacher(teacher, prepare_teacher_pixels(frames, need.image_size))
    assert ns["tokens"].shape == (2, *need.grid, 32) and ns["tokens"].dtype == torch.float32
    torch.testing.assert_close(ns["tokens"][1], expected[0])
    assert len(list((tmp_path / "teacher_tokens").rglob("*.pt"))) == 1


def test_readme_snippet_one_process(tmp_path):
    (result,) = _launch(tmp_path, 1)
    assert result["world"] == 1 and not result["helper_ddp"]
    assert result["resumed_helper_matches"]
    assert result["next"][0] > 0
    assert result["resumed"] == pytest.approx(result["next"], rel=1e-6)


def test_readme_snippet_two_processes_gloo(tmp_path):
    ranks = _launch(tmp_path, 2)
    assert [r["world"] for r in ranks] == [2, 2] and all(r["helper_ddp"] for r in ranks)
    assert all(r["distributed"].endswith("MULTI_CPU") for r in ranks)
    # Different init and data per rank, yet identical projector, downsampler and transformer after 3 steps.
    assert ranks[0]["helper"] == ranks[1]["helper"]
    assert ranks[0]["transformer"] == ranks[1]["transformer"]
    for r in ranks:
        assert r["resumed_helper_matches"]
        assert r["next"][0] > 0
        assert r["resumed"] == pytest.approx(r["next"], rel=1e-6)
    assert ranks[0]["next"] != ranks[1]["next"]  # each rank's own batch
    assert ranks[0]["control"] != ranks[1]["control"]  # without the helper's sync they drift apart
    assert all(r["outer_ddp_only"] for r in ranks)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
