"""CLIPSeg: frozen CLIP towers + a FiLM-conditioned transformer decoder.

Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022; the medical transfer
study of Poudel et al. ("Exploring Transfer Learning in Medical Image Segmentation using
Vision-Language Models", MIDL 2024) fine-tunes it as a baseline. The towers are the transformers
``CLIPSegModel`` modules, stepped through vlsegkit's tower adapters; the decoder is
:class:`vlsegkit.decoders.FiLMDecoder`. Checkpoints in the transformers layout (``CIDAS/clipseg-rd16``,
``-rd64``, ``-rd64-refined``) convert on load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..decoders.film import FiLMDecoder
from ..encoders.hf_clip import from_clip_model
from ..hub import CheckpointError, load_state_dict_strict, read_json, resolve_file
from ..registry import register_model
from ..tokenizers import CLIPTokenizer
from .base import VLSM, ImageInput, SegmentationOutput, _needs_grad, _pairing

__all__ = ["CLIPSeg"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id",
)  # fmt: skip
_VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps",
)  # fmt: skip
# Upstream keys that carry no weights vlsegkit uses: CLIP's contrastive temperature and the
# position-id buffers that pre-2023 transformers wrote into checkpoints.
_IGNORED_FOREIGN_SUFFIXES = ("logit_scale", "position_ids")


def _clip_backbone_config(backbone: dict[str, Any]):
    from transformers import CLIPSegConfig

    return CLIPSegConfig(
        text_config=dict(backbone["text_config"]),
        vision_config=dict(backbone["vision_config"]),
        projection_dim=backbone["projection_dim"],
    )


class CLIPSeg(VLSM):
    """CLIPSeg with text, image or embedding conditioning and any number of prompts per image.

    Args:
        backbone: CLIP tower architecture: ``{"text_config": {...}, "vision_config": {...},
            "projection_dim": int}`` in transformers ``CLIPSegConfig`` terms.
        extract_layers: vision blocks (0-indexed) whose outputs feed the decoder, shallow to deep.
        reduce_dim: decoder width (16 / 64 in the CIDAS checkpoints).
        decoder_num_heads: decoder attention heads.
        decoder_mlp_dim: decoder MLP width.
        conditional_layer: decoder level (deepest first) where FiLM is applied.
        complex_upsampler: the refined checkpoint's three-stage transposed convolution.
        image_size: ``(H, W)`` (or one int) ``predict`` resizes to (352 for the CIDAS checkpoints).
        image_mean, image_std: normalisation used by ``predict`` (ImageNet statistics for CLIPSeg).
        freeze_backbone: freeze both towers (the CLIPSeg recipe: only the decoder trains).

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
    ) -> None:
        super().__init__()
        from transformers import CLIPSegModel

        hf_config = _clip_backbone_config(backbone)
        self._backbone = {
            "text_config": {k: getattr(hf_config.text_config, k) for k in _TEXT_KEYS},
            "vision_config": {k: getattr(hf_config.vision_config, k) for k in _VISION_KEYS},
            "projection_dim": hf_config.projection_dim,
        }
        clip = CLIPSegModel(hf_config)
        self.vision_tower, self.text_tower = from_clip_model(clip)
        # Map transformers names (``clip.*``) onto ours by tensor identity, for checkpoint conversion.
        ours = {id(t): n for n, t in self.named_parameters()}
        ours.update({id(t): n for n, t in self.named_buffers()})
        self._foreign_keys = {
            f"clip.{n}": ours[id(t)]
            for n, t in (*clip.named_parameters(), *clip.named_buffers())
            if id(t) in ours
        }
        del clip

        layers = tuple(int(i) for i in extract_layers)
        if not layers or any(not 0 <= i < self.vision_tower.num_layers for i in layers):
            raise ValueError(
                f"extract_layers must be indices in [0, {self.vision_tower.num_layers}), got {layers}"
            )
        if list(layers) != sorted(layers):
            raise ValueError(f"extract_layers must be increasing, got {layers}")
        self.extract_layers = layers
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
            eps=hf_config.vision_config.layer_norm_eps,
        )
        self._decoder_cfg = dict(
            reduce_dim=reduce_dim,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_dim=decoder_mlp_dim,
            conditional_layer=conditional_layer,
            complex_upsampler=complex_upsampler,
        )
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(size[0]), int(size[1]))
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.tokenizer = CLIPTokenizer.from_open_clip(context_length=self.text_tower.max_positions)
        #: Width of the decoder features ``forward(output_decoder_features=True)`` returns.
        self.decoder_feature_dim = reduce_dim
        #: Recompute tower block activations in backward instead of storing them (saves memory
        #: when gradients flow through frozen towers to prompts); a runtime switch, not config.
        self.gradient_checkpointing = False
        if freeze_backbone:
            self.freeze_backbone()

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        return {
            "backbone": self._backbone,
            "extract_layers": list(self.extract_layers),
            **self._decoder_cfg,
            "image_size": list(self.image_size),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "freeze_backbone": not any(p.requires_grad for p in self.text_tower.parameters()),
        }

    def freeze_backbone(self, frozen: bool = True) -> CLIPSeg:
        """Freeze (or unfreeze) both towers; the decoder stays trainable."""
        self.vision_tower.requires_grad_(not frozen)
        self.text_tower.requires_grad_(not frozen)
        return self

    # ------------------------------------------------------------------ conditions
    def encode_text(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        context: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Projected text embeddings ``(T, E)`` of prompts (strings) or token ids ``(T, L)``.

        Args:
            prompts: T strings (tokenised with room left for the context).
            input_ids, attention_mask: pre-tokenised prompts ``(T, L)`` instead of strings.
            context: per-depth learnable context ``[P_0, ..., P_{J-1}]``, each ``(n, D)`` or
                ``(T, n, D)``: ``P_0`` is inserted after BOS, ``P_i`` replaces the context slots
                before text block ``i`` (see :mod:`vlsegkit.prompts`).
        """
        context = list(context or ())
        num_context = context[0].shape[-2] if context else 0
        if input_ids is None:
            if isinstance(prompts, str):
                prompts = [prompts]
            batch = self.tokenizer(list(prompts), reserve=num_context)
            input_ids, attention_mask = batch.input_ids, batch.attention_mask
        device = self.decoder.film_mul.weight.device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        with torch.set_grad_enabled(_needs_grad(self.text_tower, *context)):
            state = self.text_tower.embed(
                input_ids, attention_mask, context=context[0] if context else None
            )
            state = self._run_blocks(self.text_tower, state, context)
            return self.text_tower.pool(state)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings ``(B, E)`` (support-image conditioning)."""
        with torch.set_grad_enabled(_needs_grad(self.vision_tower, pixel_values)):
            return self.vision_tower(pixel_values).pooled

    def _conditions(
        self,
        batch_size: int,
        prompts,
        input_ids,
        attention_mask,
        conditional_pixel_values,
        conditional_embeddings,
        context: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Condition rows ``(T, E)`` and the ``(B, C)`` index of the row each output channel uses.

        ``context`` (per-depth learnable text context, see ``encode_text``) applies to text
        conditions only; a per-image context ``(B, n, D)`` gives one row per (image, prompt) pair.
        """
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
        b = batch_size
        context = list(context or ())
        if context and prompts is None and input_ids is None:
            raise ValueError(
                "a text context (prompt learner) needs text conditions: pass prompts or input_ids, "
                "not conditional_pixel_values / conditional_embeddings"
            )
        if prompts is not None:
            if isinstance(prompts, str):
                return self._encode_rows([prompts], torch.zeros(b, 1, dtype=torch.long), context)
            prompts = list(prompts)
            if not prompts:
                raise ValueError("prompts must not be an empty list")
            if all(isinstance(p, str) for p in prompts):
                return self._encode_rows(prompts, _pairing(b, len(prompts)), context)
            if all(isinstance(p, (list, tuple)) for p in prompts):
                counts = {len(p) for p in prompts}
                if len(prompts) != b or len(counts) != 1 or 0 in counts:
                    raise ValueError(
                        f"nested prompts must be {b} lists (one per image) of the same non-zero "
                        f"length, got lengths {[len(p) for p in prompts]}"
                    )
                c = counts.pop()
                flat = [s for row in prompts for s in row]
                if not all(isinstance(s, str) for s in flat):
                    raise TypeError("prompts must be strings")
                return self._encode_rows(flat, torch.arange(b * c).view(b, c), context)
            raise TypeError("prompts must be a string, a list of strings or a list of lists")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (T, L), got {tuple(input_ids.shape)}")
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                    f"{tuple(input_ids.shape)}"
                )
            tokens = (input_ids, attention_mask)
            return self._encode_rows(tokens, _pairing(b, input_ids.shape[0]), context)
        if conditional_pixel_values is not None:
            if conditional_pixel_values.dim() != 4:
                raise ValueError(
                    "conditional_pixel_values must be (T, 3, H, W), got "
                    f"{tuple(conditional_pixel_values.shape)}"
                )
            emb = self.encode_image(conditional_pixel_values)
            return emb, _pairing(b, emb.shape[0])
        emb = conditional_embeddings
        e = self.decoder.cond_dim
        if emb.dim() == 3 and emb.shape[0] == b and emb.shape[-1] == e:
            c = emb.shape[1]
            return emb.reshape(b * c, e), torch.arange(b * c).view(b, c)
        if emb.dim() == 2 and emb.shape[-1] == e:
            return emb, _pairing(b, emb.shape[0])
        raise ValueError(
            f"conditional_embeddings must be (B, {e}), (T, {e}) or (B={b}, C, {e}), "
            f"got {tuple(emb.shape)}"
        )

    def _encode_rows(self, texts, index: Tensor, context: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Encode T texts (strings, or ``(input_ids, attention_mask)``) for the ``(B, C)`` index.

        A shared context (or none) encodes the T texts once; a per-image context ``(B, n, D)``
        encodes every (image, prompt) pair with that image's context (CoCoOp).
        """
        per_image = bool(context) and context[0].dim() == 3
        if not per_image:
            if isinstance(texts, tuple):
                ids, mask = texts
                return self.encode_text(input_ids=ids, attention_mask=mask, context=context), index
            return self.encode_text(texts, context=context), index
        b, c = index.shape
        for depth, ctx in enumerate(context):
            if ctx.shape[0] != b:
                raise ValueError(
                    f"per-image context at depth {depth} must have shape (B={b}, n, D), "
                    f"got {tuple(ctx.shape)}"
                )
        if isinstance(texts, tuple):
            ids, mask = texts
        else:
            batch = self.tokenizer(list(texts), reserve=context[0].shape[-2])
            ids, mask = batch.input_ids, batch.attention_mask
        rows = index.reshape(-1).to(ids.device)
        image = torch.arange(b, device=context[0].device).repeat_interleave(c)
        emb = self.encode_text(
            input_ids=ids[rows],
            attention_mask=None if mask is None else mask[rows],
            context=[ctx[image] for ctx in context],
        )
        return emb, torch.arange(b * c).view(b, c)

    # ------------------------------------------------------------------ forward
    def _run_blocks(
        self, tower, state, prompts: Sequence[Tensor] = (), *, start: int = 0, stop=None, keep=()
    ):
        """Blocks ``start .. stop - 1`` with deep-prompt replacement; also returns kept states."""
        from ..prompts.base import deep_prompt_hook, step_block

        hook = deep_prompt_hook(prompts)
        stop = tower.num_layers if stop is None else stop
        kept = []
        for i in range(start, stop):
            state = hook(i, state)
            state = step_block(tower, i, state, gradient_checkpointing=self.gradient_checkpointing)
            if i in keep:
                kept.append(state.tokens)
        return (state, kept) if keep else state

    def vision_activations(self, pixel_values: Tensor, *, prompts: Sequence[Tensor] | None = None):
        """Run the vision tower up to the deepest extracted block.

        Args:
            pixel_values: ``(B, 3, H, W)``.
            prompts: optional per-depth vision prompts ``[P_0, ..., P_{J-1}]``, each ``(n, D)`` or
                ``(B, n, D)``: ``P_0`` is inserted at embedding time, ``P_i`` replaces the prompt
                slots before block ``i`` (VPT-deep).

        Returns:
            The list of extracted ``(B, N, D)`` hidden states (shallow to deep; prompt slots
            included) and the final state.
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        prompts = list(prompts or ())
        with torch.set_grad_enabled(_needs_grad(self.vision_tower, pixel_values, *prompts)):
            state = self.vision_tower.embed(pixel_values, prompts=prompts[0] if prompts else None)
            state, acts = self._run_blocks(
                self.vision_tower,
                state,
                prompts,
                stop=self.extract_layers[-1] + 1,
                keep=set(self.extract_layers),
            )
        return acts, state

    def _image_features(self, state) -> Tensor:
        """Pooled image embedding ``(B, E)``: finish the vision pass from ``vision_activations``."""
        with torch.set_grad_enabled(_needs_grad(self.vision_tower, state.tokens)):
            state = self._run_blocks(self.vision_tower, state, start=self.extract_layers[-1] + 1)
            return self.vision_tower.pool(state)

    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        conditional_pixel_values: Tensor | None = None,
        conditional_embeddings: Tensor | None = None,
        prompter: Callable[..., Any] | None = None,
        output_decoder_features: bool = False,
    ) -> SegmentationOutput:
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
            conditional_embeddings: ``(T, E)`` or ``(B, C, E)`` condition vectors.
            prompter: a context learner (:mod:`vlsegkit.prompts`): called as ``prompter()`` -- or
                ``prompter(image_features (B, E))`` when ``prompter.needs_image_features`` -- it
                returns per-depth ``text`` / ``vision`` prompts that enter the towers (shared text
                context before every prompt's class words; vision prompts removed before the
                decoder unless ``decoder_sees_prompts``).
            output_decoder_features: also return the decoder's penultimate feature map (the input of
                its final upsampler) as ``extras["decoder_features"]`` ``(B, C, reduce_dim, h, w)``.

        Returns:
            :class:`SegmentationOutput` with ``logits (B, C, H, W)`` and
            ``conditional_embeddings (B, C, E)``.
        """
        b = pixel_values.shape[0] if pixel_values.dim() == 4 else -1
        needs_features = bool(getattr(prompter, "needs_image_features", False))
        learned = prompter() if prompter is not None and not needs_features else None
        acts, state = self.vision_activations(
            pixel_values, prompts=None if learned is None else learned.vision
        )
        if needs_features:
            learned = prompter(self._image_features(state))
            if learned.vision:
                raise ValueError(
                    "a prompter that needs image features cannot prompt the vision tower"
                )
        content_start = state.content_start
        if learned is not None and learned.vision and not learned.decoder_sees_prompts:
            # the decoder reads CLS + the patch grid, exactly as without prompts
            acts = [torch.cat([a[:, : state.num_prefix], a[:, content_start:]], 1) for a in acts]
            content_start = state.num_prefix
        cond, index = self._conditions(
            b,
            prompts,
            input_ids,
            attention_mask,
            conditional_pixel_values,
            conditional_embeddings,
            context=None if learned is None else learned.text,
        )
        c = index.shape[1]
        rows = cond[index.reshape(-1).to(cond.device)]
        if c > 1:
            acts = [a.repeat_interleave(c, dim=0) for a in acts]
        captured: list[Tensor] = []
        handle = None
        if output_decoder_features:
            handle = self.decoder.transposed_convolution.register_forward_pre_hook(
                lambda _module, args: captured.append(args[0])
            )
        try:
            logits = self.decoder(
                acts, rows.to(acts[0].dtype), grid=state.grid, content_start=content_start
            )
        finally:
            if handle is not None:
                handle.remove()
        h, w = logits.shape[-2:]
        extras = None
        if output_decoder_features:
            extras = {"decoder_features": captured[0].view(b, c, *captured[0].shape[1:])}
        return SegmentationOutput(
            logits=logits.view(b, c, h, w),
            conditional_embeddings=rows.view(b, c, -1),
            extras=extras,
        )

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        batch_size: int = 8,
    ) -> Tensor | list[Tensor]:
        """Probabilities for every prompt, at each image's original size.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``), any size.
            prompts: one prompt or a list of C prompts, applied to every image.
            batch_size: images per forward pass.

        Returns:
            ``(C, H, W)`` probabilities for a single image, or a list of them for a list of images.
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, Tensor) and images.dim() == 4
        )
        items = [images] if single else list(images)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ValueError("predict() needs at least one prompt")
        was_training = self.training
        self.eval()
        cond = self.encode_text(prompt_list)
        out: list[Tensor] = []
        for start in range(0, len(items), batch_size):
            pixels, sizes = self.preprocess(items[start : start + batch_size])
            emb = cond[None].expand(pixels.shape[0], -1, -1)
            probs = self(pixels, conditional_embeddings=emb).logits.sigmoid()
            for p, size in zip(probs, sizes):
                out.append(
                    torch.nn.functional.interpolate(
                        p[None], size=size, mode="bilinear", align_corners=False
                    )[0].cpu()
                )
        self.train(was_training)
        return out[0] if single else out

    # ------------------------------------------------------------------ upstream checkpoints
    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "clipseg" and "vlsegkit_format_version" not in config

    @classmethod
    def _from_foreign(cls, id_or_path, config: dict[str, Any], **hub_kwargs) -> CLIPSeg:
        """Build from a transformers ``CLIPSegForImageSegmentation`` folder / repo and convert its weights."""
        from transformers import CLIPSegConfig

        hf = CLIPSegConfig.from_dict(config)
        kwargs: dict[str, Any] = {}
        pre = resolve_file(id_or_path, "preprocessor_config.json", required=False, **hub_kwargs)
        if pre is not None:
            kwargs.update(_preprocessing_from_hf(read_json(pre)))
        model = cls(
            backbone={
                "text_config": hf.text_config.to_dict(),
                "vision_config": hf.vision_config.to_dict(),
                "projection_dim": hf.projection_dim,
            },
            extract_layers=tuple(hf.extract_layers),
            reduce_dim=hf.reduce_dim,
            decoder_num_heads=hf.decoder_num_attention_heads,
            decoder_mlp_dim=hf.decoder_intermediate_size,
            conditional_layer=hf.conditional_layer,
            complex_upsampler=hf.use_complex_transposed_convolution,
            **kwargs,
        )
        state, source = cls._load_weights_file(id_or_path, **hub_kwargs)
        load_state_dict_strict(model, model.convert_hf_state_dict(state), source=source)
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
            if key in self._foreign_keys:
                out[self._foreign_keys[key]] = value
            else:
                out[key] = value
        if not any(k.startswith("decoder.") for k in out):
            raise CheckpointError(
                "this transformers CLIPSeg checkpoint has no decoder weights (decoder.*)"
            )
        return out


def _preprocessing_from_hf(pre: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = pre.get("size")
    if isinstance(size, int):
        out["image_size"] = size
    elif isinstance(size, dict) and "height" in size and "width" in size:
        out["image_size"] = (size["height"], size["width"])
    elif isinstance(size, dict) and "shortest_edge" in size:
        out["image_size"] = size["shortest_edge"]
    if pre.get("image_mean"):
        out["image_mean"] = tuple(pre["image_mean"])
    if pre.get("image_std"):
        out["image_std"] = tuple(pre["image_std"])
    return out


# ---------------------------------------------------------------------- registry
def _clip_b16(**vision_overrides) -> dict[str, Any]:
    return {
        "text_config": dict(
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
        "vision_config": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            num_channels=3, image_size=224, patch_size=16, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, **vision_overrides,
        ),
        "projection_dim": 512,
    }  # fmt: skip


def _tiny_backbone() -> dict[str, Any]:
    return {
        "text_config": dict(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
    return CLIPSeg(backbone=_clip_b16(), reduce_dim=64, complex_upsampler=True, **kwargs)


@register_model(
    "clipseg-rd64",
    hub_id="CIDAS/clipseg-rd64",
    description="CLIPSeg ViT-B/16, reduce_dim 64 (TuneVLSeg's checkpoint)",
)
def clipseg_rd64(**kwargs) -> CLIPSeg:
    return CLIPSeg(backbone=_clip_b16(), reduce_dim=64, **kwargs)


@register_model(
    "clipseg-rd16", hub_id="CIDAS/clipseg-rd16", description="CLIPSeg ViT-B/16, reduce_dim 16"
)
def clipseg_rd16(**kwargs) -> CLIPSeg:
    return CLIPSeg(backbone=_clip_b16(), reduce_dim=16, **kwargs)


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
