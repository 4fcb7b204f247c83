"""Steppable towers over ``open_clip`` encoders: built-in ViT / text transformer, timm ViT, HF BERT.

Four adapters present open_clip's tower objects as steppable :class:`~vlsegkit.encoders.base.Tower`
objects:

* :class:`OpenCLIPVisionTower` -- ``open_clip.transformer.VisionTransformer`` (``CLIP.visual``).
* :class:`OpenCLIPTextTower` -- ``open_clip.transformer.TextTransformer`` (``CustomTextCLIP.text``) or
  the text parts an ``open_clip.CLIP`` keeps directly on itself.
* :class:`TimmViTTower` -- ``open_clip.timm_model.TimmModel`` whose ``trunk`` is a timm
  ``VisionTransformer`` (BiomedCLIP's image tower).
* :class:`HFBertTextTower` -- ``open_clip.hf_model.HFTextEncoder`` over a transformers ``BertModel``
  (BiomedCLIP's PubMedBERT text tower).

:func:`towers_from_open_clip` picks the right pair for an ``open_clip.CLIP`` / ``CustomTextCLIP``.

Ownership and parameter names: a vision tower registers the upstream module as ``self.visual`` and a
text tower as ``self.text``, so below the tower the keys are exactly open_clip's ``CustomTextCLIP`` keys
(``visual.conv1.weight``, ``visual.trunk.blocks.0.attn.qkv.weight``, ``visual.head.proj.weight``,
``text.transformer.encoder.layer.0.attention.self.query.weight``, ``text.proj.0.weight``, ...). For an
``open_clip.CLIP`` the text parts (``token_embedding``, ``positional_embedding``, ``transformer``,
``ln_final``, ``text_projection``) are gathered in a small container registered as ``self.text``, giving
``text.token_embedding.weight`` where the CLIP model has ``token_embedding.weight``. The towers share
(never copy) the upstream parameters.

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(CLIP, 2021); Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT, 2021); Devlin et al., "BERT"
(2019); Zhang et al., "BiomedCLIP" (2023); Zhou et al., "Learning to Prompt for Vision-Language Models"
(CoOp, 2022); Jia et al., "Visual Prompt Tuning" (VPT, 2022); the open_clip (mlfoundations/open_clip),
timm and transformers implementations.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from vlsegkit.encoders._checks import (
    _check_ids,
    _check_layer_index,
    _check_tokens,
    _gather,
    _patch_grid,
)
from vlsegkit.encoders._pos_embed import resample_grid_pos_embed
from vlsegkit.encoders.base import Overflow, TokenState, Tower, attention_bias

__all__ = [
    "HFBertTextTower",
    "OpenCLIPTextTower",
    "OpenCLIPVisionTower",
    "TimmViTTower",
    "towers_from_open_clip",
    "use_sequence_first",
]


# ---------------------------------------------------------------------------------------- helpers
def _square_patch(patch_size, owner: str) -> int:
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if ph != pw:
        raise NotImplementedError(f"{owner}: non-square patches {ph}x{pw} are not supported")
    return int(ph)


def _zeros_index(tokens: Tensor) -> Tensor:
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def _project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    """open_clip's projection convention: a ``(D, E)`` matrix applied as ``x @ W``, or a module."""
    if proj is None:
        return x
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj


def _proj_dim(proj: nn.Module | Tensor | None, default: int) -> int:
    if proj is None:
        return default
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return int(proj.shape[-1])


def _last_linear_out(modules: list[nn.Module], default: int) -> int:
    """Output width of the last ``nn.Linear`` among ``modules`` (searched last to first)."""
    for module in reversed(modules):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1].out_features
    return default


def _open_clip_mask(state: TokenState, num_heads: int) -> Tensor | None:
    """Attention mask in the format open_clip blocks take.

    ``nn.MultiheadAttention`` (and open_clip's own ``Attention``) want ``(N, N)`` or
    ``(B * heads, N, N)``. The pure-causal case reproduces the upstream ``-inf`` upper-triangular table
    so plain CLIP text runs bit-for-bit like open_clip; padding goes through ``attention_bias``.
    """
    n = state.tokens.shape[1]
    if state.attention_mask is None:
        if not state.causal:
            return None
        table = torch.full((n, n), float("-inf"), device=state.tokens.device)
        return table.triu_(1)
    # in the compute dtype (the autocast dtype under autocast): its finite minimum survives the
    # cast to the query dtype, where fp32's minimum would become -inf in half precision
    device = state.tokens.device.type
    dtype = (
        torch.get_autocast_dtype(device)
        if torch.is_autocast_enabled(device)
        else state.tokens.dtype
    )
    bias = attention_bias(state, dtype)
    return bias.expand(-1, num_heads, -1, -1).reshape(-1, n, n)


def _resblock_branches(block: nn.Module) -> dict[str, nn.Module]:
    # ResidualAttentionBlock: x = x + ls_1(attn(ln_1(x))); x = x + ls_2(mlp(ln_2(x)))
    if not all(hasattr(block, a) for a in ("ls_1", "ls_2")):
        raise NotImplementedError(
            f"{type(block).__name__} has no ls_1 / ls_2 branch outputs to hook into"
        )
    return {"attn": block.ls_1, "mlp": block.ls_2}


def _run_open_clip_block(block: nn.Module, state: TokenState, *, batch_first: bool) -> Tensor:
    mask = _open_clip_mask(state, block.attn.num_heads)
    x = state.tokens
    if batch_first:
        return block(x, attn_mask=mask)
    # ln_1 / ln_2 write contiguous sequence-first copies, so every matrix multiply of the block sees
    # a (N * B, D) matrix; the residual adds keep x's batch-first memory, so the transposed result
    # is contiguous again (no copy on the way out)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def use_sequence_first(transformer: nn.Module) -> bool:
    """Switch an open_clip ``Transformer`` to its sequence-first layout (``batch_first=False``).

    Why: ``nn.MultiheadAttention(batch_first=True)`` transposes its input to sequence-first inside
    ``forward`` whenever its fused inference path is off (module in train mode, or gradients
    needed -- a training step through frozen blocks after an adapter). The transposed, non-contiguous
    ``(N, B, D)`` input then makes the QKV projection a batched matmul of ``N`` small products (197
    for ViT-B/16 at 224 px) in forward and in backward: slower than one ``(N * B, D)``
    product on 2 CPU threads (about 3x). open_clip itself supports both layouts (``Transformer(batch_first=...)``
    transposes in its own ``forward``), OpenAI CLIP and the official MedCLIPSeg run sequence-first,
    and in inference the two layouts run at the same speed (the fused path is not faster here), so
    the towers switch the flag once, at construction. Outputs agree to float rounding (~1e-6).

    Only blocks whose attention is ``nn.MultiheadAttention`` are switched (the flag of the
    ``Transformer`` and of every block's attention together, as open_clip builds them); other block
    types are left alone.

    Returns:
        Whether the transformer runs sequence-first now.
    """
    if not getattr(transformer, "batch_first", True):
        return True
    blocks = list(getattr(transformer, "resblocks", ()))
    if not blocks or not all(
        isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
        and b.attn.batch_first
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    ):
        return False
    transformer.batch_first = False
    for b in blocks:
        b.attn.batch_first = False
    return True


# ---------------------------------------------------------------------------- open_clip built-in ViT
class OpenCLIPVisionTower(Tower):
    """Steppable open_clip ``VisionTransformer`` (``CLIP.visual``), pre-norm ViT.

    Implements the CLIP image encoder (Radford et al. 2021; ViT eq. 1-4 of Dosovitskiy et al. 2021)::

        z_0 = LN_pre([x_cls; P_1 E; ...; P_hw E] + E_pos)                      # embed
        z'_l = z_{l-1} + MSA(LN_1(z_{l-1})),  z_l = z'_l + MLP(LN_2(z'_l))      # block l
        pooled = LN_post(z_L[0]) W_proj           ('tok' pooling; 'avg' averages the patches)

    ``E_pos`` is resampled bicubically on the patch grid (CLS row kept, ``align_corners=False``, no
    antialias) when the input grid differs from the pretrained one, so any ``H, W`` that are multiples
    of the patch size work, square or not. VPT prompts (Jia et al. 2022) go after the CLS token, after
    the position embeddings and before ``LN_pre``. open_clip's training-time patch dropout is not
    applied: it would destroy the patch grid the tower exposes.

    Args:
        visual: an ``open_clip.transformer.VisionTransformer`` with ``conv1``, ``class_embedding``,
            ``positional_embedding``, ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``.
            Registered as ``self.visual`` (state-dict keys ``visual.conv1.weight``, ...). Attentional
            pooling (CoCa) is not supported.
        sequence_first: step the blocks sequence-first (switches ``visual.transformer`` to
            open_clip's ``batch_first=False`` layout, see :func:`use_sequence_first`; the upstream
            module's own ``forward`` keeps working). ``TokenState`` tokens stay ``(B, N, D)``.

    Attributes:
        num_layers, width (``D``), embed_dim (``E``), patch_size (``p``, pixels), num_channels,
        pretrained_grid (``(h0, w0)`` of the learned position table).
    """

    modality = "vision"

    def __init__(self, visual: nn.Module, *, sequence_first: bool = True) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                "visual must be an open_clip.transformer.VisionTransformer, "
                f"got {type(visual).__name__}"
            )
        if visual.attn_pool is not None:
            raise NotImplementedError(
                "OpenCLIPVisionTower does not support attentional pooling (attn_pool, CoCa-style "
                "towers); only pool_type 'tok' and 'avg' are supported"
            )
        if visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError(
                f"OpenCLIPVisionTower supports pool_type 'tok' and 'avg', got {visual.pool_type!r}"
            )
        self.visual = visual
        self.width = visual.class_embedding.shape[-1]
        self.embed_dim = _proj_dim(visual.proj, self.width)
        self.num_layers = len(visual.transformer.resblocks)
        self.patch_size = _square_patch(visual.patch_size, "OpenCLIPVisionTower")
        self.num_channels = visual.conv1.in_channels
        if sequence_first:
            use_sequence_first(visual.transformer)

    @property
    def pretrained_grid(self) -> tuple[int, int]:
        """``(h0, w0)`` patch grid of the learned position table."""
        return tuple(self.visual.grid_size)

    def embed(self, pixel_values: Tensor, *, prompts: Tensor | None = None) -> TokenState:
        """Patchify, prepend CLS, add (resampled) positions, insert prompts, apply ``ln_pre``.

        Args:
            pixel_values: ``(B, C, H, W)``; ``H`` and ``W`` positive multiples of ``patch_size``.
            prompts: optional ``(B, n, D)`` or ``(n, D)`` prompt tokens placed after CLS.

        Returns:
            ``TokenState`` with tokens ``(B, 1 + n + h*w, D)``, ``grid=(H/p, W/p)``, ``num_prefix=1``,
            ``num_prompts=n``, ``pool_index`` zeros and no attention mask.
        """
        v = self.visual
        grid = _patch_grid(pixel_values, channels=self.num_channels, patch_size=self.patch_size)
        x = v.conv1(pixel_values.to(v.conv1.weight.dtype))
        x = rearrange(x, "b d h w -> b (h w) d")
        cls_token = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resample_grid_pos_embed(
            v.positional_embedding, grid, num_prefix=1, old_grid=self.pretrained_grid
        )
        x = torch.cat([cls_token, x], dim=1) + pos.to(x.dtype)
        state = TokenState(tokens=x, pool_index=_zeros_index(x), num_prefix=1, grid=grid)
        if prompts is not None:
            _check_tokens("prompts", prompts, x.shape[0], self.width)
            state = state.insert_prompts(prompts)
        return state.with_tokens(v.ln_pre(state.tokens))

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``visual.transformer.resblocks[i]`` (bidirectional unless ``state`` says otherwise)."""
        _check_layer_index(i, self.num_layers)
        t = self.visual.transformer
        return state.with_tokens(
            _run_open_clip_block(t.resblocks[i], state, batch_first=t.batch_first)
        )

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """``ls_1`` / ``ls_2`` of residual block ``i``: the attention and MLP branch outputs (after
        the optional LayerScale) just before each residual add."""
        _check_layer_index(i, self.num_layers)
        return _resblock_branches(self.visual.transformer.resblocks[i])

    def _global_pool(self, state: TokenState, tokens: Tensor) -> Tensor:
        # 'avg' averages the patch tokens only: prompts are not part of the image
        if self.visual.pool_type == "tok":
            return _gather(tokens, state.pool_index)
        return tokens[:, state.content_start :].mean(dim=1)

    def pool(self, state: TokenState) -> Tensor:
        """``LN_post`` + pooling + ``proj`` -> ``(B, E)``, as ``VisionTransformer.forward``.

        ``final_ln_after_pool`` models normalise after pooling, the others before, as upstream.
        """
        v = self.visual
        if v.final_ln_after_pool:
            pooled = v.ln_post(self._global_pool(state, state.tokens))
        else:
            pooled = self._global_pool(state, v.ln_post(state.tokens))
        return _project(pooled, v.proj)

    def dense(self, state: TokenState) -> Tensor:
        """Patch tokens through ``ln_post`` and ``proj`` -> ``(B, h*w, E)`` (row-major grid)."""
        return _project(self.visual.ln_post(state.content_tokens), self.visual.proj)


# ---------------------------------------------------------------------------- open_clip text
class _CLIPTextParts(nn.Module):
    """The text modules an ``open_clip.CLIP`` keeps on itself, gathered under one prefix.

    Shares (does not copy) ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``
    and ``text_projection`` with the CLIP model and mirrors the ``TextTransformer`` attribute names.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.pool_type = model.text_pool_type
        self.eos_id = getattr(model, "text_eos_id", None)
        self.is_causal = model.attn_mask is not None
        # CLIP.encode_text never builds a padding mask nor appends a CLS embedding
        self.use_pad_mask = False
        self.pad_id = 0
        self.cls_emb = None


class OpenCLIPTextTower(Tower):
    """Steppable open_clip text transformer (causal by default, pre-norm).

    Implements the CLIP text encoder (Radford et al. 2021) with CoOp context insertion (Zhou et al.
    2022, eq. 2: ``t = [SOS][V]_1 ... [V]_M [CLASS] ... [EOS]``)::

        z_0 = [e(SOS); v_1..v_M; e(w_1)..e(EOS)] + E_pos[:L + M]       # context before positions
        z'_l = z_{l-1} + MSA_causal(LN_1(z_{l-1})),  z_l = z'_l + MLP(LN_2(z'_l))
        pooled = LN_final(z_L[eos]) W_proj

    The pooling position follows open_clip's ``text_global_pool``: ``'argmax'`` (largest token id, the
    OpenAI EOT), ``'eos'`` (first ``eos_id``), ``'first'`` or ``'last'``; it shifts with the context.
    Bidirectional towers with ``use_pad_mask`` mask ``input_ids == pad_id`` as upstream does; an
    explicit ``attention_mask`` always takes precedence.

    Args:
        text: an ``open_clip.transformer.TextTransformer`` (``CustomTextCLIP.text``), registered as
            ``self.text``; or an ``open_clip.CLIP`` model, whose text parts are gathered (shared, not
            copied) into a container registered as ``self.text``. CoCa-style towers with an appended
            CLS embedding (``embed_cls``) and ``pool_type='none'`` are not supported.
        sequence_first: step the blocks sequence-first (see :func:`use_sequence_first`).

    Attributes:
        num_layers, width (``D``), embed_dim (``E``), max_positions (rows of the position table),
        pool_type, eos_id, causal.
    """

    modality = "text"

    def __init__(self, text: nn.Module, *, sequence_first: bool = True) -> None:
        super().__init__()
        from open_clip.transformer import TextTransformer

        if isinstance(text, TextTransformer):
            causal = text.attn_mask is not None
        elif all(
            hasattr(text, a) for a in ("token_embedding", "positional_embedding", "text_pool_type")
        ):
            text = _CLIPTextParts(text)
            causal = text.is_causal
        else:
            raise TypeError(
                "text must be an open_clip TextTransformer or an open_clip.CLIP model, "
                f"got {type(text).__name__}"
            )
        if getattr(text, "cls_emb", None) is not None:
            raise NotImplementedError(
                "OpenCLIPTextTower does not support text towers with an appended CLS embedding "
                "(embed_cls=True, CoCa)"
            )
        if text.pool_type not in ("argmax", "eos", "first", "last"):
            raise NotImplementedError(
                "OpenCLIPTextTower supports pool_type 'argmax', 'eos', 'first' and 'last', "
                f"got {text.pool_type!r}"
            )
        if text.pool_type == "eos" and text.eos_id is None:
            raise ValueError("pool_type='eos' needs the tower's eos_id")
        self.text = text
        self.causal = causal
        self.pool_type: str = text.pool_type
        self.eos_id: int | None = text.eos_id
        self.width = text.token_embedding.embedding_dim
        self.embed_dim = _proj_dim(text.text_projection, self.width)
        self.num_layers = len(text.transformer.resblocks)
        self.max_positions = text.positional_embedding.shape[0]
        if sequence_first:
            use_sequence_first(text.transformer)

    def _cast_dtype(self) -> torch.dtype:
        get = getattr(self.text.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.text.token_embedding.weight.dtype

    def eos_index(self, input_ids: Tensor) -> Tensor:
        """``(B,)`` pooling position in ``input_ids`` ``(B, L)`` (before any context is inserted)."""
        if self.pool_type == "argmax":
            return input_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (input_ids == self.eos_id).int().argmax(dim=-1)
        index = _zeros_index(input_ids)
        return index if self.pool_type == "first" else index + input_ids.shape[1] - 1

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        overflow: Overflow = "error",
    ) -> TokenState:
        """Token embeddings, CoOp context after SOS, then position embeddings.

        Args:
            input_ids: ``(B, L)`` token ids starting with SOS, ``L + n <= max_positions``.
            attention_mask: optional ``(B, L)``, nonzero/True for real tokens. Defaults to none for
                causal towers (as ``CLIP.encode_text``) and to ``input_ids != pad_id`` for
                ``use_pad_mask`` towers.
            context: optional ``(B, n, D)`` or ``(n, D)`` learnable context embeddings placed at
                positions ``1 .. n`` before the position embeddings are added; the mask is extended
                with ones and the pooling index shifted by ``n``.
            overflow: when ``L + n`` exceeds the position table: ``"error"``, ``"truncate"`` or
                ``"released"`` (see :meth:`~vlsegkit.encoders.TokenState.fit_length`).

        Returns:
            ``TokenState`` with tokens ``(B, L + n, D)``, ``num_prefix=1``, ``num_prompts=n``.
        """
        t = self.text
        mask = _check_ids(input_ids, attention_mask, t.token_embedding.num_embeddings)
        b = input_ids.shape[0]
        if context is not None:
            _check_tokens("context", context, b, self.width)
        if mask is None and getattr(t, "use_pad_mask", False):
            mask = input_ids != t.pad_id
        cast = self._cast_dtype()
        state = TokenState(
            tokens=t.token_embedding(input_ids).to(cast),
            attention_mask=mask,
            pool_index=self.eos_index(input_ids),
            num_prefix=1,
            causal=self.causal,
        )
        if context is not None:
            state = state.insert_prompts(context)
        state = state.fit_length(self.max_positions, overflow)
        pos = t.positional_embedding[: state.tokens.shape[1]].to(cast)
        return state.with_tokens(state.tokens + pos)

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``transformer.resblocks[i]`` with the causal / padding mask of ``state``."""
        _check_layer_index(i, self.num_layers)
        t = self.text.transformer
        return state.with_tokens(
            _run_open_clip_block(t.resblocks[i], state, batch_first=t.batch_first)
        )

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """``ls_1`` / ``ls_2`` of text residual block ``i`` (branch outputs before the residual add)."""
        _check_layer_index(i, self.num_layers)
        return _resblock_branches(self.text.transformer.resblocks[i])

    def pool(self, state: TokenState) -> Tensor:
        """``LN_final(tokens[pool_index]) W_proj`` -> ``(B, E)`` (``encode_text``, unnormalised)."""
        if state.pool_index is None:
            raise ValueError("text TokenState has no pool_index (the EOS position)")
        pooled = self.text.ln_final(_gather(state.tokens, state.pool_index))
        return _project(pooled, self.text.text_projection)

    def dense(self, state: TokenState) -> Tensor:
        """Every token except the context through ``ln_final`` and the projection -> ``(B, L, E)``."""
        return _project(self.text.ln_final(state.without_prompts()), self.text.text_projection)

    def final_tokens(self, state: TokenState) -> Tensor:
        """Every token, context included, through ``ln_final`` only -> ``(B, N, D)``.

        The unprojected word features of ``CLIP.encode_text`` before pooling (what CRIS's
        vision-language decoder cross-attends to).
        """
        return self.text.ln_final(state.tokens)


# ---------------------------------------------------------------------------- timm ViT (TimmModel)
class TimmViTTower(Tower):
    """Steppable open_clip ``TimmModel`` over a timm ``VisionTransformer`` (BiomedCLIP image tower).

    Implements timm's ViT forward (Dosovitskiy et al. 2021, eq. 1-4) followed by the open_clip head::

        z_0 = norm_pre([x_cls; x_reg; P_1 E; ...] + E_pos)     # (no_embed_class: E_pos on patches only)
        z_l = blocks[l](z_{l-1})
        pooled = head(fc_norm(pool(norm(z_L))))                # 'token': z_L[0]; 'avg'/'max': patches

    For a grid other than the pretrained one ``E_pos`` is resampled like timm's dynamic-size path
    (``resample_abs_pos_embed``: bicubic, ``align_corners=False``, antialiased, prefix rows kept), so
    the tower reproduces a ``dynamic_img_size=True`` trunk at any size, square or not. The patch
    embedding is applied as ``patch_embed.proj`` + ``patch_embed.norm`` (no padding, no size check
    beyond divisibility). Prompts (VPT) go after the prefix tokens (CLS and registers), after the
    position embeddings and before ``norm_pre``; pooling ignores them. timm's training-time patch
    dropout is not applied (it would break the patch grid).

    Args:
        visual: an ``open_clip.timm_model.TimmModel`` whose ``trunk`` is a timm
            ``VisionTransformer`` with a standard ``PatchEmbed`` and global pool ``'token'``,
            ``'avg'``, ``'avgmax'`` or ``'max'`` (no attention pooling, neither in the trunk nor in the
            open_clip head). Registered as ``self.visual`` (keys ``visual.trunk.*``,
            ``visual.head.*``).

    Attributes:
        num_layers, width (``D``), embed_dim (``E``), patch_size, num_channels, num_prefix
        (CLS + register tokens), pretrained_grid.
    """

    modality = "vision"

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import VisionTransformer

        trunk = getattr(visual, "trunk", None)
        if not isinstance(trunk, VisionTransformer):
            raise TypeError(
                "visual must be an open_clip TimmModel whose trunk is a timm VisionTransformer, "
                f"got trunk {type(trunk).__name__}"
            )
        if trunk.attn_pool is not None or "pool" in dict(visual.head.named_children()):
            raise NotImplementedError(
                "TimmViTTower does not support attention pooling (timm attn_pool / open_clip "
                "abs_attn, rot_attn heads)"
            )
        if trunk.global_pool not in ("token", "avg", "avgmax", "max"):
            raise NotImplementedError(
                "TimmViTTower supports timm global_pool 'token', 'avg', 'avgmax' and 'max', "
                f"got {trunk.global_pool!r}"
            )
        if type(trunk.patch_embed) is not PatchEmbed:
            raise NotImplementedError(
                "TimmViTTower supports the plain timm PatchEmbed only, "
                f"got {type(trunk.patch_embed).__name__}"
            )
        self.visual = visual
        self.width = trunk.embed_dim
        self.embed_dim = _last_linear_out([trunk.head, visual.head], trunk.num_features)
        self.num_layers = len(trunk.blocks)
        self.patch_size = _square_patch(trunk.patch_embed.patch_size, "TimmViTTower")
        self.num_channels = trunk.patch_embed.proj.in_channels
        self.num_prefix = trunk.num_prefix_tokens

    @property
    def pretrained_grid(self) -> tuple[int, int] | None:
        """``(h0, w0)`` patch grid of the learned position table (None: inferred as square)."""
        grid = self.visual.trunk.patch_embed.grid_size
        return None if grid is None else tuple(grid)

    def _prefix_tokens(self, batch: int) -> list[Tensor]:
        trunk = self.visual.trunk
        tokens = [trunk.cls_token, trunk.reg_token]
        return [t.expand(batch, -1, -1) for t in tokens if t is not None]

    def embed(self, pixel_values: Tensor, *, prompts: Tensor | None = None) -> TokenState:
        """Patchify, add prefix tokens and (resampled) positions, insert prompts, apply ``norm_pre``.

        Args:
            pixel_values: ``(B, C, H, W)``; ``H`` and ``W`` positive multiples of ``patch_size``.
            prompts: optional ``(B, n, D)`` or ``(n, D)`` prompt tokens placed after the prefix.

        Returns:
            ``TokenState`` with tokens ``(B, num_prefix + n + h*w, D)``, ``grid=(H/p, W/p)``,
            ``num_prefix`` = CLS + registers, ``num_prompts=n``, ``pool_index`` zeros.
        """
        trunk = self.visual.trunk
        pe = trunk.patch_embed
        grid = _patch_grid(pixel_values, channels=self.num_channels, patch_size=self.patch_size)
        x = pe.proj(pixel_values.to(pe.proj.weight.dtype))
        x = pe.norm(rearrange(x, "b d h w -> b (h w) d"))
        prefix = self._prefix_tokens(x.shape[0])
        if trunk.pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        else:
            pos = resample_grid_pos_embed(
                trunk.pos_embed,
                grid,
                num_prefix=0 if trunk.no_embed_class else self.num_prefix,
                old_grid=self.pretrained_grid,
                antialias=True,
            )
            if trunk.no_embed_class:
                # DeiT-3 / big_vision layout: positions cover the patches only
                x = torch.cat([*prefix, x + pos], dim=1)
            else:
                x = torch.cat([*prefix, x], dim=1) + pos
        x = trunk.pos_drop(x)
        state = TokenState(
            tokens=x, pool_index=_zeros_index(x), num_prefix=self.num_prefix, grid=grid
        )
        if prompts is not None:
            _check_tokens("prompts", prompts, x.shape[0], self.width)
            state = state.insert_prompts(prompts)
        return state.with_tokens(trunk.norm_pre(state.tokens))

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``trunk.blocks[i]``; an additive ``(B, 1, N, N)`` mask is passed only when needed."""
        _check_layer_index(i, self.num_layers)
        blk = self.visual.trunk.blocks[i]
        bias = attention_bias(state)
        out = blk(state.tokens) if bias is None else blk(state.tokens, attn_mask=bias)
        return state.with_tokens(out)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """``drop_path1`` / ``drop_path2`` of timm block ``i``: the attention and MLP branch outputs
        (after LayerScale and stochastic depth) just before each residual add."""
        _check_layer_index(i, self.num_layers)
        blk = self.visual.trunk.blocks[i]
        if not all(hasattr(blk, a) for a in ("drop_path1", "drop_path2")):
            raise NotImplementedError(
                f"timm {type(blk).__name__} has no drop_path1 / drop_path2 branch outputs"
            )
        return {"attn": blk.drop_path1, "mlp": blk.drop_path2}

    def _head(self, x: Tensor) -> Tensor:
        trunk = self.visual.trunk
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(x))))

    def pool(self, state: TokenState) -> Tensor:
        """``head(fc_norm(pool(norm(tokens))))`` -> ``(B, E)``, as ``TimmModel.forward``.

        ``'token'`` reads ``pool_index`` (CLS); the reducing pools use the patch tokens (plus the
        prefix when the trunk has ``pool_include_prefix``), never the prompts.
        """
        trunk = self.visual.trunk
        normed = state.with_tokens(trunk.norm(state.tokens))
        kind = trunk.global_pool
        if kind == "token":
            pooled = _gather(normed.tokens, normed.pool_index)
        else:
            x = normed.without_prompts() if trunk.pool_include_prefix else normed.content_tokens
            if kind == "avg":
                pooled = x.mean(dim=1)
            elif kind == "max":
                pooled = x.amax(dim=1)
            else:
                pooled = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        return self._head(pooled)

    def dense(self, state: TokenState) -> Tensor:
        """Patch tokens through ``norm`` and the heads (``fc_norm``, trunk ``head``, open_clip
        ``head``) -> ``(B, h*w, E)``. For BiomedCLIP this is ``head(trunk.forward_features(x)[:, 1:])``.
        """
        return self._head(self.visual.trunk.norm(state.content_tokens))


# ---------------------------------------------------------------------------- HF BERT (HFTextEncoder)
_BERT_POOLERS = ("ClsLastHiddenStatePooler", "ClsPooler", "MeanPooler")


class HFBertTextTower(Tower):
    """Steppable open_clip ``HFTextEncoder`` over a transformers ``BertModel`` (BiomedCLIP text).

    Implements BERT (Devlin et al. 2019) with open_clip's pooling and projection::

        z_0 = LN(e(w) + E_pos + E_type)     with CoOp context after [CLS], before E_pos is added
        z_l = encoder.layer[l](z_{l-1}, padding mask)               # post-norm, bidirectional
        pooled = proj(z_L[0])                                       # cls_last_hidden_state_pooler

    The padding mask is ``input_ids != pad_token_id`` as ``HFTextEncoder.forward`` builds it (or the
    given ``attention_mask``), turned into the layer's mask format by transformers'
    ``create_bidirectional_mask`` for whatever attention implementation the config selects.
    ``'cls_pooler'`` (BERT pooler on CLS) and ``'mean_pooler'`` (masked mean; the context counts as
    valid tokens) are supported too.

    Args:
        text: an ``open_clip.hf_model.HFTextEncoder`` whose ``transformer`` is a transformers
            ``BertModel`` (encoder-only, ``model_type == 'bert'``). Registered as ``self.text``
            (keys ``text.transformer.*``, ``text.proj.*``).

    Attributes:
        num_layers, width (``D``), embed_dim (``E``), max_positions (BERT position table length),
        pad_token_id.
    """

    modality = "text"

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        bert = getattr(text, "transformer", None)
        config = getattr(bert, "config", None)
        if getattr(config, "model_type", None) != "bert" or not hasattr(text, "pooler"):
            raise TypeError(
                "text must be an open_clip HFTextEncoder over a transformers BertModel, "
                f"got {type(text).__name__} with transformer {type(bert).__name__}"
            )
        if config.is_decoder:
            raise NotImplementedError(
                "HFBertTextTower supports encoder-only BERT (is_decoder=False)"
            )
        pooler = type(text.pooler).__name__
        if pooler not in _BERT_POOLERS:
            raise NotImplementedError(
                f"HFBertTextTower supports poolers {_BERT_POOLERS}, got {pooler}"
            )
        self.text = text
        self.width = config.hidden_size
        self.embed_dim = int(text.output_dim)
        self.num_layers = len(bert.encoder.layer)
        self.max_positions = int(config.max_position_embeddings)
        self.pad_token_id = config.pad_token_id

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        overflow: Overflow = "error",
    ) -> TokenState:
        """Word embeddings, context after [CLS], then BERT's position/type embeddings and LayerNorm.

        Args:
            input_ids: ``(B, L)`` token ids starting with [CLS], ``L + n <= max_positions``.
            attention_mask: optional ``(B, L)``; defaults to ``input_ids != pad_token_id``.
            context: optional ``(B, n, D)`` or ``(n, D)`` learnable embeddings placed at positions
                ``1 .. n`` (they receive position embeddings ``1 .. n``); mask extended with ones.
            overflow: when ``L + n`` exceeds the position table: ``"error"``, ``"truncate"`` or
                ``"released"`` (see :meth:`~vlsegkit.encoders.TokenState.fit_length`).

        Returns:
            ``TokenState`` with tokens ``(B, L + n, D)``, ``num_prefix=1``, ``num_prompts=n``,
            ``pool_index`` zeros (CLS), ``causal=False``.
        """
        emb = self.text.transformer.embeddings
        mask = _check_ids(input_ids, attention_mask, emb.word_embeddings.num_embeddings)
        b = input_ids.shape[0]
        if context is not None:
            _check_tokens("context", context, b, self.width)
        if mask is None:
            mask = (
                torch.ones_like(input_ids, dtype=torch.bool)
                if self.pad_token_id is None
                else input_ids != self.pad_token_id
            )
        words = emb.word_embeddings(input_ids)
        state = TokenState(
            tokens=words, attention_mask=mask, pool_index=_zeros_index(words), num_prefix=1
        )
        if context is not None:
            state = state.insert_prompts(context)
        state = state.fit_length(self.max_positions, overflow)
        return state.with_tokens(emb(inputs_embeds=state.tokens))

    def _mask(self, state: TokenState) -> Tensor | None:
        if state.causal:
            return attention_bias(state)
        if state.attention_mask is None:
            return None
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.text.transformer.config,
            inputs_embeds=state.tokens,
            attention_mask=state.attention_mask,
        )

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``transformer.encoder.layer[i]`` with the padding mask of ``state``."""
        _check_layer_index(i, self.num_layers)
        out = self.text.transformer.encoder.layer[i](state.tokens, attention_mask=self._mask(state))
        return state.with_tokens(out[0] if isinstance(out, tuple) else out)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """The dropouts after BERT layer ``i``'s attention output projection and its FFN output
        projection: each branch's value just before ``LayerNorm(branch + residual)``."""
        _check_layer_index(i, self.num_layers)
        layer = self.text.transformer.encoder.layer[i]
        return {"attn": layer.attention.output.dropout, "mlp": layer.output.dropout}

    def pool(self, state: TokenState) -> Tensor:
        """open_clip's pooler then ``proj`` -> ``(B, E)`` (``HFTextEncoder.forward``)."""
        text = self.text
        kind = type(text.pooler).__name__
        if kind == "MeanPooler":
            mask = state.attention_mask
            if mask is None:
                pooled = state.tokens.mean(dim=1)
            else:
                weights = mask.to(state.tokens.dtype).unsqueeze(-1)
                pooled = (state.tokens * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            pooled = _gather(state.tokens, state.pool_index)
            bert_pooler = text.transformer.pooler
            if kind == "ClsPooler" and text.pooler.use_pooler_output and bert_pooler is not None:
                pooled = bert_pooler(pooled.unsqueeze(1))
        return text.proj(pooled)

    def dense(self, state: TokenState) -> Tensor:
        """``proj`` applied to every last-hidden token except the context -> ``(B, L, E)``."""
        return self.text.proj(state.without_prompts())


# ---------------------------------------------------------------------------- factory
def towers_from_open_clip(model: nn.Module) -> tuple[Tower, Tower]:
    """``(vision_tower, text_tower)`` sharing the modules of an open_clip model.

    Args:
        model: ``open_clip.CLIP`` (built-in ViT + text parts on the model) or ``CustomTextCLIP``
            (``visual`` = ViT or ``TimmModel``; ``text`` = ``TextTransformer`` or ``HFTextEncoder``),
            e.g. BiomedCLIP.

    Returns:
        One of ``OpenCLIPVisionTower`` / ``TimmViTTower`` and one of ``OpenCLIPTextTower`` /
        ``HFBertTextTower``. ``logit_scale`` / ``logit_bias`` stay with the caller.
    """
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    visual = model.visual
    vision: Tower
    if isinstance(visual, TimmModel):
        vision = TimmViTTower(visual)
    else:
        vision = OpenCLIPVisionTower(visual)
    text_module = getattr(model, "text", None)
    text: Tower
    if text_module is None:
        text = OpenCLIPTextTower(model)
    elif isinstance(text_module, HFTextEncoder):
        text = HFBertTextTower(text_module)
    else:
        text = OpenCLIPTextTower(text_module)
    return vision, text
