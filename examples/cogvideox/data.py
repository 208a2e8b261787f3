"""Clips and prompts for the example, prepared as VideoREPA's trainer prepares them (or as before, by flag).

Defaults follow aHapBean/VideoREPA, ``finetune/datasets/``:

- frames (``utils.py``, ``preprocess_video_with_resize_with_frame_idxs``): every ``(n // num_frames)``-th
  frame from frame 0, the first ``num_frames`` of those; a clip shorter than ``num_frames`` keeps all its
  frames and repeats the last one.
- size (``data_transform.py``, ``CenterCropResizeVideo``): a centred crop to the target aspect ratio, then a
  bilinear resize with antialiasing (``align_corners=True``); ``t2v_dataset.py`` then maps 0..255 to [-1, 1].

``frame_sampling="linspace"`` and ``resize="bicubic_crop"`` give this example's earlier behaviour: frames
spread evenly over the whole clip (short clips rejected), bicubic resize of the short side, centre crop, clamp.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

FRAME_SAMPLING = ("stride", "linspace")
RESIZE = ("crop_bilinear", "bicubic_crop")


def frame_indices(total: int, num_frames: int, sampling: str = "stride") -> List[int]:
    """Indices of the frames to keep from a clip of ``total`` frames (see the module docstring)."""
    if total < 1:
        raise ValueError(f"the clip has {total} frames")
    if sampling == "stride":
        if total < num_frames:
            return list(range(total)) + [total - 1] * (num_frames - total)
        return list(range(0, total, total // num_frames))[:num_frames]
    if sampling == "linspace":
        if total < num_frames:
            raise ValueError(f"the clip has {total} frames, needs at least num_frames={num_frames} "
                             "(frame_sampling='stride' pads short clips instead)")
        return torch.linspace(0, total - 1, num_frames).round().long().tolist()
    raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")


def crop_to_aspect(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred crop of ``[..., H, W]`` with the aspect ratio of ``height x width`` (sizes truncated)."""
    h, w = clip.shape[-2:]
    ratio = height / width
    new_h, new_w = (int(w * ratio), w) if h / w > ratio else (h, int(h / ratio))
    top, left = int(round((h - new_h) / 2.0)), int(round((w - new_w) / 2.0))
    return clip[..., top:top + new_h, left:left + new_w]


def resize_clip(clip: torch.Tensor, height: int, width: int, mode: str = "crop_bilinear") -> torch.Tensor:
    """``[F, 3, H, W]`` float frames to ``height x width`` (see the module docstring)."""
    if mode == "crop_bilinear":
        clip = crop_to_aspect(clip, height, width)
        if tuple(clip.shape[-2:]) == (height, width):
            return clip
        # Linear with weights summing to 1, so the same on [-1, 1] as on 0..255 and without overshoot.
        return F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=True, antialias=True)
    if mode == "bicubic_crop":
        h, w = clip.shape[-2:]
        if (h, w) != (height, width):
            scale = max(height / h, width / w)
            new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
            clip = F.interpolate(clip, size=(new_h, new_w), mode="bicubic", align_corners=False)
            top, left = (new_h - height) // 2, (new_w - width) // 2
            clip = clip[:, :, top:top + height, left:left + width]
        return clip.clamp(-1, 1)
    raise ValueError(f"resize must be one of {RESIZE}, got {mode!r}")


def _read_video_file(path: Path, pick: Callable[[int], List[int]]) -> torch.Tensor:
    """uint8 [F, H, W, 3] frames ``pick(total)`` of a video file via decord, torchvision or imageio."""
    if importlib.util.find_spec("decord") is not None:
        import decord

        decord.bridge.set_bridge("torch")
        reader = decord.VideoReader(str(path))
        return reader.get_batch(pick(len(reader)))
    if importlib.util.find_spec("torchvision") is not None:
        from torchvision.io import read_video

        frames = read_video(str(path), pts_unit="sec", output_format="THWC")[0]
    elif importlib.util.find_spec("imageio") is not None:
        import imageio.v3 as iio

        frames = torch.from_numpy(iio.imread(str(path)))
    else:
        raise ImportError(f"reading {path.name} needs a video decoder: pip install decord "
                          "(or torchvision, or imageio[pyav])")
    return frames[pick(frames.shape[0])]


def load_clip(path: Path, num_frames: int, height: int, width: int, frame_sampling: str = "stride",
              resize: str = "crop_bilinear") -> torch.Tensor:
    """``[num_frames, 3, height, width]`` float32 in [-1, 1] from a .pt/.npy tensor (float [F, 3, H, W] in
    [-1, 1] or uint8 [F, H, W, 3]) or a video file."""
    pick = lambda total: frame_indices(total, num_frames, frame_sampling)  # noqa: E731
    if path.suffix in (".pt", ".pth", ".npy"):
        if path.suffix == ".npy":
            import numpy as np

            clip = torch.from_numpy(np.load(path))
        else:
            clip = torch.load(path, map_location="cpu", weights_only=True)
        if clip.dim() != 4:
            raise ValueError(f"{path}: expected a 4-D clip, got shape {tuple(clip.shape)}")
        clip = clip[pick(clip.shape[0])]
    else:
        clip = _read_video_file(path, pick)
    if clip.dtype == torch.uint8:  # [F, H, W, C] in 0..255
        clip = clip.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    clip = clip.float()
    if clip.shape[1] != 3:
        raise ValueError(f"{path}: expected [F, 3, H, W] or uint8 [F, H, W, 3], got shape {tuple(clip.shape)}")
    return resize_clip(clip, height, width, resize).contiguous()


class ClipDataset(torch.utils.data.Dataset):
    """Clips and prompts listed line by line in ``data_root/caption_column`` and ``data_root/video_column``."""

    def __init__(self, root, caption_column, video_column, num_frames, height, width, frame_sampling="stride",
                 resize="crop_bilinear"):
        self.root = Path(root)
        prompt_file, video_file = self.root / caption_column, self.root / video_column
        for f, flag in ((prompt_file, "--caption_column"), (video_file, "--video_column")):
            if not f.is_file():
                raise ValueError(f"{flag}: {f} is not a file of line-separated entries in --data_root")
        self.prompts = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.videos = [line.strip() for line in video_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(self.prompts) != len(self.videos) or not self.videos:
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.videos)} videos in {self.root}")
        frame_indices(num_frames, num_frames, frame_sampling)  # validates the option
        resize_clip(torch.zeros(1, 3, height, width), height, width, resize)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_sampling, self.resize = frame_sampling, resize

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        clip = load_clip(self.root / self.videos[index], self.num_frames, self.height, self.width,
                         self.frame_sampling, self.resize)
        return {"frames": clip, "prompt": self.prompts[index], "key": self.videos[index]}


def collate(examples):
    return {"frames": torch.stack([e["frames"] for e in examples]),  # [B, F, 3, H, W] in [-1, 1]
            "prompts": [e["prompt"] for e in examples], "keys": [e["key"] for e in examples]}
