"""MedCLIPSeg: frozen CLIP towers fused by probabilistic PVL adapters, with MC uncertainty.

Koleilat, Asgariandehkordi, Nejati Manzari, Barile, Xiao and Rivaz, "MedCLIPSeg: Probabilistic
Vision-Language Adaptation for Data-Efficient and Generalizable Medical Image Segmentation" (CVPR 2026,
arXiv 2602.20423), section 3; official code ``HealthX-Lab/MedCLIPSeg`` (Apache-2.0). The model is a
short composition of vlsegkit parts:

* two frozen towers from :func:`vlsegkit.encoders.create_towers`, stepped together by the one runner;
* :class:`~vlsegkit.adapters.PVLAdapters`, a hook with one :class:`~vlsegkit.layers.PVLAdapter` before
  each configured block (eqs. 3-17; default blocks ``1 .. L-2`` 0-indexed, i.e. 1..10 of 12);
* :class:`~vlsegkit.layers.PixelTextHead` (eqs. 18-19);
* the loss ``0.5 Dice + 0.5 BCE + 0.1 L_SoftCon`` (eq. 23): :class:`~vlsegkit.losses.MedCLIPSegLoss`,
  the model's default task;
* Monte Carlo inference (section 3.2 / Appendix G) through :mod:`vlsegkit.uncertainty`.

Any other hook (prompt learners, bottleneck adapters) composes with the PVL adapters. Released
checkpoints load with :meth:`MedCLIPSeg.from_released` (:mod:`vlsegkit.models.medclipseg_released`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..adapters.pvl import IDENTICAL_COPIES, PVLAdapters
from ..encoders.base import TokenState
from ..encoders.factory import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    OpenCLIPSpec,
    TowerSpec,
    create_towers,
    tower_spec_from_dict,
)
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.runner import Checkpointing, embed_tower, run_towers
from ..encoders.text_cache import TextCache, unique_token_rows
from ..hub import empty_weights, load_state_dict_strict, resolve_file
from ..layers import PixelTextHead
from ..registry import register_model
from ..uncertainty import UncertaintyOutput, monte_carlo_predict, pair_generators
from ._backbones import tiny_open_clip
from .base import (
    VLSM,
    ImageInput,
    LazyTokenizer,
    check_pixels,
    check_token_rows,
    pair_rows,
    parse_text_prompts,
    preprocessing_args,
)
from .medclipseg_released import (
    RELEASED_KEY_MAP,
    convert_released_state_dict,
    load_released_state_dict,
    released_checkpoint_name,
)
from .outputs import MedCLIPSegOutput

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = [
    "RELEASED_KEY_MAP",
    "MedCLIPSeg",
    "MedCLIPSegPrefix",
    "released_checkpoint_name",
]

BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

TextPadding = Literal["max_length", "longest"]
FrozenTowersMode = Literal["eval", "train"]


@dataclass
class MedCLIPSegPrefix:
    """The sampling-independent part of a forward pass, shared by every Monte Carlo sample.

    Attributes:
        vision: vision ``TokenState`` ``(B, N, D_v)`` after blocks ``0 .. start - 1`` (one row per image).
        text: text ``TokenState`` ``(T, M, D_t)`` after blocks ``0 .. start - 1``.
        index: ``(B, C)`` long, the text row of output channel ``c`` of image ``b``.
        start: first block that depends on the pairing of images with prompts (the first adapter).
        image_size: ``(H, W)`` of the input pixels (the logits' resolution).
        hooks: every hook of the pass (the model's PVL adapters, its own hooks, the call's).
        ctx: the pass's :class:`~vlsegkit.encoders.RunContext` (memoised prompts).
        text_key_mask: ``(T, M)`` bool padding mask the adapters apply to text keys, or None when
            they attend to every text position (the released 256-token padding).
    """

    vision: TokenState
    text: TokenState
    index: Tensor
    start: int
    image_size: tuple[int, int]
    hooks: tuple[TowerHook, ...] = ()
    ctx: RunContext | None = None
    text_key_mask: Tensor | None = None


def _keeps(hooks: Sequence[TowerHook], tower: str) -> list[int]:
    return sorted({i for h in hooks if tower in h.towers for i in h.keep_layers(tower)})


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MedCLIPSeg(LazyTokenizer, VLSM):
    """MedCLIPSeg: frozen vision / text towers, PVL adapters between their layers, pixel-text head.

    Forward pass (Koleilat et al. 2026, eqs. 3-19), with ``V`` / ``T`` the residual streams::

        V, T = vision.embed(x), text.embed(prompt)
        for i in range(L):                           # the runner, towers in lockstep
            if i in layers:                          # adapter n sits before block i
                V, T = PVLAdapter_n(V, T)            # eqs. 3, 14-17 (values sampled, eq. 10)
            V, T = vision.block(i, V), text.block(i, T)
        Z_v = vision.dense(V)                        # (P, E) patch tokens in the joint space
        z_t = text.pool(T)                           # global text token ([EOS] / BERT [CLS])
        logits = Upsample_{HxW}(psi(norm(Z_v)) . phi(norm(z_t)))     # eqs. 18-19

    The text stream interacts with the image, so every (image, prompt) pair runs its own lockstep
    pass after the first adapter (the blocks before it run once per image and once per distinct
    prompt). Values are sampled in eval mode too (the paper's Monte Carlo inference); pass
    ``sample=False`` or build with ``deterministic=True`` for the value means.

    Defaults vs the released code (each released behaviour is a named option, all set by
    :meth:`released_config` / :meth:`from_released`):

    * ``text_padding="longest"``: prompts are padded to the batch's longest and padded text keys are
      masked in the adapters, so a prediction does not depend on the rest of the batch, and a
      10-30 token prompt costs 10-30 positions instead of 256 (released: ``"max_length"``).
    * ``frozen_towers="eval"``: ``model.train()`` leaves the frozen towers in eval mode (no dropout
      inside the frozen BERT; released: ``"train"``, dropout active while training).
    * ``gradient_checkpointing="auto"`` (a runtime attribute): the frozen blocks between and after
      the adapters are recomputed in backward when their stored activations would exceed
      :data:`vlsegkit.encoders.runner.AUTO_CHECKPOINT_BYTES` (2 GiB; full size at batch 8 stays
      below, so the default step is not slowed down).

    Args:
        backbone: tower spec (:class:`~vlsegkit.encoders.OpenCLIPSpec` /
            :class:`~vlsegkit.encoders.TransformersCLIPSpec` or its dict). Both towers must have the
            same depth ``L`` and the same joint width ``E``.
        layers: blocks (0-indexed) preceded by an adapter; default ``1 .. L-2``. ``()`` gives the
            adapter-free "EoMT-CLIP" ablation.
        adapter_dim: shared adapter width ``D_s`` (256).
        adapter_heads: PVL attention heads (1 as released).
        beta: confidence penalty ``beta`` of eq. 8 (2.35).
        kv_norm: LayerNorm on the key / value means (not in the paper; needed by the released
            checkpoints, see :meth:`released_config`).
        var_eps: floor added to the softplus variances (1e-6 as released).
        gate_init: initial gate logit (0 -> g = 0.5; the released Covid19 config uses -0.02).
        deterministic: adapters use the value means unless ``sample=True`` is passed.
        num_upscale: ×2 ScaleBlocks in ``psi`` (2: 14x14 -> 56x56 for ViT-B/16 at 224).
        text_padding: ``"longest"`` (default) pads to the batch's longest prompt and masks padded
            text keys in the adapters, so the output does not depend on what else is in the batch
            (and is much cheaper); ``"max_length"`` pads every prompt to ``context_length`` and lets
            the adapters attend to the padding, as released (T_t = 256 for BERT).
        context_length: text length (default ``min(256, max positions)`` for BERT, the position
            table length -- 77 -- for CLIP text towers).
        tokenizer: tokenizer folder or Hub id (:func:`vlsegkit.tokenizers.load_tokenizer`), resolved
            on first use. None means open_clip's bundled OpenAI BPE for CLIP text towers; BERT
            towers then need ``input_ids`` (or assign ``model.tokenizer``).
        image_size: ``(H, W)`` (or one int) ``predict`` resizes images to.
        image_mean, image_std: normalisation used by ``predict`` / ``preprocess``.
        channel_order: ``"RGB"``, or ``"BGR"`` to feed channels reversed (the released checkpoints
            were trained on OpenCV's BGR images with ImageNet statistics).
        freeze_backbone: freeze both towers (MedCLIPSeg trains only the adapters and the head).
        frozen_towers: ``"eval"`` (default) keeps a tower without trainable parameters in eval mode
            when the model is put in train mode, so no dropout runs inside the frozen encoders;
            ``"train"`` lets it follow ``model.train()`` as the released code does (BERT's dropout
            active while training; measured in the issue: 2% slower and 0.9 GiB more at full size).
        hooks: further hooks the model owns (e.g. ``[MaPLe(depth=3)]``), acting with the adapters.

    Attributes:
        gradient_checkpointing: ``"auto"`` (default), True or False; see
            :func:`vlsegkit.encoders.run_towers` (a runtime switch, not saved in the config).
        text_cache: an optional :class:`~vlsegkit.encoders.text_cache.TextCache` (None by default)
            reusing each prompt's text prefix (embedding and the blocks before the first adapter)
            across calls while the text tower is frozen and no other hook acts on it.

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts)`` -> ``logits (B, C, H, W)``, H and W
    multiples of the patch size.
    """

    model_type = "medclipseg"

    _tokenizer_hint = BIOMEDBERT_ID

    def __init__(
        self,
        *,
        backbone: dict[str, Any] | TowerSpec,
        layers: Sequence[int] | None = None,
        adapter_dim: int = 256,
        adapter_heads: int = 1,
        beta: float = 2.35,
        kv_norm: bool = False,
        var_eps: float = 1e-6,
        gate_init: float = 0.0,
        deterministic: bool = False,
        num_upscale: int = 2,
        text_padding: TextPadding = "longest",
        context_length: int | None = None,
        tokenizer: str | None = None,
        image_size: int | Sequence[int] = 224,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        channel_order: Literal["RGB", "BGR"] = "RGB",
        freeze_backbone: bool = True,
        frozen_towers: FrozenTowersMode = "eval",
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        super().__init__()
        if frozen_towers not in ("eval", "train"):
            raise ValueError(f"frozen_towers must be 'eval' or 'train', got {frozen_towers!r}")
        self.frozen_towers: str = frozen_towers
        if text_padding not in ("max_length", "longest"):
            raise ValueError(
                f"text_padding must be 'max_length' or 'longest', got {text_padding!r}"
            )
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        self._init_tokenizer(tokenizer)
        self._spec = tower_spec_from_dict(backbone)
        self._set_config_arg(backbone=self._spec.to_dict())
        towers = create_towers(self._spec)
        self.vision_tower, self.text_tower = towers.vision, towers.text
        self._make_tokenizer = towers.make_tokenizer
        depth = self.vision_tower.num_layers
        if self.text_tower.num_layers != depth:
            raise ValueError(
                f"the towers must have the same depth to run in lockstep, got vision {depth} and "
                f"text {self.text_tower.num_layers} blocks"
            )
        embed_dim = self.vision_tower.embed_dim
        if self.text_tower.embed_dim != embed_dim:
            raise ValueError(
                f"the towers must share the joint width, got vision {embed_dim} and text "
                f"{self.text_tower.embed_dim}"
            )
        self.deterministic = bool(deterministic)
        self.text_padding: str = text_padding
        self.pvl_adapters = PVLAdapters(
            layers=layers,
            dim=_positive_int(adapter_dim, "adapter_dim"),
            num_heads=_positive_int(adapter_heads, "adapter_heads"),
            beta=beta,
            kv_norm=kv_norm,
            var_eps=var_eps,
            gate_init=gate_init,
            deterministic=deterministic,
            mask_text_padding=text_padding == "longest",
        ).bind(self._slots())
        self.layers = self.pvl_adapters.adapter_layers
        self.head = PixelTextHead(dim=embed_dim, num_upscale=num_upscale)
        max_positions = int(self.text_tower.max_positions)
        if context_length is None:
            context_length = (
                min(256, max_positions)
                if isinstance(self._spec, OpenCLIPSpec) and self._spec.has_bert_text
                else max_positions
            )
        if not 2 <= int(context_length) <= max_positions:
            raise ValueError(
                f"context_length must be in [2, {max_positions}] (the text position table), "
                f"got {context_length}"
            )
        self.context_length = int(context_length)
        self.image_size, self.image_mean, self.image_std = preprocessing_args(
            image_size, image_mean, image_std
        )
        self.channel_order: str = channel_order
        #: Recompute frozen tower blocks in backward instead of storing their activations:
        #: ``"auto"`` above a size (see the class docstring), True or False.
        self.gradient_checkpointing: Checkpointing = "auto"
        #: Optional cache of each prompt's text prefix across calls (see the class docstring).
        self.text_cache: TextCache | None = None
        if freeze_backbone:
            self.freeze_backbone()
        self.hooks = self._bind_hooks(hooks)
        self.train(self.training)

    # ------------------------------------------------------------------ modes
    def _frozen_towers(self) -> list[torch.nn.Module]:
        return [
            tower
            for tower in (self.vision_tower, self.text_tower)
            if not any(p.requires_grad for p in tower.parameters())
        ]

    def train(self, mode: bool = True) -> MedCLIPSeg:
        """Set train / eval mode; with ``frozen_towers="eval"`` the frozen towers stay in eval mode.

        A tower counts as frozen when none of its parameters requires gradients (checked now; call
        ``train()`` again after changing ``requires_grad`` by hand -- :meth:`freeze_backbone` does).
        """
        super().train(mode)
        if mode and self.frozen_towers == "eval":
            for tower in self._frozen_towers():
                tower.eval()
        return self

    def freeze_backbone(self, frozen: bool = True) -> MedCLIPSeg:
        """Freeze (or unfreeze) both towers and re-apply the train / eval rule above."""
        super().freeze_backbone(frozen)
        if hasattr(self, "frozen_towers"):
            self.train(self.training)
        return self

    # ------------------------------------------------------------------ parts
    def _slots(self, tokenizer: Any = None) -> HookSlots:
        depth = self.vision_tower.num_layers
        return HookSlots(
            towers={"vision": self.vision_tower, "text": self.text_tower},
            kept={"vision": (depth - 1,)},
            condition_dim=self.vision_tower.embed_dim,
            tokenizer=tokenizer,
        )

    def hook_slots(self) -> HookSlots:
        """Towers, the final vision block (what the pixel-text head reads) and the text-token width."""
        return self._slots(self._maybe_tokenizer())

    def default_task(self) -> Task:
        """MedCLIPSeg's objective: ``0.5 Dice + 0.5 BCE + 0.1 SoftCon`` (eq. 23)."""
        from ..losses import MedCLIPSegLoss
        from ..tasks import SegmentationTask

        return SegmentationTask(loss=MedCLIPSegLoss())

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> channels reversed if ``channel_order="BGR"``, normalised."""
        if self.channel_order == "BGR":
            images = images.flip(-3)
        return super().normalize(images)

    def is_sampling(self, sample: bool | None) -> bool:
        """Whether a pass samples the adapter values (``sample``, else ``not deterministic``)."""
        return (not self.deterministic) if sample is None else bool(sample)

    # ------------------------------------------------------------------ text rows
    def tokenize(self, prompts: Sequence[str], *, reserve: int = 0) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, L)`` with this model's padding rule.

        Args:
            prompts: T strings.
            reserve: text positions left free for context tokens hooks insert.
        """
        padding = "max_length" if self.text_padding == "max_length" else "longest"
        batch = self.tokenizer(
            list(prompts), context_length=self.context_length, padding=padding, reserve=reserve
        )
        return batch.input_ids, batch.attention_mask

    def _text_rows(self, batch, prompts, input_ids, attention_mask, hooks):
        """Text rows ``(T, L)`` (+ mask) and the ``(B, C)`` index pairing them with images."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts or input_ids")
        if input_ids is not None:
            # identical rows (one per image of a shared prompt) are encoded once
            return unique_token_rows(*check_token_rows(input_ids, attention_mask, batch))
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids, not with prompts")
        texts, index = parse_text_prompts(prompts, batch)
        reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        ids, mask = self.tokenize(texts, reserve=reserve)
        return ids, mask, index

    # ------------------------------------------------------------------ forward
    def _hooks(self, extra: Sequence[TowerHook]) -> tuple[TowerHook, ...]:
        return (self.pvl_adapters, *self._run_hooks(extra))

    def encode_prefix(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
    ) -> MedCLIPSegPrefix:
        """Embed images and prompts and run the blocks before the first adapter (no sampling).

        Each image and each prompt is encoded once here, whatever the pairing and the number of
        Monte Carlo samples; :meth:`forward_from_prefix` does the rest. Arguments as in ``forward``.
        """
        pixel_values = check_pixels(pixel_values)
        hooks = self._hooks(hooks)
        b = pixel_values.shape[0]
        ids, mask, index = self._text_rows(b, prompts, input_ids, attention_mask, hooks)
        device = pixel_values.device
        ids = ids.to(device)
        mask = None if mask is None else mask.to(device)
        ctx = RunContext()
        # hooks other than the adapters that pair text with images act from the embedding on
        early_pairing = any(h.pairs_text_with_images for h in hooks if h is not self.pvl_adapters)
        if early_pairing:
            rows, images, index = pair_rows(index)
            ids, mask = ids[rows.to(device)], None if mask is None else mask[rows.to(device)]
            ctx.text_image_index = images.to(device)
        if any(h.needs_image_features for h in hooks):
            ctx.image_features = self.vision_tower(pixel_values).pooled
        # the pairs split at the first block where a lockstep hook (the adapters) acts; the last
        # block always runs per pair, so what the head reads passes through the kept-state hooks
        last = self.vision_tower.num_layers - 1
        firsts = [min(h.layers(t)) for h in hooks if h.lockstep for t in h.towers if h.layers(t)]
        # text states a hook reads later (per pair) must come from the paired part too
        firsts += [i for h in hooks for i in h.keep_layers("text")]
        start = 0 if early_pairing else min([*firsts, last])
        vision = embed_tower("vision", self.vision_tower, pixel_values, hooks=hooks, ctx=ctx)
        text_hooks = any("text" in h.towers for h in hooks if h is not self.pvl_adapters)
        if self.text_cache is not None and not early_pairing and not text_hooks:
            # the text prefix depends on the prompt alone: reuse it across calls
            text = self.text_cache.rows(
                self.text_tower,
                ("medclipseg-prefix", start, self.text_padding, ids.shape[1]),
                ids,
                mask,
                lambda rows: self._text_prefix(
                    ids[rows], None if mask is None else mask[rows], start
                ),
            )
            if start:
                vision = run_towers(
                    {"vision": self.vision_tower},
                    {"vision": vision},
                    hooks=hooks,
                    ctx=ctx,
                    stop=start,
                    gradient_checkpointing=self.gradient_checkpointing,
                ).states["vision"]
        else:
            text = self._text_state(
                embed_tower("text", self.text_tower, ids, mask, hooks=hooks, ctx=ctx)
            )
            if not early_pairing:
                run = run_towers(
                    {"vision": self.vision_tower, "text": self.text_tower},
                    {"vision": vision, "text": text},
                    hooks=hooks,
                    ctx=ctx,
                    stop=start,
                    gradient_checkpointing=self.gradient_checkpointing,
                )
                vision, text = run.states["vision"], run.states["text"]
        return MedCLIPSegPrefix(
            vision=vision,
            text=text,
            index=index,
            start=start,
            image_size=(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])),
            hooks=hooks,
            ctx=ctx,
            text_key_mask=(
                text.attention_mask.bool()
                if self.pvl_adapters.mask_text_padding and text.attention_mask is not None
                else None
            ),
        )

    def _text_state(self, text: TokenState) -> TokenState:
        if text.causal and self.text_padding == "max_length":
            # right padding follows EOS, so the causal mask alone keeps it away from every real
            # token; upstream CLIP text encoders run exactly so (no padding mask), and the released
            # adapters attend to the padding
            text = text.replace(attention_mask=None)
        return text

    def _text_prefix(self, ids: Tensor, mask: Tensor | None, start: int) -> TokenState:
        """Text rows embedded and run through blocks ``[0, start)`` (no hook acts there)."""
        text = self._text_state(self.text_tower.embed(ids, mask))
        run = run_towers(
            {"text": self.text_tower},
            {"text": text},
            stop=start,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        return run.states["text"]

    def forward_from_prefix(
        self,
        prefix: MedCLIPSegPrefix,
        *,
        generators: Sequence[torch.Generator] | None = None,
        copies: int = 1,
        sample: bool | None = None,
        row_generators: Sequence[torch.Generator] | None = None,
    ) -> MedCLIPSegOutput:
        """Finish a forward pass from :meth:`encode_prefix`, for several noise copies at once.

        The ``B * C`` (image, prompt) pairs are repeated ``copies`` times along the batch axis
        (copy-major) and stepped through the remaining blocks and adapters together.

        Args:
            prefix: output of :meth:`encode_prefix`.
            generators: one ``torch.Generator`` per copy (on the input device): copy ``s`` draws its
                value noise from ``generators[s]`` exactly as ``model(x, p, generator=generators[s])``
                would. ``copies`` is then ``len(generators)``. None uses the global RNG.
            copies: number of copies when neither ``generators`` nor ``row_generators`` is given.
            sample: sample the values; None follows ``deterministic``.
            row_generators: instead of ``generators``, ``copies * B * C`` generators, one per
                (copy, image, prompt) row in copy-major order: each row draws its noise alone, as a
                pass of that image and prompt alone would, so it does not depend on the other rows
                (:func:`~vlsegkit.uncertainty.monte_carlo_predict`'s scheme). ``copies`` must
                match.

        Returns:
            :class:`~vlsegkit.models.MedCLIPSegOutput` with ``logits (copies * B, C, H, W)``,
            ``text_embeddings (copies * B, C, E)`` and ``patch_tokens (copies * B, C, h*w, E)``.
        """
        if generators is not None and row_generators is not None:
            raise ValueError(
                "pass generators (one per copy) or row_generators (one per row), not both"
            )
        if generators is not None:
            generators = list(generators)
            copies = len(generators)
        copies = _positive_int(copies, "copies")
        b, c = prefix.index.shape
        if row_generators is not None:
            generators = list(row_generators)
            if len(generators) != copies * b * c:
                raise ValueError(
                    f"row_generators must hold copies * B * C = {copies} * {b} * {c} generators, "
                    f"got {len(generators)}"
                )
        device = prefix.vision.tokens.device
        images = torch.arange(b, device=device).repeat_interleave(c).repeat(copies)
        rows = prefix.index.reshape(-1).to(device).repeat(copies)
        parent = prefix.ctx or RunContext()
        ctx = RunContext(
            image_features=parent.image_features,
            text_image_index=images,
            generators=generators,
            sample=self.is_sampling(sample),
            memo=parent.memo,
        )
        adapters = self.pvl_adapters.adapter_layers
        if (
            copies > 1
            and adapters
            and adapters[0] == prefix.start
            and prefix.hooks[0] is self.pvl_adapters
        ):
            # the copies are identical until the first adapter draws its noise: it computes its
            # sampling-independent part once for all of them
            ctx.extras[IDENTICAL_COPIES] = (prefix.start, copies)
        last = self.vision_tower.num_layers - 1
        run = run_towers(
            {"vision": self.vision_tower, "text": self.text_tower},
            {"vision": prefix.vision.take(images), "text": prefix.text.take(rows)},
            hooks=prefix.hooks,
            ctx=ctx,
            start=prefix.start,
            keep={"vision": [last], "text": _keeps(prefix.hooks, "text")},
            gradient_checkpointing=self.gradient_checkpointing,
        )
        vision = run.kept["vision"][last]
        patches = self.vision_tower.dense(vision)
        text_emb = self.text_tower.pool(run.states["text"])
        for hook in prefix.hooks:
            text_emb = hook.condition(text_emb, ctx)
        logits = self.head(patches, vision.grid, text_emb, output_size=prefix.image_size)
        n = copies * b
        text_emb = text_emb.view(n, c, -1)
        return MedCLIPSegOutput(
            logits=logits.view(n, c, *logits.shape[-2:]),
            conditional_embeddings=text_emb,
            patch_tokens=patches.view(n, c, *patches.shape[1:]),
            text_embeddings=text_emb,
        )

    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool | None = None,
    ) -> MedCLIPSegOutput:
        """Segment ``pixel_values`` with text prompts (one stochastic pass).

        Pairing of B images with prompts: a string -> every image (C = 1); B strings (or ``input_ids``
        with B rows) -> one per image (C = 1); T != B strings / rows -> every image with every prompt
        (C = T); B lists of C strings -> per-image prompt sets.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
            prompts: text prompts (see above).
            input_ids, attention_mask: pre-tokenised prompts ``(T, L)`` instead of strings (e.g.
                for a BERT backbone without a tokenizer).
            hooks: further :class:`~vlsegkit.encoders.TowerHook` s bound to this model.
            generator: value-noise generator (reproducible sampling); or ``B * C`` generators, one
                per (image, prompt) row in image-major order, each row then drawing its noise alone
                (:meth:`noise_generators`' scheme); None uses the global RNG.
            sample: sample the values (eq. 10); None follows ``deterministic`` (sampled by default,
                in eval mode too).

        Returns:
            :class:`~vlsegkit.models.MedCLIPSegOutput`: ``logits (B, C, H, W)``,
            ``text_embeddings`` (= ``conditional_embeddings``) ``(B, C, E)`` and ``patch_tokens
            (B, C, h*w, E)`` for :class:`~vlsegkit.losses.MedCLIPSegLoss`.
        """
        prefix = self.encode_prefix(
            pixel_values, prompts, input_ids=input_ids, attention_mask=attention_mask, hooks=hooks
        )
        if generator is None or isinstance(generator, torch.Generator):
            gens = None if generator is None else [generator]
            return self.forward_from_prefix(prefix, generators=gens, sample=sample)
        return self.forward_from_prefix(prefix, row_generators=generator, sample=sample)

    # ------------------------------------------------------------------ Monte Carlo inference
    @staticmethod
    def noise_generators(
        samples: int,
        num_images: int,
        num_prompts: int = 1,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[list[list[torch.Generator]]]:
        """The noise generators ``[s][i][k]`` of :meth:`predict_with_uncertainty`.

        Sample ``s`` of image ``i`` with prompt ``k`` in ``predict_with_uncertainty(images,
        prompts, samples, seed=seed)`` draws its value noise exactly as
        ``model(pixels[i:i+1], [[prompts[k]]], generator=noise_generators(...)[s][i][k])`` would,
        whatever ``batch_size`` and ``batch_samples`` are and whatever images or prompts follow
        (:func:`~vlsegkit.uncertainty.pair_generators`; the base stream is
        ``torch.Generator().manual_seed(seed)``, the given ``generator``, or the global RNG).
        """
        samples = _positive_int(samples, "samples")
        num_images = _positive_int(num_images, "num_images")
        num_prompts = _positive_int(num_prompts, "num_prompts")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        base = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        return pair_generators(base, samples, num_images, num_prompts, device)

    def predict_with_uncertainty(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | Sequence[Sequence[str]],
        samples: int = 30,
        *,
        batch_samples: int | None = None,
        batch_size: int = 8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sample: bool | None = None,
        progress: bool | None = False,
    ) -> UncertaintyOutput:
        """Monte Carlo segmentation with uncertainty maps (section 3.2; 30 samples in the paper).

        See :func:`vlsegkit.uncertainty.monte_carlo_predict` for the arguments: each image chunk is
        encoded once up to the first adapter, then ``batch_samples`` noise copies at a time run the
        rest as one batch; logits are resized to each image's original size before the sigmoid.
        Prompts follow ``predict``'s rule (a list of C prompts applies to every image).
        """
        return monte_carlo_predict(
            self,
            images,
            prompts,
            samples,
            batch_samples=batch_samples,
            batch_size=batch_size,
            seed=seed,
            generator=generator,
            sample=sample,
            progress=progress,
        )

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        samples: int = 30,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Tensor | list[Tensor]:
        """Mean Monte Carlo probability ``(C, H, W)`` per image at its original size (threshold 0.5).

        Shortcut for ``predict_with_uncertainty(...).mean``; ``samples=1`` with ``sample=False`` gives
        the deterministic (value-mean) prediction.
        """
        return self.predict_with_uncertainty(images, prompts, samples, seed=seed, **kwargs).mean

    # ------------------------------------------------------------------ released checkpoints
    @staticmethod
    def released_config(**overrides: Any) -> dict[str, Any]:
        """Constructor arguments matching the released UniMedCLIP checkpoints (spec §8-9).

        UniMedCLIP ViT-B/16 (QuickGELU) + BiomedBERT (768 -> 640 -> 512 MLP projection, [CLS] pool),
        adapters before blocks 1..10 with ``kv_norm=True``, text padded to 256 tokens with the
        padding attended to, BGR channel order with ImageNet mean / std, 224 x 224 input, and the
        frozen towers following ``model.train()`` (BERT dropout active while training), as the
        official ``train.py`` runs them.
        """
        return {
            "backbone": _unimedclip_backbone(),
            "layers": list(range(1, 11)),
            "adapter_dim": 256,
            "kv_norm": True,
            "text_padding": "max_length",
            "context_length": 256,
            "tokenizer": BIOMEDBERT_ID,
            "image_size": [224, 224],
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "channel_order": "BGR",
            "frozen_towers": "train",
            **overrides,
        }

    @classmethod
    def from_released(
        cls,
        checkpoint: str | os.PathLike,
        *,
        filename: str | None = None,
        config: dict[str, Any] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MedCLIPSeg:
        """Load an official MedCLIPSeg checkpoint (``*_latest.pth`` of ``HealthX-Lab/MedCLIPSeg``).

        Args:
            checkpoint: the ``.pth`` file, a folder holding ``filename``, or a Hub repo id (e.g.
                ``"TahaKoleilat/MedCLIPSeg"`` with ``filename=released_checkpoint_name("BUSI")``).
            filename: file inside a folder / Hub repo.
            config: constructor arguments; default :meth:`released_config` (UniMedCLIP ViT-B/16 +
                BiomedBERT). The backbone must be an open_clip ViT + BERT spec.
            revision, cache_dir, local_files_only, token: Hub options.

        Returns:
            The model in eval mode. Values are still sampled in eval (as released); inputs must be
            prepared as released: BGR, ImageNet-normalised, 224 x 224 (``predict`` does this).

        Raises:
            CheckpointError: unreadable file, missing / unexpected keys or wrong shapes.
        """
        config = cls.released_config() if config is None else dict(config)
        backbone = config.get("backbone", {})
        if not isinstance(backbone, dict):
            raise ValueError("config['backbone'] must be a backbone dict")
        if (
            backbone.get("kind") != "open_clip"
            or "bert_config" not in backbone
            or backbone.get("vision_cfg", {}).get("timm_model_name")
        ):
            raise ValueError(
                "the released key map covers the UniMedCLIP model: config['backbone'] must be an "
                "open_clip built-in ViT with 'bert_config'"
            )
        path = Path(checkpoint)
        if not path.is_file():
            if filename is None:
                raise ValueError(f"{checkpoint} is not a file: pass filename= (folder or Hub repo)")
            path = resolve_file(
                checkpoint,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        state = load_released_state_dict(path)
        with empty_weights():  # one copy of the weights: the file's, assigned
            model = cls(**config)
        state = convert_released_state_dict(state)
        load_state_dict_strict(model, state, source=str(path), assign=True)
        return model._mark_source(checkpoint, revision).eval()


# ---------------------------------------------------------------------- registry
def _biomedbert_config() -> dict[str, Any]:
    # microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract: BERT-base shape, uncased 30522 vocab
    return dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
    )  # fmt: skip


def _vit_b16_cfg() -> dict[str, Any]:
    return {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64}


def _unimedclip_backbone() -> dict[str, Any]:
    return {
        "kind": "open_clip",
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": _vit_b16_cfg(),
        "bert_config": _biomedbert_config(),
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }


@register_model(
    "medclipseg-unimedclip-vit-b16",
    description="MedCLIPSeg (paper default): UniMedCLIP ViT-B/16 + BiomedBERT, 10 PVL adapters",
)
def medclipseg_unimedclip_vit_b16(**kwargs) -> MedCLIPSeg:
    defaults = dict(backbone=_unimedclip_backbone(), context_length=256, tokenizer=BIOMEDBERT_ID)
    return MedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "medclipseg-biomedclip-vit-b16",
    description="MedCLIPSeg on BiomedCLIP (timm ViT-B/16 + PubMedBERT), the Table 5 ablation",
)
def medclipseg_biomedclip_vit_b16(**kwargs) -> MedCLIPSeg:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "linear", "image_size": 224,
        },
        "bert_config": _biomedbert_config(),
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip
    defaults = dict(backbone=backbone, context_length=256, tokenizer=BIOMEDBERT_ID)
    return MedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "medclipseg-clip-vit-b16",
    description="MedCLIPSeg on OpenAI CLIP ViT-B/16 (77-token text), the Table 5 ablation",
)
def medclipseg_clip_vit_b16(**kwargs) -> MedCLIPSeg:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": _vit_b16_cfg(),
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12},
    }  # fmt: skip
    return MedCLIPSeg(**{"backbone": backbone, **kwargs})


@register_model(
    "medclipseg-tiny",
    description="A tiny random MedCLIPSeg (width 64, 4 layers, CLIP BPE text) for tests and demos",
)
def medclipseg_tiny(**kwargs) -> MedCLIPSeg:
    backbone = tiny_open_clip()
    defaults = dict(
        backbone=backbone, adapter_dim=32, text_padding="longest", image_size=64,
    )  # fmt: skip
    return MedCLIPSeg(**{**defaults, **kwargs})
