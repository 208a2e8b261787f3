"""VideoREPA for diffusers video transformers: block hooks, projectors, grid alignment and the TRD loss.

The :class:`VideoREPA` helper attaches to a diffusers video transformer without forking it. A training step
becomes::

    helper = VideoREPA(transformer, teacher_dim=768, align_layer=18)      # or align_layer=[8, 16]
    optimizer = torch.optim.AdamW(helper.trainable_parameters(transformer), lr=...)

    with helper.capture():
        pred = transformer(hidden_states=noisy_latents, ...)[0]
        loss_trd = helper(teacher_tokens, noisy_latents.shape)
    loss = loss_diffusion + 0.5 * loss_trd

**Supported models.** The helper reads the block list, patch sizes and latent layout of these classes (and
their subclasses); any other model needs ``blocks=``, ``latent_layout=`` and ``patch_size=`` (else
``TypeError`` naming the class and what was missing):

=========================================  ===========================================  =======  =========  ====
model                                      blocks (``align_layer`` counts through them)  layout   patch      VAE
=========================================  ===========================================  =======  =========  ====
``CogVideoXTransformer3DModel``            ``transformer_blocks``                        BFCHW    (t, 2, 2)  4
``WanTransformer3DModel`` (Wan 2.1/2.2)    ``blocks``                                    BCFHW    (1, 2, 2)  4
``HunyuanVideoTransformer3DModel``         ``transformer_blocks`` + ``single_...``       BCFHW    (1, 2, 2)  4
``LTXVideoTransformer3DModel``             ``transformer_blocks``                        BCFHW*   (1, 1, 1)  8
=========================================  ===========================================  =======  =========  ====

*Text tokens.* Only video tokens are aligned. Every block of these models returns them apart from the text:
CogVideoX and HunyuanVideo blocks (dual- and single-stream) attend over text and video jointly but return
``(video, text)``, the single-stream ones splitting their concatenation back; Wan and LTX-Video blocks take
text by cross-attention only and return the video tokens alone. The hook takes the first output and checks
its length against the video token grid, so a block that returned text as well is an error, not a silent
misalignment. (*) LTX-Video consumes latents packed to ``[B, F*H*W, C]``; pass the unpacked shape
``[B, C, F, H, W]`` (its pipeline's ``latent_num_frames, latent_height, latent_width``).

*VAE frames vs teacher tubelets.* The causal VAEs of CogVideoX, Wan, HunyuanVideo and LTX-Video encode the
first pixel frame alone into the first latent frame and each later group of ``r`` pixel frames (``r`` = 4,
4, 4, 8: the last column) into one latent frame; ``4k + 1`` pixel frames give ``k + 1`` latent frames
(``8k + 1`` for LTX-Video). The teacher (VideoMAEv2, tubelet 2) is fed the frames after the first, so each
later latent frame spans ``r / 2`` teacher tubelets: the helper drops the first latent frame and upsamples
the rest by ``temporal_upsample = r / 2`` (2, or 4 for LTX-Video). Wan's and LTX-Video's encoders are causal
frame by frame (latent frame 0 sees pixel frame 0 only); CogVideoX's and HunyuanVideo's GroupNorms take
statistics over all frames, so there the mapping holds for where frames are pooled, not strictly for what
each latent frame sees (tests/test_integrations_families.py checks both on tiny VAEs).

**Alignment** (VideoREPA, arXiv 2505.23656; aHapBean/VideoREPA ``finetune/models/cogvideox_t2v_align``): the
block's video tokens ``[B, F*H*W, C]`` (frame-major, then row-major) go through the projector MLP to the
teacher width, the first latent frame is dropped, the frames are upsampled by trilinear interpolation and
a stride-3 convolution brings each frame's token grid to the teacher's. CogVideoX at 49x480x720: 13x30x45
tokens -> 12x30x45 -> 24x30x45 -> 24x10x15, VideoMAEv2-B's grid on 48 frames at 160x240.

**Native grid** (``native_grid=True``; not in VideoREPA): no downsampler; the student keeps its own spatial
token grid and the teacher is run at the matching pixel size (:meth:`VideoREPA.teacher_input`): CogVideoX
49x480x720 -> 24x30x45 = 32,400 tokens, teacher on 48 frames at 480x720; Wan 81x480x832 -> latent tokens
21x30x52 (32,760), aligned 40x30x52 = 62,400, teacher on 80 frames at 480x832. VideoREPA shrinks the
student to the teacher's 3,600 tokens because its ``bmm`` Grams grow as N^2; the blockwise loss does not
(examples/wan/README.md has the memory per sample and the teacher's cost).

**Several layers** (``align_layer=[8, 16]``; VideoREPA aligns one): each layer gets its own projector and
downsampler, and the TRD losses are averaged.

**Data parallel.** The helper is not passed to ``accelerator.prepare`` (nor wrapped in DDP): when
``torch.distributed`` is initialised with more than one rank, its first training forward wraps its own
projectors and downsamplers in ``DistributedDataParallel`` (rank 0's weights are broadcast then), so their
gradients are averaged like the transformer's. ``accelerator.register_for_checkpointing(helper)`` puts them in
``save_state``/``load_state`` without touching diffusers' model save/load hooks.

**Layer numbering.** ``align_layer`` counts blocks from 1, as VideoREPA does (its CogVideoX forward taps
the block whose ``i + 1 == align_layer``): ``align_layer=18`` hooks ``transformer.transformer_blocks[17]``,
the output of the 18th block. For HunyuanVideo the count runs through the 20 dual-stream blocks, then the
single-stream ones, in forward order.

This module needs only torch; diffusers is not imported.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..api import BACKENDS, trd_loss
from ..relation import canonicalize

Grid = Tuple[int, int, int]
LAYOUTS = ("BFCHW", "BCFHW")


class ModelFamily(NamedTuple):
    """How the helper reads one diffusers video transformer class."""
    block_lists: Tuple[str, ...]  # attributes holding the blocks, in forward order
    latent_layout: str            # "BFCHW" (CogVideoX) or "BCFHW"
    temporal_upsample: int        # VAE pixel frames per later latent frame / teacher tubelet (2)


FAMILIES: Dict[str, ModelFamily] = {
    "CogVideoXTransformer3DModel": ModelFamily(("transformer_blocks",), "BFCHW", 2),
    "WanTransformer3DModel": ModelFamily(("blocks",), "BCFHW", 2),
    "HunyuanVideoTransformer3DModel": ModelFamily(("transformer_blocks", "single_transformer_blocks"), "BCFHW", 2),
    "LTXVideoTransformer3DModel": ModelFamily(("transformer_blocks",), "BCFHW", 4),
}


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_layout(latent_layout) -> str:
    if latent_layout not in LAYOUTS:
        raise ValueError(f"latent_layout must be one of {LAYOUTS}, got {latent_layout!r}")
    return latent_layout


def _shape_tuple(latent_shape, latent_layout: str = "BFCHW") -> Tuple[int, ...]:
    if isinstance(latent_shape, torch.Tensor):
        latent_shape = latent_shape.shape
    try:
        shape = tuple(int(d) for d in latent_shape)
    except TypeError as err:
        raise TypeError(
            f"latent_shape must be a shape (torch.Size / tuple) or the latent tensor, got {type(latent_shape).__name__}"
        ) from err
    if len(shape) != 5:
        layout = "[" + ", ".join(_check_layout(latent_layout)) + "]"
        raise ValueError(
            f"latent_shape must be the 5-D shape {layout} of the latents fed to the transformer (packed LTX-Video "
            f"latents: their unpacked shape), got {shape}"
        )
    return shape


def _frames_rows_cols(shape: Tuple[int, ...], latent_layout: str) -> Tuple[int, int, int, int]:
    """(batch, frames, height, width) of a 5-D latent shape in ``latent_layout``."""
    if _check_layout(latent_layout) == "BFCHW":
        batch, frames, _, height, width = shape
    else:
        batch, _, frames, height, width = shape
    return batch, frames, height, width


def student_token_grid(latent_shape, patch_size: int, patch_size_t: Optional[int] = None,
                       latent_layout: str = "BFCHW") -> Grid:
    """The (frames, rows, cols) token grid a diffusers video transformer makes of its 5-D latents.

    ``latent_layout`` is ``"BFCHW"`` (CogVideoX) or ``"BCFHW"`` (Wan, HunyuanVideo, unpacked LTX-Video).
    """
    _, frames, height, width = _frames_rows_cols(_shape_tuple(latent_shape, latent_layout), latent_layout)
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
            "tokens 30x45 -> 10x15), or native_grid=True"
        )
    return frames * temporal_upsample, rows // spatial_downsample, cols // spatial_downsample


def _family_of(model: nn.Module) -> Optional[ModelFamily]:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


def _readable(model: nn.Module) -> bool:
    return _family_of(model) is not None or any(
        isinstance(getattr(model, name, None), nn.ModuleList) for name in ("transformer_blocks", "blocks"))


def _unwrap_transformer(transformer: nn.Module, explicit_blocks: bool = False) -> nn.Module:
    """The diffusers model inside DDP, torch.compile or peft wrappers (the transformer itself if none is)."""
    candidate = transformer
    for _ in range(4):
        if _readable(candidate):
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
    if explicit_blocks:
        return candidate
    raise TypeError(
        f"VideoREPA cannot read {type(transformer).__name__}: it is none of {', '.join(sorted(FAMILIES))} and has no "
        "`transformer_blocks` or `blocks` nn.ModuleList; pass blocks=, latent_layout= and patch_size="
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
    raise ValueError(f"cannot infer the hidden width of {type(model).__name__} from its config; pass hidden_dim=")


def _split_patch(patch_size, patch_size_t) -> Tuple[int, Optional[int]]:
    """(spatial, temporal) patch sizes from an int or a (t, h, w) tuple (Wan's config)."""
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != 3 or patch_size[1] != patch_size[2]:
            raise ValueError(f"patch_size must be an int or a (t, h, w) tuple with h == w, got {tuple(patch_size)}")
        if patch_size_t is not None and int(patch_size_t) != int(patch_size[0]):
            raise ValueError(f"patch_size_t={patch_size_t} contradicts patch_size={tuple(patch_size)}")
        patch_size_t, patch_size = patch_size[0], patch_size[1]
    return (_positive_int("patch_size", patch_size),
            None if patch_size_t is None else _positive_int("patch_size_t", patch_size_t))


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
    """The helper's trainable part (projectors, downsamplers) as the module that DDP wraps; same parameters."""

    def __init__(self, owner: "VideoREPA"):
        super().__init__()
        self.heads = nn.ModuleList(nn.ModuleList(pair) for pair in owner.heads())
        self.__dict__["_owner"] = owner  # not a submodule: no cycle

    def forward(self, hiddens: Sequence[torch.Tensor], latent_shape) -> Tuple[torch.Tensor, ...]:
        return tuple(self._owner.align(h, latent_shape, index=i) for i, h in enumerate(hiddens))


def _as_layers(align_layer) -> List[int]:
    if isinstance(align_layer, (list, tuple)):
        if not align_layer:
            raise ValueError("align_layer must be an int or a non-empty list of ints, got []")
        layers = [_positive_int("align_layer", v) for v in align_layer]
        if len(set(layers)) != len(layers):
            raise ValueError(f"align_layer lists a layer twice: {list(align_layer)}")
        return layers
    return [_positive_int("align_layer", align_layer)]


class VideoREPA(nn.Module):
    """VideoREPA's trainable parts and TRD loss for hooked blocks of a diffusers video transformer.

    Args:
        transformer: the video transformer (see the module docstring for the classes read automatically). It is
            not registered as a submodule: the helper's parameters and state dict hold only its own parts.
        teacher_dim: the teacher's token width (768 for VideoMAEv2 ViT-B).
        align_layer: which block to tap, counted from 1 (VideoREPA's default 18 is ``transformer_blocks[17]``),
            or a list of blocks: each gets its own projector and downsampler and the TRD losses are averaged.
        projector_dim: hidden width of each projector MLP ``Linear(C, P) -> SiLU -> Linear(P, P) -> SiLU ->
            Linear(P, teacher_dim)`` (VideoREPA: 2048).
        margin: TRD margin (VideoREPA: 0.1).
        relation: ``"full"`` (VideoREPA's loss), ``"spatial"`` or ``"temporal"`` pairs.
        hidden_dim: the block's token width ``C``; read from the config (heads x head dim) when None.
        blocks: the block list (an ``nn.ModuleList``, a list of them, or attribute names), for a model not read
            automatically.
        latent_layout: ``"BFCHW"`` or ``"BCFHW"``: the order of the latents whose shape is passed to the loss.
        patch_size, patch_size_t: the transformer's patch sizes (an int each, or patch_size=(t, h, w)); read
            from its config when None.
        native_grid: align at the student's own spatial token grid (no downsampler); the teacher then runs at
            the matching pixel size (:meth:`teacher_input`).
        drop_first_frame, temporal_upsample, spatial_downsample: the alignment (VideoREPA: True, 2, 3);
            ``temporal_upsample`` defaults to the VAE's frames per latent frame / 2 (4 for LTX-Video),
            ``spatial_downsample`` to 3 (1 with ``native_grid``).
        backend, deterministic, reduction: passed to :func:`vrepa_kernels.trd_loss`.
        sync_gradients: under ``torch.distributed`` with several ranks, wrap the projectors and downsamplers in
            ``DistributedDataParallel`` at the first training forward (over ``process_group``, default all
            ranks). Pass False only if you wrap the helper in DDP yourself.

    With one layer the parts are ``helper.projector`` and ``helper.downsampler`` (state-dict keys unchanged);
    with several, ``helper.projectors[i]`` and ``helper.downsamplers[i]``. :meth:`heads` lists them either way.
    """

    def __init__(self, transformer: nn.Module, teacher_dim: int = 768, align_layer: Union[int, Sequence[int]] = 18,
                 projector_dim: int = 2048, margin: float = 0.1, relation: str = "full", *,
                 hidden_dim: Optional[int] = None, blocks=None, latent_layout: Optional[str] = None,
                 patch_size=None, patch_size_t: Optional[int] = None, native_grid: bool = False,
                 drop_first_frame: bool = True, temporal_upsample: Optional[int] = None,
                 spatial_downsample: Optional[int] = None, backend: str = "auto", deterministic: bool = False,
                 reduction: str = "mean", sync_gradients: bool = True, process_group=None):
        super().__init__()
        model = _unwrap_transformer(transformer, explicit_blocks=blocks is not None)
        family = _family_of(model)
        name = type(model).__name__
        block_list = self._find_blocks(model, family, blocks)
        if latent_layout is None:
            if family is None:
                if blocks is not None or not isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList):
                    raise TypeError(f"VideoREPA does not know the latent layout of {name}; pass latent_layout= "
                                    f"(one of {LAYOUTS})")
                latent_layout = "BFCHW"  # a CogVideoX-like model (the helper's earlier contract)
            else:
                latent_layout = family.latent_layout
        self.latent_layout = _check_layout(latent_layout)
        self.align_layers = _as_layers(align_layer)
        for layer in self.align_layers:
            if layer > len(block_list):
                raise ValueError(
                    f"align_layer={layer} counts blocks from 1, but {name} has {len(block_list)} blocks "
                    f"(valid: 1..{len(block_list)}; align_layer=k hooks block k-1)"
                )
        self.teacher_dim = _positive_int("teacher_dim", teacher_dim)
        self.projector_dim = _positive_int("projector_dim", projector_dim)
        if hidden_dim is None:
            hidden_dim = _infer_hidden_dim(model)
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        if temporal_upsample is None:
            temporal_upsample = family.temporal_upsample if family is not None else 2
        self.temporal_upsample = _positive_int("temporal_upsample", temporal_upsample)
        self.native_grid = bool(native_grid)
        if spatial_downsample is None:
            spatial_downsample = 1 if self.native_grid else 3
        self.spatial_downsample = _positive_int("spatial_downsample", spatial_downsample)
        if self.native_grid and self.spatial_downsample != 1:
            raise ValueError(f"native_grid=True aligns without a downsampler; got spatial_downsample="
                             f"{spatial_downsample}")
        self.drop_first_frame = bool(drop_first_frame)
        if patch_size is None:
            patch_size = _config_value(model, "patch_size")
            if patch_size is None:
                raise TypeError(f"the config of {name} has no patch_size; pass patch_size=")
            if patch_size_t is None and not isinstance(patch_size, (tuple, list)):
                patch_size_t = _config_value(model, "patch_size_t")
        self.patch_size, self.patch_size_t = _split_patch(patch_size, patch_size_t)
        probe = torch.zeros(1, 2, 1, 1)
        canonicalize(probe, probe, margin, relation, None, reduction)  # validates margin, relation, reduction
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.margin, self.relation, self.reduction = float(margin), relation, reduction
        self.backend, self.deterministic = backend, bool(deterministic)

        parts = [(self._make_projector(), self._make_downsampler()) for _ in self.align_layers]
        if len(parts) == 1:
            self.projector, self.downsampler = parts[0]
        else:
            self.projectors = nn.ModuleList(p for p, _ in parts)
            self.downsamplers = nn.ModuleList(d for _, d in parts)

        self.sync_gradients = bool(sync_gradients)
        self.__dict__["_process_group"] = process_group
        self.__dict__["_ddp"] = None  # DistributedDataParallel of _AlignmentHead, outside the state dict
        self.__dict__["_block_names"] = [self._block_name(model, block_list, k - 1) for k in self.align_layers]

        self._armed = False
        self._consumed = False
        self._captured: Dict[int, torch.Tensor] = {}
        self._captured_without_grad = False
        self._handles = [block_list[k - 1].register_forward_hook(functools.partial(self._on_block_output, i))
                         for i, k in enumerate(self.align_layers)]

    @staticmethod
    def _find_blocks(model: nn.Module, family: Optional[ModelFamily], blocks) -> List[nn.Module]:
        name = type(model).__name__
        if blocks is None:
            names = family.block_lists if family is not None else next(
                ((n,) for n in ("transformer_blocks", "blocks") if isinstance(getattr(model, n, None), nn.ModuleList)),
                ())
            blocks = list(names)
        if isinstance(blocks, (str, nn.ModuleList)):
            blocks = [blocks]
        found: List[nn.Module] = []
        for item in blocks:
            if isinstance(item, str):
                value = getattr(model, item, None)
                if not isinstance(value, nn.ModuleList):
                    raise TypeError(f"{name} has no nn.ModuleList `{item}` of transformer blocks")
                found.extend(value)
            elif isinstance(item, nn.ModuleList):
                found.extend(item)
            elif isinstance(item, nn.Module):
                found.append(item)
            else:
                raise TypeError(f"blocks must hold nn.ModuleLists, modules or attribute names, got "
                                f"{type(item).__name__}")
        if not found:
            raise TypeError(f"VideoREPA found no transformer blocks in {name}; pass blocks=")
        return found

    @staticmethod
    def _block_name(model: nn.Module, block_list: List[nn.Module], index: int) -> str:
        target = block_list[index]
        for qualified, module in model.named_modules():
            if module is target:
                return qualified.replace(".", "[", 1) + "]" if "." in qualified else qualified
        return f"block {index}"

    def _make_projector(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(self.hidden_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.projector_dim),
            nn.SiLU(),
            nn.Linear(self.projector_dim, self.teacher_dim),
        )

    def _make_downsampler(self) -> nn.Module:
        s = self.spatial_downsample
        if s == 1:
            return nn.Identity()
        return nn.Conv2d(self.teacher_dim, self.teacher_dim, kernel_size=s, stride=s)

    def heads(self) -> List[Tuple[nn.Module, nn.Module]]:
        """``(projector, downsampler)`` per aligned layer, in ``align_layers`` order."""
        if len(self.align_layers) == 1:
            return [(self.projector, self.downsampler)]
        return list(zip(self.projectors, self.downsamplers))

    @property
    def align_layer(self) -> Union[int, List[int]]:
        """The aligned block as given: an int, or the list of blocks."""
        return self.align_layers[0] if len(self.align_layers) == 1 else list(self.align_layers)

    # ---------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self):
        """Arm the hooks for one transformer forward; the captures are dropped when the context exits.

        Outside this context the hooks do nothing, so a gradient-checkpoint recomputation during a later
        backward can neither overwrite nor leak a capture. Inside it, the first forward of each hooked block
        is kept; after the helper has used them, further calls of the blocks (recomputation) are ignored.
        """
        if self._armed:
            raise RuntimeError("VideoREPA.capture() contexts do not nest")
        self._armed, self._consumed, self._captured = True, False, {}
        self._captured_without_grad = False
        try:
            yield self
        finally:
            self._armed, self._consumed, self._captured = False, False, {}

    @property
    def captured(self):
        """The hooked block's video tokens ``[B, F*H*W, C]`` of the current capture (None before the block ran);
        with several layers, a dict ``{layer: tokens}`` of those captured so far."""
        if len(self.align_layers) == 1:
            return self._captured.get(0)
        return {self.align_layers[i]: t for i, t in sorted(self._captured.items())}

    def _on_block_output(self, index: int, module: nn.Module, args, output) -> None:
        if not self._armed or self._consumed:
            return
        where = self._block_names[index]
        if index in self._captured:
            raise RuntimeError(
                f"{where} ran twice inside one VideoREPA.capture(); use one capture() context per transformer forward"
            )
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise TypeError(
                f"{where} must return video tokens [B, N, C] (or a tuple starting with them, as CogVideoX blocks "
                f"return (hidden_states, encoder_hidden_states)); got {got}"
            )
        self._captured[index] = hidden
        if (not torch.is_grad_enabled()) and any(p.requires_grad for p in module.parameters()):
            self._captured_without_grad = True

    def remove(self) -> None:
        """Detach the hooks from the transformer."""
        for handle in self._handles:
            handle.remove()

    # ---------------------------------------------------------------- alignment and loss
    def token_grid(self, latent_shape) -> Grid:
        """The student's (frames, rows, cols) token grid for latents of ``latent_shape`` (in ``latent_layout``)."""
        return student_token_grid(latent_shape, self.patch_size, self.patch_size_t, self.latent_layout)

    def aligned_grid(self, latent_shape) -> Grid:
        """The grid the student is aligned to (and the teacher must produce) for latents of ``latent_shape``."""
        return aligned_grid(self.token_grid(latent_shape), self.drop_first_frame, self.temporal_upsample,
                            self.spatial_downsample)

    def align(self, hidden: torch.Tensor, latent_shape, index: int = 0) -> torch.Tensor:
        """Project and align block tokens ``[B, F*H*W, C]`` to the teacher grid: ``[B, F', H', W', teacher_dim]``.

        ``latent_shape`` is the shape of the latents fed to the transformer, in ``latent_layout``; the token
        grid follows from it and the patch size. ``index`` picks the layer's projector and downsampler.
        """
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, N, C] block tokens, got {getattr(hidden, 'shape', hidden)}")
        shape = _shape_tuple(latent_shape, self.latent_layout)
        batch, tokens, width = hidden.shape
        if width != self.hidden_dim:
            raise ValueError(f"hidden has width {width}, but the projector expects hidden_dim={self.hidden_dim}")
        if shape[0] != batch:
            raise ValueError(f"latent_shape has batch {shape[0]}, but the captured tokens have batch {batch}")
        frames, rows, cols = self.token_grid(shape)
        if tokens != frames * rows * cols:
            raise ValueError(
                f"the block returned {tokens} tokens, but {self.latent_layout} latents {shape} with patch_size="
                f"{self.patch_size} give a {frames}x{rows}x{cols} = {frames * rows * cols} token grid of video "
                "tokens; pass the shape of the latents this forward consumed (a block that returns text tokens too "
                "is not supported)"
            )
        out_frames, out_rows, out_cols = aligned_grid(
            (frames, rows, cols), self.drop_first_frame, self.temporal_upsample, self.spatial_downsample
        )
        projector, downsampler = self.heads()[index]
        x = hidden.reshape(batch, frames, rows * cols, width)
        if self.drop_first_frame:
            x = x[:, 1:]
        weight = projector[0].weight
        if not _autocast_on(x.device.type) and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        x = projector(x)  # [B, F, H*W, Dt]
        kept = x.shape[1]
        x = x.reshape(batch, kept, rows, cols, self.teacher_dim)
        if self.temporal_upsample > 1:
            x = F.interpolate(x.permute(0, 4, 1, 2, 3), scale_factor=(float(self.temporal_upsample), 1.0, 1.0),
                              mode="trilinear", align_corners=False).permute(0, 2, 3, 4, 1)  # [B, F', H, W, Dt]
        if isinstance(downsampler, nn.Identity):  # native grid
            return x.reshape(batch, out_frames, out_rows, out_cols, self.teacher_dim)
        x = x.reshape(batch * out_frames, rows, cols, self.teacher_dim).permute(0, 3, 1, 2)
        conv_weight = downsampler.weight
        if not _autocast_on(x.device.type) and x.dtype != conv_weight.dtype:
            x = x.to(conv_weight.dtype)
        x = downsampler(x)  # [B*F', Dt, H', W']
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
        """TRD loss between the captured block tokens (aligned) and ``teacher_tokens``; with several layers,
        the mean of their TRD losses (one teacher for all).

        Call inside ``with helper.capture():`` after the transformer forward. ``teacher_tokens`` are
        ``[B, N, Dt]`` in frame-major, row-major order (VideoMAE's ``last_hidden_state``) or ``[B, F, H, W, Dt]``.
        """
        if not self._armed:
            raise RuntimeError(
                "call the VideoREPA helper inside `with helper.capture():`, after the transformer forward")
        missing = [self._block_names[i] for i in range(len(self.align_layers)) if i not in self._captured]
        if missing:
            raise RuntimeError(
                f"nothing was captured from {', '.join(missing)}: the block did not run inside this capture() "
                "context; run the transformer forward first"
            )
        if self._captured_without_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "the hooked block ran with autograd off (reentrant gradient checkpointing or torch.no_grad), so the "
                "TRD loss cannot reach the transformer; use non-reentrant checkpointing (diffusers' default)"
            )
        self._consumed = True
        hiddens = [self._captured[i] for i in range(len(self.align_layers))]
        students = self._aligner()(hiddens, latent_shape)
        teacher = self.teacher_grid(teacher_tokens, students[0].shape)
        losses = [self.trd(student, teacher) for student in students]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean(dim=0)

    def _align_all(self, hiddens: Sequence[torch.Tensor], latent_shape) -> Tuple[torch.Tensor, ...]:
        return tuple(self.align(h, latent_shape, index=i) for i, h in enumerate(hiddens))

    def _aligner(self):
        """:meth:`align` of every layer, through DistributedDataParallel when training on several ranks."""
        dist = torch.distributed
        if not (self.sync_gradients and self.training and torch.is_grad_enabled() and dist.is_available()
                and dist.is_initialized()):
            return self._align_all
        group = self._process_group
        if dist.get_world_size(group) <= 1:
            return self._align_all
        outer = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if outer is not None and outer.module is self:  # the caller wrapped the helper in DDP: it syncs already
            return self._align_all
        if self._ddp is None:
            device = self.heads()[0][0][0].weight.device
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
        """What a VideoMAE-style teacher must see for latents of ``latent_shape`` (in ``latent_layout``).

        Returns ``TeacherInput(num_frames, image_size, grid)``: the pixel frames (the clip's frames after the
        first), their (height, width) and the token grid, which equals the student's aligned grid. The
        teacher's patch and tubelet sizes come from ``teacher.config`` when a teacher is given (VideoMAEv2:
        16 and 2). CogVideoX at 49x480x720 (latents 13x60x90): 48 frames at 160x240, grid 24x10x15; with
        ``native_grid``: 48 frames at 480x720, grid 24x30x45.
        """
        if teacher is not None:
            config = teacher.config
            patch_size = _pair_int(config.patch_size)
            tubelet_size = int(config.tubelet_size)
        patch_size = _positive_int("patch_size", patch_size)
        tubelet_size = _positive_int("tubelet_size", tubelet_size)
        grid = self.aligned_grid(latent_shape)
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
            "latent_layout": self.latent_layout, "patch_size": self.patch_size, "patch_size_t": self.patch_size_t,
            "native_grid": self.native_grid, "drop_first_frame": self.drop_first_frame,
            "temporal_upsample": self.temporal_upsample, "spatial_downsample": self.spatial_downsample,
            "reduction": self.reduction,
        }

    def extra_repr(self) -> str:
        return (f"align_layer={self.align_layer} ({', '.join(self._block_names)}), "
                f"hidden_dim={self.hidden_dim}, teacher_dim={self.teacher_dim}, margin={self.margin}, "
                f"relation={self.relation!r}, latent_layout={self.latent_layout}, native_grid={self.native_grid}")


__all__ = ["VideoREPA", "TeacherInput", "ModelFamily", "FAMILIES", "student_token_grid", "aligned_grid"]
