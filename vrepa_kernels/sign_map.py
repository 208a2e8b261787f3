"""The sign map of the two-pass training path: one 2-bit code per pair, shared by the Triton and CUDA backends.

The relation pass of a two-pass backend writes, for each sample, the sign ``P_ij`` of every pair's
gradient instead of any N x N float tensor; the gradient pass decodes it while loading the left operand
of ``G = P X``. Both backends write this exact layout, so their maps compare bit for bit.

Layout (``MAP_TILE = 128``, ``n_tiles = ceil(N / 128)``): the upper triangle of 128 x 128 tiles
``(I, J)``, ``I <= J``, row-major, linear index ``I * n_tiles - I * (I - 1) / 2 + (J - I)``. A tile is
128 rows of 8 int32 words; the pair ``(128 I + r, 128 J + c)`` sits in word ``c // 16`` of row ``r``,
bits ``2 (c % 16)`` and ``2 (c % 16) + 1``. Diagonal tiles hold both orders of their pairs; a pair
``(i, j)`` below the diagonal tiles is read as ``(j, i)`` (``P`` is symmetric). Codes:

* ``0``: no gradient (``|D_ij| <= margin``, a pair the relation drops, or padding past N);
* ``1``: ``D_ij > margin`` (``P_ij = +1``); ``2``: ``D_ij < -margin`` (``P_ij = -1``);
* ``3``: ``D_ij`` is NaN or infinite (``P_ij = NaN``, so the gradient shows it).

Tensor: int32 ``[B, n_tiles (n_tiles + 1) / 2, 128, 8]``, i.e. about ``N^2 / 8`` bytes per sample
(39 MB at N = 17,550; 0.71 GB at N = 75,600). The spatial relation is run as the full relation of
``B * F`` one-frame samples, so its map is that of those samples.

The functions here are the plain-PyTorch definition of the format (tests and debugging; they hold N x N
tensors); the kernels implement it tile by tile.
"""
from __future__ import annotations

import torch

MAP_TILE = 128  # C++ twin: kMapTile in csrc/trd_shared.h
ALGORITHMS = ("auto", "two_pass", "memory_minimal")  # trd_loss(algorithm=): with the map, or without it
MAP_BUDGET_BYTES = 1 << 30  # "auto" takes the two-pass path while the map fits 1 GiB
CODES_PER_WORD = 16
WORDS_PER_ROW = MAP_TILE // CODES_PER_WORD
CODE_NONE, CODE_PLUS, CODE_MINUS, CODE_NONFINITE = 0, 1, 2, 3


def num_tiles(num_tokens: int) -> int:
    return -(-num_tokens // MAP_TILE)


def num_map_tiles(num_tokens: int) -> int:
    """Tiles in one sample's upper triangle."""
    n = num_tiles(num_tokens)
    return n * (n + 1) // 2


def tile_index(i: int, j: int, n_tiles: int) -> int:
    """Linear index of tile ``(i, j)``, ``i <= j``, in the row-major upper triangle."""
    if not 0 <= i <= j < n_tiles:
        raise ValueError(f"tile ({i}, {j}) is not in the upper triangle of {n_tiles} tiles")
    return i * n_tiles - i * (i - 1) // 2 + (j - i)


def map_bytes(batch: int, num_tokens: int) -> int:
    """Bytes of the map for ``batch`` samples of ``num_tokens`` tokens."""
    return batch * num_map_tiles(num_tokens) * MAP_TILE * WORDS_PER_ROW * 4


def codes_of(gap: torch.Tensor, margin: float, keep: torch.Tensor = None) -> torch.Tensor:
    """The code of each pair from ``D = Gs - Gt`` (any shape) and the relation's ``keep`` mask."""
    codes = torch.where(gap > margin, CODE_PLUS, torch.where(gap < -margin, CODE_MINUS, CODE_NONE))
    codes = torch.where(torch.isfinite(gap), codes, CODE_NONFINITE)
    if keep is not None:
        codes = torch.where(keep, codes, CODE_NONE)
    return codes.to(torch.int64)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` codes (symmetric) to the int32 map ``[B, tiles, 128, 8]``."""
    batch, n, _ = codes.shape
    nt = num_tiles(n)
    padded = codes.new_zeros(batch, nt * MAP_TILE, nt * MAP_TILE)
    padded[:, :n, :n] = codes
    tiles = []
    for i in range(nt):
        for j in range(i, nt):
            block = padded[:, i * MAP_TILE:(i + 1) * MAP_TILE, j * MAP_TILE:(j + 1) * MAP_TILE]
            tiles.append(block.reshape(batch, MAP_TILE, WORDS_PER_ROW, CODES_PER_WORD))
    shifts = 2 * torch.arange(CODES_PER_WORD, device=codes.device)
    words = (torch.stack(tiles, dim=1) << shifts).sum(dim=-1)  # disjoint bit fields: sum == or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The int32 map back to ``[B, N, N]`` codes (int64), filling the lower triangle by symmetry."""
    batch = words.shape[0]
    nt = num_tiles(num_tokens)
    if words.shape[1:] != (num_map_tiles(num_tokens), MAP_TILE, WORDS_PER_ROW):
        raise ValueError(f"a map for N={num_tokens} has shape [B, {num_map_tiles(num_tokens)}, {MAP_TILE}, "
                         f"{WORDS_PER_ROW}], got {tuple(words.shape)}")
    shifts = 2 * torch.arange(CODES_PER_WORD, device=words.device)
    codes = (words.to(torch.int64)[..., None] >> shifts) & 3  # [B, tiles, 128, 8, 16]
    codes = codes.reshape(batch, -1, MAP_TILE, MAP_TILE)
    full = codes.new_zeros(batch, nt * MAP_TILE, nt * MAP_TILE)
    for i in range(nt):
        for j in range(i, nt):
            block = codes[:, tile_index(i, j, nt)]
            full[:, i * MAP_TILE:(i + 1) * MAP_TILE, j * MAP_TILE:(j + 1) * MAP_TILE] = block
            if j > i:
                full[:, j * MAP_TILE:(j + 1) * MAP_TILE, i * MAP_TILE:(i + 1) * MAP_TILE] = block.transpose(1, 2)
    return full[:, :num_tokens, :num_tokens]


def signs(codes: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``P`` from codes: +1, -1, 0, or NaN for a non-finite pair."""
    p = (codes == CODE_PLUS).to(dtype) - (codes == CODE_MINUS).to(dtype)
    return torch.where(codes == CODE_NONFINITE, torch.full_like(p, float("nan")), p)
