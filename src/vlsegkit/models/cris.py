"""CRIS: CLIP-driven referring image segmentation on a CLIP ResNet and the CLIP text transformer.

Wang, Lu, Li, Tao, Guo, Gong and Liu, "CRIS: CLIP-Driven Referring Image Segmentation", CVPR 2022;
official code ``DerrickWang005/CRIS.pytorch``. Fine-tuned for medical images by Poudel et al.
("Exploring Transfer Learning in Medical Image Segmentation using Vision-Language Models", MIDL
2024, medvlsm) and prompt-tuned with CoOp / CoCoOp by Adhikari et al. (TuneVLSeg, ACCV 2024). The
model is a short composition of vlsegkit parts:

* a CLIP ResNet (:class:`~vlsegkit.encoders.OpenCLIPResNetTower`: ``C3``, ``C4``, ``C5`` and CRIS's
  dense attention pool) and the CLIP text transformer (:class:`~vlsegkit.encoders.OpenCLIPTextTower`,
  stepped by :func:`~vlsegkit.encoders.run_towers`, so text hooks -- CoOp, CoCoOp -- act on it), both
  from :func:`~vlsegkit.encoders.create_towers`;
* :class:`~vlsegkit.decoders.TextConditionedFPN`, :class:`~vlsegkit.decoders.VisionLanguageDecoder`
  and :class:`~vlsegkit.decoders.DynamicKernelProjector`;
* medvlsm's loss ``Dice + 0.2 BCE`` as the default task.

CRIS.pytorch checkpoints (the community RefCOCO R50 one that medvlsm and TuneVLSeg use) load with
:meth:`CRIS.from_released`; CLIP ResNet weights alone with :meth:`CRIS.from_clip`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoders.cris import DynamicKernelProjector, TextConditionedFPN, VisionLanguageDecoder
from ..encoders.factory import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    OpenCLIPResNet,
    OpenCLIPSpec,
    OpenCLIPText,
    TowerSpec,
    create_towers,
    tower_spec_from_dict,
)
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.open_clip_resnet import keep_frozen_batchnorm_in_eval
from ..encoders.runner import embed_tower, run_towers
from ..hub import CheckpointError, check_state_dict, empty_weights, load_state_dict_strict
from ..registry import register_model
from .base import (
    VLSM,
    check_pixels,
    check_token_rows,
    pair_rows,
    parse_text_prompts,
    preprocessing_args,
)
from .cris_released import (
    clip_backbone_spec,
    convert_clip_state_dict,
    convert_cris_state_dict,
    infer_cris_config,
    read_state_dict,
)
from .outputs import SegmentationOutput

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["CRIS", "CRISOutput"]

#: CRIS.pytorch's pad id: its tokenizer pads with 0, and ``pad_mask = (word == 0)``.
CRIS_PAD_ID = 0
#: Why hooks cannot act on CRIS's vision tower (``HookSlots.unavailable``).
_NO_VISION_HOOKS = (
    "CRIS's image encoder is a convolutional CLIP ResNet with no token sequence to insert prompts "
    "into or adapt between blocks; only text hooks (CoOp, CoCoOp) apply to CRIS"
)
#: The arguments :meth:`CRIS.from_released` reads from shapes (CRIS.pytorch's config names).
_SHAPE_ARGS = ("fpn_in", "fpn_out", "vis_dim", "word_dim", "num_layers", "dim_ffn")


@dataclass
class CRISOutput(SegmentationOutput):
    """CRIS's output.

    Attributes:
        logits: ``(B, C, H, W)`` at input resolution (bicubic, ``align_corners=True``, as medvlsm and
            TuneVLSeg upsample), or ``(B, C, H/4, W/4)`` with ``upsample=False``.
        conditional_embeddings: ``(B, C, E)`` sentence features ``F_s`` (projected EOS token).
        stride4_logits: ``(B, C, H/4, W/4)`` the projector's logits, what CRIS.pytorch trains on.
    """

    stride4_logits: Tensor | None = None


def _ints(value: Any, n: int, name: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be {n} positive ints, got {value!r}")
    return tuple(int(v) for v in value)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _backbone(backbone: dict[str, Any] | TowerSpec) -> OpenCLIPSpec:
    spec = tower_spec_from_dict(backbone)
    if not (
        isinstance(spec, OpenCLIPSpec)
        and isinstance(spec.vision, OpenCLIPResNet)
        and isinstance(spec.text, OpenCLIPText)
    ):
        raise ValueError(
            "CRIS needs an open_clip backbone with a CLIP ResNet vision part (vision_cfg.layers = "
            "four stage depths) and the CLIP text transformer (text_cfg)"
        )
    return spec


class CRIS(VLSM):
    """CRIS with any number of text prompts per image.

    Forward pass (Wang et al. 2022, section 3; shapes for RN50 at 416 px)::

        C3, C4, C5 = resnet(x)                               # (512, 52²), (1024, 26²), (2048, 13²)
        V5 = ReLU(dense_attnpool(C5) + connect(C5))          # (1024, 13²), CRIS's modified pool
        F_w, F_s = LN(text(prompt)), LN(text(prompt))[EOS] W  # words (L, 512), sentence (1024,)
        F_q = neck(C3, C4, V5, F_s)                          # (512, 26²)
        F_c = decoder(F_q, F_w, padding)                     # (512, 26²)
        logits = projector(F_c, F_s)                         # (1, 104²), stride 4
        logits = bicubic(logits, (H, W), align_corners=True) # unless upsample=False

    ``connect`` (Conv1x1 + BN) is CRIS's residual branch around the attention pool; it is not part of
    CLIP, so it counts as backbone for freezing and learning rates (it lives under ``backbone`` in
    CRIS.pytorch).

    Padding: words marked padding (``attention_mask == 0``, or id 0 as CRIS.pytorch pads when only
    ``input_ids`` are given) are masked in the decoder's cross-attention and in the text blocks;
    the sentence feature is read at the end-of-text token (the largest id, CLIP's ``argmax``), which
    moves with inserted context tokens.

    Args:
        backbone: :class:`~vlsegkit.encoders.OpenCLIPSpec` (dict) with an
            :class:`~vlsegkit.encoders.OpenCLIPResNet` vision part and an
            :class:`~vlsegkit.encoders.OpenCLIPText` text part.
        word_len: maximum prompt length in tokens, start / end tokens included (77 in medvlsm; the
            CRIS code uses 17, which truncates longer attribute prompts). Context tokens inserted by
            hooks come out of it.
        fpn_in: ``(C3, C4, V5)`` widths; read from the backbone when None.
        fpn_out: neck widths ``(out3, out4, out5)``; ``out4`` is the decoder width.
        vis_dim: decoder width; must equal ``fpn_out[1]`` and the text width (None: ``fpn_out[1]``).
        word_dim: sentence width; must equal the joint width (None: read from the backbone).
        num_layers: vision-language decoder layers (3).
        num_head: decoder attention heads (8).
        dim_ffn: decoder FFN width (2048).
        dropout: decoder dropout (CRIS: 0.1; medvlsm 0.2; TuneVLSeg prompt tuning 0).
        image_size: ``(H, W)`` (or one int) ``predict`` resizes to; multiples of 32 (416).
        image_mean, image_std: normalisation of ``predict`` (CLIP's statistics).
        freeze_backbone: freeze both towers and ``connect`` (medvlsm fine-tunes them: default False).
        update_frozen_bn_stats: let frozen BatchNorms follow the train / eval mode, so their running
            statistics drift in training (TuneVLSeg's released prompt tuning). Default False: a
            BatchNorm whose parameters are frozen stays in eval mode.
        hooks: text hooks the model owns (e.g. ``[CoOp(depth=3)]``); hooks on the vision tower
            raise a ``ValueError`` naming the reason.

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts)`` -> ``logits (B, C, H, W)``, H and W
    multiples of 32.
    """

    model_type = "cris"

    def __init__(
        self,
        *,
        backbone: dict[str, Any] | TowerSpec,
        word_len: int = 77,
        fpn_in: Sequence[int] | None = None,
        fpn_out: Sequence[int] = (256, 512, 1024),
        vis_dim: int | None = None,
        word_dim: int | None = None,
        num_layers: int = 3,
        num_head: int = 8,
        dim_ffn: int = 2048,
        dropout: float = 0.1,
        image_size: int | Sequence[int] = 416,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        freeze_backbone: bool = False,
        update_frozen_bn_stats: bool = False,
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        super().__init__()
        spec = _backbone(backbone)
        self._set_config_arg(backbone=spec.to_dict())
        towers = create_towers(spec)
        self.vision_tower, self.text_tower = towers.vision, towers.text
        vision, text = self.vision_tower, self.text_tower
        if vision.embed_dim != text.embed_dim:
            raise ValueError(
                f"the towers must share the joint width, got vision {vision.embed_dim} and text "
                f"{text.embed_dim}"
            )
        derived_in = (vision.channels["c3"], vision.channels["c4"], vision.embed_dim)
        fpn_in = derived_in if fpn_in is None else _ints(list(fpn_in), 3, "fpn_in")
        if tuple(fpn_in) != derived_in:
            raise ValueError(
                f"fpn_in must be the backbone's (C3, C4, V5) widths {list(derived_in)}, got "
                f"{list(fpn_in)}"
            )
        fpn_out = _ints(list(fpn_out), 3, "fpn_out")
        vis_dim = fpn_out[1] if vis_dim is None else _positive(vis_dim, "vis_dim")
        if vis_dim != fpn_out[1] or vis_dim != text.width:
            raise ValueError(
                f"vis_dim must equal fpn_out[1] (the neck's output) and the text width (the word "
                f"features the decoder attends to): got vis_dim={vis_dim}, fpn_out[1]={fpn_out[1]}, "
                f"text width {text.width}"
            )
        word_dim = vision.embed_dim if word_dim is None else _positive(word_dim, "word_dim")
        if word_dim != vision.embed_dim:
            raise ValueError(
                f"word_dim must be the joint width {vision.embed_dim} (the sentence feature), got "
                f"{word_dim}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        word_len = _positive(word_len, "word_len")
        if not 2 <= word_len <= text.max_positions:
            raise ValueError(
                f"word_len must be in [2, {text.max_positions}] (the text position table), got "
                f"{word_len}"
            )
        self._set_config_arg(fpn_in=list(fpn_in), vis_dim=vis_dim, word_dim=word_dim)
        self.word_len = word_len
        # CRIS's residual branch around the attention pool (CRIS.pytorch: attnpool.connect)
        self.connect = nn.Sequential(
            nn.Conv2d(vision.width, vision.embed_dim, 1, bias=False),
            nn.BatchNorm2d(vision.embed_dim),
        )
        self.neck = TextConditionedFPN(in_channels=fpn_in, out_channels=fpn_out)
        self.decoder = VisionLanguageDecoder(
            dim=vis_dim,
            num_layers=_positive(num_layers, "num_layers"),
            num_heads=_positive(num_head, "num_head"),
            dim_ffn=_positive(dim_ffn, "dim_ffn"),
            dropout=float(dropout),
        )
        self.proj = DynamicKernelProjector(word_dim=word_dim, in_dim=vis_dim // 2, kernel_size=3)
        self.image_size, self.image_mean, self.image_std = preprocessing_args(
            image_size, image_mean, image_std
        )
        if any(s % 32 for s in self.image_size):
            raise ValueError(
                f"image_size must be multiples of 32 (the ResNet stride), got {self.image_size}"
            )
        self.tokenizer = towers.make_tokenizer(word_len)
        self.update_frozen_bn_stats = bool(update_frozen_bn_stats)
        self.vision_tower.update_frozen_bn_stats = self.update_frozen_bn_stats
        #: Recompute tower activations in backward instead of storing them (a runtime switch).
        self.gradient_checkpointing = False
        if freeze_backbone:
            self.freeze_backbone()
        self.hooks = self._bind_hooks(hooks)

    # ------------------------------------------------------------------ hooks, freezing, training
    def hook_slots(self) -> HookSlots:
        """The text tower only (the ResNet has no token sequence), the tokenizer, and the width of
        the image features CoCoOp reads (the spatial mean of ``V5``)."""
        return HookSlots(
            towers={"text": self.text_tower},
            unavailable={"vision": _NO_VISION_HOOKS},
            condition_dim=self.text_tower.embed_dim,
            tokenizer=self.tokenizer,
            lockstep=False,
            image_features_dim=self.vision_tower.embed_dim,
        )

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of both towers and of ``connect`` (CRIS.pytorch's ``backbone``)."""
        for module in (self.vision_tower, self.text_tower, self.connect):
            yield from module.parameters()

    def freeze_backbone(self, frozen: bool = True) -> CRIS:
        """Freeze (or unfreeze) both towers and ``connect``; frozen BatchNorms switch to eval mode
        (unless ``update_frozen_bn_stats``)."""
        super().freeze_backbone(frozen)
        self.connect.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> CRIS:
        """Train / eval mode; every BatchNorm whose parameters are frozen stays in eval mode unless
        ``update_frozen_bn_stats`` (the released prompt-tuning behaviour)."""
        super().train(mode)
        if mode and not getattr(self, "update_frozen_bn_stats", False):
            keep_frozen_batchnorm_in_eval(self)
        return self

    def param_groups(
        self, lr: float, *, backbone_lr_mult: float = 0.1, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer groups: the backbone at ``lr * backbone_lr_mult``, the rest at ``lr``.

        medvlsm fine-tunes CRIS with 1e-5 for the decoder and 1e-6 for the encoders (Poudel et al.
        §4.1); CRIS.pytorch uses a 0.1 multiplier too (it keeps the position embeddings in the head
        group). Only trainable parameters are included; empty groups are left out.

        Example:
            >>> opt = torch.optim.Adam(model.param_groups(1e-5))
            >>> fit(model, loader, optimizer=opt)
        """
        backbone = {id(p) for p in self.backbone_parameters()}
        groups = [
            {"params": [p for p in self.trainable_parameters() if id(p) in backbone],
             "lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
            {"params": [p for p in self.trainable_parameters() if id(p) not in backbone],
             "lr": lr, "weight_decay": weight_decay},
        ]  # fmt: skip
        return [g for g in groups if g["params"]]

    def default_task(
        self,
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 0.2,
        smooth: float = 1e-5,
        threshold: float = 0.35,
    ) -> Task:
        """medvlsm's CRIS objective: ``dice_weight * Dice + bce_weight * BCE`` on the logits.

        medvlsm configures ``monai.losses.DiceCELoss(lambda_dice=1, lambda_ce=0.2)`` (MONAI's smooth
        ``1e-5``) and thresholds CRIS at 0.35 (CRIS.pytorch's value); TuneVLSeg uses the same weights
        and 0.5.
        """
        from ..losses import DiceBCELoss
        from ..tasks import SegmentationTask

        loss = DiceBCELoss(dice_weight=dice_weight, bce_weight=bce_weight, smooth=smooth)
        return SegmentationTask(loss=loss, threshold=threshold)

    # ------------------------------------------------------------------ parts of the forward pass
    def encode_image(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """``{"c3", "c4", "v5"}``: the neck's visual inputs for ``pixel_values`` ``(B, 3, H, W)``.

        ``v5 = ReLU(dense_attnpool(C5) + connect(C5))`` ``(B, E, H/32, W/32)``.
        """
        feats = self.vision_tower.features(
            pixel_values, gradient_checkpointing=self.gradient_checkpointing
        )
        v5 = F.relu(self.vision_tower.dense(feats.c5) + self.connect(feats.c5))
        return {"c3": feats.c3, "c4": feats.c4, "v5": v5}

    def _check_hooks(self, hooks: Sequence[TowerHook]) -> None:
        slots = HookSlots(
            towers={"text": self.text_tower}, unavailable={"vision": _NO_VISION_HOOKS}
        )
        for hook in hooks:
            slots.require(hook)

    def tokenize(self, prompts: str | Sequence[str], *, reserve: int = 0) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, word_len)`` as ``forward`` tokenises prompts, on
        the model's device.

        ``forward(pixel_values, input_ids=..., attention_mask=...)`` with them is the tensor-only
        pass (what ``torch.compile(model, fullgraph=True)`` captures in one graph).

        Args:
            prompts: one string or T strings.
            reserve: text positions left free for context tokens hooks insert.
        """
        tokens = self.tokenizer(prompts, reserve=reserve)
        device = self.proj.txt.weight.device
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    def _text_rows(self, batch, prompts, input_ids, attention_mask, hooks):
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts or input_ids")
        if input_ids is not None:
            ids, mask, index = check_token_rows(input_ids, attention_mask, batch)
            if mask is None:
                mask = ids != CRIS_PAD_ID  # CRIS.pytorch's padding rule
            return ids, mask, index
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids, not with prompts")
        texts, index = parse_text_prompts(prompts, batch)
        reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        tokens = self.tokenizer(texts, reserve=reserve)
        return tokens.input_ids, tokens.attention_mask, index

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        hooks: Sequence[TowerHook] = (),
        ctx: RunContext | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Word features, padding and sentence features of token rows, with the text hooks.

        Args:
            input_ids, attention_mask: ``(R, L)``; the mask is 1 / True for real tokens.
            hooks: text hooks (CoOp context after SOT, ...).
            ctx: the forward pass's context (image features for CoCoOp, pairing).

        Returns:
            ``words (R, N, D)`` (``ln_final`` of every token, context included, not projected),
            ``padding (R, N)`` bool (True at padded positions) and ``sentence (R, E)``.
        """
        ctx = RunContext() if ctx is None else ctx
        state = embed_tower(
            "text", self.text_tower, input_ids, attention_mask.bool(), hooks=hooks, ctx=ctx
        )
        keep = sorted({i for h in hooks if "text" in h.towers for i in h.keep_layers("text")})
        run = run_towers(
            {"text": self.text_tower},
            {"text": state},
            hooks=hooks,
            ctx=ctx,
            keep={"text": keep} if keep else None,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        final = run.states["text"]
        sentence = self.text_tower.pool(final)
        for hook in hooks:
            sentence = hook.condition(sentence, ctx)
        return self.text_tower.final_tokens(final), ~final.attention_mask.bool(), sentence

    def decode(
        self,
        visual: Mapping[str, Tensor],
        words: Tensor,
        padding: Tensor,
        sentence: Tensor,
    ) -> Tensor:
        """Neck, decoder and projector for one row per (image, prompt) pair -> ``(R, 1, H/4, W/4)``."""
        fq = self.neck(visual["c3"], visual["c4"], visual["v5"], sentence)
        fq = self.decoder(fq, words, padding)
        return self.proj(fq, sentence)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
        upsample: bool = True,
    ) -> CRISOutput:
        """Segment ``pixel_values`` with text prompts.

        Pairing of B images with prompts: a string -> every image (C = 1); B strings (or ``input_ids``
        with B rows) -> one per image (C = 1); T != B strings / rows -> every image with every prompt
        (C = T); B lists of C strings -> per-image prompt sets.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of 32.
            prompts: text prompts (see above); ``""`` is a valid (empty) prompt.
            input_ids, attention_mask: pre-tokenised prompts ``(T, L)``; without a mask, id 0 marks
                padding (CRIS.pytorch's convention).
            hooks: further text :class:`~vlsegkit.encoders.TowerHook` s bound to this model.
            upsample: return ``logits`` at input resolution (bicubic, ``align_corners=True``, as
                medvlsm / TuneVLSeg); False returns the stride-4 logits there.

        Returns:
            :class:`CRISOutput` with ``logits``, ``stride4_logits (B, C, H/4, W/4)`` and the sentence
            features as ``conditional_embeddings (B, C, E)``.
        """
        hooks = self._run_hooks(hooks)
        self._check_hooks(hooks)
        pixel_values = check_pixels(pixel_values)
        b = pixel_values.shape[0]
        device = pixel_values.device
        ids, mask, index = self._text_rows(b, prompts, input_ids, attention_mask, hooks)
        ids, mask = ids.to(device), mask.to(device)
        ctx = RunContext()
        visual = self.encode_image(pixel_values)
        if any(h.needs_image_features for h in hooks):
            # CoCoOp's image feature on CRIS: the spatial mean of V5 (TuneVLSeg)
            ctx.image_features = visual["v5"].mean(dim=(2, 3))
        if any(h.pairs_text_with_images for h in hooks):
            rows, images, index = pair_rows(index)
            ids, mask = ids[rows.to(device)], mask[rows.to(device)]
            ctx.text_image_index = images.to(device)
        words, padding, sentence = self.encode_text(ids, mask, hooks=hooks, ctx=ctx)
        c = index.shape[1]
        rows = index.reshape(-1).to(device)
        images = torch.arange(b, device=device).repeat_interleave(c)
        pairs = {k: v if c == 1 else v[images] for k, v in visual.items()}
        low = self.decode(pairs, words[rows], padding[rows], sentence[rows].to(words.dtype))
        logits = low
        if upsample:
            logits = F.interpolate(
                low, size=tuple(pixel_values.shape[-2:]), mode="bicubic", align_corners=True
            )
        return CRISOutput(
            logits=logits.view(b, c, *logits.shape[-2:]),
            conditional_embeddings=sentence[rows].view(b, c, -1),
            stride4_logits=low.view(b, c, *low.shape[-2:]),
        )

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_released(
        cls, checkpoint: str | os.PathLike | Mapping[str, Tensor], **overrides: Any
    ) -> CRIS:
        """Load a CRIS.pytorch checkpoint (e.g. the community RefCOCO R50 ``cris_best.pth``).

        Accepts what CRIS.pytorch's ``train.py`` saves (``{"state_dict": {"module." + key: ...},
        ...}``), a bare state dict with or without the ``module.`` prefix (medvlsm's ``cris.pt``,
        TuneVLSeg's ``cris_best_single.pth``), or a ``.safetensors`` file; pickles are read with
        ``torch.load(weights_only=True)``.

        Widths, depths and resolutions come from tensor shapes (CLIP's ``build_model`` rules);
        ``overrides`` give the rest with CRIS.pytorch's config names -- ``word_len`` (77),
        ``num_head`` (8), ``dropout`` (0.1) -- or any other constructor argument (``image_size``,
        ``freeze_backbone``, ``hooks`` -- bound after the checkpoint is loaded, so they start fresh). Overriding a shape-derived value (``fpn_in``, ``fpn_out``,
        ``vis_dim``, ``word_dim``, ``num_layers``, ``dim_ffn``) with a different value is an error.

        Returns:
            The model in eval mode. Every tensor of the checkpoint is loaded except CLIP's unused
            ``logit_scale``.

        Raises:
            CheckpointError: unreadable file, not a CRIS state dict, or keys / shapes that do not fit.
            ValueError: an override contradicting the checkpoint.
        """
        state = read_state_dict(checkpoint)
        config = infer_cris_config(state)
        for name in _SHAPE_ARGS:
            if name in overrides and _plain(overrides[name]) != _plain(config[name]):
                raise ValueError(
                    f"{name}={overrides[name]!r} contradicts the checkpoint, whose shapes give "
                    f"{name}={config[name]!r}"
                )
        hooks = overrides.pop("hooks", ())
        # read from a file: the file's tensors are assigned (one copy of the weights); a state
        # dict the caller holds is copied, so the model does not share memory with it
        from_file = isinstance(checkpoint, (str, os.PathLike))
        with empty_weights() if from_file else contextlib.nullcontext():
            model = cls(**{**config, **overrides})
        converted, _ = convert_cris_state_dict(state)
        source = checkpoint if from_file else "state dict"
        load_state_dict_strict(model, converted, source=str(source), assign=from_file)
        if hooks:  # model-owned hooks start fresh on the released weights
            model.hooks = model._bind_hooks(hooks)
            model._set_config_arg(hooks=list(model.hooks))
        # name_or_path stays None: a .pth is not a folder VLSM.from_pretrained can reload (a tuned
        # model needs its base saved with save_pretrained first)
        return model.eval()

    @classmethod
    def from_clip(cls, checkpoint: str | os.PathLike | Mapping[str, Tensor], **kwargs: Any) -> CRIS:
        """CRIS with pretrained CLIP ResNet towers and a fresh neck, decoder and projector.

        Args:
            checkpoint: a CLIP ResNet state dict (OpenAI / open_clip keys: ``visual.*``,
                ``token_embedding.weight``, ``transformer.*``, ...) or a file holding one
                (``.safetensors`` such as open_clip's ``timm/resnet50_clip.openai``
                ``open_clip_model.safetensors``, or a ``weights_only`` pickle). OpenAI's TorchScript
                ``RN50.pt`` must be converted to a state dict first (the error says how).
            **kwargs: constructor arguments (the backbone is read from the checkpoint).

        Returns:
            The model in eval mode; every tower tensor is loaded strictly (CLIP's ``logit_scale``
            and TorchScript metadata entries are dropped), ``connect`` and the head stay random.
        """
        state = read_state_dict(checkpoint)
        if any(k.startswith(("neck.", "decoder.", "proj.", "backbone.")) for k in state):
            raise CheckpointError(
                "this is a CRIS checkpoint, not a CLIP one: load it with CRIS.from_released"
            )
        spec = clip_backbone_spec(state)
        if "backbone" in kwargs:
            raise ValueError(
                "from_clip reads the backbone from the checkpoint; do not pass backbone="
            )
        model = cls(backbone=spec, **kwargs)
        converted, _ = convert_clip_state_dict(state)
        source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
        for name in ("vision_tower", "text_tower"):
            part = {k[len(name) + 1 :]: v for k, v in converted.items() if k.startswith(name + ".")}
            check_state_dict(getattr(model, name), part, source=source)
        leftover = sorted(
            k for k in converted if not k.startswith(("vision_tower.", "text_tower."))
        )
        if leftover:
            raise CheckpointError(
                f"cannot load {source} into CRIS's towers: unexpected keys {leftover[:20]}"
            )
        model.load_state_dict(converted, strict=False)
        return model.eval()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- registry
def _clip_text() -> dict[str, Any]:
    return {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def _rn_backbone(layers: list[int], embed_dim: int) -> dict[str, Any]:
    return {
        "kind": "open_clip",
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"layers": layers, "width": 64, "head_width": 64, "image_size": 224},
        "text_cfg": _clip_text(),
    }


@register_model(
    "cris-rn50",
    description="CRIS on CLIP RN50 (416 px; medvlsm / TuneVLSeg; CRIS.from_released loads the "
    "community RefCOCO checkpoint)",
)
def cris_rn50(**kwargs) -> CRIS:
    return CRIS(**{"backbone": _rn_backbone([3, 4, 6, 3], 1024), **kwargs})


@register_model("cris-rn101", description="CRIS on CLIP RN101 (416 px, CRIS.pytorch's R101 config)")
def cris_rn101(**kwargs) -> CRIS:
    return CRIS(**{"backbone": _rn_backbone([3, 4, 23, 3], 512), **kwargs})


@register_model(
    "cris-tiny",
    description="A tiny random CRIS (ResNet width 8, 2 text layers) for tests, demos and CPU runs",
)
def cris_tiny(**kwargs) -> CRIS:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "image_size": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2},
    }  # fmt: skip
    defaults = dict(
        backbone=backbone, fpn_out=(16, 32, 64), num_layers=2, num_head=4, dim_ffn=64,
        image_size=64,
    )  # fmt: skip
    return CRIS(**{**defaults, **kwargs})
