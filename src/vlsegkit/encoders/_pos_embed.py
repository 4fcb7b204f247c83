"""Position-embedding resampling shared by the vision towers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def resample_grid_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    *,
    num_prefix: int = 1,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """Resample a learned ``(N, D)`` position table to a new patch grid, prefix rows kept.

    The patch rows are reshaped to their grid, interpolated (bicubic, ``align_corners=False``: what
    transformers' CLIP/CLIPSeg ``interpolate_pos_encoding`` does; timm additionally antialiases) and
    flattened back row-major.

    Args:
        pos_embed: ``(num_prefix + h0 * w0, D)`` table (a leading batch dim of 1 is accepted).
        new_grid: target ``(h, w)``.
        num_prefix: rows kept as they are (CLS, registers).
        old_grid: source ``(h0, w0)``; inferred as square when None.
        mode: interpolation mode for ``F.interpolate``.
        antialias: antialias when downsampling (timm's ``resample_abs_pos_embed`` does).

    Returns:
        ``(num_prefix + h * w, D)`` (same leading batch dim as the input).
    """
    squeeze = pos_embed.dim() == 2
    table = pos_embed.unsqueeze(0) if squeeze else pos_embed
    prefix, grid = table[:, :num_prefix], table[:, num_prefix:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer a square grid from {grid.shape[1]} position rows")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    h0, w0 = old_grid
    grid = rearrange(grid, "b (h w) d -> b d h w", h=h0, w=w0)
    orig_dtype = grid.dtype
    grid = F.interpolate(
        grid.to(torch.promote_types(orig_dtype, torch.float32)),
        size=tuple(new_grid),
        mode=mode,
        align_corners=False,
        antialias=antialias,
    ).to(orig_dtype)
    grid = rearrange(grid, "b d h w -> b (h w) d")
    out = grid if num_prefix == 0 else torch.cat([prefix, grid], dim=1)
    return out.squeeze(0) if squeeze else out
