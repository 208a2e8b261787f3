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
    source_num_frames: int = SOURCE_NUM_FRAMES,
    source_image_size=SOURCE_IMAGE_SIZE,
    device=None,
    dtype: Optional[torch.dtype] = None,
    trusted: bool = False,
):
    """A frozen transformers ``VideoMAEModel`` holding the official VideoMAEv2 weights, for one input geometry.

    Args:
        checkpoint_path: local path of the official checkpoint (e.g. ``vit_b_k710_dl_from_giant.pth``).
        num_frames, image_size: the teacher's input (VideoREPA: 48 frames at 160x240).
        architecture: overrides of :data:`VIDEOMAE_V2_BASE` (tests build tiny teachers this way).
        source_num_frames, source_image_size: the geometry the checkpoint's position table was made for.
        trusted: unpickle arbitrary objects in the file (``weights_only=False``); only for files you trust.
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
    config = videomae_v2_config(num_frames, image_size, architecture)
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
def prepare_teacher_pixels(frames: torch.Tensor, size=(160, 240), *, drop_first_frame: bool = True,
                           layout: str = "BFCHW", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """VideoREPA's teacher input from [-1, 1] frames: drop the first frame, ImageNet-normalise, bicubic resize.

    Args:
        frames: ``[B, F, 3, H, W]`` (``layout="BFCHW"``, diffusers' batches) or ``[B, 3, F, H, W]`` ("BCFHW",
            the VAE's input) in [-1, 1].
        size: output (height, width); VideoREPA uses 160x240 for 480x720 clips.
    Returns:
        ``[B, F-1, 3, height, width]`` pixel values for ``VideoMAEModel`` (in ``dtype``, default the input's).
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        raise ValueError(f"frames must be a 5-D tensor, got {getattr(frames, 'shape', type(frames).__name__)}")
    if layout not in ("BFCHW", "BCFHW"):
        raise ValueError(f"layout must be 'BFCHW' or 'BCFHW', got {layout!r}")
    if layout == "BCFHW":
        frames = frames.transpose(1, 2)
    batch, count, channels, height, width = frames.shape
    if channels != 3:
        raise ValueError(f"frames must have 3 channels in layout {layout}, got shape {tuple(frames.shape)}")
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
    return x.reshape(batch, count, 3, out_h, out_w).to(dtype or frames.dtype)


@torch.no_grad()
def encode_teacher(teacher: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Teacher tokens ``[B, F', H', W', D]`` of ``[B, F, 3, H, W]`` pixel values (no gradient)."""
    config = teacher.config
    param = next(teacher.parameters())
    batch, frames, _, height, width = pixel_values.shape
    hidden = teacher(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype)).last_hidden_state
    patch_h, patch_w = _pair(config.patch_size)
    return hidden.reshape(batch, frames // config.tubelet_size, height // patch_h, width // patch_w, -1)


# ------------------------------------------------------------------------------------------- cache
class TeacherTokenCache:
    """Teacher tokens on disk, one file per clip, computed once.

    At VideoREPA's geometry a clip's tokens are 24x10x15 x 768 = 2,764,800 values: about 5.5 MB in bf16.
    Each file records ``fingerprint`` (see :func:`teacher_fingerprint`) and the clip key; a file written for
    another teacher or geometry is recomputed, never reused. Writes are atomic (temp file, then rename), so
    several processes can share a cache folder.
    """

    def __init__(self, root: Union[str, os.PathLike], fingerprint: str, dtype: torch.dtype = torch.bfloat16):
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
        return entry["tokens"]

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
def random_videomae_v2_checkpoint(architecture: Optional[Mapping] = None, seed: int = 0,
                                  num_classes: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """A random checkpoint in the official VideoMAEv2 layout (``{"module": state_dict}``), for tests and
    offline demos. q/v biases are non-zero; ``num_classes > 0`` adds the ``fc_norm``/``head`` of a
    fine-tuned release."""
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
    return {"module": {"module." + k: v for k, v in sd.items()}}


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "VIDEOMAE_V2_BASE", "videomae_v2_config", "official_state_dict",
    "convert_videomae_v2_state_dict", "resize_position_table", "load_videomae_teacher", "teacher_fingerprint",
    "prepare_teacher_pixels", "encode_teacher", "TeacherTokenCache", "random_videomae_v2_checkpoint", "token_grid",
]
