"""A convolutional vision tower over open_clip's CLIP ResNet (``ModifiedResNet``: RN50, RN101, ...).

CLIP's ResNets (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", 2021, section 2.4) are ResNet-D style networks -- a three-convolution stem with average
pooling, anti-aliased strided blocks (an average pool before every strided convolution) -- whose
global average pool is replaced by a single multi-head QKV attention layer ("attention pooling") with
the mean feature as query.

This tower is **not a token tower**: a ResNet has no token sequence a hook could insert prompts into
or act on between blocks, so it is not a :class:`~vlsegkit.encoders.Tower` and never goes through
:func:`~vlsegkit.encoders.run_towers` (which stays the one loop over *token* towers). It presents
itself as what dense decoders need:

* :meth:`OpenCLIPResNetTower.features` -- the multi-scale maps ``C2 .. C5`` (strides 4, 8, 16, 32),
  :class:`ResNetFeatures`;
* :meth:`OpenCLIPResNetTower.pool` -- CLIP's attention-pooled global image embedding ``(B, E)``;
* :meth:`OpenCLIPResNetTower.dense` -- the same attention applied with every ``C5`` position as a
  query (CRIS's modified attention pool, Wang et al., "CRIS: CLIP-Driven Referring Image
  Segmentation", CVPR 2022): a ``(B, E, h, w)`` map in the joint space.

The attention pool's learned position table covers the pretraining grid (7 x 7 for 224 px); for any
other input size (CRIS: 416 px -> 13 x 13) its grid rows are resampled bicubically
(``align_corners=False``), the CLS row kept, with
:func:`vlsegkit.encoders._pos_embed.resample_grid_pos_embed` -- what CRIS's ``resize_pos_embed`` does.

BatchNorm and freezing: a frozen ResNet should not change. :meth:`OpenCLIPResNetTower.train` keeps
every BatchNorm whose affine parameters are frozen in eval mode (running statistics neither used from
the batch nor updated) unless ``update_frozen_bn_stats`` is set, which reproduces code that puts a
frozen network in train mode (TuneVLSeg's CRIS prompt tuning: the statistics drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlsegkit.encoders._pos_embed import resample_grid_pos_embed

__all__ = ["OpenCLIPResNetTower", "ResNetFeatures", "keep_frozen_batchnorm_in_eval"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class ResNetFeatures:
    """The multi-scale feature maps of a CLIP ResNet (``W`` = the stem width, 64 for RN50).

    Attributes:
        c2: ``(B, 4W, H/4, W/4)`` output of ``layer1`` (stride 4).
        c3: ``(B, 8W, H/8, W/8)`` output of ``layer2`` (stride 8).
        c4: ``(B, 16W, H/16, W/16)`` output of ``layer3`` (stride 16).
        c5: ``(B, 32W, H/32, W/32)`` output of ``layer4`` (stride 32), the attention pool's input.
    """

    c2: Tensor
    c3: Tensor
    c4: Tensor
    c5: Tensor

    def take(self, rows: Tensor) -> ResNetFeatures:
        """The features of batch rows ``rows`` ``(R,)`` (repeats allowed)."""
        rows = rows.to(self.c5.device)
        return ResNetFeatures(self.c2[rows], self.c3[rows], self.c4[rows], self.c5[rows])


def keep_frozen_batchnorm_in_eval(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` whose affine parameters are all frozen in eval mode.

    A BatchNorm without affine parameters counts as frozen when it has no trainable parameter at all.
    Called after ``module.train(True)``: frozen normalisation then uses (and keeps) its running
    statistics instead of the batch's.
    """
    for m in module.modules():
        frozen = not any(p.requires_grad for p in m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and frozen:
            m.eval()


class OpenCLIPResNetTower(nn.Module):
    """A CLIP ``ModifiedResNet`` presented as multi-scale features plus attention pooling.

    Forward (Radford et al. 2021; He et al. 2019's ResNet-D tweaks)::

        x  = AvgPool2(ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(ReLU(BN(Conv3x3_s2(pixels)))))))))
        C2 = layer1(x); C3 = layer2(C2); C4 = layer3(C3); C5 = layer4(C4)

        # attention pooling on C5, tokens t_j (HW of them) of width D = 32W
        pooled = c_proj(MHA(q = t̄ + p_cls, k = v = [t̄ + p_cls; t_j + p_j]))          # (B, E)
        dense  = c_proj(MHA(q = k = v = [t_j + p_j]))                                   # (B, E, h, w)

    with ``t̄`` the mean token and ``p`` the (resampled) position table. ``dense`` is CRIS's modified
    pool: no global query, every position attends to every position (the CLS row is unused).

    Args:
        visual: an ``open_clip.modified_resnet.ModifiedResNet`` (``CLIP.visual`` of the RN models),
            registered as ``self.visual`` so the keys are open_clip's / OpenAI's (``visual.conv1.weight``,
            ``visual.layer1.0.bn1.running_mean``, ``visual.attnpool.q_proj.weight``, ...).

    Attributes:
        modality: ``"vision"``.
        channels: ``{"c2": 4W, "c3": 8W, "c4": 16W, "c5": 32W}``.
        width: ``C5`` channels ``D`` (the attention pool's width).
        embed_dim: joint embedding width ``E`` (the attention pool's output).
        num_heads: attention-pool heads.
        stride: 32, the total downsampling (input sides must be multiples of it).
        update_frozen_bn_stats: False (default) keeps frozen BatchNorms in eval mode in ``train()``.
    """

    modality = "vision"
    stride = 32

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        if not isinstance(visual, ModifiedResNet):
            raise TypeError(
                "visual must be an open_clip.modified_resnet.ModifiedResNet, "
                f"got {type(visual).__name__}"
            )
        self.visual = visual
        self.channels = {
            f"c{n + 2}": int(getattr(visual, stage)[-1].bn3.num_features)
            for n, stage in enumerate(_STAGES)
        }
        pool = visual.attnpool
        self.width = int(pool.q_proj.in_features)
        if self.width != self.channels["c5"]:
            raise ValueError(
                f"the attention pool reads {self.width} channels but layer4 gives "
                f"{self.channels['c5']}"
            )
        self.embed_dim = int(pool.c_proj.out_features)
        self.num_heads = int(pool.num_heads)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        self.num_channels = int(visual.conv1.in_channels)
        self.update_frozen_bn_stats = False

    # ------------------------------------------------------------------ sizes
    @property
    def pretrained_grid(self) -> tuple[int, int]:
        """``(h0, w0)`` grid of the attention pool's learned position table (7 x 7 for 224 px)."""
        rows = self.visual.attnpool.positional_embedding.shape[0] - 1
        side = math.isqrt(rows)
        return side, side

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``C5`` grid ``(H/32, W/32)`` of an input of ``height x width`` pixels."""
        return height // self.stride, width // self.stride

    def _check_pixels(self, pixel_values: Tensor) -> None:
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else pixel_values
            raise ValueError(
                f"pixel_values must have shape (B, {self.num_channels}, H, W), got {shape}"
            )
        b, c, h, w = pixel_values.shape
        if b == 0 or c != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (B, {self.num_channels}, H, W) with B >= 1, got "
                f"{tuple(pixel_values.shape)}"
            )
        if h == 0 or w == 0 or h % self.stride or w % self.stride:
            raise ValueError(
                f"pixel_values height and width must be positive multiples of {self.stride} (the "
                f"ResNet's total stride), got {h}x{w}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")

    # ------------------------------------------------------------------ features
    def features(
        self, pixel_values: Tensor, *, gradient_checkpointing: bool = False
    ) -> ResNetFeatures:
        """``C2 .. C5`` of ``pixel_values`` ``(B, 3, H, W)``, H and W multiples of 32.

        A frozen tower records no autograd graph unless the pixels require gradients; with
        ``gradient_checkpointing`` each stage that records one is recomputed in backward.
        """
        self._check_pixels(pixel_values)
        v = self.visual
        trainable = any(p.requires_grad for p in self.parameters())
        graph = torch.is_grad_enabled() and (trainable or pixel_values.requires_grad)
        with torch.set_grad_enabled(graph):
            x = pixel_values.to(v.conv1.weight.dtype)
            maps = []
            for name in ("stem", *_STAGES):
                stage = getattr(v, name)
                if graph and gradient_checkpointing:
                    x = checkpoint(stage, x, use_reentrant=False)
                else:
                    x = stage(x)
                maps.append(x)
        return ResNetFeatures(*maps[1:])

    def forward(
        self, pixel_values: Tensor, *, gradient_checkpointing: bool = False
    ) -> ResNetFeatures:
        """Same as :meth:`features`."""
        return self.features(pixel_values, gradient_checkpointing=gradient_checkpointing)

    # ------------------------------------------------------------------ attention pooling
    def _positions(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        pos = resample_grid_pos_embed(
            self.visual.attnpool.positional_embedding,
            grid,
            num_prefix=1,
            old_grid=self.pretrained_grid,
        )
        return pos.to(dtype)

    def _attention(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """Multi-head attention of the pool's projections: ``(B, Q, D)`` x ``(B, N, D)`` -> ``(B, Q, E)``."""
        pool = self.visual.attnpool
        heads = self.num_heads
        q = rearrange(pool.q_proj(queries), "b n (h d) -> b h n d", h=heads)
        k = rearrange(pool.k_proj(tokens), "b n (h d) -> b h n d", h=heads)
        v = rearrange(pool.v_proj(tokens), "b n (h d) -> b h n d", h=heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return pool.c_proj(rearrange(out, "b h n d -> b n (h d)"))

    def _tokens(self, c5: Tensor) -> Tensor:
        if c5.dim() != 4 or c5.shape[1] != self.width:
            raise ValueError(f"c5 must have shape (B, {self.width}, h, w), got {tuple(c5.shape)}")
        return rearrange(c5, "b d h w -> b (h w) d")

    def pool(self, c5: Tensor) -> Tensor:
        """CLIP's attention-pooled image embedding ``(B, E)`` of ``c5`` ``(B, D, h, w)``.

        The query is the mean token plus the CLS position row; keys and values are the mean token and
        every position (``open_clip``'s ``AttentionPool2d``; exact at the pretraining grid, with the
        position table resampled elsewhere).
        """
        x = self._tokens(c5)
        grid = (int(c5.shape[-2]), int(c5.shape[-1]))
        pos = self._positions(grid, x.dtype)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pos
        return self._attention(x[:, :1], x)[:, 0]

    def dense(self, c5: Tensor) -> Tensor:
        """CRIS's dense attention pool: ``(B, D, h, w)`` -> ``(B, E, h, w)``.

        Every position (plus its resampled position row; the CLS row is not used) is a query over all
        positions; the output projection maps to the joint space (Wang et al. 2022, section 3.1).
        """
        x = self._tokens(c5)
        h, w = int(c5.shape[-2]), int(c5.shape[-1])
        x = x + self._positions((h, w), x.dtype)[1:]
        out = self._attention(x, x)
        return rearrange(out, "b (h w) e -> b e h w", h=h, w=w)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> OpenCLIPResNetTower:
        """Train / eval mode; frozen BatchNorms stay in eval unless ``update_frozen_bn_stats``."""
        super().train(mode)
        if mode and not self.update_frozen_bn_stats:
            keep_frozen_batchnorm_in_eval(self)
        return self
