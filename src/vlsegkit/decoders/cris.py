"""CRIS's text-conditioned FPN neck, vision-language decoder and dynamic-kernel projector.

Wang, Lu, Li, Tao, Guo, Gong and Liu, "CRIS: CLIP-Driven Referring Image Segmentation", CVPR 2022
(section 3.2 cross-modal neck, 3.3 vision-language decoder, 3.4 text-to-pixel contrastive learning),
as released in ``DerrickWang005/CRIS.pytorch`` (``model/layers.py``). Parameter names follow the
released modules (``f1_v_proj.0.weight``, ``layers.0.multihead_attn.in_proj_weight``, ``vis.4.bias``,
...) so CRIS checkpoints map one-to-one; the implementation is vlsegkit's own (attention on
``F.scaled_dot_product_attention``, batch-first tensors, any feature-map size).

Each block works on plain tensors:

* :class:`TextConditionedFPN` -- ``(C3, C4, V5, sentence) -> F_q (B, vis_dim, H/16, W/16)``;
* :class:`VisionLanguageDecoder` -- ``(F_q, words, padding) -> F_c`` (same shape as ``F_q``);
* :class:`DynamicKernelProjector` -- ``(F_c, sentence) -> logits (B, 1, H/4, W/4)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "CoordConv",
    "DynamicKernelProjector",
    "TextConditionedFPN",
    "VisionLanguageDecoder",
    "VisionLanguageDecoderLayer",
    "conv_bn_relu",
    "sine_position_1d",
    "sine_position_2d",
]


def conv_bn_relu(
    in_dim: int, out_dim: int, kernel_size: int = 1, padding: int = 0
) -> nn.Sequential:
    """``Conv2d (no bias) -> BatchNorm2d -> ReLU`` (CRIS's ``conv_layer``; keys ``0.weight``, ``1.*``)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, 1, padding, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(True),
    )


def _linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(True)
    )


def sine_position_1d(dim: int, length: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Fixed 1-D sine position encoding ``(length, dim)`` (Vaswani et al. 2017, section 3.5).

    ``PE[p, 2i] = sin(p / 10000^(2i/dim))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/dim))``.
    """
    if dim % 2:
        raise ValueError(f"sine position encodings need an even width, got dim={dim}")
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * inv)
    pe[:, 1::2] = torch.cos(position * inv)
    return pe.to(dtype)


def sine_position_2d(
    dim: int, height: int, width: int, *, device=None, dtype=torch.float32
) -> Tensor:
    """Fixed 2-D sine position encoding ``(height * width, dim)``, row-major (CRIS's ``pos2d``).

    The first half of the channels encodes the column ``x`` and the second half the row ``y``, each
    as interleaved sines and cosines with frequencies ``1 / 10000^(2i / (dim/2))``.
    """
    if dim % 4:
        raise ValueError(f"2-D sine position encodings need a width divisible by 4, got dim={dim}")
    half = dim // 2
    inv = torch.exp(
        torch.arange(0, half, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / half)
    )
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None] * inv  # (w, half/2)
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] * inv  # (h, half/2)
    pe = torch.zeros(height, width, dim, device=device, dtype=torch.float32)
    pe[:, :, 0:half:2] = torch.sin(xs)[None]
    pe[:, :, 1:half:2] = torch.cos(xs)[None]
    pe[:, :, half::2] = torch.sin(ys)[:, None]
    pe[:, :, half + 1 :: 2] = torch.cos(ys)[:, None]
    return rearrange(pe, "h w d -> (h w) d").to(dtype)


class CoordConv(nn.Module):
    """Append normalised ``x, y`` coordinates in ``[-1, 1]`` as two channels, then ``conv_bn_relu``
    (Liu et al., "An intriguing failing of convolutional neural networks and the CoordConv solution",
    2018; CRIS eq. for ``F_v``).

    Args:
        in_channels, out_channels: feature widths (the coordinates are added to ``in_channels``).
        kernel_size, padding: of the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + 2, out_channels, kernel_size, padding)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w) -> (B, out_channels, h, w)``."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y]).expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], dim=1))


class TextConditionedFPN(nn.Module):
    """CRIS's cross-modal neck: a feature pyramid whose deepest level is multiplied by the sentence.

    With ``g`` = ``conv_bn_relu`` and ``Up`` / ``Avg`` = ×2 bilinear upsampling / 2x2 average pooling
    (section 3.2)::

        s    = ReLU(BN1d(W_s F_s))                                      # (B, out5)
        F_m5 = ReLU(BN(g_1x1(V5) ⊙ s))                                  # text conditioning, stride 32
        F_m4 = g_1x1([g_3x3(C4), Up(F_m5)])                             # stride 16
        F_m3 = g_1x1([Avg(g_3x3(C3)), F_m4])                            # stride 16
        F_q  = g_3x3(CoordConv(g_1x1([g_3x3(F_m3), g_3x3(F_m4), Up(g_3x3(F_m5))])))

    Args:
        in_channels: ``(C3, C4, V5)`` widths: ``[512, 1024, 1024]`` for RN50 (``V5`` = the dense
            attention-pool output, whose width equals the sentence width ``F_s``).
        out_channels: ``(out3, out4, out5)``: ``[256, 512, 1024]``; ``out4`` is the decoder width.

    Shapes:
        ``forward(c3 (B, in3, 2h, 2w), c4 (B, in4, h, w), v5 (B, in5, h/2, w/2), sentence (B, in5))``
        -> ``(B, out4, h, w)``.
    """

    def __init__(
        self,
        *,
        in_channels: tuple[int, int, int] = (512, 1024, 1024),
        out_channels: tuple[int, int, int] = (256, 512, 1024),
    ) -> None:
        super().__init__()
        in3, in4, in5 = (int(c) for c in in_channels)
        out3, out4, out5 = (int(c) for c in out_channels)
        self.in_channels, self.out_channels = (in3, in4, in5), (out3, out4, out5)
        self.txt_proj = _linear_bn_relu(in5, out5)
        self.f1_v_proj = conv_bn_relu(in5, out5, 1, 0)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(out5), nn.ReLU(True))
        self.f2_v_proj = conv_bn_relu(in4, out4, 3, 1)
        self.f2_cat = conv_bn_relu(out5 + out4, out4, 1, 0)
        self.f3_v_proj = conv_bn_relu(in3, out3, 3, 1)
        self.f3_cat = conv_bn_relu(out3 + out4, out4, 1, 0)
        self.f4_proj5 = conv_bn_relu(out5, out4, 3, 1)
        self.f4_proj4 = conv_bn_relu(out4, out4, 3, 1)
        self.f4_proj3 = conv_bn_relu(out4, out4, 3, 1)
        self.aggr = conv_bn_relu(3 * out4, out4, 1, 0)
        self.coordconv = nn.Sequential(CoordConv(out4, out4, 3, 1), conv_bn_relu(out4, out4, 3, 1))

    def _check(self, c3: Tensor, c4: Tensor, v5: Tensor, sentence: Tensor) -> None:
        in3, in4, in5 = self.in_channels
        b = v5.shape[0]
        for name, x, c in (("c3", c3, in3), ("c4", c4, in4), ("v5", v5, in5)):
            if x.dim() != 4 or x.shape[:2] != (b, c):
                raise ValueError(f"{name} must have shape (B={b}, {c}, h, w), got {tuple(x.shape)}")
        h, w = v5.shape[-2:]
        if tuple(c4.shape[-2:]) != (2 * h, 2 * w) or tuple(c3.shape[-2:]) != (4 * h, 4 * w):
            raise ValueError(
                f"c3, c4, v5 must be strides 8, 16, 32 of one image: for v5 {h}x{w} expected c4 "
                f"{2 * h}x{2 * w} and c3 {4 * h}x{4 * w}, got {tuple(c4.shape[-2:])} and "
                f"{tuple(c3.shape[-2:])}"
            )
        if sentence.dim() != 2 or sentence.shape != (b, in5):
            raise ValueError(
                f"sentence must have shape (B={b}, {in5}), got {tuple(sentence.shape)}"
            )
        if b < 2 and self.txt_proj[1].training:
            raise ValueError(
                "CRIS's sentence projection has a BatchNorm1d: training needs at least 2 (image, "
                "prompt) pairs per batch (or put the neck in eval mode)"
            )

    def forward(self, c3: Tensor, c4: Tensor, v5: Tensor, sentence: Tensor) -> Tensor:
        self._check(c3, c4, v5, sentence)
        state = self.txt_proj(sentence)[:, :, None, None]
        f5 = self.norm_layer(self.f1_v_proj(v5) * state)
        f4 = self.f2_v_proj(c4)
        f4 = self.f2_cat(torch.cat([f4, F.interpolate(f5, scale_factor=2, mode="bilinear")], 1))
        f3 = F.avg_pool2d(self.f3_v_proj(c3), 2, 2)
        f3 = self.f3_cat(torch.cat([f3, f4], 1))
        fq5 = F.interpolate(self.f4_proj5(f5), scale_factor=2, mode="bilinear")
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], 1))
        return self.coordconv(fq)


class _Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, on SDPA.

    ``in_proj_weight (3D, D)`` / ``in_proj_bias (3D,)`` hold the stacked q / k / v projections and
    ``out_proj`` the output projection, initialised as PyTorch initialises ``nn.MultiheadAttention``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None) -> Tensor:
        """``(B, Q, D)``, ``(B, K, D)``, ``(B, K, D)``, additive ``(B, 1, 1, K)`` -> ``(B, Q, D)``."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h = self.num_heads
        q = rearrange(F.linear(query, wq, bq), "b n (h d) -> b h n d", h=h)
        k = rearrange(F.linear(key, wk, bk), "b n (h d) -> b h n d", h=h)
        v = rearrange(F.linear(value, wv, bv), "b n (h d) -> b h n d", h=h)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class VisionLanguageDecoderLayer(nn.Module):
    """One CRIS decoder layer: self-attention over pixels, cross-attention to words, FFN.

    Pre-norm residual branches, each attention output normalised once more (section 3.3)::

        v' = LN_1(v);  v = v + Drop(LN_sa(SelfAttn(q = k = v' + P_v, value = v')))
        v' = LN_2(v);  v = v + Drop(LN_ca(CrossAttn(q = v' + P_v, k = F_w + P_w, value = F_w, pad)))
        v' = LN_3(v);  v = v + Drop(W_2 LN_ffn(Drop(ReLU(W_1 v'))))

    Args:
        dim: decoder width (``vis_dim``, 512; also the word-feature width).
        num_heads: attention heads (8).
        dim_ffn: FFN width (2048).
        dropout: dropout on attention weights and on each branch (0.1 in CRIS; medvlsm 0.2,
            TuneVLSeg's prompt tuning 0).
    """

    def __init__(
        self, dim: int = 512, *, num_heads: int = 8, dim_ffn: int = 2048, dropout: float = 0.1
    ):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, num_heads, dropout)
        self.multihead_attn = _Attention(dim, num_heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_ffn),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.LayerNorm(dim_ffn),
            nn.Linear(dim_ffn, dim),
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, vis: Tensor, words: Tensor, vis_pos: Tensor, word_pos: Tensor, bias: Tensor | None
    ) -> Tensor:
        """``vis (B, N, D)``, ``words (B, L, D)``, positions ``(N, D)`` / ``(L, D)``, additive key
        bias ``(B, 1, 1, L)`` (or None) -> ``(B, N, D)``."""
        v = self.norm1(vis)
        q = v + vis_pos
        vis = vis + self.dropout1(self.self_attn_norm(self.self_attn(q, q, v, None)))
        v = self.norm2(vis)
        attended = self.multihead_attn(v + vis_pos, words + word_pos, words, bias)
        vis = vis + self.dropout2(self.cross_attn_norm(attended))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class VisionLanguageDecoder(nn.Module):
    """CRIS's vision-language decoder: ``num_layers`` :class:`VisionLanguageDecoderLayer` + LayerNorm.

    Pixels of ``F_q`` get a fixed 2-D sine position encoding, words a 1-D one; word positions marked
    as padding are excluded from the cross-attention keys.

    Args:
        dim: width of the pixels and of the words (``vis_dim`` = CLIP text width, 512).
        num_layers: decoder layers (3).
        num_heads: attention heads (8).
        dim_ffn: FFN width (2048).
        dropout: dropout (0.1).

    Shapes:
        ``forward(vis (B, D, h, w), words (B, L, D), padding (B, L) bool or None)`` -> ``(B, D, h, w)``;
        ``padding`` is True at padded word positions (PyTorch's ``key_padding_mask`` convention).
    """

    def __init__(
        self,
        *,
        dim: int = 512,
        num_layers: int = 3,
        num_heads: int = 8,
        dim_ffn: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(
                f"the decoder width must be divisible by 4 (2-D sine positions), got {dim}"
            )
        self.dim = dim
        self.layers = nn.ModuleList(
            VisionLanguageDecoderLayer(dim, num_heads=num_heads, dim_ffn=dim_ffn, dropout=dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, vis: Tensor, words: Tensor, padding: Tensor | None = None) -> Tensor:
        if vis.dim() != 4 or vis.shape[1] != self.dim:
            raise ValueError(f"vis must have shape (B, {self.dim}, h, w), got {tuple(vis.shape)}")
        b, d, h, w = vis.shape
        if words.dim() != 3 or words.shape[0] != b or words.shape[-1] != d:
            raise ValueError(f"words must have shape (B={b}, L, {d}), got {tuple(words.shape)}")
        bias = None
        if padding is not None:
            if padding.shape != words.shape[:2]:
                raise ValueError(
                    f"padding must have shape (B, L)={tuple(words.shape[:2])}, got "
                    f"{tuple(padding.shape)}"
                )
            # additive bias with the dtype's most negative finite value, so a fully padded row
            # gives a uniform softmax instead of NaN
            dtype = torch.promote_types(words.dtype, torch.float32)
            zeros = torch.zeros(padding.shape, dtype=dtype, device=words.device)
            bias = zeros.masked_fill(padding.bool(), torch.finfo(dtype).min)[:, None, None, :]
        dtype = vis.dtype
        vis_pos = sine_position_2d(d, h, w, device=vis.device, dtype=dtype)
        word_pos = sine_position_1d(d, words.shape[1], device=vis.device, dtype=words.dtype)
        x = rearrange(vis, "b d h w -> b (h w) d")
        for layer in self.layers:
            x = layer(x, words, vis_pos, word_pos, None if bias is None else bias.to(x.dtype))
        return rearrange(self.norm(x), "b (h w) d -> b d h w", h=h, w=w)


class DynamicKernelProjector(nn.Module):
    """CRIS's projector: the sentence becomes a per-sample 3x3 kernel applied to upsampled pixels.

    Section 3.4 (text-to-pixel contrastive learning)::

        Z_v = Conv1x1(g_3x3(Up(g_3x3(Up(F_c)))))           # (B, in_dim, 4h, 4w), stride 4
        [W_b, b_b] = Linear(F_s)                            # W_b (1, in_dim, k, k), b_b scalar
        logits_b = W_b * Z_v[b] + b_b                        # (1, 4h, 4w), one grouped convolution

    Args:
        word_dim: sentence width (1024 for RN50).
        in_dim: pixel width after the projector (``vis_dim // 2`` = 256).
        kernel_size: dynamic kernel size (3).

    Shapes:
        ``forward(x (B, 2 * in_dim, h, w), sentence (B, word_dim))`` -> ``(B, 1, 4h, 4w)``.
    """

    def __init__(self, *, word_dim: int = 1024, in_dim: int = 256, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.word_dim, self.in_dim, self.kernel_size = word_dim, in_dim, kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(in_dim * 2, in_dim * 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(in_dim * 2, in_dim, 3, padding=1),
            nn.Conv2d(in_dim, in_dim, 1),
        )
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x: Tensor, sentence: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 2 * self.in_dim:
            raise ValueError(
                f"x must have shape (B, {2 * self.in_dim}, h, w), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if sentence.shape != (b, self.word_dim):
            raise ValueError(
                f"sentence must have shape (B={b}, {self.word_dim}), got {tuple(sentence.shape)}"
            )
        z = self.vis(x)
        params = self.txt(sentence).to(z.dtype)
        k = self.kernel_size
        weight = rearrange(params[:, :-1], "b (c i j) -> b c i j", c=self.in_dim, i=k, j=k)
        # all samples at once: the batch becomes the channel groups of one convolution
        out = F.conv2d(
            rearrange(z, "b c h w -> 1 (b c) h w"), weight, params[:, -1], padding=k // 2, groups=b
        )
        return rearrange(out, "1 b h w -> b 1 h w")
