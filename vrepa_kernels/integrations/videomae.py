"""The VideoMAEv2 teacher of VideoREPA: loading, input preparation and an on-disk token cache.

VideoREPA's teacher is VideoMAEv2 ViT-B distilled from ViT-g (the official ``vit_b_k710_dl_from_giant.pth``)
run on the clip's last 48 frames at 160x240: patch 16, tubelet 2, so 24x10x15 tokens of width 768, taken
after the last block with no final norm. :func:`load_videomae_teacher` builds transformers'
``VideoMAEModel`` for that geometry and loads the official checkpoint from a local path into it, mapping
its keys to transformers' names; the sin-cos position table of the 16x224x224 pre-training geometry is
resized (bicubic in space, then linear in time) as VideoREPA does.

transformers is imported only by the functions that need it; everything else here needs only torch.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# VideoMAEv2 ViT-B (``vit_base_patch16_224`` in the VideoMAEv2 and VideoREPA code): patch 16, width 768,
# 12 blocks of 12 heads, MLP ratio 4, q/v biases, LayerNorm eps 1e-6; pre-trained on 16 frames of 224x224.
VIDEOMAE_V2_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 16,
    "tubelet_size": 2,
}
SOURCE_NUM_FRAMES = 16
SOURCE_IMAGE_SIZE = 224

# Parts of official checkpoints that are not the encoder: classification head, pre-training decoder.
_IGNORED_PREFIXES = ("head.", "fc_norm.", "decoder.", "encoder_to_decoder.", "mask_token")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected (height, width), got {value}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def videomae_v2_config(num_frames: int = 48, image_size=(160, 240), architecture: Optional[Mapping] = None):
    """transformers ``VideoMAEConfig`` of VideoMAEv2 (ViT-B unless ``architecture`` overrides sizes) for a geometry."""
    transformers = require("transformers", "the VideoMAEv2 teacher")
    arch = dict(VIDEOMAE_V2_BASE)
    arch.update(architecture or {})
    height, width = _pair(image_size)
    patch, tubelet = int(arch["patch_size"]), int(arch["tubelet_size"])
    if num_frames <= 0 or num_frames % tubelet:
        raise ValueError(f"num_frames={num_frames} must be a positive multiple of the tubelet size {tubelet}")
    if height % patch or width % patch:
        raise ValueError(f"image_size={height}x{width} must be a multiple of the patch size {patch}")
    return transformers.VideoMAEConfig(
        image_size=[height, width], num_frames=int(num_frames), num_channels=3, hidden_act="gelu",
        layer_norm_eps=1e-6, qkv_bias=True, use_mean_pooling=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **arch,
    )


def official_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The encoder weights of an official VideoMAEv2 checkpoint object, with wrapper prefixes stripped.

    Accepts ``{"module": sd}`` (fine-tuned / distilled releases), ``{"model": sd}`` (pre-training releases,
    keys under ``encoder.``) or a bare state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict of tensors, got {type(checkpoint).__name__}")
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    out = {}
    for key, value in checkpoint.items():
        for prefix in ("module.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# Attention heads cannot be read from weights; VideoMAEv2's ViTs by width (S, B, L, H, g).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
METADATA_KEY = "videomae_v2"  # beside the weights: {"architecture": {...}, "source_num_frames", "source_image_size"}


def infer_videomae_v2_architecture(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Sizes of a VideoMAEv2 encoder read from its official-layout weights (see :func:`official_state_dict`).

    Width, depth, MLP width, patch and tubelet come from tensor shapes. The head count is not in the weights:
    it is taken from VideoMAEv2's models by width (ViT-S/B/L/H/g) and left out for any other width, where
    the checkpoint's metadata or ``architecture=`` must give ``num_attention_heads``.
    """
    weight = state_dict.get("patch_embed.proj.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        raise ValueError(
            "the checkpoint has no 5-D patch_embed.proj.weight [D, 3, tubelet, patch, patch]: not a VideoMAEv2 "
            f"video encoder (first keys: {sorted(state_dict)[:5]})"
        )
    width, _, tubelet, patch_h, patch_w = (int(d) for d in weight.shape)
    if patch_h != patch_w:
        raise ValueError(f"non-square patches {patch_h}x{patch_w} are not supported")
    layers = {int(m.group(1)) for m in (_BLOCK_KEY.match(k) for k in state_dict) if m}
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    arch = {"hidden_size": width, "num_hidden_layers": len(layers), "patch_size": patch_h, "tubelet_size": tubelet}
    if isinstance(fc1, torch.Tensor):
        arch["intermediate_size"] = int(fc1.shape[0])
    if width in _HEADS_BY_WIDTH:
        arch["num_attention_heads"] = _HEADS_BY_WIDTH[width]
    return arch


def _resolve_architecture(inferred: Mapping, stored: Optional[Mapping], given: Optional[Mapping]) -> Dict[str, int]:
    arch = dict(inferred)
    for source, values in (("the checkpoint's metadata", stored), ("architecture=", given)):
        for key, value in (values or {}).items():
            if key in inferred and int(value) != int(inferred[key]):
                raise ValueError(
                    f"{source} says {key}={value}, but the checkpoint's weights have {key}={inferred[key]}"
                )
            arch[key] = value
    if "num_attention_heads" not in arch:
        raise ValueError(
            f"the checkpoint's width {arch['hidden_size']} is not a VideoMAEv2 ViT-S/B/L/H/g width, so its head "
            "count is unknown; pass architecture={'num_attention_heads': ...}"
        )
    return arch


def _qv_bias_names(model_keys) -> Tuple[str, str]:
    """transformers names its q/v biases ``q_bias``/``v_bias`` (4.x) or ``query.bias``/``value.bias`` (5.x)."""
    if "encoder.layer.0.attention.attention.q_bias" in model_keys:
        return "attention.attention.q_bias", "attention.attention.v_bias"
    if "encoder.layer.0.attention.attention.query.bias" in model_keys:
        return "attention.attention.query.bias", "attention.attention.value.bias"
    raise RuntimeError("this transformers VideoMAEModel has no query/value biases; build it with qkv_bias=True")


def convert_videomae_v2_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Map official VideoMAEv2 encoder keys to ``model``'s (a transformers ``VideoMAEModel``) names.

    Returns the mapped state dict and the checkpoint's learned position table (``pos_embed``) if it has
    one. The fused ``qkv`` weight is split into query/key/value; the key projection has no bias. Raises
    ``ValueError`` on keys it does not know (e.g. layer-scale ``gamma_1``), so nothing is dropped silently.
    """
    model_keys = set(model.state_dict().keys())
    q_name, v_name = _qv_bias_names(model_keys)
    mapped: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    pos_embed = None
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key == "pos_embed":
            pos_embed = value
            continue
        if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            mapped["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
            continue
        if key in ("norm.weight", "norm.bias"):
            if "layernorm.weight" in model_keys:
                mapped["layernorm." + key.rsplit(".", 1)[1]] = value
            continue  # VideoREPA takes the last block's tokens without the final norm
        match = _BLOCK_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        layer, rest = match.group(1), match.group(2)
        prefix = f"encoder.layer.{layer}."
        if rest == "attn.qkv.weight":
            query, key_w, val = value.chunk(3, dim=0)
            mapped[prefix + "attention.attention.query.weight"] = query
            mapped[prefix + "attention.attention.key.weight"] = key_w
            mapped[prefix + "attention.attention.value.weight"] = val
        elif rest == "attn.q_bias":
            mapped[prefix + q_name] = value
        elif rest == "attn.v_bias":
            mapped[prefix + v_name] = value
        elif rest in _BLOCK_MAP:
            mapped[prefix + _BLOCK_MAP[rest]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"the checkpoint has keys that transformers' VideoMAEModel cannot hold: {sorted(unknown)[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}"
        )
    missing = sorted(model_keys - set(mapped))
    extra = sorted(set(mapped) - model_keys)
    if missing or extra:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:8]}, not in the model {extra[:8]}; check the "
            "architecture (depth, width) against the checkpoint"
        )
    for name, tensor in mapped.items():
        target = model.state_dict()[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} but model shape {tuple(target.shape)}")
    return mapped, pos_embed


def resize_position_table(table: torch.Tensor, source_grid: Sequence[int], target_grid: Sequence[int]) -> torch.Tensor:
    """Resize a ``[1, T*H*W, D]`` position table (frame-major, row-major) to another token grid.

    Bicubic in space, then linear in time (trilinear with unchanged H, W), both with ``align_corners=False``:
    VideoREPA's resize of VideoMAEv2's 8x14x14 table to 24x10x15.
    """
    t, h, w = (int(d) for d in source_grid)
    tt, hh, ww = (int(d) for d in target_grid)
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[1] != t * h * w:
        raise ValueError(f"table of shape {tuple(table.shape)} is not [1, {t}*{h}*{w}, D]")
    dim = table.shape[-1]
    x = table.reshape(t, h, w, dim).permute(0, 3, 1, 2).float()  # [T, D, H, W]
    if (h, w) != (hh, ww):
        x = F.interpolate(x, size=(hh, ww), mode="bicubic", align_corners=False)
    x = x.permute(1, 0, 2, 3).unsqueeze(0)  # [1, D, T, H, W]
    if t != tt:
        x = F.interpolate(x, size=(tt, hh, ww), mode="trilinear", align_corners=False)
    return x[0].permute(1, 2, 3, 0).reshape(1, tt * hh * ww, dim)


def token_grid(config) -> Tuple[int, int, int]:
    """The (frames, rows, cols) token grid of a VideoMAE config."""
    height, width = _pair(config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    return config.num_frames // config.tubelet_size, height // patch_h, width // patch_w


def _set_position_table(model: nn.Module, table: torch.Tensor) -> None:
    embeddings = model.embeddings
    current = getattr(embeddings, "position_embeddings", None)
    if isinstance(current, nn.Parameter):
        current.data = table.to(current.dtype)
    elif "position_embeddings" in getattr(embeddings, "_buffers", {}):
        embeddings._buffers["position_embeddings"] = table
    else:
        embeddings.position_embeddings = table


def _check_qv_biases(state_dict: Mapping[str, torch.Tensor], model: nn.Module, num_layers: int) -> None:
    """The checkpoint's q/v biases are non-zero and the model holds exactly them (some transformers releases
    silently load zeros into differently named bias parameters)."""
    model_state = model.state_dict()
    q_name, v_name = _qv_bias_names(model_state.keys())
    for layer in range(num_layers):
        for official, name in ((f"blocks.{layer}.attn.q_bias", q_name), (f"blocks.{layer}.attn.v_bias", v_name)):
            source = state_dict[official].float().cpu()
            if not torch.any(source != 0):
                raise ValueError(f"checkpoint's {official} is all zeros: not a VideoMAEv2 encoder with q/v biases")
            loaded = model_state[f"encoder.layer.{layer}.{name}"].float().cpu()
            if not torch.any(loaded != 0) or not torch.equal(loaded, source):
                raise RuntimeError(
                    f"after loading, encoder.layer.{layer}.{name} does not hold the checkpoint's {official} "
                    "(the installed transformers dropped the q/v biases)"
                )


def load_videomae_teacher(
    checkpoint_path: Union[str, os.PathLike],
    *,
    num_frames: int = 48,
    image_size=(160, 240),
    architecture: Optional[Mapping] = None,
    source_num_frames: Optional[int] = None,
    source_image_size=None,
    device=None,
    dtype: Optional[torch.dtype] = None,
    trusted: bool = False,
    attn_implementation: Optional[str] = "sdpa",
):
    """A frozen transformers ``VideoMAEModel`` holding the official VideoMAEv2 weights, for one input geometry.

    Args:
        checkpoint_path: local path of the official checkpoint (e.g. ``vit_b_k710_dl_from_giant.pth``).
        num_frames, image_size: the teacher's input (VideoREPA: 48 frames at 160x240).
        architecture: sizes of the encoder; by default read from the checkpoint (see
            :func:`infer_videomae_v2_architecture`; a checkpoint dict may also store them beside the weights
            under ``"videomae_v2": {"architecture": {...}}``, as :func:`random_videomae_v2_checkpoint` does).
            Values given here must agree with the weights.
        source_num_frames, source_image_size: the geometry the checkpoint's position table was made for
            (default: the checkpoint's metadata, else VideoMAEv2's 16 frames at 224x224).
        trusted: unpickle arbitrary objects in the file (``weights_only=False``); only for files you trust.
        attn_implementation: transformers' attention for the teacher: ``"sdpa"`` (default: torch SDPA, which
            picks flash/memory-efficient kernels on GPU; needed at native-grid sizes, where one clip is 32,400
            tokens and eager attention would build 12 x 32,400^2 scores per layer), ``"flash_attention_2"``
            (needs flash-attn) or ``"eager"``; None leaves transformers' choice.
    """
    transformers = require("transformers", "load_videomae_teacher")
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path} (every path is local; nothing is downloaded)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        if trusted:
            raise
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({err}); if you trust the file, pass trusted=True"
        ) from err
    state_dict = official_state_dict(raw)
    meta = raw.get(METADATA_KEY) if isinstance(raw, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    arch = _resolve_architecture(infer_videomae_v2_architecture(state_dict), meta.get("architecture"), architecture)
    if source_num_frames is None:
        source_num_frames = int(meta.get("source_num_frames", SOURCE_NUM_FRAMES))
    if source_image_size is None:
        source_image_size = meta.get("source_image_size", SOURCE_IMAGE_SIZE)
    config = videomae_v2_config(num_frames, image_size, arch)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = transformers.VideoMAEModel(config)
    mapped, pos_embed = convert_videomae_v2_state_dict(state_dict, model)
    model.load_state_dict(mapped, strict=True)
    _check_qv_biases(state_dict, model, config.num_hidden_layers)

    src_h, src_w = _pair(source_image_size)
    patch_h, patch_w = _pair(config.patch_size)
    source_grid = (source_num_frames // config.tubelet_size, src_h // patch_h, src_w // patch_w)
    if pos_embed is None:
        from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

        pos_embed = get_sinusoid_encoding_table(source_grid[0] * source_grid[1] * source_grid[2], config.hidden_size)
    _set_position_table(model, resize_position_table(pos_embed, source_grid, token_grid(config)))

    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def teacher_fingerprint(checkpoint_path, num_frames: int, image_size, extra: str = "") -> str:
    """A string that changes when the checkpoint file or the teacher geometry does (for the token cache)."""
    path = Path(checkpoint_path).resolve()
    stat = path.stat()
    height, width = _pair(image_size)
    return f"{path}|{stat.st_size}|{int(stat.st_mtime)}|{num_frames}x{height}x{width}|{extra}"


# ------------------------------------------------------------------------------------------- inputs
# Float frames outside this range are not [-1, 1] frames (0..1 or 0..255 ones would be silently garbled).
PIXEL_RANGE_TOLERANCE = 0.05


def _frames_in_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """``frames`` as floating point in [-1, 1]: uint8 0..255 maps to [-1, 1] (x / 127.5 - 1); other integer
    dtypes and float frames outside [-1, 1] (beyond a small tolerance) raise."""
    if frames.dtype == torch.uint8:
        return frames.float() / 127.5 - 1.0
    if not frames.is_floating_point():
        raise TypeError(
            f"frames must be uint8 (0..255, converted to [-1, 1]) or floating point in [-1, 1], got {frames.dtype}"
        )
    if frames.numel():
        low, high = (float(v) for v in torch.aminmax(frames.detach()))
        limit = 1.0 + PIXEL_RANGE_TOLERANCE
        if low < -limit or high > limit:  # NaN compares False and propagates to the tokens
            raise ValueError(
                f"frames must be in [-1, 1] (diffusers' video batches), got values in [{low:.4g}, {high:.4g}]; "
                "map 0..255 frames with x / 127.5 - 1 (or pass them as uint8) and 0..1 frames with 2 * x - 1"
            )
    return frames


def prepare_teacher_pixels(frames: torch.Tensor, size=(160, 240), *, drop_first_frame: bool = True,
                           layout: str = "BFCHW", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """VideoREPA's teacher input: drop the first frame, ImageNet-normalise, bicubic resize.

    The steps are VideoREPA's (aHapBean/VideoREPA, ``finetune/models/cogvideox_t2v_align/lora_trainer.py``,
    ``compute_loss``): ``(x + 1) / 2``, ImageNet mean/std, frames after the first, bicubic to ``size``.

    Args:
        frames: ``[B, F, 3, H, W]`` (``layout="BFCHW"``, diffusers' batches) or ``[B, 3, F, H, W]`` ("BCFHW",
            the VAE's input). Floating point in [-1, 1], or uint8 in 0..255, which is converted with
            ``x / 127.5 - 1`` (the convention of diffusers' video examples). Other integer dtypes raise
            ``TypeError``; float frames outside [-1, 1] by more than 0.05 (0..255 floats, say) raise ``ValueError``.
            0..1 float frames lie inside [-1, 1] and cannot be told apart: map them with ``2 * x - 1`` first.
        size: output (height, width); VideoREPA uses 160x240 for 480x720 clips
            (:meth:`VideoREPA.teacher_input` gives it for any latent shape).
        dtype: output dtype; default the input's, or float32 for uint8 frames.
    Returns:
        ``[B, F-1, 3, height, width]`` floating-point pixel values for ``VideoMAEModel``.
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        raise ValueError(f"frames must be a 5-D tensor, got {getattr(frames, 'shape', type(frames).__name__)}")
    if layout not in ("BFCHW", "BCFHW"):
        raise ValueError(f"layout must be 'BFCHW' or 'BCFHW', got {layout!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    if layout == "BCFHW":
        frames = frames.transpose(1, 2)
    batch, count, channels, height, width = frames.shape
    if channels != 3:
        raise ValueError(f"frames must have 3 channels in layout {layout}, got shape {tuple(frames.shape)}")
    out_dtype = dtype or (frames.dtype if frames.is_floating_point() else torch.float32)
    frames = _frames_in_unit_range(frames)
    if drop_first_frame:
        if count < 2:
            raise ValueError(f"dropping the first frame of {count} frame(s) leaves nothing")
        frames = frames[:, 1:]
        count -= 1
    out_h, out_w = _pair(size)
    x = (frames.float() + 1.0) / 2.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 1, 3, 1, 1)
    x = ((x - mean) / std).reshape(batch * count, 3, height, width)
    if (height, width) != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)
    return x.reshape(batch, count, 3, out_h, out_w).to(out_dtype)


def teacher_token_grid(config, pixel_shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The (frames, rows, cols) token grid of a VideoMAE config, or of ``[B, F, 3, H, W]`` pixels under it."""
    if pixel_shape is None:
        return token_grid(config)
    _, frames, _, height, width = (int(d) for d in pixel_shape)
    patch_h, patch_w = _pair(config.patch_size)
    return frames // config.tubelet_size, height // patch_h, width // patch_w


@torch.no_grad()
def encode_teacher(teacher: nn.Module, pixel_values: torch.Tensor,
                   expected_grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Teacher tokens ``[B, F', H', W', D]`` of ``[B, F, 3, H, W]`` pixel values (no gradient).

    Before the teacher runs, the pixels' token grid is checked against the one the teacher was built for
    (its position table) and, if given, against ``expected_grid`` (e.g. ``helper.teacher_input(shape).grid``);
    a mismatch raises ``ValueError`` naming both grids.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5 or pixel_values.shape[2] != 3:
        raise ValueError(
            f"pixel_values must be [B, F, 3, H, W], got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point (see prepare_teacher_pixels), got {pixel_values.dtype}")
    config = teacher.config
    batch, frames, _, height, width = pixel_values.shape
    patch_h, patch_w = _pair(config.patch_size)
    built = token_grid(config)
    got = teacher_token_grid(config, pixel_values.shape)
    fmt = lambda g: "x".join(str(int(d)) for d in g)  # noqa: E731
    if frames % config.tubelet_size or height % patch_h or width % patch_w or got != built:
        want_h, want_w = _pair(config.image_size)
        raise ValueError(
            f"pixel_values {frames}x{height}x{width} (frames x height x width) give a {fmt(got)} token grid, but "
            f"the teacher was built for a {fmt(built)} grid ({config.num_frames} frames at {want_h}x{want_w}); "
            "build it with load_videomae_teacher(num_frames=, image_size=) from helper.teacher_input(latent_shape)"
        )
    if expected_grid is not None and tuple(int(d) for d in expected_grid) != tuple(built):
        raise ValueError(
            f"the teacher gives a {fmt(built)} token grid, but the student aligns to {fmt(expected_grid)}; "
            "build the teacher from helper.teacher_input(latent_shape)"
        )
    param = next(teacher.parameters())
    hidden = teacher(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype)).last_hidden_state
    return hidden.reshape(batch, *built, -1)


# ------------------------------------------------------------------------------------------- cache
class TeacherTokenCache:
    """Teacher tokens on disk, one file per clip, computed once.

    At VideoREPA's geometry a clip's tokens are 24x10x15 x 768 = 2,764,800 values: about 11 MB in fp32 (the
    default: VideoREPA runs its teacher in fp32) or 5.5 MB with ``dtype=torch.bfloat16``.
    Each file records ``fingerprint`` (see :func:`teacher_fingerprint`) and the clip key; a file written for
    another teacher or geometry is recomputed, never reused. Writes are atomic (temp file, then rename), so
    several processes can share a cache folder.
    """

    def __init__(self, root: Union[str, os.PathLike], fingerprint: str, dtype: torch.dtype = torch.float32):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string identifying the teacher and its geometry")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        digest = hashlib.sha1(f"{self.fingerprint}\0{key}".encode("utf-8")).hexdigest()
        return self.root / digest[:2] / f"{digest}.pt"

    def load(self, key: str) -> Optional[torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute
            return None
        if not isinstance(entry, dict) or entry.get("fingerprint") != self.fingerprint or entry.get("key") != key:
            return None
        tokens = entry.get("tokens")
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != self.dtype:  # written at another precision
            return None
        return tokens

    def save(self, key: str, tokens: torch.Tensor) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"fingerprint": self.fingerprint, "key": key,
                 "tokens": tokens.detach().to(device="cpu", dtype=self.dtype).contiguous().clone()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[List[int]], torch.Tensor],
                       device=None) -> torch.Tensor:
        """Stacked tokens of ``keys``; ``compute(indices)`` returns the tokens of the uncached ones, in order."""
        found: List[Optional[torch.Tensor]] = [self.load(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            computed = compute(missing)
            if computed.shape[0] != len(missing):
                raise ValueError(f"compute returned {computed.shape[0]} clips for {len(missing)} missing keys")
            for i, tokens in zip(missing, computed):
                self.save(keys[i], tokens)
                found[i] = tokens.detach().to(device="cpu", dtype=self.dtype)
        out = torch.stack([t for t in found])
        return out if device is None else out.to(device)


# ------------------------------------------------------------------------------------------- test helper
def random_videomae_v2_checkpoint(architecture: Optional[Mapping] = None, seed: int = 0, num_classes: int = 0,
                                  source_num_frames: int = SOURCE_NUM_FRAMES,
                                  source_image_size=SOURCE_IMAGE_SIZE) -> Dict[str, Dict]:
    """A random VideoMAEv2 checkpoint in the official layout, to test and demo without the real weights.

    ``torch.save`` it and load it with :func:`load_videomae_teacher` like the official file: the key mapping,
    q/v-bias checks and position-table resize all run. ``architecture`` overrides sizes of
    :data:`VIDEOMAE_V2_BASE` (ViT-B); the sizes and the source geometry are stored beside the weights under
    ``"videomae_v2"``, so the loader needs no ``architecture=``. q/v biases are non-zero; ``num_classes > 0``
    adds the ``fc_norm``/``head`` of a fine-tuned release. Example::

        torch.save(random_videomae_v2_checkpoint({"hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "intermediate_size": 37, "patch_size": 8}), "tiny.pth")
        teacher = load_videomae_teacher("tiny.pth", num_frames=8, image_size=(16, 24))
    """
    arch = dict(VIDEOMAE_V2_BASE)
    arch.update(architecture or {})
    gen = torch.Generator().manual_seed(seed)
    dim, hidden = int(arch["hidden_size"]), int(arch["intermediate_size"])
    patch, tubelet = _pair(arch["patch_size"]), int(arch["tubelet_size"])

    def rand(*shape, scale=0.02, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    sd = {
        "patch_embed.proj.weight": rand(dim, 3, tubelet, patch[0], patch[1]),
        "patch_embed.proj.bias": rand(dim),
    }
    for i in range(int(arch["num_hidden_layers"])):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": rand(dim, scale=0.1, offset=1.0), p + "norm1.bias": rand(dim),
            p + "attn.q_bias": rand(dim), p + "attn.v_bias": rand(dim),
            p + "attn.qkv.weight": rand(3 * dim, dim, scale=dim ** -0.5),
            p + "attn.proj.weight": rand(dim, dim, scale=dim ** -0.5), p + "attn.proj.bias": rand(dim),
            p + "norm2.weight": rand(dim, scale=0.1, offset=1.0), p + "norm2.bias": rand(dim),
            p + "mlp.fc1.weight": rand(hidden, dim, scale=dim ** -0.5), p + "mlp.fc1.bias": rand(hidden),
            p + "mlp.fc2.weight": rand(dim, hidden, scale=hidden ** -0.5), p + "mlp.fc2.bias": rand(dim),
        })
    if num_classes > 0:
        sd.update({"fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim),
                   "head.weight": rand(num_classes, dim), "head.bias": torch.zeros(num_classes)})
    meta = {"architecture": {k: int(v) for k, v in arch.items()}, "source_num_frames": int(source_num_frames),
            "source_image_size": list(_pair(source_image_size))}
    return {"module": {"module." + k: v for k, v in sd.items()}, METADATA_KEY: meta}


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "VIDEOMAE_V2_BASE", "videomae_v2_config", "official_state_dict",
    "convert_videomae_v2_state_dict", "resize_position_table", "load_videomae_teacher", "teacher_fingerprint",
    "prepare_teacher_pixels", "encode_teacher", "TeacherTokenCache", "random_videomae_v2_checkpoint", "token_grid",
    "infer_videomae_v2_architecture", "teacher_token_grid",
]
