"""VideoREPA for diffusers video transformers: block hook, projector, grid alignment and the TRD loss.

The :class:`VideoREPA` helper attaches to a transformer that keeps its blocks in
``transformer.transformer_blocks`` (diffusers' ``CogVideoXTransformer3DModel`` and most diffusers video
transformers) without forking it. A training step becomes::

    helper = VideoREPA(transformer, teacher_dim=768, align_layer=18)
    optimizer = torch.optim.AdamW(helper.trainable_parameters(transformer), lr=...)

    with helper.capture():
        pred = transformer(hidden_states=noisy_latents, ...)[0]       # latents [B, F, C, H, W]
        loss_trd = helper(teacher_tokens, noisy_latents.shape)
    loss = loss_diffusion + 0.5 * loss_trd

**Data parallel.** The helper is not passed to ``accelerator.prepare`` (nor wrapped in DDP): when
``torch.distributed`` is initialised with more than one rank, its first training forward wraps its own
projector and downsampler in ``DistributedDataParallel`` (rank 0's weights are broadcast then), so their
gradients are averaged like the transformer's. ``accelerator.register_for_checkpointing(helper)`` puts them in
``save_state``/``load_state`` without touching diffusers' model save/load hooks.

**Layer numbering.** ``align_layer`` counts blocks from 1, as VideoREPA does (its CogVideoX forward taps
the block whose ``i + 1 == align_layer``): ``align_layer=18`` hooks ``transformer.transformer_blocks[17]``,
the output of the 18th block.

**Alignment** (VideoREPA, arXiv 2505.23656, and its ``cogvideox_t2v_align`` trainer): the block's video
tokens ``[B, F*H*W, C]`` (frame-major, then row-major) go through the projector MLP to the teacher width,
the first latent frame is dropped (the teacher never sees the first pixel frame), the frames are
upsampled x2 by trilinear interpolation (one latent frame spans 4 pixel frames, one teacher tubelet 2) and
a stride-3 convolution brings each frame's token grid to the teacher's. For CogVideoX at 49x480x720:
13x30x45 tokens -> 12x30x45 -> 24x30x45 -> 24x10x15, which is VideoMAEv2-B's grid on 48 frames at 160x240.
The helper derives every size from the latent shape and the patch size and raises ``ValueError`` on a
geometry it cannot align.

This module needs only torch; diffusers is not imported.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..api import BACKENDS, trd_loss
from ..relation import canonicalize

Grid = Tuple[int, int, int]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _shape_tuple(latent_shape) -> Tuple[int, ...]:
    if isinstance(latent_shape, torch.Tensor):
        latent_shape = latent_shape.shape
    try:
        shape = tuple(int(d) for d in latent_shape)
    except TypeError as err:
        raise TypeError(
            f"latent_shape must be a shape (torch.Size / tuple) or the latent tensor, got {type(latent_shape).__name__}"
        ) from err
    if len(shape) != 5:
        raise ValueError(
            f"latent_shape must be the 5-D shape [B, F, C, H, W] of the latents fed to the transformer, got {shape}"
        )
    return shape


def student_token_grid(latent_shape, patch_size: int, patch_size_t: Optional[int] = None) -> Grid:
    """The (frames, rows, cols) token grid a diffusers video transformer makes of ``[B, F, C, H, W]`` latents."""
    _, frames, _, height, width = _shape_tuple(latent_shape)
    patch_size = _positive_int("patch_size", patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latent height x width {height}x{width} is not divisible by the transformer's patch_size={patch_size}"
        )
    if patch_size_t is not None:
        patch_size_t = _positive_int("patch_size_t", patch_size_t)
        if frames % patch_size_t:
            raise ValueError(
                f"{frames} latent frames are not a multiple of patch_size_t={patch_size_t}; pad the latents first "
                "(as CogVideoX 1.5 trainers do by repeating the first frame)"
            )
        frames //= patch_size_t
    return frames, height // patch_size, width // patch_size


def aligned_grid(student_grid: Sequence[int], drop_first_frame: bool = True, temporal_upsample: int = 2,
                 spatial_downsample: int = 3) -> Grid:
    """The token grid after VideoREPA's alignment of a student grid, or ``ValueError`` if it cannot align."""
    frames, rows, cols = (int(d) for d in student_grid)
    if drop_first_frame:
        if frames < 2:
            raise ValueError(
                f"the student grid {frames}x{rows}x{cols} has {frames} frame(s); dropping the first latent frame "
                "leaves none to align (use more frames, or drop_first_frame=False)"
            )
        frames -= 1
    if rows % spatial_downsample or cols % spatial_downsample:
        raise ValueError(
            f"the student token grid {rows}x{cols} per frame is not divisible by spatial_downsample="
            f"{spatial_downsample}; pick a resolution whose token grid is (e.g. 480x720 -> latent 60x90 -> "
            "tokens 30x45 -> 10x15)"
        )
    return frames * temporal_upsample, rows // spatial_downsample, cols // spatial_downsample


def _unwrap_transformer(transformer: nn.Module) -> nn.Module:
    """Find the module that owns ``transformer_blocks`` through DDP, torch.compile or peft wrappers."""
    candidate = transformer
    for _ in range(4):
        if isinstance(getattr(candidate, "transformer_blocks", None), nn.ModuleList):
            return candidate
        for attr in ("module", "_orig_mod"):
            inner = getattr(candidate, attr, None)
            if isinstance(inner, nn.Module):
                candidate = inner
                break
        else:
            base = getattr(candidate, "get_base_model", None)
            if callable(base) and base() is not candidate:
                candidate = base()
            else:
                break
    raise TypeError(
        f"VideoREPA needs a video transformer whose blocks are in `transformer_blocks` (an nn.ModuleList), e.g. "
        f"diffusers' CogVideoXTransformer3DModel; got {type(transformer).__name__}"
    )


def _config_value(model: nn.Module, name: str, default=None):
    config = getattr(model, "config", None)
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _infer_hidden_dim(model: nn.Module) -> int:
    heads = _config_value(model, "num_attention_heads")
    head_dim = _config_value(model, "attention_head_dim")
    if heads and head_dim:
        return int(heads) * int(head_dim)
    for name in ("inner_dim", "hidden_size", "hidden_dim"):
        value = _config_value(model, name)
        if value:
            return int(value)
    raise ValueError("cannot infer the transformer's hidden width from its config; pass hidden_dim=")


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class TeacherInput(NamedTuple):
    """The teacher's input for one latent shape (see :meth:`VideoREPA.teacher_input`)."""
    num_frames: int
    image_size: Tuple[int, int]
    grid: Grid


def _pair_int(value) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(int(v) for v in value)) != 1:
            raise ValueError(f"non-square teacher patches {tuple(value)} are not supported")
        value = value[0]
    return int(value)


class _AlignmentHead(nn.Module):
    """The helper's trainable part (projector, downsampler) as the module that DDP wraps; same parameters."""

    def __init__(self, owner: "VideoREPA"):
        super().__init__()
        self.projector, self.downsampler = owner.projector, owner.downsampler
        self.__dict__["_owner"] = owner  # not a submodule: no cycle

    def forward(self, hidden: torch.Tensor, latent_shape) -> torch.Tensor:
        return self._owner.align(hidden, latent_shape)


class VideoREPA(nn.Module):
    """VideoREPA's trainable parts and TRD loss for one hooked block of a diffusers video transformer.

    Args:
        transformer: the video transformer; its ``transformer_blocks[align_layer - 1]`` is hooked. It is not
            registered as a submodule: the helper's parameters and state dict hold only its own parts.
        teacher_dim: the teacher's token width (768 for VideoMAEv2 ViT-B).
        align_layer: which block to tap, counted from 1 (VideoREPA's default 18 is ``transformer_blocks[17]``).
        projector_dim: hidden width of the projector MLP ``Linear(C, P) -> SiLU -> Linear(P, P) -> SiLU ->
            Linear(P, teacher_dim)`` (VideoREPA: 2048).
        margin: TRD margin (VideoREPA: 0.1).
        relation: ``"full"`` (VideoREPA's loss), ``"spatial"`` or ``"temporal"`` pairs.
        hidden_dim: the block's token width ``C``; read from the config (heads x head dim) when None.
        patch_size, patch_size_t: the transformer's patch sizes; read from its config when None.
        drop_first_frame, temporal_upsample, spatial_downsample: the alignment (VideoREPA: True, 2, 3).
        backend, deterministic, reduction: passed to :func:`vrepa_kernels.trd_loss`.
        sync_gradients: under ``torch.distributed`` with several ranks, wrap the projector and downsampler in
            ``DistributedDataParallel`` at the first training forward (over ``process_group``, default all
            ranks). Pass False only if you wrap the helper in DDP yourself.
    """

    def __init__(self, transformer: nn.Module, teacher_dim: int = 768, align_layer: int = 18,
                 projector_dim: int = 2048, margin: float = 0.1, relation: str = "full", *,
                 hidden_dim: Optional[int] = None, patch_size: Optional[int] = None,
                 patch_size_t: Optional[int] = None, drop_first_frame: bool = True, temporal_upsample: int = 2,
                 spatial_downsample: int = 3, backend: str = "auto", deterministic: bool = False,
                 reduction: str = "mean", sync_gradients: bool = True, process_group=None):
        super().__init__()
        model = _unwrap_transformer(transformer)
        blocks = model.transformer_blocks
        align_layer = _positive_int("align_layer", align_layer)
        if align_layer > len(blocks):
            raise ValueError(
                f"align_layer={align_layer} counts blocks from 1, but the transformer has {len(blocks)} blocks "
                f"(valid: 1..{len(blocks)}; align_layer=k hooks transformer_blocks[k-1])"
            )
        self.teacher_dim = _positive_int("teacher_dim", teacher_dim)
        self.projector_dim = _positive_int("projector_dim", projector_dim)
        if hidden_dim is None:
            hidden_dim = _infer_hidden_dim(model)
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.temporal_upsample = _positive_int("temporal_upsample", temporal_upsample)
        self.spatial_downsample = _positive_int("spatial_downsample", spatial_downsample)
        self.drop_first_frame = bool(drop_first_frame)
        if patch_size is None:
            patch_size = _config_value(model, "patch_size")
            if patch_size is None:
                raise ValueError("the transformer's config has no patch_size; pass patch_size=")
        self.patch_size = _positive_int("patch_size", patch_size)
        if patch_size_t is None:
            patch_size_t = _config_value(model, "patch_size_t")
        self.patch_size_t = None if patch_size_t is None else _positive_int("patch_size_t", patch_size_t)
        probe = torch.zeros(1, 2, 1, 1)
        canonicalize(probe, probe, margin, relation, None, reduction)  # validates margin, relation, reduction
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.margin, self.relation, self.reduction = float(margin), relation, reduction
        self.backend, self.deterministic = backend, bool(deterministic)
        self.align_layer = align_layer

        self.projector = nn.Sequential(
            nn.Linear(self.hidden_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.teacher_dim),
        )
        s = self.spatial_downsample
        self.downsampler = nn.Conv2d(self.teacher_dim, self.teacher_dim, kernel_size=s, stride=s)

        self.sync_gradients = bool(sync_gradients)
        self.__dict__["_process_group"] = process_group
        self.__dict__["_ddp"] = None  # DistributedDataParallel of _AlignmentHead, outside the state dict

        self._armed = False
        self._consumed = False
        self._captured: Optional[torch.Tensor] = None
        self._captured_without_grad = False
        self._handle = blocks[align_layer - 1].register_forward_hook(self._on_block_output)

    # ---------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self):
        """Arm the hook for one transformer forward; the capture is dropped when the context exits.

        Outside this context the hook does nothing, so a gradient-checkpoint recomputation during a later
        backward can neither overwrite nor leak a capture. Inside it, the first forward of the hooked block
        is kept; after the helper has used it, further calls of the block (recomputation) are ignored.
        """
        if self._armed:
            raise RuntimeError("VideoREPA.capture() contexts do not nest")
        self._armed, self._consumed, self._captured = True, False, None
        try:
            yield self
        finally:
            self._armed, self._consumed, self._captured = False, False, None

    @property
    def captured(self) -> Optional[torch.Tensor]:
        """The hooked block's video tokens ``[B, F*H*W, C]`` of the current capture, or None."""
        return self._captured

    def _on_block_output(self, module: nn.Module, args, output) -> None:
        if not self._armed or self._consumed:
            return
        if self._captured is not None:
            raise RuntimeError(
                f"transformer_blocks[{self.align_layer - 1}] ran twice inside one VideoREPA.capture(); "
                "use one capture() context per transformer forward"
            )
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise TypeError(
                f"transformer_blocks[{self.align_layer - 1}] must return video tokens [B, N, C] (or a tuple "
                f"starting with them, as CogVideoX blocks return (hidden_states, encoder_hidden_states)); got {got}"
            )
        self._captured = hidden
        self._captured_without_grad = (not torch.is_grad_enabled()) and any(
            p.requires_grad for p in module.parameters()
        )

    def remove(self) -> None:
        """Detach the hook from the transformer."""
        self._handle.remove()

    # ---------------------------------------------------------------- alignment and loss
    def align(self, hidden: torch.Tensor, latent_shape) -> torch.Tensor:
        """Project and align block tokens ``[B, F*H*W, C]`` to the teacher grid: ``[B, F', H', W', teacher_dim]``.

        ``latent_shape`` is the shape ``[B, F, C, H, W]`` of the latents fed to the transformer (diffusers'
        CogVideoX layout); the token grid follows from it and the patch size.
        """
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, N, C] block tokens, got {getattr(hidden, 'shape', hidden)}")
        shape = _shape_tuple(latent_shape)
        batch, tokens, width = hidden.shape
        if width != self.hidden_dim:
            raise ValueError(f"hidden has width {width}, but the projector expects hidden_dim={self.hidden_dim}")
        if shape[0] != batch:
            raise ValueError(f"latent_shape has batch {shape[0]}, but the captured tokens have batch {batch}")
        frames, rows, cols = student_token_grid(shape, self.patch_size, self.patch_size_t)
        if tokens != frames * rows * cols:
            raise ValueError(
                f"the block returned {tokens} video tokens, but latents {shape} with patch_size={self.patch_size} "
                f"give a {frames}x{rows}x{cols} = {frames * rows * cols} token grid; pass the shape of the latents "
                "this forward consumed"
            )
        out_frames, out_rows, out_cols = aligned_grid(
            (frames, rows, cols), self.drop_first_frame, self.temporal_upsample, self.spatial_downsample
        )
        x = hidden.reshape(batch, frames, rows * cols, width)
        if self.drop_first_frame:
            x = x[:, 1:]
        weight = self.projector[0].weight
        if not _autocast_on(x.device.type) and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        x = self.projector(x)  # [B, F, H*W, Dt]
        kept = x.shape[1]
        x = x.reshape(batch, kept, rows, cols, self.teacher_dim).permute(0, 4, 1, 2, 3)  # [B, Dt, F, H, W]
        if self.temporal_upsample > 1:
            x = F.interpolate(x, scale_factor=(float(self.temporal_upsample), 1.0, 1.0), mode="trilinear",
                              align_corners=False)
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * out_frames, self.teacher_dim, rows, cols)
        conv_weight = self.downsampler.weight
        if not _autocast_on(x.device.type) and x.dtype != conv_weight.dtype:
            x = x.to(conv_weight.dtype)
        x = self.downsampler(x)  # [B*F', Dt, H', W']
        return x.reshape(batch, out_frames, self.teacher_dim, out_rows, out_cols).permute(0, 1, 3, 4, 2)

    def teacher_grid(self, teacher_tokens: torch.Tensor, aligned_shape: Sequence[int]) -> torch.Tensor:
        """``[B, N, Dt]`` or ``[B, F, H, W, Dt]`` teacher tokens as ``[B, F, H, W, Dt]``, checked against the
        student's aligned shape."""
        batch, frames, rows, cols, width = (int(d) for d in aligned_shape)
        want = (batch, frames, rows, cols, width)
        if not isinstance(teacher_tokens, torch.Tensor):
            raise TypeError(f"teacher_tokens must be a torch.Tensor, got {type(teacher_tokens).__name__}")
        hint = (
            f"the student aligns to a {frames}x{rows}x{cols} grid of width {width}; a VideoMAE-style teacher "
            f"gives that on {frames * 2} frames (tubelet 2) at {rows}*patch x {cols}*patch pixels"
        )
        if teacher_tokens.dim() == 3:
            if tuple(teacher_tokens.shape) != (batch, frames * rows * cols, width):
                raise ValueError(
                    f"teacher_tokens has shape {tuple(teacher_tokens.shape)}, expected "
                    f"{(batch, frames * rows * cols, width)}: {hint}"
                )
            return teacher_tokens.reshape(want)
        if teacher_tokens.dim() == 5:
            if tuple(teacher_tokens.shape) != want:
                raise ValueError(f"teacher_tokens has shape {tuple(teacher_tokens.shape)}, expected {want}: {hint}")
            return teacher_tokens
        raise ValueError(
            f"teacher_tokens must be [B, N, Dt] or [B, F, H, W, Dt], got shape {tuple(teacher_tokens.shape)}"
        )

    def trd(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """TRD loss of aligned ``[B, F, H, W, D]`` grids (frames carried to the relation), outside autocast."""
        batch, frames = student.shape[:2]
        s = student.reshape(batch, frames, -1, student.shape[-1])
        t = teacher.reshape(batch, frames, -1, teacher.shape[-1]).to(device=s.device, dtype=s.dtype)
        with _autocast_off(s.device.type):
            return trd_loss(s, t, margin=self.margin, relation=self.relation, reduction=self.reduction,
                            backend=self.backend, deterministic=self.deterministic)

    def forward(self, teacher_tokens: torch.Tensor, latent_shape) -> torch.Tensor:
        """TRD loss between the captured block tokens (aligned) and ``teacher_tokens``.

        Call inside ``with helper.capture():`` after the transformer forward. ``teacher_tokens`` are
        ``[B, N, Dt]`` in frame-major, row-major order (VideoMAE's ``last_hidden_state``) or ``[B, F, H, W, Dt]``.
        """
        if not self._armed:
            raise RuntimeError(
                "call the VideoREPA helper inside `with helper.capture():`, after the transformer forward")
        hidden = self._captured
        if hidden is None:
            raise RuntimeError(
                f"nothing was captured: transformer_blocks[{self.align_layer - 1}] did not run inside this "
                "capture() context; run the transformer forward first"
            )
        if self._captured_without_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "the hooked block ran with autograd off (reentrant gradient checkpointing or torch.no_grad), so the "
                "TRD loss cannot reach the transformer; use non-reentrant checkpointing (diffusers' default)"
            )
        self._consumed = True
        student = self._aligner()(hidden, latent_shape)
        teacher = self.teacher_grid(teacher_tokens, student.shape)
        return self.trd(student, teacher)

    def _aligner(self):
        """:meth:`align`, through DistributedDataParallel when training on several ranks (created once)."""
        dist = torch.distributed
        if not (self.sync_gradients and self.training and torch.is_grad_enabled() and dist.is_available()
                and dist.is_initialized()):
            return self.align
        group = self._process_group
        if dist.get_world_size(group) <= 1:
            return self.align
        outer = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if outer is not None and outer.module is self:  # the caller wrapped the helper in DDP: it syncs already
            return self.align
        if self._ddp is None:
            device = self.projector[0].weight.device
            if device.type == "cuda":
                device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
            else:
                device_ids = None
            self.__dict__["_ddp"] = nn.parallel.DistributedDataParallel(
                _AlignmentHead(self), device_ids=device_ids,
                process_group=group, broadcast_buffers=False)
        return self._ddp

    def teacher_input(self, latent_shape, teacher: Optional[nn.Module] = None, *, patch_size: int = 16,
                      tubelet_size: int = 2) -> "TeacherInput":
        """What a VideoMAE-style teacher must see for latents of ``latent_shape`` ``[B, F, C, H, W]``.

        Returns ``TeacherInput(num_frames, image_size, grid)``: the pixel frames (the clip's frames after the
        first), their (height, width) and the token grid, which equals the student's aligned grid. The
        teacher's patch and tubelet sizes come from ``teacher.config`` when a teacher is given (VideoMAEv2:
        16 and 2). CogVideoX at 49x480x720 (latents 13x60x90): 48 frames at 160x240, grid 24x10x15.
        """
        if teacher is not None:
            config = teacher.config
            patch_size = _pair_int(config.patch_size)
            tubelet_size = int(config.tubelet_size)
        patch_size = _positive_int("patch_size", patch_size)
        tubelet_size = _positive_int("tubelet_size", tubelet_size)
        grid = aligned_grid(student_token_grid(latent_shape, self.patch_size, self.patch_size_t),
                            self.drop_first_frame, self.temporal_upsample, self.spatial_downsample)
        return TeacherInput(grid[0] * tubelet_size, (grid[1] * patch_size, grid[2] * patch_size), grid)

    # ---------------------------------------------------------------- optimizer and checkpoints
    def trainable_parameters(self, transformer: Optional[nn.Module] = None) -> List[nn.Parameter]:
        """The helper's parameters plus, if given, the transformer's trainable ones (all in full finetuning,
        the adapters under LoRA), each once."""
        params: Dict[int, nn.Parameter] = {id(p): p for p in self.parameters()}
        if transformer is not None:
            for p in transformer.parameters():
                if p.requires_grad:
                    params.setdefault(id(p), p)
        return list(params.values())

    def config_dict(self) -> Dict[str, object]:
        """Constructor arguments (without the transformer), for saving next to :meth:`state_dict`."""
        return {
            "teacher_dim": self.teacher_dim, "align_layer": self.align_layer, "projector_dim": self.projector_dim,
            "margin": self.margin, "relation": self.relation, "hidden_dim": self.hidden_dim,
            "patch_size": self.patch_size, "patch_size_t": self.patch_size_t,
            "drop_first_frame": self.drop_first_frame, "temporal_upsample": self.temporal_upsample,
            "spatial_downsample": self.spatial_downsample, "reduction": self.reduction,
        }

    def extra_repr(self) -> str:
        return (f"align_layer={self.align_layer} (transformer_blocks[{self.align_layer - 1}]), "
                f"hidden_dim={self.hidden_dim}, teacher_dim={self.teacher_dim}, margin={self.margin}, "
                f"relation={self.relation!r}")


__all__ = ["VideoREPA", "TeacherInput", "student_token_grid", "aligned_grid"]
