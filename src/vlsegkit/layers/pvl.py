"""Probabilistic Vision-Language (PVL) attention and adapter.

Koleilat et al., "MedCLIPSeg: Probabilistic Vision-Language Adaptation for Data-Efficient and
Generalizable Medical Image Segmentation" (CVPR 2026), section 3.2, eqs. 3-17; official code
``HealthX-Lab/MedCLIPSeg`` (``trainers/layers.py``: ``ProbCrossAttention``, ``TwoWayTransformerLayer``,
``PVL_Adapter``). Parameter names follow the released checkpoints (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``, ``norm_k``, ``norm_v``, ``gate``; ``proj_{vis,txt}_{down,up}``;
``two_way.cross_attn_{img_to_txt,txt_to_img}``) so a key map stays trivial. The implementation is
vlsegkit's own.

Paper vs released code (``specs/medclipseg.md`` section 8): the paper's method is the default; the
released checkpoints additionally need ``kv_norm=True`` (LayerNorm on the key / value means). Both add
``var_eps = 1e-6`` to the softplus variances here (a numerical floor the paper does not discuss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlsegkit.ops.probabilistic_attention import probabilistic_attention

__all__ = ["PVLAdapter", "PVLAttention", "PVLTwoWayLayer"]


def _check_tokens(name: str, x: Tensor, dim: int, batch: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, N, {dim}), got {shape}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch}, got shape {tuple(x.shape)}")


class PVLAttention(nn.Module):
    """Gated probabilistic cross-attention ``Attn_PVL(X, Z)`` (MedCLIPSeg eqs. 4-13).

    ::

        Q = X W_Q                                  (eq. 4)
        [K_mu, K_raw] = Z W_K,  [V_mu, V_raw] = Z W_V   (eq. 5; optional LayerNorm on the means)
        K_var = softplus(K_raw) + eps,  V_var = softplus(V_raw) + eps   (eq. 6)
        A = softmax(Q K_mu^T / sqrt(d) - beta * sqrt((Q*Q) K_var^T / d))   (eqs. 7-9)
        V_s = V_mu + sqrt(V_var) * noise,  noise ~ N(0, I)   (eq. 10; V_s = V_mu when not sampling)
        O = A V_s,  O_proj = O W_out                (eqs. 11-12)
        Y = g * O_proj + (1 - g) * X,  g = sigmoid(gate)   (eq. 13)

    ``d`` is the head width ``attn_dim / num_heads``. Attention goes through
    :func:`vlsegkit.ops.probabilistic_attention`.

    **Sampling.** Values are sampled in training *and* in eval mode by default: the paper's inference is
    Monte Carlo (30 stochastic passes averaged), and the released code also samples in eval.
    ``model.eval()`` therefore does not make the layer deterministic; pass ``sample=False`` to
    ``forward`` or construct with ``deterministic=True`` to use the value means. (The penalty ``beta``
    still applies then; ``beta=0`` additionally removes the key uncertainty.)

    Args:
        dim: width ``D_s`` of the query and context sequences (also the output width).
        attn_dim: attention width ``D_a`` (default ``dim``, as released).
        num_heads: attention heads (1 in the release); ``attn_dim`` must be divisible by it.
        beta: confidence-penalty weight of eq. 8 (2.35 in the paper).
        kv_norm: LayerNorm (affine, over ``attn_dim``) on ``K_mu`` and ``V_mu``. Not in the paper;
            on in the released checkpoints (``norm_k`` / ``norm_v``).
        var_eps: added to the softplus variances (``1e-6`` as released; ``>= 0``).
        gate_init: initial gate logit (0 gives ``g = 0.5``, the paper's choice).
        bias: biases on the Q/K/V/O projections (True as released).
        deterministic: if True, ``forward`` uses ``V_mu`` unless called with ``sample=True``.
        chunk_size: query chunk size forwarded to ``probabilistic_attention`` (memory bound for
            long query sequences), None for a single call.
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        attn_dim: int | None = None,
        num_heads: int = 1,
        beta: float = 2.35,
        kv_norm: bool = False,
        var_eps: float = 1e-6,
        gate_init: float = 0.0,
        bias: bool = True,
        deterministic: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim {attn_dim} is not divisible by num_heads {num_heads}")
        if var_eps < 0:
            raise ValueError(f"var_eps must be >= 0, got {var_eps}")
        self.dim, self.attn_dim, self.num_heads = dim, attn_dim, num_heads
        self.beta, self.var_eps = float(beta), float(var_eps)
        self.deterministic, self.chunk_size = deterministic, chunk_size
        self.q_proj = nn.Linear(dim, attn_dim, bias=bias)
        self.k_proj = nn.Linear(dim, 2 * attn_dim, bias=bias)
        self.v_proj = nn.Linear(dim, 2 * attn_dim, bias=bias)
        self.out_proj = nn.Linear(attn_dim, dim, bias=bias)
        self.norm_k = nn.LayerNorm(attn_dim) if kv_norm else nn.Identity()
        self.norm_v = nn.LayerNorm(attn_dim) if kv_norm else nn.Identity()
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def gaussian_keys_values(self, context: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key / value means and variances of eqs. 5-6, each ``(B, M, attn_dim)``.

        Args:
            context: ``(B, M, dim)`` context sequence ``Z``.

        Returns:
            ``(k_mu, k_var, v_mu, v_var)``.
        """
        k_mu, k_raw = self.k_proj(context).chunk(2, dim=-1)
        v_mu, v_raw = self.v_proj(context).chunk(2, dim=-1)
        k_var = F.softplus(k_raw) + self.var_eps
        v_var = F.softplus(v_raw) + self.var_eps
        return self.norm_k(k_mu), k_var, self.norm_v(v_mu), v_var

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        context_padding_mask: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: Tensor | None = None,
        sample: bool | None = None,
        copies: int = 1,
    ) -> Tensor:
        """Attend from ``x`` to ``context`` and gate the result into ``x``.

        Args:
            x: ``(B, N, dim)`` query sequence ``X``.
            context: ``(B, M, dim)`` context sequence ``Z``.
            context_padding_mask: optional ``(B, M)`` bool, True for real context tokens (padded
                keys get no attention; a query with no valid key gets ``O = 0``).
            generator: random generator for the value noise (reproducible sampling), on the device
                of the inputs; or a sequence of S generators, one per equal chunk of the batch
                (Monte Carlo copies stacked copy-major): chunk ``s`` then draws exactly the noise a
                call on that chunk alone with ``generators[s]`` would.
            noise: ``(B, M, attn_dim)`` standard-normal draws to use instead of generating them
                (replays exact draws); implies sampling.
            sample: sample the values (eq. 10); None means ``not self.deterministic``.
            copies: ``S`` noise copies of the same inputs: the output is ``(S * B, N, dim)``,
                copy-major, exactly ``forward(x.repeat(S, 1, 1), context.repeat(S, 1, 1), ...)``
                (``context_padding_mask`` is then ``(B, M)``; ``noise`` and the generators cover
                the ``S * B`` rows). The projections, key means and variances and value means and
                variances are computed once for all copies; the attention then runs per copy.

        Returns:
            ``(S * B, N, dim)`` the gated output ``Y`` of eq. 13 (``S = copies``, 1 by default).
        """
        _check_tokens("x", x, self.dim)
        _check_tokens("context", context, self.dim, batch=x.shape[0])
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive int, got {copies!r}")
        sample = (not self.deterministic if sample is None else sample) or noise is not None
        k_mu, k_var, v_mu, v_var = self.gaussian_keys_values(context)
        q = self.q_proj(x)
        values = v_mu
        if sample:
            rows = (copies * x.shape[0], *v_mu.shape[1:])
            if noise is None:
                like = v_mu if copies == 1 else v_mu.new_empty(rows)
                noise = _draw_noise(like, generator)
            elif tuple(noise.shape) != rows:
                raise ValueError(
                    f"noise must have shape {rows} (copies * B, M, attn_dim), got "
                    f"{tuple(noise.shape)}"
                )
            noise = rearrange(noise.to(v_mu.dtype), "(s b) m d -> s b m d", s=copies)
            values = rearrange(v_mu + v_var.sqrt() * noise, "s b m d -> (s b) m d")
        if copies > 1:
            # everything above ran once for all copies (row-wise ops: the same numbers as on the
            # repeated rows); the attention runs per copy, as for repeated inputs
            q, k_mu, k_var, x = (t.repeat(copies, 1, 1) for t in (q, k_mu, k_var, x))
            if context_padding_mask is not None:
                context_padding_mask = context_padding_mask.repeat(copies, 1)
            if not sample:
                values = values.repeat(copies, 1, 1)
        q, k_mu, k_var, values = (
            rearrange(t, "b n (h d) -> b h n d", h=self.num_heads) for t in (q, k_mu, k_var, values)
        )
        out = probabilistic_attention(
            q,
            k_mu,
            k_var,
            values,
            beta=self.beta,
            key_padding_mask=context_padding_mask,
            chunk_size=self.chunk_size,
        )
        out = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        g = torch.sigmoid(self.gate)
        return g * out + (1 - g) * x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, attn_dim={self.attn_dim}, num_heads={self.num_heads}, "
            f"beta={self.beta}, var_eps={self.var_eps}, deterministic={self.deterministic}"
        )


def _draw_noise(like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None):
    """``randn(like.shape)`` from one generator, or chunk ``s`` of the batch from generator ``s``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    generators = list(generator)
    if not generators or like.shape[0] % len(generators):
        raise ValueError(
            f"{len(generators)} generators cannot split a batch of {like.shape[0]} into equal "
            "chunks (one generator per Monte Carlo copy)"
        )
    return torch.cat(
        [
            torch.randn(chunk.shape, generator=g, device=like.device, dtype=like.dtype)
            for chunk, g in zip(like.chunk(len(generators)), generators)
        ]
    )


class PVLTwoWayLayer(nn.Module):
    """Bidirectional, vision-first PVL update (MedCLIPSeg eqs. 14-15).

    ::

        v' = Attn_PVL^{img<-txt}(v, t)     # cross_attn_img_to_txt: image queries, text context
        t' = Attn_PVL^{txt<-img}(t, v')    # cross_attn_txt_to_img: text queries, *updated* image

    Args:
        dim: shared width ``D_s``.
        **attn_kwargs: forwarded to both :class:`PVLAttention` modules (``num_heads``, ``beta``, ...).
    """

    def __init__(self, *, dim: int = 256, **attn_kwargs) -> None:
        super().__init__()
        self.cross_attn_img_to_txt = PVLAttention(dim=dim, **attn_kwargs)
        self.cross_attn_txt_to_img = PVLAttention(dim=dim, **attn_kwargs)

    def forward(
        self,
        v: Tensor,
        t: Tensor,
        *,
        text_padding_mask: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool | None = None,
        copies: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """Update image tokens from text, then text tokens from the updated image tokens.

        Args:
            v: ``(B, N, dim)`` image tokens.
            t: ``(B, M, dim)`` text tokens.
            text_padding_mask: optional ``(B, M)`` bool, True for real text tokens; masks the text
                keys of the image update (text queries are all updated).
            generator: value-noise generator (or one per batch chunk, see :class:`PVLAttention`),
                used first by the image update, then by the text one.
            sample: see :class:`PVLAttention`.
            copies: ``S`` noise copies of the same ``(v, t)`` (see :class:`PVLAttention`): the
                image update shares its sampling-independent part; the outputs have ``S * B``
                rows, copy-major.

        Returns:
            ``(v', t')`` with the shapes of ``v`` and ``t`` (``S * B`` rows for ``copies = S``).
        """
        v = self.cross_attn_img_to_txt(
            v,
            t,
            context_padding_mask=text_padding_mask,
            generator=generator,
            sample=sample,
            copies=copies,
        )
        if copies > 1:
            t = t.repeat(copies, 1, 1)
        t = self.cross_attn_txt_to_img(t, v, generator=generator, sample=sample)
        return v, t


class PVLAdapter(nn.Module):
    """PVL adapter between two encoder layers (MedCLIPSeg eqs. 3 and 14-17).

    ::

        v = V W_v_down,  t = T W_t_down              (eq. 3, no bias)
        v', t' = two-way PVL update of (v, t)         (eqs. 14-15, vision first)
        V_hat = V + v' W_v_up,  T_hat = T + t' W_t_up (eqs. 16-17, no bias)

    The up-projections use PyTorch's default initialisation (as released), not zeros, so an adapter
    changes the streams from the first step; note ``v'`` already contains ``(1 - g) v``.

    Args:
        vision_dim: residual width ``D_v`` of the vision tower (768 for ViT-B).
        text_dim: residual width ``D_t`` of the text tower (768 for BERT-base).
        dim: shared adapter width ``D_s`` (256 in the paper).
        **attn_kwargs: forwarded to both :class:`PVLAttention` modules (``attn_dim``, ``num_heads``,
            ``beta``, ``kv_norm``, ``var_eps``, ``gate_init``, ``bias``, ``deterministic``,
            ``chunk_size``).

    Example:
        >>> adapter = PVLAdapter(vision_dim=768, text_dim=768, dim=256, kv_norm=True)
        >>> vis, txt = adapter(torch.randn(2, 197, 768), torch.randn(2, 256, 768))
    """

    def __init__(
        self, *, vision_dim: int = 768, text_dim: int = 768, dim: int = 256, **attn_kwargs
    ) -> None:
        super().__init__()
        self.vision_dim, self.text_dim, self.dim = vision_dim, text_dim, dim
        self.proj_vis_down = nn.Linear(vision_dim, dim, bias=False)
        self.proj_txt_down = nn.Linear(text_dim, dim, bias=False)
        self.two_way = PVLTwoWayLayer(dim=dim, **attn_kwargs)
        self.proj_vis_up = nn.Linear(dim, vision_dim, bias=False)
        self.proj_txt_up = nn.Linear(dim, text_dim, bias=False)

    def forward(
        self,
        vision_tokens: Tensor,
        text_tokens: Tensor,
        *,
        text_padding_mask: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool | None = None,
        copies: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """Fuse the two residual streams.

        Args:
            vision_tokens: ``(B, N, vision_dim)`` image residual stream (CLS included).
            text_tokens: ``(B, M, text_dim)`` text residual stream.
            text_padding_mask: optional ``(B, M)`` bool, True for real text tokens. None attends to
                every text position, padding included -- what the released model does.
            generator: value-noise generator (reproducible sampling), or one per equal batch chunk
                (Monte Carlo copies; see :class:`PVLAttention`).
            sample: sample the values; None follows each attention module's ``deterministic``.
            copies: ``S`` noise copies of the same streams (Monte Carlo copies of one input): the
                result has ``S * B`` rows, copy-major, exactly as for the inputs repeated ``S``
                times, but the down-projections and the image update's attention weights are
                computed once (see :class:`PVLAttention`).

        Returns:
            ``(new_vision, new_text)`` of the input shapes (``S * B`` rows for ``copies = S``): the
            residual updates of eqs. 16-17.
        """
        _check_tokens("vision_tokens", vision_tokens, self.vision_dim)
        _check_tokens("text_tokens", text_tokens, self.text_dim, batch=vision_tokens.shape[0])
        v, t = self.two_way(
            self.proj_vis_down(vision_tokens),
            self.proj_txt_down(text_tokens),
            text_padding_mask=text_padding_mask,
            generator=generator,
            sample=sample,
            copies=copies,
        )
        if copies > 1:
            vision_tokens = vision_tokens.repeat(copies, 1, 1)
            text_tokens = text_tokens.repeat(copies, 1, 1)
        return vision_tokens + self.proj_vis_up(v), text_tokens + self.proj_txt_up(t)
