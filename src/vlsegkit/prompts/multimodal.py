"""Multimodal context learners: MaPLe, Shared-Separate and Shared-Attention.

TuneVLSeg (Adhikari et al., ACCV 2024, §4.3) writes all three as unified prompts
``P^_i ∈ R^{B x H_u}`` turned into a text and a vision prompt per depth, eq. (9)::

    [P_i, P~_i] = U_i(P^_i),    i = 0 .. J-1

* MaPLe (Khattak et al., CVPR 2023): the unified prompt lives in text space (``U^l = id``) and the
  vision prompt is a coupling function of it, ``P~_i = g_i(P_i)`` (eq. 10-11 with one identity branch).
* Shared-Separate: ``P_i = U^l_i(P^_i)``, ``P~_i = U^v_i(P^_i)``, each a linear layer followed by layer
  normalisation (eq. 10-11).
* Shared-Attention: ``U_i`` is a transformer block over the ``B`` unified tokens, whose output is
  split into the text part (first ``D_t`` channels) and the vision part (last ``D_v``).

Text prompts go after the start token, vision prompts into the vision sequence, both replaced below
depth ``J`` and carried after (see :mod:`vlsegkit.prompts.base`). The text and vision prompts of a
forward pass come from one evaluation of ``U_i``, so dropout inside ``U_i`` draws one sample for both.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import ContextLearner, PromptSet, TextOverflow
from .projector import PromptProjector

__all__ = ["MaPLe", "PromptTransformerLayer", "SharedAttention", "SharedSeparate"]


class MaPLe(ContextLearner):
    """Multi-modal prompt learning: text prompts ``P_i`` coupled to vision prompts ``g_i(P_i)``.

    Parameters ``context (J, B, D_t)`` (``P_0`` from ``init``, deeper ``N(0, init_std^2)``) and one
    coupling ``g_i: R^{D_t} -> R^{D_v}`` per depth -- ``Linear(D_t, D_v)`` as in MaPLe, or TuneVLSeg's
    searched MLP / low-rank projection when ``hidden_dim`` is set.

    Args:
        num_context: ``B`` (None: token count of ``init``, else 4).
        depth: ``J``, at most the depth of either tower.
        init: phrase initialising ``P_0`` (default ``"a photo of a"``; None: Gaussian, TuneVLSeg
            Table 4 ablation).
        init_std: std of the Gaussian initialisation.
        hidden_dim, low_rank, norm, final_bias: coupling shape (see
            :class:`~vlsegkit.prompts.PromptProjector`); ``final_bias`` (the LayerNorm's bias in
            the MLP / low-rank forms) is on as in TuneVLSeg's released MaPLe.
        overflow: see :class:`~vlsegkit.prompts.ContextLearner`.
        decoder_sees_prompts: what the decoder reads in the vision prompt slots (see
            :class:`~vlsegkit.prompts.ContextLearner`; ``"released"`` for TuneVLSeg's code).
        text_width, text_layers, vision_width, vision_layers: tower sizes.
    """

    phrase_init = True
    towers = ("text", "vision")
    required_dims = ("text_width", "text_layers", "vision_width", "vision_layers")
    RELEASED: ClassVar[dict[str, Any]] = {
        "init": "a photo of a", "hidden_dim": 64, "norm": True, "final_bias": True,
        "decoder_sees_prompts": "released", "overflow": "released",
    }  # fmt: skip
    RELEASED_UPSAMPLER: ClassVar[str | None] = "interpolate"

    def __init__(
        self,
        *,
        num_context: int | None = None,
        depth: int = 1,
        init: str | None = "a photo of a",
        init_std: float = 0.02,
        hidden_dim: int | None = None,
        low_rank: bool = False,
        norm: bool = True,
        final_bias: bool = True,
        decoder_sees_prompts: bool | str = False,
        overflow: TextOverflow = "truncate",
        text_width: int | None = None,
        text_layers: int | None = None,
        vision_width: int | None = None,
        vision_layers: int | None = None,
    ) -> None:
        self.hidden_dim, self.low_rank, self.norm = hidden_dim, low_rank, norm
        self.final_bias = final_bias
        super().__init__(
            num_context=num_context,
            depth=depth,
            init=init,
            init_std=init_std,
            decoder_sees_prompts=decoder_sees_prompts,
            overflow=overflow,
            text_width=text_width,
            text_layers=text_layers,
            vision_width=vision_width,
            vision_layers=vision_layers,
        )

    def _build(self) -> None:
        d_t, d_v = self._dims["text_width"], self._dims["vision_width"]
        self.context = self._normal(self.depth, self.num_context, d_t)
        self.couplings = nn.ModuleList(
            PromptProjector(
                d_t,
                d_v,
                hidden_dim=self.hidden_dim,
                low_rank=self.low_rank,
                norm=self.norm,
                final_bias=self.final_bias,
            )
            for _ in range(self.depth)
        )

    def _first_text_context(self) -> Tensor:
        return self.context[0]

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per depth: text prompt ``P_i`` ``(n, D_t)`` and vision prompt ``g_i(P_i)`` ``(n, D_v)``."""
        text = list(self.context.unbind(0))
        vision = [g(p) for g, p in zip(self.couplings, text)]
        return PromptSet(text=text, vision=vision)


class SharedSeparate(ContextLearner):
    """Unified prompts projected to each modality: ``P_i = U^l_i(P^_i)``, ``P~_i = U^v_i(P^_i)``.

    Parameters ``unified (J, B, H_u)`` ~ ``N(0, init_std^2)``; ``U^l_i = LN(Linear(H_u, D_t))`` and
    ``U^v_i = LN(Linear(H_u, D_v))`` (TuneVLSeg §4.3: "a linear layer followed by layer
    normalization"). ``layernorm=False`` gives the released code, where the projection factory
    returns a bare ``Linear`` (spec discrepancy #2).

    Args:
        num_context: ``B``.
        depth: ``J``.
        shared_dim: ``H_u`` (TuneVLSeg searches {32, 64}).
        layernorm: LayerNorm after each projection (paper; False: released code).
        init_std: std of the Gaussian initialisation.
        decoder_sees_prompts: what the decoder reads in the vision prompt slots (see
            :class:`~vlsegkit.prompts.ContextLearner`; ``"released"`` for TuneVLSeg's code).
        text_width, text_layers, vision_width, vision_layers: tower sizes.
    """

    towers = ("text", "vision")
    required_dims = ("text_width", "text_layers", "vision_width", "vision_layers")
    RELEASED: ClassVar[dict[str, Any]] = {
        "num_context": 4, "shared_dim": 64, "layernorm": False,
        "decoder_sees_prompts": "released", "overflow": "released",
    }  # fmt: skip
    RELEASED_UPSAMPLER: ClassVar[str | None] = "interpolate"

    def __init__(
        self,
        *,
        num_context: int = 4,
        depth: int = 1,
        shared_dim: int = 64,
        layernorm: bool = True,
        init_std: float = 0.02,
        decoder_sees_prompts: bool | str = False,
        overflow: TextOverflow = "truncate",
        text_width: int | None = None,
        text_layers: int | None = None,
        vision_width: int | None = None,
        vision_layers: int | None = None,
    ) -> None:
        if shared_dim < 1:
            raise ValueError(f"shared_dim must be >= 1, got {shared_dim}")
        self.shared_dim, self.layernorm = shared_dim, layernorm
        super().__init__(
            num_context=num_context,
            depth=depth,
            init_std=init_std,
            decoder_sees_prompts=decoder_sees_prompts,
            overflow=overflow,
            text_width=text_width,
            text_layers=text_layers,
            vision_width=vision_width,
            vision_layers=vision_layers,
        )

    def _projection(self, out_dim: int) -> nn.Module:
        linear = nn.Linear(self.shared_dim, out_dim)
        return nn.Sequential(linear, nn.LayerNorm(out_dim)) if self.layernorm else linear

    def _build(self) -> None:
        d_t, d_v = self._dims["text_width"], self._dims["vision_width"]
        self.unified = self._normal(self.depth, self.num_context, self.shared_dim)
        self.to_text = nn.ModuleList(self._projection(d_t) for _ in range(self.depth))
        self.to_vision = nn.ModuleList(self._projection(d_v) for _ in range(self.depth))

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per-depth text ``(n, D_t)`` and vision ``(n, D_v)`` prompts, ``n = num_context``."""
        unified = self.unified.unbind(0)
        text = [u_l(p) for u_l, p in zip(self.to_text, unified)]
        vision = [u_v(p) for u_v, p in zip(self.to_vision, unified)]
        return PromptSet(text=text, vision=vision)


class PromptTransformerLayer(nn.Module):
    """A transformer encoder layer over a handful of prompt tokens (``nn.TransformerEncoderLayer``
    semantics: ReLU MLP, dropout, post-norm unless ``norm_first``), on SDPA.

    Post-norm: ``x = LN_1(x + Drop(SA(x)))``, ``x = LN_2(x + Drop(W_2 Drop(ReLU(W_1 x))))``;
    pre-norm: ``x = x + Drop(SA(LN_1 x))``, ``x = x + Drop(MLP(LN_2 x))``.

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        mlp_dim: hidden width of the MLP.
        dropout: dropout on attention weights, after attention, inside and after the MLP.
        norm_first: pre-norm instead of post-norm.
        mix_tokens: let the tokens attend to each other (the paper). False restricts each token to
            itself -- what TuneVLSeg's released code computes, since it feeds the ``B`` prompts as a
            batch of length-1 sequences.

    Shapes:
        ``(n, dim)`` or ``(batch, n, dim)`` -> same shape.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        norm_first: bool = False,
        mix_tokens: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the prompt width dim={dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm_first, self.mix_tokens = norm_first, mix_tokens
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _attention(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        mask = None
        if not self.mix_tokens:
            mask = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.drop(self.out_proj(rearrange(out, "b h n d -> b n (h d)")))

    def _mlp(self, x: Tensor) -> Tensor:
        return self.drop(self.linear2(self.drop(F.relu(self.linear1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x[None]
        if self.norm_first:
            x = x + self._attention(self.norm1(x))
            x = x + self._mlp(self.norm2(x))
        else:
            x = self.norm1(x + self._attention(x))
            x = self.norm2(x + self._mlp(x))
        return x[0] if squeeze else x


class SharedAttention(ContextLearner):
    """Unified prompts mixed by a transformer block per depth: ``[P_i, P~_i] = U_i(P^_i)``.

    Parameters ``unified (J, B, D_t + D_v)`` ~ ``N(0, init_std^2)`` and one
    :class:`PromptTransformerLayer` per depth over the ``B`` unified tokens; channels ``[:D_t]`` of its
    output are the text prompt, ``[D_t:]`` the vision prompt (TuneVLSeg, Fig. 2e).

    Args:
        num_context: ``B``.
        depth: ``J``.
        num_heads: attention heads of ``U_i`` (TuneVLSeg searches {16, 20, 32}; must divide
            ``D_t + D_v``).
        mlp_dim: MLP width of ``U_i`` (TuneVLSeg: {1280, 1420}).
        dropout: dropout of ``U_i`` (TuneVLSeg: [0.1, 0.55]).
        norm_first: pre-norm ``U_i`` (TuneVLSeg searches both).
        mix_tokens: prompt tokens attend to each other (paper); False reproduces the released code.
        init_std: std of the Gaussian initialisation.
        decoder_sees_prompts: what the decoder reads in the vision prompt slots (see
            :class:`~vlsegkit.prompts.ContextLearner`; ``"released"`` for TuneVLSeg's code).
        text_width, text_layers, vision_width, vision_layers: tower sizes.
    """

    towers = ("text", "vision")
    required_dims = ("text_width", "text_layers", "vision_width", "vision_layers")
    RELEASED: ClassVar[dict[str, Any]] = {
        "num_context": 4, "num_heads": 16, "mlp_dim": 1536, "dropout": 0.25, "norm_first": True,
        "mix_tokens": False, "decoder_sees_prompts": "released", "overflow": "released",
    }  # fmt: skip
    RELEASED_UPSAMPLER: ClassVar[str | None] = "interpolate"

    def __init__(
        self,
        *,
        num_context: int = 4,
        depth: int = 1,
        num_heads: int = 16,
        mlp_dim: int = 1280,
        dropout: float = 0.1,
        norm_first: bool = False,
        mix_tokens: bool = True,
        init_std: float = 0.02,
        decoder_sees_prompts: bool | str = False,
        overflow: TextOverflow = "truncate",
        text_width: int | None = None,
        text_layers: int | None = None,
        vision_width: int | None = None,
        vision_layers: int | None = None,
    ) -> None:
        self.num_heads, self.mlp_dim, self.dropout = num_heads, mlp_dim, dropout
        self.norm_first, self.mix_tokens = norm_first, mix_tokens
        super().__init__(
            num_context=num_context,
            depth=depth,
            init_std=init_std,
            decoder_sees_prompts=decoder_sees_prompts,
            overflow=overflow,
            text_width=text_width,
            text_layers=text_layers,
            vision_width=vision_width,
            vision_layers=vision_layers,
        )

    def _build(self) -> None:
        dim = self._dims["text_width"] + self._dims["vision_width"]
        self.unified = self._normal(self.depth, self.num_context, dim)
        self.mixers = nn.ModuleList(
            PromptTransformerLayer(
                dim,
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                norm_first=self.norm_first,
                mix_tokens=self.mix_tokens,
            )
            for _ in range(self.depth)
        )

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per-depth text ``(n, D_t)`` and vision ``(n, D_v)`` halves of ``U_i(P^_i)``."""
        d_t = self._dims["text_width"]
        mixed = [u(p) for u, p in zip(self.mixers, self.unified.unbind(0))]
        return PromptSet(text=[m[:, :d_t] for m in mixed], vision=[m[:, d_t:] for m in mixed])
