"""Steppable towers over Hugging Face ``transformers`` CLIP and CLIPSeg encoders.

The towers wrap the upstream module objects -- ``CLIPModel.vision_model`` / ``CLIPSegModel.vision_model``
(``CLIPVisionModel`` / ``CLIPSegVisionModel`` in transformers 5.x) with ``visual_projection``, and
``text_model`` (``CLIPTextModel`` / ``CLIPSegTextModel``) with ``text_projection`` -- and re-run their
forward passes one block at a time, so prompt learners and adapters can act between blocks while the
weights keep their upstream parameter names.

Ownership: a tower *owns* the upstream modules it is given, as the attributes ``vision_model`` /
``visual_projection`` (vision) and ``text_model`` / ``text_projection`` (text). A model holding a tower
under ``vision`` therefore has state-dict keys ``vision.vision_model.embeddings.patch_embedding.weight``,
``vision.vision_model.encoder.layers.0.self_attn.q_proj.weight``, ``vision.visual_projection.weight``,
... i.e. the transformers keys with ``clip.`` replaced by the tower's attribute path. A model must not
also register the transformers ``CLIPModel`` itself, or every weight would be stored twice.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(CLIP, 2021); Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts" (CLIPSeg, 2022);
the transformers implementations ``modeling_clip.py`` / ``modeling_clipseg.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vlsegkit.encoders._checks import _check_ids, _check_layer_index, _patch_grid
from vlsegkit.encoders._pos_embed import resample_grid_pos_embed
from vlsegkit.encoders.base import Overflow, TokenState, Tower, attention_bias

__all__ = ["HFCLIPTextTower", "HFCLIPVisionTower", "from_clip_model"]

EosPooling = Literal["auto", "argmax", "first_eos"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Dtype the attention scores will have: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _run_layer(layer: nn.Module, state: TokenState) -> TokenState:
    """One transformers ``CLIPEncoderLayer`` / ``CLIPSegEncoderLayer`` on ``state``.

    The layer takes a 4D additive mask ``(B, 1, N, N)`` (or None); an additive float mask is what the
    eager path adds to the scores and what SDPA accepts too, so one mask serves both backends.
    """
    bias = attention_bias(state, _compute_dtype(state.tokens))
    out = layer(state.tokens, bias)
    # transformers < 5 returned a 1-tuple from encoder layers
    if isinstance(out, tuple):
        out = out[0]
    return state.with_tokens(out)


def _branches(layer: nn.Module) -> dict[str, nn.Module]:
    # CLIPEncoderLayer: x = x + self_attn(layer_norm1(x))[0]; x = x + mlp(layer_norm2(x))
    return {"attn": layer.self_attn, "mlp": layer.mlp}


def _unwrap(model: nn.Module) -> nn.Module:
    """``CLIPSegForImageSegmentation`` keeps its CLIP at ``.clip``."""
    clip = getattr(model, "clip", None)
    return clip if isinstance(clip, nn.Module) else model


class HFCLIPVisionTower(Tower):
    """Steppable transformers CLIP / CLIPSeg vision tower (ViT, pre-norm).

    Implements the CLIP ViT (Radford et al. 2021, after Dosovitskiy et al. 2021, eq. 1-4)::

        z_0 = LN_pre([x_cls; P_1 E; ...; P_hw E] + E_pos)       # embed
        z_l = z'_l + MLP(LN_2(z'_l)),  z'_l = z_{l-1} + MSA(LN_1(z_{l-1}))   # block l
        pooled = LN_post(z_L[0]) W_proj                           # pool

    ``E_pos`` is bicubically resampled on the patch grid for inputs whose grid differs from the
    pretrained one, exactly as transformers' ``interpolate_pos_encoding`` (non-square grids included).
    VPT-style prompts (Jia et al. 2022) are inserted after the CLS token, before ``LN_pre``.

    Args:
        vision_model: a transformers ``CLIPVisionModel`` / ``CLIPSegVisionModel`` (what
            ``CLIPModel.vision_model`` / ``CLIPSegModel.vision_model`` are), i.e. a module with
            ``embeddings``, ``pre_layrnorm``, ``encoder.layers`` and ``post_layernorm``. Registered as
            ``self.vision_model`` (parameter names unchanged below that prefix).
        visual_projection: the model's ``visual_projection`` ``nn.Linear(D, E, bias=False)``, registered
            as ``self.visual_projection``.

    Attributes:
        num_layers: number of encoder blocks.
        width: residual width ``D``.
        embed_dim: joint-space width ``E``.
        patch_size: patch side ``p`` in pixels.
        image_size: pretrained image side; its grid ``(image_size // p,) * 2`` needs no resampling.
    """

    modality = "vision"

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Linear) -> None:
        super().__init__()
        for name in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
            if not hasattr(vision_model, name):
                raise TypeError(
                    "vision_model must be a transformers CLIPVisionModel/CLIPSegVisionModel "
                    f"(missing attribute {name!r}), got {type(vision_model).__name__}"
                )
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        emb = vision_model.embeddings
        self.width = emb.class_embedding.shape[-1]
        if visual_projection.in_features != self.width:
            raise ValueError(
                f"visual_projection expects in_features={visual_projection.in_features}, "
                f"but the vision width is {self.width}"
            )
        self.embed_dim = visual_projection.out_features
        self.num_layers = len(vision_model.encoder.layers)
        self.patch_size = int(emb.patch_size)
        self.image_size = int(emb.image_size)
        self.num_channels = emb.patch_embedding.in_channels

    @classmethod
    def from_clip_model(cls, model: nn.Module) -> HFCLIPVisionTower:
        """Vision tower of a ``CLIPModel``, ``CLIPSegModel``, ``CLIPSegForImageSegmentation`` or
        ``CLIPVisionModelWithProjection`` (shares its modules, no copy)."""
        model = _unwrap(model)
        return cls(model.vision_model, model.visual_projection)

    @property
    def pretrained_grid(self) -> tuple[int, int]:
        """``(h0, w0)`` patch grid of the learned position table."""
        side = self.image_size // self.patch_size
        return side, side

    def embed(self, pixel_values: Tensor, *, prompts: Tensor | None = None) -> TokenState:
        """Patchify, prepend CLS, add (resampled) positions, insert prompts, apply ``pre_layrnorm``.

        Args:
            pixel_values: ``(B, C, H, W)``; ``H`` and ``W`` multiples of ``patch_size``, any aspect.
            prompts: optional ``(B, n, D)`` or ``(n, D)`` prompt tokens placed after CLS.

        Returns:
            ``TokenState`` with tokens ``(B, 1 + n + h*w, D)``, ``grid=(H/p, W/p)``, ``num_prefix=1``,
            ``num_prompts=n``, ``pool_index`` zeros and no attention mask.
        """
        grid = _patch_grid(pixel_values, channels=self.num_channels, patch_size=self.patch_size)
        b = pixel_values.shape[0]
        emb = self.vision_model.embeddings
        weight = emb.patch_embedding.weight
        patches = emb.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls_token = emb.class_embedding.expand(b, 1, -1)
        pos = resample_grid_pos_embed(
            emb.position_embedding.weight, grid, num_prefix=1, old_grid=self.pretrained_grid
        )
        tokens = torch.cat([cls_token, patches], dim=1) + pos
        state = TokenState(
            tokens=tokens,
            pool_index=torch.zeros(b, dtype=torch.long, device=tokens.device),
            num_prefix=1,
            grid=grid,
        )
        if prompts is not None:
            state = state.insert_prompts(prompts)
        return state.with_tokens(self.vision_model.pre_layrnorm(state.tokens))

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``vision_model.encoder.layers[i]`` (bidirectional attention)."""
        _check_layer_index(i, self.num_layers)
        return _run_layer(self.vision_model.encoder.layers[i], state)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """``self_attn`` (its output before the residual add) and ``mlp`` of encoder layer ``i``."""
        _check_layer_index(i, self.num_layers)
        return _branches(self.vision_model.encoder.layers[i])

    def pool(self, state: TokenState) -> Tensor:
        """``visual_projection(post_layernorm(tokens[:, 0]))`` -> ``(B, E)`` (``get_image_features``)."""
        idx = state.pool_index
        if idx is None:
            x = state.tokens[:, 0]
        else:
            x = state.tokens[torch.arange(state.batch_size, device=idx.device), idx]
        return self.visual_projection(self.vision_model.post_layernorm(x))

    def dense(self, state: TokenState) -> Tensor:
        """Patch tokens through ``post_layernorm`` and ``visual_projection`` -> ``(B, h*w, E)``.

        CLS and prompt tokens are dropped; the order is the row-major patch grid ``state.grid``.
        """
        return self.visual_projection(self.vision_model.post_layernorm(state.content_tokens))


class HFCLIPTextTower(Tower):
    """Steppable transformers CLIP / CLIPSeg text tower (causal transformer, pre-norm).

    Implements the CLIP text encoder (Radford et al. 2021) with CoOp context insertion
    (Zhou et al. 2022, eq. 2: ``t = [BOS, v_1, ..., v_M, w_1, ..., w_K, EOS]``)::

        z_0 = [e(BOS); v_1..v_M; e(w_1)..e(EOS)] + E_pos[:L + M]  # embed (context before positions)
        z_l = z'_l + MLP(LN_2(z'_l)),  z'_l = z_{l-1} + MSA_causal(LN_1(z_{l-1}))
        pooled = LN_final(z_L[eos]) W_proj                        # pool

    Args:
        text_model: a transformers ``CLIPTextModel`` / ``CLIPSegTextModel`` (what ``CLIPModel.text_model``
            / ``CLIPSegModel.text_model`` are): ``embeddings.{token,position}_embedding``,
            ``encoder.layers``, ``final_layer_norm``. Registered as ``self.text_model``.
        text_projection: the model's ``text_projection`` ``nn.Linear(D, E, bias=False)``, registered as
            ``self.text_projection``.
        eos_pooling: where ``pool`` reads. ``"auto"`` follows transformers: ``"argmax"`` (position of the
            largest token id, the legacy rule) when ``config.eos_token_id == 2`` (OpenAI / CIDAS
            configs), else ``"first_eos"`` (first position equal to ``config.eos_token_id``).

    Attributes:
        num_layers, width (``D``), embed_dim (``E``), max_positions (length of the position table),
        eos_token_id, eos_pooling (resolved, never ``"auto"``).
    """

    modality = "text"

    def __init__(
        self,
        text_model: nn.Module,
        text_projection: nn.Linear,
        *,
        eos_pooling: EosPooling = "auto",
    ) -> None:
        super().__init__()
        for name in ("embeddings", "encoder", "final_layer_norm"):
            if not hasattr(text_model, name):
                raise TypeError(
                    "text_model must be a transformers CLIPTextModel/CLIPSegTextModel "
                    f"(missing attribute {name!r}), got {type(text_model).__name__}"
                )
        self.text_model = text_model
        self.text_projection = text_projection
        emb = text_model.embeddings
        self.width = emb.token_embedding.embedding_dim
        if text_projection.in_features != self.width:
            raise ValueError(
                f"text_projection expects in_features={text_projection.in_features}, "
                f"but the text width is {self.width}"
            )
        self.embed_dim = text_projection.out_features
        self.num_layers = len(text_model.encoder.layers)
        self.max_positions = emb.position_embedding.num_embeddings
        config = getattr(text_model, "config", None)
        self.eos_token_id = getattr(
            text_model, "eos_token_id", getattr(config, "eos_token_id", None)
        )
        if eos_pooling == "auto":
            eos_pooling = "argmax" if self.eos_token_id == 2 else "first_eos"
        if eos_pooling not in ("argmax", "first_eos"):
            raise ValueError(
                f"eos_pooling must be 'auto', 'argmax' or 'first_eos', got {eos_pooling!r}"
            )
        if eos_pooling == "first_eos" and self.eos_token_id is None:
            raise ValueError("eos_pooling='first_eos' needs text_model.config.eos_token_id")
        self.eos_pooling: str = eos_pooling

    @classmethod
    def from_clip_model(
        cls, model: nn.Module, *, eos_pooling: EosPooling = "auto"
    ) -> HFCLIPTextTower:
        """Text tower of a ``CLIPModel``, ``CLIPSegModel``, ``CLIPSegForImageSegmentation`` or
        ``CLIPTextModelWithProjection`` (shares its modules, no copy)."""
        model = _unwrap(model)
        return cls(model.text_model, model.text_projection, eos_pooling=eos_pooling)

    def eos_index(self, input_ids: Tensor) -> Tensor:
        """``(B,)`` pooling position of each sequence in ``input_ids`` ``(B, L)`` (before context)."""
        ids = input_ids.to(torch.int)  # transformers casts to int too; argmax ties pick the first
        if self.eos_pooling == "argmax":
            return ids.argmax(dim=-1).long()
        return (ids == self.eos_token_id).int().argmax(dim=-1).long()

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        overflow: Overflow = "error",
    ) -> TokenState:
        """Token embeddings, CoOp context after BOS, then position embeddings.

        Args:
            input_ids: ``(B, L)`` token ids starting with BOS (right padding).
            attention_mask: optional ``(B, L)``, nonzero/True for real tokens.
            context: optional ``(B, n, D)`` or ``(n, D)`` learnable context embeddings placed at
                positions ``1 .. n`` (words shift right by ``n``); the mask is extended with ones and
                the EOS index shifted by ``n``.
            overflow: when ``L + n`` exceeds the position table: ``"error"``, ``"truncate"`` or
                ``"released"`` (see :meth:`TokenState.fit_length`).

        Returns:
            ``TokenState`` with tokens ``(B, L + n, D)``, ``num_prefix=1``, ``num_prompts=n``,
            ``causal=True`` and ``pool_index`` at EOS.
        """
        emb = self.text_model.embeddings
        attention_mask = _check_ids(input_ids, attention_mask, emb.token_embedding.num_embeddings)
        state = TokenState(
            tokens=emb.token_embedding(input_ids),
            attention_mask=attention_mask,
            pool_index=self.eos_index(input_ids),
            num_prefix=1,
            causal=True,
        )
        if context is not None:
            state = state.insert_prompts(context)  # validates the context shape
        state = state.fit_length(self.max_positions, overflow)
        length = state.tokens.shape[1]
        pos = emb.position_embedding.weight[:length]
        return state.with_tokens(state.tokens + pos)

    def block(self, i: int, state: TokenState) -> TokenState:
        """Run ``text_model.encoder.layers[i]`` with the causal + padding bias of ``state``."""
        _check_layer_index(i, self.num_layers)
        return _run_layer(self.text_model.encoder.layers[i], state)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """``self_attn`` and ``mlp`` of text encoder layer ``i`` (outputs before the residual add)."""
        _check_layer_index(i, self.num_layers)
        return _branches(self.text_model.encoder.layers[i])

    def pool(self, state: TokenState) -> Tensor:
        """``text_projection(final_layer_norm(tokens[eos]))`` -> ``(B, E)`` (``get_text_features``)."""
        idx = state.pool_index
        if idx is None:
            raise ValueError("text TokenState has no pool_index (the EOS position)")
        x = state.tokens[torch.arange(state.batch_size, device=idx.device), idx]
        return self.text_projection(self.text_model.final_layer_norm(x))

    def dense(self, state: TokenState) -> Tensor:
        """Every token except the context through ``final_layer_norm`` and ``text_projection``.

        Returns:
            ``(B, L, E)``: BOS, words, EOS and padding, in input order.
        """
        return self.text_projection(self.text_model.final_layer_norm(state.without_prompts()))


def from_clip_model(
    model: nn.Module, *, eos_pooling: EosPooling = "auto"
) -> tuple[HFCLIPVisionTower, HFCLIPTextTower]:
    """``(vision_tower, text_tower)`` sharing the modules of a transformers CLIP / CLIPSeg model.

    Args:
        model: ``CLIPModel``, ``CLIPSegModel`` or ``CLIPSegForImageSegmentation`` (its ``.clip``).
        eos_pooling: passed to ``HFCLIPTextTower``.

    The towers then own ``vision_model``/``visual_projection`` and ``text_model``/``text_projection``;
    ``logit_scale`` (and a CLIPSeg decoder) stay with the caller.
    """
    return (
        HFCLIPVisionTower.from_clip_model(model),
        HFCLIPTextTower.from_clip_model(model, eos_pooling=eos_pooling),
    )
