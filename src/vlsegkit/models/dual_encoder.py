"""``DualEncoder``: a pair of CLIP-family towers embedding images and texts into one space.

The model contrastive fine-tuning trains and saves (MedCLIP-SAMv2, Koleilat et al. 2025, §3.1:
BiomedCLIP fine-tuned with DHN-NCE), built from any tower spec through
:func:`vlsegkit.encoders.create_towers`: BiomedCLIP (open_clip: timm ViT-B/16 + PubMedBERT), OpenAI
CLIP (transformers ``CLIPModel``), or any open_clip model. It outputs no masks: ``forward`` returns
the projected image / text embeddings (the pooled [CLS] / [EOS] tokens after the final norm and
projection, as in the paper's footnote 1) and their similarity logits.

Loading pretrained towers:

* ``VLSM.from_pretrained("openai/clip-vit-base-patch16")`` (any transformers ``CLIPModel`` folder or
  Hub repository) converts it on load;
* ``DualEncoder.from_open_clip("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")`` reads an
  open_clip repository (``open_clip_config.json`` + its weights), BiomedCLIP included;
* ``save_pretrained`` / ``VLSM.from_pretrained`` round-trip a fine-tuned model in vlsegkit's format,
  and :meth:`DualEncoder.upstream_state_dict` gives the weights back in the upstream layout (load
  them into ``open_clip`` / ``transformers`` with ``load_state_dict``).

Hooks act inside the towers as in every model built from towers (prompt learners, adapters), except
those that condition a text on an image (CoCoOp, PVL adapters): a dual encoder embeds its images
and its texts independently, so that any image can be compared with any text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.factory import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    OpenCLIPSpec,
    TowerSpec,
    TransformersCLIPSpec,
    create_towers,
    tower_spec_from_dict,
)
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.runner import embed_tower, run_towers
from ..hub import (
    CheckpointError,
    empty_weights,
    load_checkpoint_file,
    load_state_dict_strict,
    read_json,
    resolve_file,
)
from ..registry import register_model
from ._backbones import biomedclip, hf_clip_vit_b16, tiny_open_clip
from .base import (
    VLSM,
    ImageInput,
    LazyTokenizer,
    _as_image_list,
    check_pixels,
    eval_mode,
    preprocessing_from_hf,
)

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["DualEncoder", "DualEncoderOutput"]

#: CLIP's initial temperature 0.07, as ``logit_scale = log(1 / 0.07)`` (Radford et al. 2021).
_CLIP_LOGIT_SCALE = math.log(1 / 0.07)
# Upstream keys without a counterpart here: position-id buffers older transformers versions wrote.
_IGNORED_UPSTREAM_SUFFIXES = ("position_ids",)
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


@dataclass
class DualEncoderOutput:
    """What :class:`DualEncoder` returns.

    Attributes:
        logits: ``(B, T)`` similarity logits ``exp(logit_scale) · cos(image_b, text_t)`` of every
            image with every text.
        image_embeds: ``(B, E)`` projected image embeddings (not normalised).
        text_embeds: ``(T, E)`` projected text embeddings (not normalised), one row per text in
            the order given (repeated texts keep their rows).
    """

    logits: Tensor
    image_embeds: Tensor
    text_embeds: Tensor


def _keeps(hooks: Sequence[TowerHook], tower: str) -> list[int]:
    return sorted({i for h in hooks if tower in h.towers for i in h.keep_layers(tower)})


def _check_independent(hooks: Sequence[TowerHook]) -> None:
    for hook in hooks:
        if hook.lockstep or hook.pairs_text_with_images or hook.needs_image_features:
            raise ValueError(
                f"{type(hook).__name__} conditions texts on images (one text row per image), but a "
                "DualEncoder embeds images and texts independently so that any image can be "
                "compared with any text; use a hook that acts on one tower at a time (CoOp, VPT, "
                "MaPLe, bottleneck adapters)"
            )


class DualEncoder(LazyTokenizer, VLSM):
    """Image and text towers into one joint space, for retrieval and contrastive fine-tuning.

    Forward pass::

        v = vision.pool(run_towers(vision.embed(x)))      # (B, E) [CLS] after norm + projection
        t = text.pool(run_towers(text.embed(texts)))      # (T, E) [EOS] / BERT [CLS]
        logits = exp(logit_scale) · normalize(v) normalize(t)ᵀ        # (B, T)

    Both towers train by default: MedCLIP-SAMv2 fine-tunes BiomedCLIP end to end (its released
    script locks neither tower). ``logit_scale`` is CLIP's temperature, kept as a buffer at its
    loaded value: it scales ``logits`` (and ``predict``), while the DHN-NCE family uses its own fixed
    ``τ`` (in the released script ``logit_scale`` gets no gradient either). A parameter no loss
    reaches would also stall DDP's gradient reduction.

    Args:
        backbone: tower spec (:class:`~vlsegkit.encoders.OpenCLIPSpec` /
            :class:`~vlsegkit.encoders.TransformersCLIPSpec` or its dict); the towers must share the
            joint width ``E``.
        context_length: maximum text length (default ``min(256, max positions)`` for BERT towers,
            BiomedCLIP's 256; the position table length, 77, for CLIP text towers).
        tokenizer: tokenizer folder or Hub id (:func:`vlsegkit.tokenizers.load_tokenizer`; for
            BiomedCLIP its own repository), resolved on first use. None means open_clip's bundled
            OpenAI BPE for CLIP text towers; BERT towers then need ``input_ids``.
        image_size: ``(H, W)`` (or one int) ``predict`` resizes images to.
        image_mean, image_std: normalisation used by ``predict`` / ``preprocess`` (OpenAI CLIP's, as
            the paper uses for BiomedCLIP).
        freeze_backbone: freeze both towers (only hooks then train).
        hooks: hooks the model owns (trained and saved with it), acting on one tower at a time.

    Shapes:
        ``forward(pixel_values (B, 3, H, W), texts (T strings))`` -> :class:`DualEncoderOutput`
        with ``logits (B, T)``, ``image_embeds (B, E)``, ``text_embeds (T, E)``; H and W multiples
        of the patch size.
    """

    model_type = "dual_encoder"

    _tokenizer_hint = BIOMEDCLIP_ID

    def __init__(
        self,
        *,
        backbone: dict[str, Any] | TowerSpec,
        context_length: int | None = None,
        tokenizer: str | None = None,
        image_size: int | Sequence[int] = 224,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        freeze_backbone: bool = False,
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        super().__init__()
        self._init_tokenizer(tokenizer)
        self._spec = tower_spec_from_dict(backbone)
        self._set_config_arg(backbone=self._spec.to_dict())
        towers = create_towers(self._spec)
        self.vision_tower, self.text_tower = towers.vision, towers.text
        self._make_tokenizer = towers.make_tokenizer
        if self.vision_tower.embed_dim != self.text_tower.embed_dim:
            raise ValueError(
                "the towers must share the joint width, got vision "
                f"{self.vision_tower.embed_dim} and text {self.text_tower.embed_dim}"
            )
        self.register_buffer("logit_scale", torch.tensor(_CLIP_LOGIT_SCALE))
        # upstream names (CLIPModel / open_clip keys) -> ours, for conversions both ways
        self._upstream_keys = {
            upstream: ("vision_tower." if ours.startswith("vision.") else "text_tower.")
            + ours.split(".", 1)[1]
            for upstream, ours in towers.upstream_keys.items()
        }
        self._upstream_keys["logit_scale"] = "logit_scale"
        max_positions = int(self.text_tower.max_positions)
        if context_length is None:
            bert = isinstance(self._spec, OpenCLIPSpec) and self._spec.has_bert_text
            context_length = min(256, max_positions) if bert else max_positions
        if (
            isinstance(context_length, bool)
            or not isinstance(context_length, int)
            or not 2 <= context_length <= max_positions
        ):
            raise ValueError(
                f"context_length must be an int in [2, {max_positions}] (the text position "
                f"table), got {context_length!r}"
            )
        self.context_length = context_length
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(size[0]), int(size[1]))
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        #: Recompute tower block activations in backward instead of storing them.
        self.gradient_checkpointing = False
        if freeze_backbone:
            self.freeze_backbone()
        self.hooks = self._bind_hooks(hooks)

    # ------------------------------------------------------------------ parts
    def hook_slots(self) -> HookSlots:
        """Both towers; the final vision block (what ``pool`` reads) is the kept block, the text
        embedding is the conditioning vector, and texts are never paired with images."""
        return HookSlots(
            towers={"vision": self.vision_tower, "text": self.text_tower},
            kept={"vision": (self.vision_tower.num_layers - 1,)},
            condition_dim=self.text_tower.embed_dim,
            tokenizer=self._maybe_tokenizer(),
            lockstep=False,
        )

    def check_hooks(self, hooks: Sequence[TowerHook], *, frozen: bool = False) -> None:
        """Refuse hooks that condition texts on images (CoCoOp, PVL adapters), owned or attached:
        a dual encoder embeds images and texts independently."""
        _check_independent(hooks)

    def default_task(self) -> Task:
        """MedCLIP-SAMv2's fine-tuning: :class:`~vlsegkit.contrastive.ContrastiveTask` with
        :class:`~vlsegkit.losses.DHNNCELoss` (τ 0.6, β1 = β2 = 0.15, the paper's eqs. 9-13)."""
        from ..contrastive import ContrastiveTask
        from ..losses import DHNNCELoss

        return ContrastiveTask(loss=DHNNCELoss())

    def _hooks(self, extra: Sequence[TowerHook]) -> tuple[TowerHook, ...]:
        hooks = self._run_hooks(extra)
        _check_independent(hooks)
        return hooks

    # ------------------------------------------------------------------ encoders
    def _image_rows(self, pixel_values: Tensor, hooks, ctx: RunContext) -> Tensor:
        state = embed_tower("vision", self.vision_tower, pixel_values, hooks=hooks, ctx=ctx)
        last = self.vision_tower.num_layers - 1
        run = run_towers(
            {"vision": self.vision_tower},
            {"vision": state},
            hooks=hooks,
            ctx=ctx,
            keep={"vision": [last]},
            gradient_checkpointing=self.gradient_checkpointing,
        )
        # the kept final state, as the hooks present it (e.g. with its prompt slots removed)
        return self.vision_tower.pool(run.kept["vision"][last])

    def _text_rows(self, ids: Tensor, mask: Tensor | None, hooks, ctx: RunContext) -> Tensor:
        state = embed_tower("text", self.text_tower, ids, mask, hooks=hooks, ctx=ctx)
        keep = _keeps(hooks, "text")
        run = run_towers(
            {"text": self.text_tower},
            {"text": state},
            hooks=hooks,
            ctx=ctx,
            keep={"text": keep} if keep else None,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        embeds = self.text_tower.pool(run.states["text"])
        for hook in hooks:
            embeds = hook.condition(embeds, ctx)
        return embeds

    def tokenize(self, texts: str | Sequence[str], *, reserve: int = 0) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, L)`` as ``forward`` tokenises texts, on the
        model's device: the tensor-only pass ``forward(pixel_values, input_ids=...,
        attention_mask=...)`` is what ``torch.compile(model, fullgraph=True)`` captures whole.

        Args:
            texts: one string or T strings.
            reserve: text positions left free for context tokens hooks insert.
        """
        rows = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(rows, context_length=self.context_length, reserve=reserve)
        device = next(self.text_tower.parameters()).device
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def _token_rows(self, texts, input_ids, attention_mask, hooks, device) -> tuple[Tensor, Any]:
        if (texts is None) == (input_ids is None):
            raise ValueError("pass exactly one of texts or input_ids")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
                shape = getattr(input_ids, "shape", type(input_ids).__name__)
                raise ValueError(f"input_ids must be a (T, L) tensor with T, L >= 1, got {shape}")
            if attention_mask is not None and (
                not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
            ):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}"
                )
            ids, mask = input_ids, attention_mask
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask goes with input_ids, not with texts")
            rows = [texts] if isinstance(texts, str) else texts
            if (
                not isinstance(rows, (list, tuple))
                or not rows
                or not all(isinstance(t, str) for t in rows)
            ):
                raise ValueError(
                    "texts must be a string or a non-empty list of strings (one row per text), "
                    f"got {type(texts).__name__}"
                )
            reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
            batch = self.tokenizer(list(rows), context_length=self.context_length, reserve=reserve)
            ids, mask = batch.input_ids, batch.attention_mask
        return ids.to(device), None if mask is None else mask.to(device)

    def encode_image(self, pixel_values: Tensor, *, hooks: Sequence[TowerHook] = ()) -> Tensor:
        """Projected image embeddings ``(B, E)`` (unnormalised) of normalised pixels
        ``(B, 3, H, W)``, with the model's own hooks and ``hooks``."""
        hooks = self._hooks(hooks)
        return self._image_rows(check_pixels(pixel_values), hooks, RunContext())

    def encode_text(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
    ) -> Tensor:
        """Projected text embeddings ``(T, E)`` (unnormalised) of T strings or token ids ``(T, L)``."""
        hooks = self._hooks(hooks)
        ids, mask = self._token_rows(texts, input_ids, attention_mask, hooks, self._device())
        return self._text_rows(ids, mask, hooks, RunContext())

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """``exp(logit_scale) · cos`` ``(B, T)`` of image embeddings ``(B, E)`` and text embeddings
        ``(T, E)`` (CLIP's ``logits_per_image``)."""
        for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.embed_dim:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be an (N, {self.embed_dim}) tensor, got {shape}")
        cos = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
        return self.logit_scale.exp().to(cos.dtype) * cos

    @property
    def embed_dim(self) -> int:
        """Width ``E`` of the joint embedding space."""
        return int(self.vision_tower.embed_dim)

    def forward(
        self,
        pixel_values: Tensor,
        texts: str | Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
    ) -> DualEncoderOutput:
        """Embed B images and T texts and score every image with every text.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
            texts: one string or a list of T strings (for contrastive training, T = B captions
                with caption ``i`` describing image ``i``).
            input_ids, attention_mask: pre-tokenised texts ``(T, L)`` instead of strings (e.g. for
                a BERT tower without a tokenizer).
            hooks: further :class:`~vlsegkit.encoders.TowerHook` s bound to this model.

        Returns:
            :class:`DualEncoderOutput` with ``logits (B, T)``, ``image_embeds (B, E)`` and
            ``text_embeds (T, E)``.
        """
        hooks = self._hooks(hooks)
        pixel_values = check_pixels(pixel_values)
        ids, mask = self._token_rows(texts, input_ids, attention_mask, hooks, pixel_values.device)
        ctx = RunContext()  # one context: hooks acting on both towers memoise their prompts once
        image_embeds = self._image_rows(pixel_values, hooks, ctx)
        text_embeds = self._text_rows(ids, mask, hooks, ctx)
        return DualEncoderOutput(
            logits=self.similarity(image_embeds, text_embeds),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        *,
        batch_size: int = 8,
        hooks: Sequence[TowerHook] = (),
    ) -> Tensor:
        """Zero-shot classification: the softmax over ``texts`` of each image's logits.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``), any
                size; resized to ``image_size`` and normalised.
            texts: T class descriptions, shared by every image.
            batch_size: images per forward pass.
            hooks: hooks to run besides the model's own (a :class:`~vlsegkit.TunedModel`'s).

        Returns:
            ``(T,)`` probabilities for a single image, ``(N, T)`` for a list of N images. The
            train / eval mode is restored afterwards.
        """
        single, items = _as_image_list(images)
        out = []
        with eval_mode(self):
            text_embeds = self.encode_text(texts, hooks=hooks)
            for _, pixels, _ in self.image_chunks(items, batch_size):
                logits = self.similarity(self.encode_image(pixels, hooks=hooks), text_embeds)
                out.append(logits.softmax(dim=-1).cpu())
        probs = torch.cat(out)
        return probs[0] if single else probs

    # ------------------------------------------------------------------ upstream layouts
    def upstream_state_dict(self) -> dict[str, Tensor]:
        """The weights under the upstream model's names (open_clip ``CLIP`` / ``CustomTextCLIP``
        keys, or transformers ``CLIPModel`` keys), ``logit_scale`` included: load them into the
        upstream model with ``load_state_dict`` (e.g. MedCLIP-SAMv2's ``convert.py`` reads an
        open_clip state dict). Hooks the model owns have no upstream counterpart and are left out.
        """
        ours = self.state_dict()
        # (non-persistent buffers such as position ids are in neither state dict)
        return {up: ours[key] for up, key in self._upstream_keys.items() if key in ours}

    def load_upstream_state_dict(
        self, state: dict[str, Tensor], *, source: str = "", assign: bool = False
    ) -> None:
        """Load an upstream state dict (the names :meth:`upstream_state_dict` gives) strictly.

        A ``module.`` / ``model.`` prefix (checkpoints saved from a DDP or other wrapper, e.g. an
        open_clip training checkpoint's ``state_dict``) and legacy ``position_ids`` buffers are
        dropped; a missing ``logit_scale`` keeps the current value.

        ``assign=True`` takes the given tensors instead of copying them (a model built with
        :func:`~vlsegkit.hub.empty_weights`, loading a memory-mapped file: one copy of the weights).

        Raises:
            CheckpointError: missing, unexpected or mis-shaped tensors (named).
        """
        converted: dict[str, Tensor] = {}
        for key, value in state.items():
            for prefix in ("module.", "model."):
                key = key.removeprefix(prefix)
            if key.endswith(_IGNORED_UPSTREAM_SUFFIXES):
                continue
            converted[self._upstream_keys.get(key, key)] = value
        if "logit_scale" not in converted:
            converted["logit_scale"] = self.logit_scale.clone()
        for name, tensor in self.state_dict().items():  # model-owned hooks are not upstream parts
            if not name.startswith(("vision_tower.", "text_tower.", "logit_scale")):
                converted.setdefault(name, tensor)
        if "logit_scale" in converted and converted["logit_scale"].dim() == 1:
            converted["logit_scale"] = converted["logit_scale"].reshape(())
        load_state_dict_strict(
            self, converted, source=source or "upstream state dict", assign=assign
        )

    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "clip" and "vlsegkit_format_version" not in config

    @classmethod
    def _from_foreign(cls, id_or_path, config: dict[str, Any], **hub_kwargs) -> DualEncoder:
        """Build from a transformers ``CLIPModel`` folder / Hub repository and convert its weights."""
        kwargs = preprocessing_from_hf(id_or_path, **hub_kwargs)
        spec = TransformersCLIPSpec.from_hf_config(config)
        state, source = cls._load_weights_file(id_or_path, **hub_kwargs)
        with empty_weights():  # the weights come from the (memory-mapped) file, not copied
            model = cls(backbone=spec.to_dict(), **kwargs)
        model.load_upstream_state_dict(state, source=source, assign=True)
        return model

    @classmethod
    def from_open_clip(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> DualEncoder:
        """Load an open_clip model repository or folder, e.g. BiomedCLIP.

        Reads ``open_clip_config.json`` (``model_cfg`` -> the tower spec, ``preprocess_cfg`` -> the
        normalisation, ``text_cfg.context_length``), the ``config.json`` of a Hugging Face text
        encoder it names (``hf_model_name``, e.g. PubMedBERT), and the weights
        (``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin`` loaded with
        ``weights_only=True``). The tokenizer is the repository's own (``load_tokenizer``).

        Args:
            name_or_path: Hub repository id or local folder (e.g. :data:`BIOMEDCLIP_ID`).
            revision, cache_dir, local_files_only, token: Hub options.
            **overrides: constructor arguments to change (e.g. ``freeze_backbone=True``).

        Returns:
            The model in eval mode.
        """
        kw = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        config_path = resolve_file(name_or_path, "open_clip_config.json", **kw)
        config = read_json(config_path)
        model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
        if not isinstance(model_cfg, dict):
            raise CheckpointError(f"{config_path} has no 'model_cfg' object")
        text_cfg = model_cfg.get("text_cfg") or {}
        bert_config = None
        if text_cfg.get("hf_model_name"):
            # the text encoder's architecture lives in its own repository (revision: its default)
            hf_kw = {k: v for k, v in kw.items() if k != "revision"}
            bert_config = read_json(resolve_file(text_cfg["hf_model_name"], "config.json", **hf_kw))
        try:
            spec = OpenCLIPSpec.from_open_clip_config(model_cfg, bert_config=bert_config)
        except ValueError as e:
            raise CheckpointError(f"{config_path}: {e}") from e
        pre = config.get("preprocess_cfg") or {}
        args: dict[str, Any] = {"backbone": spec.to_dict(), "tokenizer": str(name_or_path)}
        vision_size = model_cfg.get("vision_cfg", {}).get("image_size")
        if vision_size is not None:
            args["image_size"] = vision_size
        if text_cfg.get("context_length"):
            args["context_length"] = int(text_cfg["context_length"])
        if pre.get("mean"):
            args["image_mean"] = tuple(pre["mean"])
        if pre.get("std"):
            args["image_std"] = tuple(pre["std"])
        hooks = overrides.pop("hooks", ())
        for name in _OPEN_CLIP_WEIGHTS:
            path = resolve_file(name_or_path, name, required=False, **kw)
            if path is not None:
                state = load_checkpoint_file(path, check_in_background=True)
                with empty_weights():  # one copy of the weights: the file's, assigned
                    model = cls(**{**args, **overrides})
                model.load_upstream_state_dict(state, source=str(path), assign=True)
                if hooks:  # model-owned hooks start fresh on the loaded towers
                    model.hooks = model._bind_hooks(hooks)
                    model._set_config_arg(hooks=list(model.hooks))
                return model._mark_source(name_or_path, revision).eval()
        raise CheckpointError(
            f"no open_clip weights in {name_or_path}: expected one of {list(_OPEN_CLIP_WEIGHTS)}"
        )


# ---------------------------------------------------------------------- registry
@register_model(
    "biomedclip-vit-b16",
    description="BiomedCLIP (timm ViT-B/16 + PubMedBERT-256) as a dual encoder, MedCLIP-SAMv2's "
    "fine-tuning base; weights: DualEncoder.from_open_clip(BIOMEDCLIP_ID)",
)
def biomedclip_vit_b16(**kwargs) -> DualEncoder:
    defaults = dict(backbone=biomedclip(), context_length=256, tokenizer=BIOMEDCLIP_ID)
    return DualEncoder(**{**defaults, **kwargs})


@register_model(
    "clip-vit-b16",
    hub_id="openai/clip-vit-base-patch16",
    description="OpenAI CLIP ViT-B/16 (transformers CLIPModel) as a dual encoder",
)
def clip_vit_b16(**kwargs) -> DualEncoder:
    backbone = {"kind": "transformers_clip", "model": "clip", **hf_clip_vit_b16()}
    return DualEncoder(**{"backbone": backbone, **kwargs})


@register_model(
    "dual-encoder-tiny",
    description="A tiny random dual encoder (open_clip ViT + CLIP BPE text, width 64) for tests",
)
def dual_encoder_tiny(**kwargs) -> DualEncoder:
    backbone = tiny_open_clip()
    return DualEncoder(**{"backbone": backbone, "image_size": 64, **kwargs})
