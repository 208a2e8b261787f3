"""VideoREPA helper on a tiny diffusers CogVideoX, and the VideoMAEv2 teacher loader, on CPU."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from vrepa_kernels import trd_loss_reference  # noqa: E402
from vrepa_kernels.integrations import require  # noqa: E402
from vrepa_kernels.integrations.diffusers import VideoREPA, aligned_grid, student_token_grid  # noqa: E402
from vrepa_kernels.integrations.videomae import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherTokenCache,
    encode_teacher,
    load_videomae_teacher,
    prepare_teacher_pixels,
    random_videomae_v2_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Latents [B, F, C, H, W] = [2, 3, 4, 12, 18]; patch 2 -> 3x6x9 tokens -> aligned 4x2x3.
LATENT_SHAPE = (2, 3, 4, 12, 18)
ALIGNED = (4, 2, 3)
TEACHER_DIM = 24
TINY_TEACHER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8,
                    tubelet_size=2)


def tiny_transformer(num_layers=3, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                  text_embed_dim=8, num_layers=num_layers, sample_width=18, sample_height=12, sample_frames=9,
                  patch_size=2, max_text_seq_length=8)
    config.update(overrides)
    return diffusers.CogVideoXTransformer3DModel(**config)


def tiny_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(*LATENT_SHAPE, generator=gen)
    text = torch.randn(LATENT_SHAPE[0], 8, 8, generator=gen)
    teacher = torch.randn(LATENT_SHAPE[0], math.prod(ALIGNED), TEACHER_DIM, generator=gen)
    return latents, text, torch.tensor([10, 700]), teacher


def run(transformer, latents, text, timesteps):
    return transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timesteps, return_dict=False)[0]


# ------------------------------------------------------------------------------------------ optional extras
def test_importing_the_package_imports_no_optional_extra():
    code = ("import sys, vrepa_kernels, vrepa_kernels.integrations, vrepa_kernels.integrations.diffusers, "
            "vrepa_kernels.integrations.videomae; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_extra_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install vrepa-kernels\[diffusers\]"):
        require("transformers", "the teacher")
    with pytest.raises(ImportError, match=r"vrepa-kernels\[diffusers\]"):
        load_videomae_teacher(__file__)


# ------------------------------------------------------------------------------------------ geometry
def test_geometry_of_videorepa_cogvideox_setting():
    # 49 frames at 480x720 -> latents 13x60x90 -> tokens 13x30x45 -> aligned 24x10x15 (VideoMAEv2 on 48x160x240).
    grid = student_token_grid((4, 13, 16, 60, 90), patch_size=2)
    assert grid == (13, 30, 45)
    assert aligned_grid(grid) == (24, 10, 15)
    assert aligned_grid((5, 9, 12), drop_first_frame=False, temporal_upsample=1, spatial_downsample=3) == (5, 3, 4)
    assert student_token_grid((1, 4, 16, 8, 8), patch_size=2, patch_size_t=2) == (2, 4, 4)


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 4, 12, 17), "not divisible by the transformer's patch_size"),
    ((2, 3, 4, 12), "5-D shape"),
    ((2, 1, 4, 12, 18), "leaves none to align"),
    ((2, 3, 4, 12, 16), "not divisible by spatial_downsample=3"),
])
def test_unalignable_geometry_is_a_clear_error(shape, match):
    grid_fn = lambda: aligned_grid(student_token_grid(shape, patch_size=2))  # noqa: E731
    with pytest.raises(ValueError, match=match):
        grid_fn()


def test_align_layer_counts_from_one():
    with pytest.raises(TypeError, match="transformer_blocks"):
        VideoREPA(torch.nn.Linear(2, 2), TEACHER_DIM)
    transformer = tiny_transformer()
    with pytest.raises(ValueError, match="counts blocks from 1"):
        VideoREPA(transformer, TEACHER_DIM, align_layer=4, projector_dim=16)
    with pytest.raises(ValueError, match="align_layer must be >= 1"):
        VideoREPA(transformer, TEACHER_DIM, align_layer=0, projector_dim=16)
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16)
    seen = {}
    handle = transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    latents, text, timesteps, _ = tiny_inputs()
    with torch.no_grad(), helper.capture():
        run(transformer, latents, text, timesteps)
        assert helper.captured is seen["out"]  # the output of the 2nd block, transformer_blocks[1]
    handle.remove()
    helper.remove()


# ------------------------------------------------------------------------------------------ capture
def test_capture_shape_and_nothing_outside_capture():
    transformer = tiny_transformer()
    transformer.enable_gradient_checkpointing()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16)
    latents, text, timesteps, teacher = tiny_inputs()
    run(transformer, latents, text, timesteps)
    assert helper.captured is None
    with pytest.raises(RuntimeError, match="inside `with helper.capture"):
        helper(teacher, latents.shape)
    with helper.capture():
        with pytest.raises(RuntimeError, match="nothing was captured"):
            helper(teacher, latents.shape)
        out = run(transformer, latents, text, timesteps)
        assert helper.captured.shape == (2, 3 * 6 * 9, 16)  # [B, F*H'*W', heads*head_dim], text tokens excluded
        loss_trd = helper(teacher, latents.shape)
    assert helper.captured is None
    # The backward recomputes the checkpointed blocks outside capture(): the hook must stay silent.
    (out.square().mean() + loss_trd).backward()
    assert helper.captured is None


def test_second_forward_in_one_capture_is_an_error():
    transformer = tiny_transformer()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=1, projector_dim=16)
    latents, text, timesteps, _ = tiny_inputs()
    with torch.no_grad(), helper.capture():
        run(transformer, latents, text, timesteps)
        with pytest.raises(RuntimeError, match="ran twice inside one"):
            run(transformer, latents, text, timesteps)


def test_grid_mismatches_are_clear_errors():
    transformer = tiny_transformer()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=1, projector_dim=16)
    latents, text, timesteps, teacher = tiny_inputs()
    with torch.no_grad(), helper.capture():
        run(transformer, latents, text, timesteps)
        with pytest.raises(ValueError, match="give a 3x6x6 = 108 token grid"):
            helper(teacher, (2, 3, 4, 12, 12))
        with pytest.raises(ValueError, match=r"expected \(2, 24, 24\)"):
            helper(teacher[:, :12], latents.shape)
        with pytest.raises(ValueError, match="batch"):
            helper(teacher, (1, 3, 4, 12, 18))


# ------------------------------------------------------------------------------------------ loss and training
def _videorepa_alignment(helper, hidden, latent_shape):
    """VideoREPA's trainer, step by step: project every token, drop latent frame 0, x2 trilinear, stride-3 conv."""
    b, f, _, h, w = latent_shape
    p = helper.patch_size
    x = helper.projector(hidden).reshape(b, f, h // p, w // p, -1)[:, 1:]
    x = x.permute(0, 4, 1, 2, 3)
    x = F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="trilinear")
    b, c, f2, hh, ww = x.shape
    x = helper.downsampler(x.permute(0, 2, 1, 3, 4).reshape(b * f2, c, hh, ww))
    return x.reshape(b, f2, c, hh // 3, ww // 3).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("relation", ["full", "spatial", "temporal"])
def test_helper_trd_equals_reference_on_the_aligned_tokens(relation):
    transformer = tiny_transformer()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16, margin=0.05, relation=relation)
    latents, text, timesteps, teacher = tiny_inputs()
    with helper.capture():
        run(transformer, latents, text, timesteps)
        hidden = helper.captured
        loss = helper(teacher, latents.shape)
    aligned = helper.align(hidden, latents.shape)
    assert aligned.shape == (2, *ALIGNED, TEACHER_DIM)
    torch.testing.assert_close(aligned, _videorepa_alignment(helper, hidden, latents.shape), rtol=1e-5, atol=1e-6)
    expected = trd_loss_reference(aligned.flatten(2, 3), teacher.reshape(2, ALIGNED[0], -1, TEACHER_DIM),
                                  margin=0.05, relation=relation)
    assert loss.item() > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def _two_steps(gradient_checkpointing, seed=0):
    transformer = tiny_transformer(seed=seed)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16, margin=0.0)
    optimizer = torch.optim.AdamW(helper.trainable_parameters(transformer), lr=1e-3)
    latents, text, timesteps, teacher = tiny_inputs()
    history = []
    for _ in range(2):
        with helper.capture():
            out = run(transformer, latents, text, timesteps)
            loss_trd = helper(teacher, latents.shape)
        loss_diffusion = (out - latents).square().mean()
        optimizer.zero_grad()
        (loss_diffusion + 0.5 * loss_trd).backward()
        grads = {name: p.grad.detach().clone() for name, p in helper.named_parameters()}
        history.append((loss_diffusion.detach(), loss_trd.detach(), grads))
        optimizer.step()
    return transformer, helper, history


def test_two_training_steps_with_and_without_gradient_checkpointing():
    _, _, plain = _two_steps(gradient_checkpointing=False)
    transformer, helper, checkpointed = _two_steps(gradient_checkpointing=True)
    assert transformer.gradient_checkpointing
    for (ld, lt, grads), (ld_c, lt_c, grads_c) in zip(plain, checkpointed):
        assert torch.isfinite(ld) and torch.isfinite(lt) and lt > 0
        for name in ("projector.0.weight", "projector.4.weight", "downsampler.weight", "downsampler.bias"):
            assert torch.isfinite(grads_c[name]).all() and grads_c[name].abs().sum() > 0, name
        torch.testing.assert_close(ld_c, ld)
        torch.testing.assert_close(lt_c, lt)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-7)


def test_trd_gradient_reaches_the_blocks_up_to_align_layer_only():
    for checkpointing in (False, True):
        transformer = tiny_transformer()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16, margin=0.0)
        latents, text, timesteps, teacher = tiny_inputs()
        with helper.capture():
            run(transformer, latents, text, timesteps)
            helper(teacher, latents.shape).backward()
        below = transformer.transformer_blocks[1].attn1.to_q.weight.grad
        above = transformer.transformer_blocks[2].attn1.to_q.weight.grad
        assert below is not None and below.abs().sum() > 0
        assert above is None or above.abs().sum() == 0


def test_bf16_autocast_step_is_finite():
    transformer = tiny_transformer()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16)
    latents, text, timesteps, teacher = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), helper.capture():
        run(transformer, latents, text, timesteps)
        loss = helper(teacher.bfloat16(), latents.shape)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert helper.projector[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(helper.downsampler.weight.grad).all() and helper.downsampler.weight.grad.abs().sum() > 0


def test_parameters_for_full_and_lora_finetuning_and_state_dict():
    pytest.importorskip("peft")
    from peft import LoraConfig

    transformer = tiny_transformer()
    helper = VideoREPA(transformer, TEACHER_DIM, align_layer=2, projector_dim=16)
    own = {id(p) for p in helper.parameters()}
    assert not own & {id(p) for p in transformer.parameters()}  # the transformer is not a submodule
    full = helper.trainable_parameters(transformer)
    assert len(full) == len(own) + len(list(transformer.parameters()))

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = helper.trainable_parameters(transformer)
    names = {id(p): n for n, p in transformer.named_parameters()}
    adapters = [names[id(p)] for p in lora if id(p) in names]
    assert adapters and all("lora_" in n for n in adapters)
    assert len(lora) == len(own) + len(adapters)
    # The hook survives the adapter injection: LoRA weights of the hooked block get TRD gradients.
    latents, text, timesteps, teacher = tiny_inputs()
    with helper.capture():
        run(transformer, latents, text, timesteps)
        helper(teacher, latents.shape).backward()
    lora_b = transformer.transformer_blocks[1].attn1.to_q.lora_B["default"].weight
    assert lora_b.grad is not None

    state = helper.state_dict()
    assert set(state) == {f"projector.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")} | {
        "downsampler.weight", "downsampler.bias"}
    fresh = VideoREPA(tiny_transformer(), **helper.config_dict())
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key])


# ------------------------------------------------------------------------------------------ teacher
def _sinusoid_table(positions, dim):
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * (j // 2) / dim)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()[None]


def _videorepa_resize(table, source, target):
    """VideoREPA's position-table resize: bicubic on each frame's grid, then trilinear to the target frames."""
    t, h, w = source
    x = table.reshape(t, h, w, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=target[1:], mode="bicubic", align_corners=False)
    x = x.permute(1, 0, 2, 3)[None]
    x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    return x[0].permute(1, 2, 3, 0).reshape(1, -1, table.shape[-1])


def _official_forward(sd, pixels, pos_table, heads):
    """VideoMAEv2's encoder as its own code computes it, from official-layout weights (no final norm)."""
    x = pixels.permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
    x = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[2:])
    x = x.flatten(2).transpose(1, 2) + pos_table
    dim = x.shape[-1]
    layer = 0
    while f"blocks.{layer}.attn.qkv.weight" in sd:
        p = lambda name: sd[f"blocks.{layer}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        q, k, v = F.linear(y, p("attn.qkv.weight"), bias).reshape(x.shape[0], -1, 3, heads, dim // heads).permute(
            2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
        layer += 1
    return x


def _write_tiny_checkpoint(tmp_path, seed=0, mutate=None):
    ckpt = random_videomae_v2_checkpoint(TINY_TEACHER, seed=seed, num_classes=3)
    if mutate:
        mutate(ckpt["module"])
    path = tmp_path / f"tiny_{seed}.pth"
    torch.save(ckpt, path)
    return path, {k[len("module."):]: v for k, v in ckpt["module"].items()}


@pytest.mark.parametrize("geometry", [
    dict(num_frames=4, image_size=16),                                   # the checkpoint's own: no resize
    dict(num_frames=8, image_size=(16, 24), source_num_frames=4, source_image_size=16),  # resized table
])
def test_teacher_key_mapping_reproduces_the_official_encoder(tmp_path, geometry):
    path, sd = _write_tiny_checkpoint(tmp_path)
    geometry = dict(geometry)
    geometry.setdefault("source_num_frames", 4)
    geometry.setdefault("source_image_size", 16)
    teacher = load_videomae_teacher(path, architecture=TINY_TEACHER, **geometry)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    state = teacher.state_dict()
    dim = TINY_TEACHER["hidden_size"]
    qkv = sd["blocks.1.attn.qkv.weight"]
    assert torch.equal(state["encoder.layer.1.attention.attention.query.weight"], qkv[:dim])
    assert torch.equal(state["encoder.layer.1.attention.attention.key.weight"], qkv[dim:2 * dim])
    assert torch.equal(state["encoder.layer.1.attention.attention.value.weight"], qkv[2 * dim:])
    assert torch.equal(state["encoder.layer.0.intermediate.dense.weight"], sd["blocks.0.mlp.fc1.weight"])

    size = geometry["image_size"] if isinstance(geometry["image_size"], tuple) else (16, 16)
    frames = geometry["num_frames"]
    pixels = torch.randn(2, frames, 3, *size, generator=torch.Generator().manual_seed(3))
    source = (2, 2, 2)
    target = (frames // 2, size[0] // 8, size[1] // 8)
    table = _sinusoid_table(math.prod(source), dim)
    if target != source:
        table = _videorepa_resize(table, source, target)
    expected = _official_forward(sd, pixels, table, TINY_TEACHER["num_attention_heads"])
    tokens = encode_teacher(teacher, pixels)
    assert tokens.shape == (2, *target, dim)
    torch.testing.assert_close(tokens.reshape(2, -1, dim), expected, rtol=1e-4, atol=1e-5)


def test_videomae_v2_geometry_of_videorepa():
    from vrepa_kernels.integrations.videomae import resize_position_table, token_grid, videomae_v2_config

    config = videomae_v2_config()  # ViT-B/16, tubelet 2, on 48 frames at 160x240
    assert token_grid(config) == (24, 10, 15)
    assert (config.hidden_size, config.num_hidden_layers, config.layer_norm_eps) == (768, 12, 1e-6)
    source = _sinusoid_table(8 * 14 * 14, 768)  # the 16x224x224 pre-training table
    resized = resize_position_table(source, (8, 14, 14), (24, 10, 15))
    assert resized.shape == (1, 3600, 768)
    torch.testing.assert_close(resized, _videorepa_resize(source, (8, 14, 14), (24, 10, 15)))
    torch.testing.assert_close(resize_position_table(source, (8, 14, 14), (8, 14, 14)), source)


def test_teacher_rejects_zero_qv_biases_and_unknown_keys(tmp_path):
    zero = lambda m: m["module.blocks.1.attn.v_bias"].zero_()  # noqa: E731
    path, _ = _write_tiny_checkpoint(tmp_path, seed=1, mutate=zero)
    with pytest.raises(ValueError, match="blocks.1.attn.v_bias is all zeros"):
        load_videomae_teacher(path, architecture=TINY_TEACHER, num_frames=4, image_size=16)
    layer_scale = lambda m: m.__setitem__("module.blocks.0.gamma_1", torch.ones(32))  # noqa: E731
    path, _ = _write_tiny_checkpoint(tmp_path, seed=2, mutate=layer_scale)
    with pytest.raises(ValueError, match="gamma_1"):
        load_videomae_teacher(path, architecture=TINY_TEACHER, num_frames=4, image_size=16)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_videomae_teacher(tmp_path / "absent.pth", architecture=TINY_TEACHER)


def test_teacher_detects_biases_lost_in_loading(tmp_path, monkeypatch):
    path, _ = _write_tiny_checkpoint(tmp_path)
    original = transformers.VideoMAEModel.load_state_dict

    def drop_biases(self, state_dict, strict=True, **kwargs):  # what a faulty transformers release does
        result = original(self, state_dict, strict=strict, **kwargs)
        for layer in self.encoder.layer:
            attention = layer.attention.attention
            bias = getattr(attention, "q_bias", None)
            (bias if bias is not None else attention.query.bias).data.zero_()
        return result

    monkeypatch.setattr(transformers.VideoMAEModel, "load_state_dict", drop_biases)
    with pytest.raises(RuntimeError, match="dropped the q/v biases"):
        load_videomae_teacher(path, architecture=TINY_TEACHER, num_frames=4, image_size=16)


def test_prepare_teacher_pixels():
    frames = torch.full((2, 5, 3, 12, 18), -1.0)
    frames[:, 0] = 1.0  # the first frame must be dropped
    out = prepare_teacher_pixels(frames, size=(4, 6))
    assert out.shape == (2, 4, 3, 4, 6)
    expected = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, 0, :, 0, 0], expected)
    clip = torch.rand(1, 5, 3, 12, 18) * 2 - 1
    torch.testing.assert_close(prepare_teacher_pixels(clip, size=(4, 6)),
                               prepare_teacher_pixels(clip.transpose(1, 2), size=(4, 6), layout="BCFHW"))
    with pytest.raises(ValueError, match="3 channels"):
        prepare_teacher_pixels(torch.zeros(1, 5, 4, 8, 8))


def test_teacher_token_cache(tmp_path):
    cache = TeacherTokenCache(tmp_path / "cache", fingerprint="teacher-a", dtype=torch.bfloat16)
    calls = []

    def compute(indices):
        calls.append(list(indices))
        return torch.stack([torch.full((4, 2, 3, 8), float(i)) for i in indices])

    first = cache.get_or_compute(["a", "b"], compute)
    again = cache.get_or_compute(["b", "c", "a"], compute)
    assert calls == [[0, 1], [1]]  # only "c" was computed the second time
    assert first.dtype == torch.bfloat16 and again.shape == (3, 4, 2, 3, 8)
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    other = TeacherTokenCache(tmp_path / "cache", fingerprint="teacher-b")
    assert other.load("a") is None  # another teacher or geometry never reuses a file
    fp32 = TeacherTokenCache(tmp_path / "cache", fingerprint="teacher-a")
    assert fp32.dtype == torch.float32 and fp32.load("a") is None  # nor a file written at another precision

    # VideoREPA's per-clip tokens, 24x10x15 x 768 in bf16: about 5.5 MB on disk.
    path = cache.save("clip", torch.randn(24, 10, 15, 768))
    assert 5.5e6 < path.stat().st_size < 5.6e6


# ------------------------------------------------------------------------------------------ teacher input (issue 11)
def test_prepare_teacher_pixels_converts_uint8_frames():
    # The repro: uint8 frames came back uint8 (values truncated to 0..7).
    frames = torch.randint(0, 256, (1, 9, 3, 96, 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = prepare_teacher_pixels(frames, (16, 24))
    assert out.dtype == torch.float32 and out.shape == (1, 8, 3, 16, 24)
    torch.testing.assert_close(out, prepare_teacher_pixels(frames.float() / 127.5 - 1.0, (16, 24)))
    white = prepare_teacher_pixels(torch.full((1, 2, 3, 4, 4), 255, dtype=torch.uint8), (4, 4))
    torch.testing.assert_close(white[0, 0, :, 0, 0], (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    assert prepare_teacher_pixels(frames, (16, 24), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_prepare_teacher_pixels_rejects_frames_out_of_range():
    with pytest.raises(ValueError, match=r"frames must be in \[-1, 1\].*\[0, 255\]"):
        prepare_teacher_pixels(torch.arange(256.0).reshape(1, 1, 1, 16, 16).expand(1, 2, 3, 16, 16), (8, 8))
    with pytest.raises(TypeError, match="frames must be uint8.*torch.int64"):
        prepare_teacher_pixels(torch.zeros(1, 2, 3, 8, 8, dtype=torch.long), (8, 8))
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        prepare_teacher_pixels(torch.zeros(1, 2, 3, 8, 8), (8, 8), dtype=torch.uint8)
    # a bicubic overshoot of [-1, 1] frames is tolerated; NaN propagates instead of being hidden
    edge = torch.full((1, 2, 3, 8, 8), -1.0)
    edge[..., 4:] = 1.03
    assert torch.isfinite(prepare_teacher_pixels(edge, (8, 8))).all()
    edge[0, 1, 0, 0, 0] = float("nan")
    assert torch.isnan(prepare_teacher_pixels(edge, (8, 8))).any()


def test_teacher_input_for_a_latent_shape():
    helper = VideoREPA(tiny_transformer(), TEACHER_DIM, align_layer=1, projector_dim=16)
    need = helper.teacher_input(LATENT_SHAPE, patch_size=8)
    assert need == (8, (16, 24), ALIGNED) and need.grid == ALIGNED
    # CogVideoX at 49x480x720: latents 13x60x90 -> VideoMAEv2 on 48 frames at 160x240, 24x10x15 tokens
    big = VideoREPA(tiny_transformer(), 768, align_layer=1, projector_dim=16)
    assert big.teacher_input((1, 13, 16, 60, 90)) == (48, (160, 240), (24, 10, 15))


def test_teacher_architecture_is_read_from_the_checkpoint(tmp_path):
    from vrepa_kernels.integrations.videomae import infer_videomae_v2_architecture, official_state_dict

    ckpt = random_videomae_v2_checkpoint(TINY_TEACHER, seed=4)
    inferred = infer_videomae_v2_architecture(official_state_dict(ckpt))
    assert inferred == {k: v for k, v in TINY_TEACHER.items() if k != "num_attention_heads"}  # heads: not in weights
    path = tmp_path / "tiny.pth"
    torch.save(ckpt, path)
    teacher = load_videomae_teacher(path, num_frames=8, image_size=(16, 24))  # no architecture= needed
    assert (teacher.config.patch_size, teacher.config.num_attention_heads, teacher.config.hidden_size) == (8, 4, 32)
    with pytest.raises(ValueError, match="architecture= says patch_size=16, but the checkpoint's weights have "
                                         "patch_size=8"):
        load_videomae_teacher(path, num_frames=8, image_size=(16, 24), architecture={"patch_size": 16})
    bare = tmp_path / "bare.pth"
    torch.save({"module": ckpt["module"]}, bare)  # no metadata: width 32 is no VideoMAEv2 width
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_videomae_teacher(bare, num_frames=8, image_size=(16, 24))
    assert load_videomae_teacher(bare, num_frames=8, image_size=(16, 24), source_num_frames=16,
                                 architecture={"num_attention_heads": 4}).config.num_attention_heads == 4
    vit_b = infer_videomae_v2_architecture({"patch_embed.proj.weight": torch.zeros(768, 3, 2, 16, 16),
                                            "blocks.0.mlp.fc1.weight": torch.zeros(3072, 768)})
    assert vit_b["num_attention_heads"] == 12 and vit_b["intermediate_size"] == 3072


def test_encode_teacher_checks_the_grid_before_the_teacher_runs(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(random_videomae_v2_checkpoint(TINY_TEACHER, seed=5, source_num_frames=4, source_image_size=16), path)
    teacher = load_videomae_teacher(path, num_frames=8, image_size=(16, 24))
    calls = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=r"pixel_values 6x16x24 .* give a 3x2x3 token grid, but the teacher was "
                                         r"built for a 4x2x3 grid"):
        encode_teacher(teacher, torch.zeros(1, 6, 3, 16, 24))
    with pytest.raises(ValueError, match="the teacher gives a 4x2x3 token grid, but the student aligns to 4x3x3"):
        encode_teacher(teacher, torch.zeros(1, 8, 3, 16, 24), expected_grid=(4, 3, 3))
    with pytest.raises(TypeError, match="floating point"):
        encode_teacher(teacher, torch.zeros(1, 8, 3, 16, 24, dtype=torch.uint8))
    assert calls == []  # every error came before transformers ran
    tokens = encode_teacher(teacher, torch.zeros(1, 8, 3, 16, 24), expected_grid=ALIGNED)
    assert tokens.shape == (1, *ALIGNED, 32) and calls == [1]
    helper = VideoREPA(tiny_transformer(), 32, align_layer=1, projector_dim=16)
    assert helper.teacher_input(LATENT_SHAPE, teacher) == (8, (16, 24), ALIGNED)  # patch 8 read from the teacher
