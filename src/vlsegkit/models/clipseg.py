"""CLIPSeg: frozen CLIP towers + a FiLM-conditioned transformer decoder.

Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022; the medical transfer
study of Poudel et al. ("Exploring Transfer Learning in Medical Image Segmentation using
Vision-Language Models", MIDL 2024) fine-tunes it as a baseline. The towers are the transformers
``CLIPSegModel`` modules (built by :func:`vlsegkit.encoders.create_towers`), stepped through the one
runner with whatever hooks are attached (prompt learners, adapters); the decoder is
:class:`vlsegkit.decoders.FiLMDecoder`. Checkpoints in the transformers layout (``CIDAS/clipseg-rd16``,
``-rd64``, ``-rd64-refined``) convert on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..decoders.film import FiLMDecoder
from ..encoders.factory import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TowerSpec,
    TransformersCLIPSpec,
    create_towers,
    tower_spec_from_dict,
)
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.runner import Checkpointing, check_layers, embed_tower, run_towers
from ..encoders.text_cache import TextCache, unique_token_rows
from ..hub import (
    CheckpointError,
    empty_weights,
    load_state_dict_strict,
)
from ..registry import register_model
from ._backbones import hf_clip_vit_b16
from .base import (
    VLSM,
    _pairing,
    check_pixels,
    check_token_rows,
    pair_rows,
    parse_text_prompts,
    preprocessing_args,
    preprocessing_from_hf,
)
from .outputs import CLIPSegOutput

__all__ = ["CLIPSeg"]


# Upstream keys that carry no weights vlsegkit uses: CLIP's contrastive temperature and the
# position-id buffers that pre-2023 transformers wrote into checkpoints.
_IGNORED_FOREIGN_SUFFIXES = ("logit_scale", "position_ids")
_TOWER_ATTR = {"vision": "vision_tower", "text": "text_tower"}


def _backbone_spec(backbone: Any) -> TransformersCLIPSpec:
    if isinstance(backbone, dict) and "kind" not in backbone:
        backbone = {"kind": "transformers_clip", "model": "clipseg", **backbone}
    spec = tower_spec_from_dict(backbone)
    if not isinstance(spec, TransformersCLIPSpec):
        raise ValueError(f"CLIPSeg needs a transformers CLIP backbone, got kind {spec.kind!r}")
    return spec


class CLIPSeg(VLSM):
    """CLIPSeg with text, image or embedding conditioning and any number of prompts per image.

    Forward pass (Lüddecke & Ecker 2022)::

        A_k = vision.block_k(...) for k in extract_layers       # kept activations (runner)
        c   = text.pool(text(prompt))  (or a support image's / a given embedding)
        logits = FiLMDecoder([A_k], c)                           # (B, C, H, W)

    Hooks (prompt learners, PVL / bottleneck adapters) act inside the towers through the runner,
    on the activations the decoder reads and on ``c``.

    Args:
        backbone: CLIP tower architecture: a :class:`~vlsegkit.encoders.TransformersCLIPSpec` dict,
            ``{"text_config": {...}, "vision_config": {...}, "projection_dim": int}`` in
            transformers ``CLIPSegConfig`` terms.
        extract_layers: vision blocks (0-indexed) whose outputs feed the decoder, shallow to deep.
        reduce_dim: decoder width (16 / 64 in the CIDAS checkpoints).
        decoder_num_heads: decoder attention heads.
        decoder_mlp_dim: decoder MLP width.
        conditional_layer: decoder level (deepest first) where FiLM is applied.
        complex_upsampler: the refined checkpoint's three-stage transposed convolution.
        image_size: ``(H, W)`` (or one int) ``predict`` resizes to (352 for the CIDAS checkpoints).
        image_mean, image_std: normalisation used by ``predict`` (ImageNet statistics for CLIPSeg).
        freeze_backbone: freeze both towers (the CLIPSeg recipe: only the decoder trains).
        hooks: hooks the model owns (trained with it, saved in its config and weights), e.g.
            ``[PVLAdapters()]``; hooks given to ``forward`` act after them.

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts)`` → ``logits (B, C, H, W)`` with C prompts
    per image; H and W must be multiples of the patch size.
    """

    model_type = "clipseg"

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        extract_layers: Sequence[int] = (3, 6, 9),
        reduce_dim: int = 64,
        decoder_num_heads: int = 4,
        decoder_mlp_dim: int = 2048,
        conditional_layer: int = 0,
        complex_upsampler: bool = False,
        image_size: int | Sequence[int] = 352,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        freeze_backbone: bool = True,
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        super().__init__()
        spec = self._backbone_spec(backbone)
        self._spec = spec
        self._set_config_arg(backbone=spec.to_dict())
        towers = create_towers(spec)
        self.vision_tower, self.text_tower = towers.vision, towers.text
        # upstream names (transformers' CLIPSegModel, open_clip's CLIP) -> ours, for conversion
        self._upstream_keys = {
            upstream: _TOWER_ATTR[ours.split(".", 1)[0]] + "." + ours.split(".", 1)[1]
            for upstream, ours in towers.upstream_keys.items()
        }
        self._foreign_keys = {f"clip.{k}": v for k, v in self._upstream_keys.items()}
        layers = tuple(int(i) for i in extract_layers)
        if not layers or list(layers) != sorted(layers):
            raise ValueError(f"extract_layers must be non-empty and increasing, got {layers}")
        self.extract_layers = check_layers(
            layers, self.vision_tower.num_layers, name="extract_layers"
        )
        self.decoder = FiLMDecoder(
            vision_width=self.vision_tower.width,
            cond_dim=self.vision_tower.embed_dim,
            reduce_dim=reduce_dim,
            depth=len(layers),
            num_heads=decoder_num_heads,
            mlp_dim=decoder_mlp_dim,
            patch_size=self.vision_tower.patch_size,
            conditional_layer=conditional_layer,
            complex_upsampler=complex_upsampler,
            eps=self._decoder_eps(spec),
        )
        self.image_size, self.image_mean, self.image_std = preprocessing_args(
            image_size, image_mean, image_std
        )
        self._make_tokenizer = towers.make_tokenizer
        self.tokenizer = self._default_tokenizer()
        #: Width of the decoder features ``forward(output_decoder_features=True)`` returns.
        self.decoder_feature_dim = reduce_dim
        #: Recompute tower block activations in backward instead of storing them (saves memory
        #: when gradients flow through frozen towers to hooks); a runtime switch, not config.
        #: ``"auto"``: frozen blocks only, above :data:`~vlsegkit.encoders.runner.AUTO_CHECKPOINT_BYTES`
        #: of estimated activations (see :func:`~vlsegkit.encoders.run_towers`).
        self.gradient_checkpointing: Checkpointing = "auto"
        #: Optional :class:`~vlsegkit.encoders.text_cache.TextCache` of the conditional embedding
        #: of each prompt across calls (used while no hook acts on the text tower); None: off.
        self.text_cache: TextCache | None = None
        if freeze_backbone:
            self.freeze_backbone()
        self.hooks = self._bind_hooks(hooks)

    # ------------------------------------------------------------------ backbone specifics
    @classmethod
    def _backbone_spec(cls, backbone: Any) -> TowerSpec:
        """The typed backbone spec this class accepts (CLIPSeg: transformers CLIP towers)."""
        return _backbone_spec(backbone)

    @staticmethod
    def _decoder_eps(spec: TowerSpec) -> float:
        """LayerNorm epsilon of the decoder (transformers' CLIPSeg uses the vision tower's)."""
        return spec.layer_norm_eps

    def _default_tokenizer(self) -> Any:
        """The tokenizer set at construction (CLIP BPE for the CLIP text tower)."""
        return self._make_tokenizer(self.text_tower.max_positions)

    def _slot_tokenizer(self) -> Any:
        return self.tokenizer

    def hook_slots(self) -> HookSlots:
        """Towers, the decoder's kept vision blocks and the conditional-embedding width."""
        return HookSlots(
            towers={"vision": self.vision_tower, "text": self.text_tower},
            kept={"vision": self.extract_layers},
            depths={"vision": self.extract_layers[-1] + 1},
            condition_dim=self.vision_tower.embed_dim,
            tokenizer=self._slot_tokenizer(),
        )

    # ------------------------------------------------------------------ conditions
    def tokenize(self, prompts: str | Sequence[str], *, reserve: int = 0) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, L)`` as ``forward`` tokenises prompts (padded to
        the longest), on the model's device.

        ``forward(pixel_values, input_ids=..., attention_mask=...)`` with them is the tensor-only
        pass (what ``torch.compile(model, fullgraph=True)`` captures in one graph).

        Args:
            prompts: one string or T strings.
            reserve: text positions left free for context tokens hooks insert.
        """
        batch = self.tokenizer(prompts, reserve=reserve)
        device = self.decoder.film_mul.weight.device
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def _tokenize(self, texts: list[str], hooks: Sequence[TowerHook]) -> tuple[Tensor, Tensor]:
        reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        return self.tokenize(texts, reserve=reserve)

    def encode_text(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
    ) -> Tensor:
        """Projected text embeddings ``(T, E)`` of prompts (strings) or token ids ``(T, L)``.

        The model's own hooks and ``hooks`` that act on the text tower (text contexts) apply; hooks
        that need image features or paired rows do not fit here.
        """
        hooks = self._run_hooks(hooks)
        if input_ids is None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts or ())
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("prompts must be a string or a non-empty list of strings")
            input_ids, attention_mask = self._tokenize(texts, hooks)
        return self._encode_rows(input_ids, attention_mask, hooks, RunContext())[0]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings ``(B, E)`` (support-image conditioning; no hooks)."""
        return self.vision_tower(check_pixels(pixel_values)).pooled

    def _encode_rows(
        self, ids: Tensor, mask: Tensor | None, hooks: Sequence[TowerHook], ctx: RunContext
    ) -> tuple[Tensor, RunContext]:
        """Pooled text rows ``(R, E)`` with the text hooks (keeping what hooks ask for)."""
        if self.text_cache is not None and not any("text" in h.towers for h in hooks):
            pooled = self.text_cache.rows(
                self.text_tower,
                "clipseg-pooled",
                ids,
                mask,
                lambda rows: self._encode_rows_now(
                    ids[rows], None if mask is None else mask[rows], (), RunContext()
                ),
            )
            return pooled, ctx
        return self._encode_rows_now(ids, mask, hooks, ctx), ctx

    def _encode_rows_now(
        self, ids: Tensor, mask: Tensor | None, hooks: Sequence[TowerHook], ctx: RunContext
    ) -> Tensor:
        state = embed_tower("text", self.text_tower, ids, mask, hooks=hooks, ctx=ctx)
        keep = _hook_keeps(hooks, "text")
        run = run_towers(
            {"text": self.text_tower},
            {"text": state},
            hooks=hooks,
            ctx=ctx,
            keep={"text": keep} if keep else None,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        return self.text_tower.pool(run.states["text"])

    def _condition_source(
        self, prompts, input_ids, conditional_pixel_values, conditional_embeddings
    ) -> str:
        given = [
            name
            for name, v in (
                ("prompts", prompts),
                ("input_ids", input_ids),
                ("conditional_pixel_values", conditional_pixel_values),
                ("conditional_embeddings", conditional_embeddings),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "pass exactly one of prompts, input_ids, conditional_pixel_values or "
                f"conditional_embeddings (got {given or 'none'})"
            )
        return given[0]

    def _embedding_rows(self, emb: Any, batch: int) -> tuple[Tensor, Tensor]:
        e = self.decoder.cond_dim
        if (
            isinstance(emb, Tensor)
            and emb.dim() == 3
            and emb.shape[0] == batch
            and emb.shape[-1] == e
        ):
            c = emb.shape[1]
            return emb.reshape(batch * c, e), torch.arange(batch * c).view(batch, c)
        if isinstance(emb, Tensor) and emb.dim() == 2 and emb.shape[-1] == e and emb.shape[0] > 0:
            return emb, _pairing(batch, emb.shape[0])
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(
            f"conditional_embeddings must be (B, {e}), (T, {e}) or (B={batch}, C, {e}), got {shape}"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        conditional_pixel_values: Tensor | None = None,
        conditional_embeddings: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
        output_decoder_features: bool = False,
    ) -> CLIPSegOutput:
        """Segment ``pixel_values`` under one or more conditions.

        Exactly one condition source is given. How conditions pair with images (B images):

        - a string: the same prompt for every image (C = 1);
        - a list of B strings (or ``input_ids`` / ``conditional_pixel_values`` / ``(B, E)``
          embeddings with B rows): one condition per image (C = 1), the transformers convention;
        - a list of T ≠ B strings (or T rows): every image with every condition (C = T);
        - a list of B lists of C strings, or embeddings ``(B, C, E)``: per-image condition sets.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
            prompts: text prompts (see above); the empty string is a valid prompt.
            input_ids, attention_mask: pre-tokenised prompts ``(T, L)``.
            conditional_pixel_values: support images ``(T, 3, H', W')``.
            conditional_embeddings: ``(T, E)`` or ``(B, C, E)`` condition vectors, used as given.
            hooks: :class:`~vlsegkit.encoders.TowerHook` s bound to this model (e.g. a prompt
                learner's), applied after the model's own.
            output_decoder_features: also return the decoder's penultimate feature map (the input of
                its final upsampler) as ``decoder_features`` ``(B, C, reduce_dim, h, w)``.

        Returns:
            :class:`~vlsegkit.models.CLIPSegOutput` with ``logits (B, C, H, W)`` and
            ``conditional_embeddings (B, C, E)``.
        """
        hooks = self._run_hooks(hooks)
        pixel_values = check_pixels(pixel_values)
        b = pixel_values.shape[0]
        source = self._condition_source(
            prompts, input_ids, conditional_pixel_values, conditional_embeddings
        )
        textual = source in ("prompts", "input_ids")
        if not textual and any("text" in h.towers for h in hooks):
            raise ValueError(
                "hooks acting on the text tower need text conditions: pass prompts or input_ids, "
                "not conditional_pixel_values / conditional_embeddings"
            )
        ctx = RunContext()
        paired = textual and any(h.pairs_text_with_images or h.lockstep for h in hooks)
        lockstep = textual and any(h.lockstep for h in hooks)
        features = any(h.needs_image_features for h in hooks)
        ids = mask = None
        if textual:
            if source == "prompts":
                texts, index = parse_text_prompts(prompts, b)
                ids, mask = self._tokenize(texts, hooks)
            else:
                # identical rows (one per image of a shared prompt) are encoded once
                ids, mask, index = unique_token_rows(
                    *check_token_rows(input_ids, attention_mask, b)
                )
                ids = ids.to(pixel_values.device)
                mask = None if mask is None else mask.to(pixel_values.device)
            if paired:
                rows, images, index = pair_rows(index)
                ids, mask = (
                    ids[rows.to(ids.device)],
                    None if mask is None else mask[rows.to(ids.device)],
                )
                ctx.text_image_index = images.to(pixel_values.device)
        elif source == "conditional_pixel_values":
            cond = self.encode_image(conditional_pixel_values)
            index = _pairing(b, cond.shape[0])
        else:
            cond, index = self._embedding_rows(conditional_embeddings, b)

        if lockstep and features:
            # the text rows (e.g. CoCoOp's contexts) need the image features before the towers
            # step together, and the lockstep run's vision states depend on the text: the
            # features come from a pass of the plain vision tower, as in MedCLIPSeg
            ctx.image_features = self.vision_tower(pixel_values).pooled
        vision = embed_tower("vision", self.vision_tower, pixel_values, hooks=hooks, ctx=ctx)
        keep = sorted({*self.extract_layers, *_hook_keeps(hooks, "vision")})
        stop = None if features and not lockstep else max(keep) + 1
        if lockstep:
            vision = vision.take(ctx.text_image_index)
            text = embed_tower("text", self.text_tower, ids, mask, hooks=hooks, ctx=ctx)
            text_keep = _hook_keeps(hooks, "text")
            run = run_towers(
                {"vision": self.vision_tower, "text": self.text_tower},
                {"vision": vision, "text": text},
                hooks=hooks,
                ctx=ctx,
                stop={"vision": stop} if stop is not None else None,
                keep={"vision": keep, **({"text": text_keep} if text_keep else {})},
                gradient_checkpointing=self.gradient_checkpointing,
            )
            cond = self.text_tower.pool(run.states["text"])
        else:
            run = run_towers(
                {"vision": self.vision_tower},
                {"vision": vision},
                hooks=hooks,
                ctx=ctx,
                stop=stop,
                keep={"vision": keep},
                gradient_checkpointing=self.gradient_checkpointing,
            )
            if features:
                ctx.image_features = self.vision_tower.pool(run.states["vision"])
            if textual:
                cond, _ = self._encode_rows(ids, mask, hooks, ctx)
        if source != "conditional_embeddings":
            for hook in hooks:
                cond = hook.condition(cond, ctx)
        acts = [run.kept["vision"][i] for i in self.extract_layers]
        c = index.shape[1]
        rows = cond[index.reshape(-1).to(cond.device)]
        tokens = [a.tokens for a in acts]
        if not lockstep and c > 1:
            tokens = [t.repeat_interleave(c, dim=0) for t in tokens]
        starts = {a.content_start for a in acts}
        if len(starts) != 1:
            raise ValueError(
                f"the kept vision activations have different prompt layouts ({sorted(starts)}); "
                "hooks must present every kept block alike"
            )
        logits, features_map = self._decode(
            tokens, rows.to(tokens[0].dtype), acts[0], output_decoder_features
        )
        h, w = logits.shape[-2:]
        return CLIPSegOutput(
            logits=logits.view(b, c, h, w),
            conditional_embeddings=rows.view(b, c, -1),
            decoder_features=None
            if features_map is None
            else features_map.view(b, c, *features_map.shape[1:]),
        )

    def _decode(self, tokens, cond, state, output_features: bool):
        # features and upsampler called separately (no temporary module hook): the pass stays one
        # graph under torch.compile
        fmap = self.decoder.features(
            tokens, cond, grid=state.grid, content_start=state.content_start
        )
        logits = self.decoder.transposed_convolution(fmap)
        return logits, (fmap if output_features else None)

    # ------------------------------------------------------------------ upstream checkpoints
    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "clipseg" and "vlsegkit_format_version" not in config

    @classmethod
    def _from_foreign(cls, id_or_path, config: dict[str, Any], **hub_kwargs) -> CLIPSeg:
        """Build from a transformers ``CLIPSegForImageSegmentation`` folder / repo and convert its weights."""
        kwargs = preprocessing_from_hf(id_or_path, **hub_kwargs)
        spec = TransformersCLIPSpec.from_hf_config(config)
        state, source = cls._load_weights_file(id_or_path, **hub_kwargs)
        # decoder fields of transformers' CLIPSegConfig, with its defaults; built without weights
        # (they come from the file, assigned without a copy)
        with empty_weights():
            model = cls(
                backbone=spec.to_dict(),
                extract_layers=tuple(config.get("extract_layers", (3, 6, 9))),
                reduce_dim=int(config.get("reduce_dim", 64)),
                decoder_num_heads=int(config.get("decoder_num_attention_heads", 4)),
                decoder_mlp_dim=int(config.get("decoder_intermediate_size", 2048)),
                conditional_layer=int(config.get("conditional_layer", 0)),
                complex_upsampler=bool(config.get("use_complex_transposed_convolution", False)),
                **kwargs,
            )
        load_state_dict_strict(
            model, model.convert_hf_state_dict(state), source=source, assign=True
        )
        return model

    def convert_hf_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename a transformers CLIPSeg state dict to this model's keys.

        ``clip.*`` keys go to the towers, ``decoder.*`` keys keep their names; ``clip.logit_scale`` and
        legacy ``position_ids`` buffers are dropped. Unknown keys are kept as they are so the strict
        load reports them.
        """
        out = {}
        for key, value in state.items():
            if key.endswith(_IGNORED_FOREIGN_SUFFIXES):
                continue
            out[self._foreign_keys.get(key, key)] = value
        if not any(k.startswith("decoder.") for k in out):
            raise CheckpointError(
                "this transformers CLIPSeg checkpoint has no decoder weights (decoder.*)"
            )
        return out


def _hook_keeps(hooks: Sequence[TowerHook], tower: str) -> list[int]:
    return sorted({i for h in hooks if tower in h.towers for i in h.keep_layers(tower)})


# ---------------------------------------------------------------------- registry
def _tiny_backbone() -> dict[str, Any]:
    return {
        "text_config": dict(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
        "vision_config": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_channels=3, image_size=64, patch_size=8, hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        "projection_dim": 32,
    }  # fmt: skip


@register_model(
    "clipseg-rd64-refined",
    hub_id="CIDAS/clipseg-rd64-refined",
    description="CLIPSeg ViT-B/16, reduce_dim 64, refined upsampler (medvlsm's checkpoint)",
)
def clipseg_rd64_refined(**kwargs) -> CLIPSeg:
    return CLIPSeg(backbone=hf_clip_vit_b16(), reduce_dim=64, complex_upsampler=True, **kwargs)


@register_model(
    "clipseg-rd64",
    hub_id="CIDAS/clipseg-rd64",
    description="CLIPSeg ViT-B/16, reduce_dim 64 (TuneVLSeg's checkpoint)",
)
def clipseg_rd64(**kwargs) -> CLIPSeg:
    return CLIPSeg(backbone=hf_clip_vit_b16(), reduce_dim=64, **kwargs)


@register_model(
    "clipseg-rd16", hub_id="CIDAS/clipseg-rd16", description="CLIPSeg ViT-B/16, reduce_dim 16"
)
def clipseg_rd16(**kwargs) -> CLIPSeg:
    return CLIPSeg(backbone=hf_clip_vit_b16(), reduce_dim=16, **kwargs)


@register_model(
    "clipseg-tiny",
    description="A tiny random CLIPSeg (patch 8, width 64) for tests, demos and CPU experiments",
)
def clipseg_tiny(**kwargs) -> CLIPSeg:
    defaults = dict(
        extract_layers=(1, 2, 3), reduce_dim=32, decoder_num_heads=4, decoder_mlp_dim=128,
        complex_upsampler=False, image_size=128,
    )  # fmt: skip
    return CLIPSeg(backbone=_tiny_backbone(), **{**defaults, **kwargs})
