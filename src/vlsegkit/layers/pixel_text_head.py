"""MedCLIPSeg's pixel-text segmentation head: upscaled patch features dotted with a text embedding.

Koleilat et al., "MedCLIPSeg" (CVPR 2026), section 3.3, eqs. 18-19, and the official code
(``compute_seg_logits``; ``ScaleBlock`` from EoMT, Kerssies et al., "Your ViT is Secretly an Image
Segmentation Model", CVPR 2025, MIT licence). Parameter names follow the released checkpoints
(``upscale.{i}.{conv1,conv2,norm}``, ``mask_head.{0,2,4}``). The implementation is vlsegkit's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["LayerNorm2d", "PixelTextHead", "ScaleBlock"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (timm's ``LayerNorm2d`` semantics:
    per-pixel normalisation over C, affine ``weight`` / ``bias`` of shape ``(C,)``, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """×2 upsampling block of EoMT, used twice as MedCLIPSeg's ``psi``.

    ``ConvTranspose2d(k=2, s=2)`` -> GELU -> depthwise ``Conv2d(3x3, no bias)`` -> ``LayerNorm2d``
    (over channels, eps 1e-6).

    Args:
        dim: number of channels ``C`` (kept).

    Shapes:
        ``(B, C, h, w)`` -> ``(B, C, 2h, 2w)``.
    """

    def __init__(self, *, dim: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of them, got {size!r}")
    return int(size[0]), int(size[1])


class PixelTextHead(nn.Module):
    """Segmentation logits from dense visual tokens and text embeddings (MedCLIPSeg eqs. 18-19).

    ::

        V~ = psi(normalize(Z_v))          # (B, dim, s*h, s*w), s = 2 ** num_upscale   (eq. 18)
        t~ = phi(normalize(z_t))          # (B, C, dim)                               (eq. 18)
        M  = Upsample_{H x W}(V~ . t~)    # bilinear, align_corners=False             (eq. 19)

    ``psi`` is ``num_upscale`` :class:`ScaleBlock` s, ``phi`` the MLP
    ``Linear -> GELU -> Linear -> GELU -> Linear``. The logits are a plain dot product: no
    temperature, no bias, and the outputs of ``psi`` / ``phi`` are not re-normalised (as released).

    Args:
        dim: width of the dense visual tokens and of the head (512 for ViT-B/16 CLIP joint space).
        text_dim: width of the text embedding (default ``dim``).
        num_upscale: number of ×2 ScaleBlocks (2 in the paper: 14x14 -> 56x56).
        normalize: L2-normalise tokens and text embeddings before ``psi`` / ``phi`` (paper and code).
    """

    def __init__(
        self,
        *,
        dim: int = 512,
        text_dim: int | None = None,
        num_upscale: int = 2,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        text_dim = dim if text_dim is None else text_dim
        self.dim, self.text_dim, self.normalize = dim, text_dim, normalize
        self.upscale = nn.Sequential(*(ScaleBlock(dim=dim) for _ in range(num_upscale)))
        self.mask_head = nn.Sequential(
            nn.Linear(text_dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
        )

    def forward(
        self,
        dense_tokens: Tensor,
        grid: tuple[int, int],
        text_embedding: Tensor,
        *,
        output_size: int | tuple[int, int] | None = None,
    ) -> Tensor:
        """Compute per-pixel logits for each text prompt.

        Args:
            dense_tokens: ``(B, h*w, dim)`` patch tokens in the joint space, row-major (CLS removed).
            grid: patch grid ``(h, w)``; non-square grids are fine.
            text_embedding: ``(B, text_dim)`` one prompt per image, or ``(B, C, text_dim)`` for C
                prompts per image.
            output_size: ``(H, W)`` (or an int for a square size) to resize the logits to
                bilinearly; None keeps the head resolution ``(s*h, s*w)``.

        Returns:
            ``(B, 1, H, W)`` for 2-D ``text_embedding``, ``(B, C, H, W)`` for 3-D.
        """
        h, w = _pair(grid, "grid")
        if dense_tokens.dim() != 3 or dense_tokens.shape[1:] != (h * w, self.dim):
            raise ValueError(
                f"dense_tokens must have shape (B, h*w, dim) = (B, {h * w}, {self.dim}) for grid "
                f"{(h, w)}, got {tuple(dense_tokens.shape)}"
            )
        batch = dense_tokens.shape[0]
        if text_embedding.dim() not in (2, 3) or text_embedding.shape[-1] != self.text_dim:
            raise ValueError(
                f"text_embedding must have shape (B, {self.text_dim}) or (B, C, {self.text_dim}), "
                f"got {tuple(text_embedding.shape)}"
            )
        if text_embedding.shape[0] != batch:
            raise ValueError(
                f"text_embedding batch {text_embedding.shape[0]} != dense_tokens batch {batch}"
            )
        size = None if output_size is None else _pair(output_size, "output_size")

        text = text_embedding if text_embedding.dim() == 3 else text_embedding[:, None]
        if self.normalize:
            dense_tokens = F.normalize(dense_tokens, dim=-1)
            text = F.normalize(text, dim=-1)
        pixels = self.upscale(rearrange(dense_tokens, "b (h w) c -> b c h w", h=h, w=w))
        logits = torch.einsum("bchw,bkc->bkhw", pixels, self.mask_head(text))
        if size is not None and logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits
