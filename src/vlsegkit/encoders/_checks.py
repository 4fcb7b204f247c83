"""Input validation shared by the tower backends (errors name the argument and expected shape)."""

from __future__ import annotations

import torch
from torch import Tensor


def _check_layer_index(i: int, num_layers: int) -> None:
    if not 0 <= i < num_layers:
        raise ValueError(f"block index i must be in [0, {num_layers}), got {i}")


def _patch_grid(pixel_values: Tensor, *, channels: int, patch_size: int) -> tuple[int, int]:
    """Validate ``(B, C, H, W)`` pixels and return the patch grid ``(H / p, W / p)``."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values must have shape (B, {channels}, H, W), got {tuple(pixel_values.shape)}"
        )
    height, width = pixel_values.shape[-2:]
    if height == 0 or width == 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"pixel_values height and width must be positive multiples of patch_size={patch_size}, "
            f"got {height}x{width}"
        )
    return height // patch_size, width // patch_size


def _check_tokens(name: str, extra: Tensor, batch: int, width: int) -> Tensor:
    """Validate prompt / context tokens ``(B, n, D)`` or ``(n, D)`` under the argument's own name."""
    if extra.dim() not in (2, 3) or extra.shape[-1] != width:
        raise ValueError(
            f"{name} must have shape (B, n, {width}) or (n, {width}), got {tuple(extra.shape)}"
        )
    if extra.dim() == 3 and extra.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have shape (B={batch}, n, {width}) or (n, {width}), "
            f"got {tuple(extra.shape)}"
        )
    return extra


def _check_ids(
    input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int | None = None
) -> Tensor | None:
    """Validate ``(B, L)`` integer ids in ``[0, vocab_size)`` and an optional ``(B, L)`` mask;
    returns the mask as bool."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape (B, L) with L >= 1, got {tuple(input_ids.shape)}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    # the embedding lookup would fail with a bare IndexError on CPU and a device assert on GPU; the
    # check is data-dependent, so compiled graphs skip it
    if vocab_size is not None and input_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {vocab_size}) (the tower's vocabulary), got values in "
                f"[{low}, {high}]; were they made by another model's tokenizer?"
            )
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have shape (B, L)={tuple(input_ids.shape)} like input_ids, "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _gather(tokens: Tensor, index: Tensor | None) -> Tensor:
    """``tokens[b, index[b]]`` -> ``(B, D)``; position 0 when ``index`` is None."""
    if index is None:
        return tokens[:, 0]
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index.to(tokens.device)]
