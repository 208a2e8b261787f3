"""VideoREPA helper on tiny random diffusers models of every supported family (CogVideoX, Wan, HunyuanVideo,
LTX-Video): hooked block, token grid, alignment shape, gradient reach; native grid; several layers."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vrepa_kernels import trd_loss_reference  # noqa: E402
from vrepa_kernels.integrations.diffusers import FAMILIES as HELPER_FAMILIES  # noqa: E402
from vrepa_kernels.integrations.diffusers import VideoREPA  # noqa: E402

B, C, FR, H, W = 2, 4, 3, 12, 12  # latents: 3 frames of 12x12, 4 channels
TEACHER_DIM = 24
TEXT_DIM = 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def cogvideox():
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, time_embed_dim=2,
        text_embed_dim=TEXT_DIM, num_layers=3, sample_width=W, sample_height=H, sample_frames=9, patch_size=2,
        max_text_seq_length=5)

    def run(latents_bcfhw, text):
        latents = latents_bcfhw.permute(0, 2, 1, 3, 4)  # CogVideoX takes [B, F, C, H, W]
        model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([10, 700]), return_dict=False)
        return latents.shape
    return model, run, [model.transformer_blocks[i] for i in range(3)]


def wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=16, num_layers=3, rope_max_seq_len=32)

    def run(latents, text):
        model(hidden_states=latents, timestep=torch.tensor([10, 700]), encoder_hidden_states=text, return_dict=False)
        return latents.shape
    return model, run, list(model.blocks)


def hunyuan():
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))

    def run(latents, text):
        model(hidden_states=latents, timestep=torch.tensor([10, 700]), encoder_hidden_states=text,
              encoder_attention_mask=torch.ones(B, text.shape[1]),
              pooled_projections=torch.randn(B, 8, generator=_gen(5)),
              guidance=torch.tensor([3000.0, 3000.0]), return_dict=False)
        return latents.shape
    # align_layer counts the dual-stream block first, then the single-stream ones
    return model, run, [model.transformer_blocks[0], *model.single_transformer_blocks]


def ltx():
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=C, out_channels=C, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=3, caption_channels=TEXT_DIM)

    def run(latents, text):
        packed = latents.permute(0, 2, 3, 4, 1).reshape(B, -1, C)  # the LTX pipeline's packing with patch 1
        model(hidden_states=packed, encoder_hidden_states=text, timestep=torch.tensor([10, 700]),
              encoder_attention_mask=torch.ones(B, text.shape[1]), num_frames=FR, height=H, width=W, return_dict=False)
        return latents.shape  # the helper takes the unpacked [B, C, F, H, W] shape
    return model, run, list(model.transformer_blocks)


# family -> (builder, student token grid, aligned grid at the default stride 3)
FAMILIES = {
    "cogvideox": (cogvideox, (3, 6, 6), (4, 2, 2)),
    "wan": (wan, (3, 6, 6), (4, 2, 2)),
    "hunyuan": (hunyuan, (3, 6, 6), (4, 2, 2)),
    "ltx": (ltx, (3, 12, 12), (8, 4, 4)),  # patch 1; 8 pixel frames per latent frame -> x4
}


def _inputs(seed=1):
    gen = _gen(seed)
    return torch.randn(B, C, FR, H, W, generator=gen), torch.randn(B, 5, TEXT_DIM, generator=gen)


def _block_grad(block):
    grads = [p.grad.abs().sum() for p in block.parameters() if p.grad is not None]
    return float(sum(grads)) if grads else 0.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_hook_grid_alignment_and_gradient_reach(family):
    build, grid, aligned = FAMILIES[family]
    model, run, blocks = build()
    helper = VideoREPA(model, TEACHER_DIM, align_layer=2, projector_dim=16, margin=0.0)
    latents, text = _inputs()
    seen = {}
    handle = blocks[1].register_forward_hook(
        lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    teacher = torch.randn(B, math.prod(aligned), TEACHER_DIM, generator=_gen(2))
    with helper.capture():
        shape = run(latents, text)
        assert helper.captured is seen["out"]  # the 2nd block in forward order
        assert helper.token_grid(shape) == grid
        assert helper.captured.shape == (B, math.prod(grid), model.config.num_attention_heads
                                         * model.config.attention_head_dim)  # video tokens only, no text
        assert helper.align(helper.captured, shape).shape == (B, *aligned, TEACHER_DIM)
        loss = helper(teacher, shape)
    handle.remove()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert _block_grad(blocks[0]) > 0 and _block_grad(blocks[1]) > 0
    assert _block_grad(blocks[2]) == 0  # the block after the aligned one gets nothing from the TRD loss
    assert helper.teacher_input(shape).num_frames == aligned[0] * 2


def test_family_is_read_from_the_class():
    for family, layout, upsample, patch in (("cogvideox", "BFCHW", 2, (2, None)), ("wan", "BCFHW", 2, (2, 1)),
                                            ("hunyuan", "BCFHW", 2, (2, 1)), ("ltx", "BCFHW", 4, (1, 1))):
        helper = VideoREPA(FAMILIES[family][0]()[0], TEACHER_DIM, align_layer=1, projector_dim=8)
        assert (helper.latent_layout, helper.temporal_upsample) == (layout, upsample), family
        assert (helper.patch_size, helper.patch_size_t) == patch, family


def test_unreadable_model_is_a_clear_error_and_explicit_arguments_work():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens):
            for layer in self.layers:
                tokens = layer(tokens)
            return tokens

    model = Custom()
    with pytest.raises(TypeError, match=r"cannot read Custom.*`transformer_blocks` or `blocks`.*blocks="):
        VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=8)
    with pytest.raises(TypeError, match="latent layout of Custom"):
        VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=8, blocks="layers", patch_size=1, hidden_dim=8)
    with pytest.raises(TypeError, match="Custom has no nn.ModuleList `stages`"):
        VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=8, blocks="stages", latent_layout="BCFHW",
                  patch_size=1, hidden_dim=8)
    with pytest.raises(ValueError, match="latent_layout must be one of .* got 'BHWCF'"):
        VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=8, blocks="layers", latent_layout="BHWCF",
                  patch_size=1, hidden_dim=8)
    with pytest.raises(TypeError, match="config of Custom has no patch_size"):
        VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=8, blocks=model.layers, latent_layout="BCFHW",
                  hidden_dim=8)
    helper = VideoREPA(model, TEACHER_DIM, align_layer=2, projector_dim=8, blocks=model.layers,
                       latent_layout="BCFHW", patch_size=(1, 3, 3), hidden_dim=8)
    latent_shape = (1, 4, 3, 9, 9)  # 3x3x3 tokens
    with helper.capture():
        model(torch.randn(1, 27, 8))
        assert helper.align(helper.captured, latent_shape).shape == (1, 4, 1, 1, TEACHER_DIM)


def test_native_grid_geometry_of_cogvideox_and_wan():
    cog = VideoREPA(cogvideox()[0], 768, align_layer=1, projector_dim=8, native_grid=True)
    need = cog.teacher_input((1, 13, 16, 60, 90))  # CogVideoX 49x480x720
    assert need == (48, (480, 720), (24, 30, 45)) and math.prod(need.grid) == 32_400
    default = VideoREPA(cogvideox()[0], 768, align_layer=1, projector_dim=8)
    assert default.teacher_input((1, 13, 16, 60, 90)) == (48, (160, 240), (24, 10, 15))
    wan_helper = VideoREPA(wan()[0], 768, align_layer=1, projector_dim=8, native_grid=True)
    shape = (1, 16, 21, 60, 104)  # Wan 81x480x832: 4x temporal, 8x spatial VAE
    assert math.prod(wan_helper.token_grid(shape)) == 21 * 30 * 52 == 32_760
    assert wan_helper.teacher_input(shape) == (80, (480, 832), (40, 30, 52))
    assert not any("downsampler" in k for k in wan_helper.state_dict())  # no stride-3 convolution
    with pytest.raises(ValueError, match="native_grid=True .* got spatial_downsample=3"):
        VideoREPA(wan()[0], 768, align_layer=1, projector_dim=8, native_grid=True, spatial_downsample=3)
    with pytest.raises(ValueError, match="or native_grid=True"):  # 30x52 tokens per frame: 52 is not a multiple of 3
        VideoREPA(wan()[0], 768, align_layer=1, projector_dim=8).teacher_input(shape)


def test_native_grid_loss_is_trd_of_the_projected_tokens():
    model, run, _ = wan()
    helper = VideoREPA(model, TEACHER_DIM, align_layer=1, projector_dim=16, native_grid=True)
    latents, text = _inputs()
    teacher = torch.randn(B, 4 * 6 * 6, TEACHER_DIM, generator=_gen(3))
    with helper.capture():
        run(latents, text)
        hidden = helper.captured
        loss = helper(teacher, latents.shape)
    x = helper.projector(hidden.detach()).reshape(B, 3, 6, 6, TEACHER_DIM)[:, 1:]
    x = torch.nn.functional.interpolate(x.permute(0, 4, 1, 2, 3), scale_factor=(2.0, 1.0, 1.0), mode="trilinear")
    x = x.permute(0, 2, 3, 4, 1).reshape(B, 4, 36, TEACHER_DIM)
    want = trd_loss_reference(x, teacher.reshape(B, 4, 36, TEACHER_DIM), margin=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_several_layers_own_heads_and_average_their_losses():
    model, run, blocks = wan()
    with pytest.raises(ValueError, match="lists a layer twice"):
        VideoREPA(model, TEACHER_DIM, align_layer=[1, 1], projector_dim=8)
    with pytest.raises(ValueError, match="non-empty list"):
        VideoREPA(model, TEACHER_DIM, align_layer=[], projector_dim=8)
    with pytest.raises(ValueError, match="align_layer=4 counts blocks from 1"):
        VideoREPA(model, TEACHER_DIM, align_layer=[1, 4], projector_dim=8)
    helper = VideoREPA(model, TEACHER_DIM, align_layer=[1, 3], projector_dim=16, margin=0.0)
    assert helper.align_layer == [1, 3] and len(helper.heads()) == 2
    assert helper.heads()[0][0] is not helper.heads()[1][0]
    assert {k.split(".")[0] for k in helper.state_dict()} == {"projectors", "downsamplers"}
    latents, text = _inputs()
    teacher = torch.randn(B, 16, TEACHER_DIM, generator=_gen(4))
    with helper.capture():
        run(latents, text)
        captured = helper.captured
        assert set(captured) == {1, 3}
        loss = helper(teacher, latents.shape)
    each = [helper.trd(helper.align(captured[k].detach(), latents.shape, index=i), teacher.reshape(B, 4, 2, 2, -1))
            for i, k in enumerate((1, 3))]
    torch.testing.assert_close(loss, (each[0] + each[1]) / 2)
    assert not torch.allclose(each[0], each[1])
    loss.backward()
    assert all(_block_grad(b) > 0 for b in blocks)  # block 3 is aligned too
    for projector, _ in helper.heads():
        assert projector[0].weight.grad.abs().sum() > 0
    fresh = VideoREPA(wan()[0], **{k: v for k, v in helper.config_dict().items()})
    fresh.load_state_dict(helper.state_dict())
    assert fresh.align_layer == [1, 3]


def test_teacher_attention_implementation(tmp_path):
    pytest.importorskip("transformers")
    from vrepa_kernels.integrations.videomae import load_videomae_teacher, random_videomae_v2_checkpoint

    arch = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, patch_size=16,
                tubelet_size=2)
    path = tmp_path / "t.pth"
    torch.save(random_videomae_v2_checkpoint(arch, seed=0, source_num_frames=4, source_image_size=32), path)
    pixels = torch.randn(1, 4, 3, 32, 48, generator=_gen(6))
    out = {}
    for impl in ("sdpa", "eager"):
        teacher = load_videomae_teacher(path, num_frames=4, image_size=(32, 48), attn_implementation=impl)
        assert teacher.config._attn_implementation == impl
        with torch.no_grad():
            out[impl] = teacher(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-4, atol=1e-5)


def _tiny_vaes():
    cog_vae = dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                   up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                   layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    ltx_blocks = dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                      layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, decoder_inject_noise=(False,) * 5,
                      upsample_residual=(False,) * 4, upsample_factor=(1,) * 4)
    # (name, VAE, pixel frames per later latent frame, strictly causal encoder)
    return [
        ("cogvideox", diffusers.AutoencoderKLCogVideoX(**cog_vae), 4, False),
        ("wan", diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4), 4, True),
        ("hunyuan", diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                                        layers_per_block=1, norm_num_groups=4,
                                                        mid_block_add_attention=False), 4, False),
        ("ltx", diffusers.AutoencoderKLLTXVideo(latent_channels=8, **ltx_blocks), 8, True),
    ]


def test_vae_temporal_mapping_behind_temporal_upsample():
    """r*k + 1 pixel frames -> k + 1 latent frames; where the encoder is causal (Wan, LTX-Video), latent frame 0
    sees pixel frame 0 only and frames 1 + r(j-1) .. rj reach latent frame j first. (CogVideoX's and HunyuanVideo's
    GroupNorms take statistics over all frames, so there every latent frame sees every pixel frame a little.)"""
    torch.manual_seed(0)
    for name, vae, r, causal in _tiny_vaes():
        x = torch.randn(1, 3, 2 * r + 1, 32, 32, generator=_gen(7))
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mode()
            assert z0.shape[2] == 3, name
            model_class = {"cogvideox": "CogVideoXTransformer3DModel", "wan": "WanTransformer3DModel",
                           "hunyuan": "HunyuanVideoTransformer3DModel", "ltx": "LTXVideoTransformer3DModel"}[name]
            # the helper's upsampling: each later latent frame spans r / 2 teacher tubelets of 2 frames
            assert HELPER_FAMILIES[model_class].temporal_upsample == r // 2, name
            if not causal:
                continue
            for j in (1, 2):
                y = x.clone()
                y[:, :, 1 + r * (j - 1):1 + r * j] += 1.0
                z = vae.encode(y).latent_dist.mode()
                changed = [bool((z[:, :, k] - z0[:, :, k]).abs().max() > 1e-6) for k in range(3)]
                assert changed == [k >= j for k in range(3)], (name, j, changed)
