"""A re-statement of CRIS.pytorch's module structure (DerrickWang005/CRIS.pytorch, CVPR 2022).

Written from the structure of ``model/clip.py``, ``model/layers.py`` and ``model/segmenter.py``: the
CLIP backbone is open_clip's ``CLIP`` (OpenAI's parameter names) whose attention pool is replaced by
CRIS's modified pool with its ``connect`` branch; neck, decoder (``nn.MultiheadAttention``,
sequence-first) and projector (one convolution per sample) carry CRIS's names, so
``RefCRIS().state_dict()`` has exactly the released checkpoint's keys. Used by ``tests/test_cris.py``
(parity, checkpoints, learners) and ``benchmarks/cris.py`` (the reference run).
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefCRIS", "RefDecoder", "RefFPN", "RefProjector", "pos1d_loops", "pos2d_loops",
           "pos_tables", "randomise"]  # fmt: skip


def _conv(i: int, o: int, k: int = 1, p: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, 1, p, bias=False), nn.BatchNorm2d(o), nn.ReLU(True))


class RefAttnPool(nn.Module):
    """CRIS's ``AttentionPool2d``: CLIP's q/k/v/c projections + ``connect``; every position a query."""

    def __init__(self, side: int, dim: int, heads: int, out: int):
        super().__init__()
        self.side, self.num_heads = side, heads
        self.positional_embedding = nn.Parameter(torch.randn(side * side + 1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, out)
        self.connect = nn.Sequential(nn.Conv2d(dim, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        b, c, h, w = x.shape
        res = self.connect(x)
        grid = self.positional_embedding[1:].T.reshape(1, c, self.side, self.side)
        pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2)
        t = (x.flatten(2) + pos).permute(2, 0, 1)
        t, _ = F.multi_head_attention_forward(
            t, t, t, c, self.num_heads, None,
            torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]), None, None, False,
            0.0, self.c_proj.weight, self.c_proj.bias, training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
        )  # fmt: skip
        return F.relu(t.permute(1, 2, 0).reshape(b, -1, h, w) + res)


class RefFPN(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.txt_proj = nn.Sequential(
            nn.Linear(cin[2], cout[2], bias=False), nn.BatchNorm1d(cout[2]), nn.ReLU(True)
        )
        self.f1_v_proj = _conv(cin[2], cout[2])
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(cout[2]), nn.ReLU(True))
        self.f2_v_proj = _conv(cin[1], cout[1], 3, 1)
        self.f2_cat = _conv(cout[2] + cout[1], cout[1])
        self.f3_v_proj = _conv(cin[0], cout[0], 3, 1)
        self.f3_cat = _conv(cout[0] + cout[1], cout[1])
        self.f4_proj5 = _conv(cout[2], cout[1], 3, 1)
        self.f4_proj4 = _conv(cout[1], cout[1], 3, 1)
        self.f4_proj3 = _conv(cout[1], cout[1], 3, 1)
        self.aggr = _conv(3 * cout[1], cout[1])
        coord = nn.Module()
        coord.conv1 = _conv(cout[1] + 2, cout[1], 3, 1)
        self.coordconv = nn.Sequential(coord, _conv(cout[1], cout[1], 3, 1))

    def forward(self, v3, v4, v5, s):
        f5 = self.norm_layer(self.f1_v_proj(v5) * self.txt_proj(s)[..., None, None])
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear")  # noqa: E731
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(v4), up(f5)], 1))
        f3 = self.f3_cat(torch.cat([F.avg_pool2d(self.f3_v_proj(v3), 2, 2), f4], 1))
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), up(self.f4_proj5(f5))], 1))
        b, _, h, w = fq.shape
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        fq = self.coordconv[0].conv1(torch.cat([fq, xs, ys], 1))
        return self.coordconv[1](fq)


def pos1d_loops(d: int, n: int) -> torch.Tensor:
    pe = torch.zeros(n, d)
    for p in range(n):
        for i in range(0, d, 2):
            angle = p / 10000 ** (i / d)
            pe[p, i], pe[p, i + 1] = math.sin(angle), math.cos(angle)
    return pe


def pos2d_loops(d: int, h: int, w: int) -> torch.Tensor:
    """(h*w, d): first half of the channels for the column, second half for the row."""
    half = d // 2
    pe = torch.zeros(h, w, d)
    for y in range(h):
        for x in range(w):
            for i in range(0, half, 2):
                f = 1 / 10000 ** (i / half)
                pe[y, x, i], pe[y, x, i + 1] = math.sin(x * f), math.cos(x * f)
                pe[y, x, half + i], pe[y, x, half + i + 1] = math.sin(y * f), math.cos(y * f)
    return pe.reshape(h * w, d)


class RefDecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn_norm, self.cross_attn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.multihead_attn = nn.MultiheadAttention(d, heads)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn), nn.ReLU(True), nn.Dropout(0.0), nn.LayerNorm(ffn), nn.Linear(ffn, d)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, v, t, vpos, tpos, pad):  # sequence-first
        q = self.norm1(v) + vpos
        v = v + self.self_attn_norm(self.self_attn(q, q, self.norm1(v))[0])
        a = self.multihead_attn(self.norm2(v) + vpos, t + tpos, t, key_padding_mask=pad)[0]
        v = v + self.cross_attn_norm(a)
        return v + self.ffn(self.norm3(v))


def pos_tables(d: int, h: int, w: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 2-D ``(h*w, d)`` and 1-D ``(n, d)`` tables, computed with tensor operations (fast,
    for the benchmark's reference run)."""
    half = d // 2
    f = 1 / 10000 ** (torch.arange(0, half, 2).float() / half)
    x = torch.arange(w).float()[:, None] * f
    y = torch.arange(h).float()[:, None] * f
    cols = torch.stack([x.sin(), x.cos()], -1).flatten(1)  # (w, half): sin, cos interleaved
    rows = torch.stack([y.sin(), y.cos()], -1).flatten(1)
    grid = torch.cat([cols[None].expand(h, w, half), rows[:, None].expand(h, w, half)], -1)
    g = 1 / 10000 ** (torch.arange(0, d, 2).float() / d)
    p = torch.arange(n).float()[:, None] * g
    return grid.reshape(h * w, d), torch.stack([p.sin(), p.cos()], -1).flatten(1)


class RefDecoder(nn.Module):
    def __init__(self, n, d, heads, ffn):
        super().__init__()
        self.layers = nn.ModuleList(RefDecoderLayer(d, heads, ffn) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.loops = True  # tests: the slow loop statements; the benchmark switches them off

    def forward(self, vis, txt, pad):
        b, c, h, w = vis.shape
        if self.loops:
            vpos, tpos = pos2d_loops(c, h, w), pos1d_loops(c, txt.shape[1])
        else:
            vpos, tpos = pos_tables(c, h, w, txt.shape[1])
        vpos, tpos = vpos[:, None], tpos[:, None]
        v, t = vis.flatten(2).permute(2, 0, 1), txt.permute(1, 0, 2)
        for layer in self.layers:
            v = layer(v, t, vpos, tpos, pad)
        return self.norm(v).permute(1, 2, 0).reshape(b, c, h, w)


class RefProjector(nn.Module):
    def __init__(self, word_dim, in_dim):
        super().__init__()
        self.in_dim = in_dim
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), _conv(2 * in_dim, 2 * in_dim, 3, 1),
            nn.Upsample(scale_factor=2, mode="bilinear"), _conv(2 * in_dim, in_dim, 3, 1),
            nn.Conv2d(in_dim, in_dim, 1),
        )  # fmt: skip
        self.txt = nn.Linear(word_dim, in_dim * 9 + 1)

    def forward(self, x, s):
        z, p = self.vis(x), self.txt(s)
        outs = [  # one 3x3 convolution per sample
            F.conv2d(z[b : b + 1], p[b, :-1].view(1, self.in_dim, 3, 3), p[b, -1:], padding=1)
            for b in range(z.shape[0])
        ]
        return torch.cat(outs)


class RefCRIS(nn.Module):
    """CRIS.pytorch's ``CRIS`` (eval path), parameter names as released."""

    def __init__(self, *, layers=(1, 1, 1, 1), width=16, embed=48, text_width=64, text_layers=2,
                 fpn_out=(32, 64, 40), dec_layers=2, heads=4, ffn=96, side=7, head_width=64,
                 text_heads=None):  # fmt: skip
        super().__init__()
        self.backbone = open_clip.CLIP(
            embed_dim=embed,
            vision_cfg=dict(layers=list(layers), width=width, head_width=head_width,
                            image_size=32 * side),
            text_cfg=dict(context_length=77, vocab_size=49408, width=text_width,
                          heads=text_heads or text_width // 64, layers=text_layers),
            quick_gelu=True,
        )  # fmt: skip
        self.backbone.visual.attnpool = RefAttnPool(
            side, 32 * width, width * 32 // head_width, embed
        )
        fpn_in = (8 * width, 16 * width, embed)
        self.neck = RefFPN(fpn_in, fpn_out)
        self.decoder = RefDecoder(dec_layers, fpn_out[1], heads, ffn)
        self.proj = RefProjector(embed, fpn_out[1] // 2)

    def encode_text(self, ids):  # no padding mask in the text encoder, as released
        bb = self.backbone
        x = bb.token_embedding(ids) + bb.positional_embedding[: ids.shape[1]]
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu_(1)
        for block in bb.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = bb.ln_final(x)
        return x, x[torch.arange(len(ids)), ids.argmax(-1)] @ bb.text_projection

    def forward(self, img, ids):
        pad = ids == 0
        v = self.backbone.visual
        x = v.layer1(v.stem(img))
        v3 = v.layer2(x)
        v4 = v.layer3(v3)
        v5 = v.attnpool(v.layer4(v4))
        words, state = self.encode_text(ids)
        fq = self.decoder(self.neck(v3, v4, v5, state), words, pad)
        pred = self.proj(fq, state)
        return F.interpolate(pred, img.shape[-2:], mode="bicubic", align_corners=True)


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.LayerNorm, nn.Linear, nn.MultiheadAttention)):
                for p in m.parameters(recurse=False):
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn(p.shape, generator=g))
