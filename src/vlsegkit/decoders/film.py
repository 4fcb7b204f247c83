"""CLIPSeg's FiLM-conditioned transformer decoder.

Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022 (CLIPSeg), as ported to
transformers (``CLIPSegDecoder``). Parameter names follow the transformers port so Hub checkpoints map
one-to-one; the implementation is vlsegkit's own and, unlike the port, supports non-square patch grids
and any number of prefix / prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["FiLMDecoder", "PostNormTransformerLayer"]


class _SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections, on SDPA."""

    def __init__(self, dim: int, *, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(proj(x), "b n (h d) -> b h n d", h=self.num_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class PostNormTransformerLayer(nn.Module):
    """Post-norm transformer layer: ``x = LN1(x + Attn(x)); x = LN2(x + MLP(x))`` with ReLU MLP.

    This is the CLIPSeg decoder block (the transformers port hard-codes ReLU and no dropout).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, *, num_heads: int = 4, mlp_dim: int = 2048, eps: float = 1e-5):
        super().__init__()
        self.self_attn = _SelfAttention(dim, num_heads=num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _MLP(dim, mlp_dim)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        x = self.layer_norm1(x + self.self_attn(x))
        return self.layer_norm2(x + self.mlp(x))


def _upsampler(reduce_dim: int, patch_size: int, *, complex: bool) -> nn.Module:
    if not complex:
        return nn.ConvTranspose2d(reduce_dim, 1, patch_size, stride=patch_size)
    k = patch_size // 4
    if k * k != patch_size:
        # Two transposed convs of stride p/4 upsample by (p/4)^2, which is p only for p = 16.
        raise ValueError(
            f"the refined upsampler reaches input resolution only for patch size 16, got {patch_size}"
        )
    # Indices 0, 2, 4 carry weights, matching the refined CIDAS checkpoint's key names.
    return nn.Sequential(
        nn.Conv2d(reduce_dim, reduce_dim, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(reduce_dim, reduce_dim // 2, kernel_size=k, stride=k),
        nn.ReLU(),
        nn.ConvTranspose2d(reduce_dim // 2, 1, kernel_size=k, stride=k),
    )


class FiLMDecoder(nn.Module):
    """CLIPSeg decoder: reduce → FiLM(condition) → post-norm transformer layers → transposed conv.

    Given activations ``A_1 .. A_K`` of K vision blocks (shallow to deep) and a conditional embedding
    ``c``, the decoder walks them deepest first::

        a = reduce_0(A_K);                  a = film_mul(c) * a + film_add(c)   (at conditional_layer)
        a = layer_0(a)
        a = reduce_j(A_{K-j}) + a;          a = layer_j(a)                       (j = 1 .. K-1)

    then drops the prefix / prompt tokens, folds the patch tokens into their ``(h, w)`` grid and
    upsamples by the patch size, giving logits at input resolution.

    Args:
        vision_width: width ``D`` of the vision activations (768 for ViT-B).
        cond_dim: width ``E`` of the conditional embedding (CLIP projection dim, 512).
        reduce_dim: decoder width (16 or 64 in the CIDAS checkpoints).
        depth: number of activations / decoder layers (``len(extract_layers)``, 3).
        num_heads: decoder attention heads (4).
        mlp_dim: decoder MLP width (2048).
        patch_size: upsampling factor = the vision tower's patch size.
        conditional_layer: index (deepest first) of the level where FiLM is applied.
        complex_upsampler: the refined ("complex") three-stage transposed convolution.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        vision_width: int = 768,
        cond_dim: int = 512,
        reduce_dim: int = 64,
        depth: int = 3,
        num_heads: int = 4,
        mlp_dim: int = 2048,
        patch_size: int = 16,
        conditional_layer: int = 0,
        complex_upsampler: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not 0 <= conditional_layer < depth:
            raise ValueError(f"conditional_layer must be in [0, {depth}), got {conditional_layer}")
        self.depth = depth
        self.cond_dim = cond_dim
        self.vision_width = vision_width
        self.conditional_layer = conditional_layer
        self.film_mul = nn.Linear(cond_dim, reduce_dim)
        self.film_add = nn.Linear(cond_dim, reduce_dim)
        self.reduces = nn.ModuleList(nn.Linear(vision_width, reduce_dim) for _ in range(depth))
        self.layers = nn.ModuleList(
            PostNormTransformerLayer(reduce_dim, num_heads=num_heads, mlp_dim=mlp_dim, eps=eps)
            for _ in range(depth)
        )
        self.transposed_convolution = _upsampler(reduce_dim, patch_size, complex=complex_upsampler)

    def forward(
        self,
        activations: Sequence[Tensor],
        cond: Tensor,
        *,
        grid: tuple[int, int],
        content_start: int = 1,
    ) -> Tensor:
        """Decode one mask per (image, condition) row: ``transposed_convolution(features(...))``.

        Args and shapes as :meth:`features`.

        Returns:
            ``(B, 1, h * p, w * p)`` logits, p the patch size.
        """
        return self.transposed_convolution(
            self.features(activations, cond, grid=grid, content_start=content_start)
        )

    def features(
        self,
        activations: Sequence[Tensor],
        cond: Tensor,
        *,
        grid: tuple[int, int],
        content_start: int = 1,
    ) -> Tensor:
        """The decoder's penultimate feature map: everything before the final upsampler.

        Args:
            activations: ``depth`` tensors ``(B, N, vision_width)``, shallow to deep, each holding
                ``content_start`` leading prefix / prompt tokens then the ``h * w`` patch tokens.
            cond: ``(B, cond_dim)`` conditional embeddings, one per row of the activations.
            grid: patch grid ``(h, w)``.
            content_start: index of the first patch token.

        Returns:
            ``(B, reduce_dim, h, w)`` patch features (the input of ``transposed_convolution``).
        """
        if len(activations) != self.depth:
            raise ValueError(f"expected {self.depth} activations, got {len(activations)}")
        b = activations[0].shape[0]
        if cond.dim() != 2 or cond.shape != (b, self.cond_dim):
            raise ValueError(
                f"cond must have shape (B={b}, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        h, w = grid
        out = None
        for i, (act, reduce, layer) in enumerate(
            zip(reversed(activations), self.reduces, self.layers)
        ):
            if act.shape[0] != b or act.shape[-1] != self.vision_width:
                raise ValueError(
                    f"activation {i} must have shape (B={b}, N, {self.vision_width}), "
                    f"got {tuple(act.shape)}"
                )
            out = reduce(act) if out is None else reduce(act) + out
            if i == self.conditional_layer:
                out = self.film_mul(cond)[:, None] * out + self.film_add(cond)[:, None]
            out = layer(out)
        patches = out[:, content_start:]
        if patches.shape[1] != h * w:
            raise ValueError(
                f"grid {h}x{w} needs {h * w} patch tokens after index {content_start}, "
                f"found {patches.shape[1]}"
            )
        return rearrange(patches, "b (h w) d -> b d h w", h=h, w=w)
