"""TuneVLSeg's learnable residual upsampler ("tuning the last layer for segmentation").

Adhikari et al., "TuneVLSeg" (ACCV 2024, §5 and §7.3, after Jia et al.'s VPT head tuning): a bilinear
upsampler followed by a 5x5 convolution reads the penultimate decoder features; its output is added
to the frozen decoder's logits with a learnable residual factor ``r``. Removing it costs 2.59 Dice
points on average (their Table 5).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["LearnableUpsampler"]

Mode = Literal["residual", "interpolate", "add"]


class LearnableUpsampler(nn.Module):
    """``logits' = T + r · A(x)`` with ``A(x) = Conv5x5(Bilinear(x))``.

    ``x`` is the decoder's penultimate feature map (CLIPSeg: the ``(reduce_dim, h, w)`` map the final
    transposed convolution reads), ``T`` the frozen decoder's logits at input resolution. The
    convolution uses replicate padding ("same" output size) and PyTorch's default initialisation,
    ``r`` starts at ``init_factor`` -- both as in TuneVLSeg's released code.

    Args:
        in_channels: channels of the decoder features.
        kernel_size: odd convolution size (5 in the paper).
        mode: how ``A`` joins the logits: ``"residual"`` ``T + r·A`` (the paper's "added with a
            learnable residual factor"); ``"interpolate"`` ``(1 - r)·T + r·A`` (released code for the
            multimodal learners); ``"add"`` ``T + A`` (released code for VPT; ``r`` unused).
        init_factor: initial ``r``.

    Shapes:
        ``forward(logits (B, C, H, W), features (B, C, in_channels, h, w))`` -> ``(B, C, H, W)``;
        features ``(B, in_channels, h, w)`` are accepted when ``C == 1``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        kernel_size: int = 5,
        mode: Mode = "residual",
        init_factor: float = 0.5,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if mode not in ("residual", "interpolate", "add"):
            raise ValueError(f"mode must be 'residual', 'interpolate' or 'add', got {mode!r}")
        self.in_channels, self.kernel_size, self.mode = in_channels, kernel_size, mode
        self.init_factor = float(init_factor)
        self.conv = nn.Conv2d(
            in_channels, 1, kernel_size, padding=kernel_size // 2, padding_mode="replicate"
        )
        self.factor = nn.Parameter(torch.tensor(self.init_factor))

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable)."""
        return dict(
            in_channels=self.in_channels,
            kernel_size=self.kernel_size,
            mode=self.mode,
            init_factor=self.init_factor,
        )

    def branch(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """``A(x)``: ``(N, in_channels, h, w)`` -> bilinear to ``size`` -> conv -> ``(N, 1, H, W)``."""
        up = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return self.conv(up)

    def forward(self, logits: Tensor, features: Tensor) -> Tensor:
        if logits.dim() != 4:
            raise ValueError(f"logits must have shape (B, C, H, W), got {tuple(logits.shape)}")
        b, c, h, w = logits.shape
        if features.dim() == 4 and c == 1:
            features = features[:, None]
        if features.dim() != 5 or features.shape[:3] != (b, c, self.in_channels):
            raise ValueError(
                f"features must have shape (B={b}, C={c}, {self.in_channels}, h, w), "
                f"got {tuple(features.shape)}"
            )
        flat = rearrange(features, "b c k h w -> (b c) k h w").to(self.conv.weight.dtype)
        extra = rearrange(self.branch(flat, (h, w)), "(b c) 1 h w -> b c h w", b=b)
        extra = extra.to(logits.dtype)
        if self.mode == "add":
            return logits + extra
        r = self.factor.to(logits.dtype)
        if self.mode == "interpolate":
            return (1 - r) * logits + r * extra
        return logits + r * extra
