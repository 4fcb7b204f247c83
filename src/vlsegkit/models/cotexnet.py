"""CoTexNet: conceptual text prompts from regions of interest, distilled into the image's [CLS] token.

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (*Engineering* 2026); released code github.com/Rango-bit/CoTexNet (MIT). A CLIPSeg
(frozen CLIP towers, trainable FiLM decoder) conditioned, during training, on a text embedding that
combines

* a coarse **real-text prompt** ``T_r`` built offline from the five concepts of each class's ROI
  (``vlsegkit.data.concepts``), and
* fine **pseudo-text tokens**: each class's ROI image ``R_i = I ⊗ M_i`` through the frozen vision tower,
  its [CLS] token mapped into the text tower's token space and written into a placeholder after
  "segmentation area of" (:class:`~vlsegkit.adapters.ROIPseudoTokens`, a text-tower hook).

SAN-KD (:class:`~vlsegkit.layers.SANKD`) mixes the squashed text embedding with the embedding ``T_c``
predicted from the image's own [CLS] token, and distils the former into the latter with a KL loss
(:class:`~vlsegkit.CoTexNetTask`); at test time the decoder is conditioned on ``T_c`` alone, so
``predict(images)`` needs no text, no mask and no text tower.

CoTexNet owns a :class:`~vlsegkit.CLIPSeg` (its towers, tokenizer and FiLM decoder) and runs it through
the one layer loop, so prompt learners and adapters attach to it like to any model with hook slots.
Multi-class segmentation (absent from the release): one pseudo-token per class present, a
``(K + 1)``-channel head (background first) and softmax Dice + cross-entropy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.roi_tokens import ROI_SLOTS, ROIPseudoTokens, ROISlots
from ..encoders.factory import IMAGENET_MEAN, IMAGENET_STD
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.runner import embed_tower, run_towers
from ..hub import CheckpointError, load_state_dict_strict
from ..layers.sankd import SANKD, CLSEmbeddingPredictor
from ..registry import register_model
from ._backbones import hf_clip_vit_b16
from .base import VLSM, _as_image_list, check_pixels, eval_mode
from .clipseg import CLIPSeg, _tiny_backbone
from .outputs import SegmentationOutput

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["PLACEHOLDER", "RELEASED_OPTIONS", "CoTexNet", "CoTexNetOutput", "CoTexNetText"]

#: The single-token word written where each ROI pseudo-token goes (Fig. 2's "[temp]").
PLACEHOLDER = "*"
#: The release's fixed slot (``model/CLIPSeg_code.py``: ``hidden_states[:, 5, :] = roi_embedding``).
RELEASED_SLOT = 5
_CONDITIONS = ("auto", "mixture", "text", "image")

#: Constructor options that reproduce the released code (github.com/Rango-bit/CoTexNet @ 5999d3f)
#: where it differs from the paper (see the docs page's table).
RELEASED_OPTIONS: dict[str, Any] = {
    "slot_mode": "released",
    "position_embedding": "overwrite",
    "roi_background": "mean",
    "cls_predictor": "released",
    "double_sigmoid": True,
    "dropout": 0.0,
}


@dataclass
class CoTexNetOutput(SegmentationOutput):
    """CoTexNet's output.

    Attributes:
        logits: ``(B, 1, H, W)`` mask logits (binary) or ``(B, K + 1, H, W)`` class logits,
            background first (multi-class).
        conditional_embeddings: ``(B, 1, E)`` the vector FiLM received (``T^`` or ``T^_c``).
        text_embedding: ``(B, E)`` ``sigmoid(T_e)`` of the real-text + pseudo-text prompt (the
            distillation teacher), when prompts and masks were given; else None.
        predicted_embedding: ``(B, E)`` ``T_c``, predicted from the image's [CLS] token.
        condition: which conditioning drove the decoder: ``"mixture"``, ``"text"`` or ``"image"``.
    """

    text_embedding: Tensor | None = None
    predicted_embedding: Tensor | None = None
    condition: str = "image"


@dataclass(frozen=True)
class CoTexNetText:
    """The text side of a training pass, prepared from prompts and masks (:meth:`CoTexNet.prepare_text`).

    Everything data-dependent happens while preparing: which classes each mask holds, the ROI count
    per image and the tokenisation of the strings built from it. A forward pass given this object
    (as its ``prompts``) runs tensor operations only, so ``torch.compile(model, fullgraph=True)``
    captures the whole pass, ROI tower pass included, in one graph.

    Attributes:
        input_ids: ``(B, L)`` token ids of the prompt texts (placeholders included).
        attention_mask: ``(B, L)`` 1 for real tokens.
        roi: ``(M, 3, H, W)`` ROI images ``R = I ⊗ M_k`` (eq. 1), one per (image, class present).
        rows: ``(M,)`` long, the image (text row) of each ROI.
        positions: ``(M,)`` long, its placeholder's index in the row's token ids.
        token_ids: ``(M,)`` long, the token id at that index.
    """

    input_ids: Tensor
    attention_mask: Tensor
    roi: Tensor
    rows: Tensor
    positions: Tensor
    token_ids: Tensor


def _hook_keeps(hooks: Sequence[TowerHook], tower: str) -> list[int]:
    return sorted({i for h in hooks if tower in h.towers for i in h.keep_layers(tower)})


class CoTexNet(VLSM):
    """CoTexNet on a CLIPSeg: text-conditioned training, text-free inference.

    Training forward (``condition="mixture"``, what :class:`~vlsegkit.CoTexNetTask` uses)::

        R_bk   = I_b ⊗ M_bk  (black background; "mean" = 0 in normalised space, the release)  eq. 1
        p_bk   = Map_roi(CLS(E_I(R_bk)))              # ROIPseudoTokens, one per class present
        T_e    = E_T("segmentation area of" ⊕ p_b1..p_bn ⊕ "." ⊕ T_r)                        eqs. 3-4
        T_c    = sigmoid(Map_cls(CLS(E_I(I))))                                             eq. 8
        T^     = Dropout(((1 - a)·sigmoid(T_e) + a·T_c)·s + m)                              eqs. 9, 11
        logits = FiLMDecoder(E_I(I)_{extract_layers}, T^)                                   eqs. 6-7

    Test (``condition="image"``, the default in eval mode and in :meth:`predict`):
    ``logits = FiLMDecoder(E_I(I)_{extract_layers}, T_c·s + m)`` (eq. 12). ``condition="text"``
    decodes with ``sigmoid(T_e)·s + m`` (the real-text conditioning, for comparisons). Both [CLS]
    tokens are the final block's, before the post-LayerNorm; one frozen vision tower serves the image
    and the ROI passes (the release keeps a second frozen copy).

    Paper defaults; the release's behaviour is one option each (``RELEASED_OPTIONS`` sets them all):

    ============================  ==================================  ==============================
    option                        paper (default)                     release
    ============================  ==================================  ==============================
    ``slot_mode``                 ``"template"``: "segmentation       ``"released"``: overwrite
                                  area of * ." before ``T_r``         index 5 of the raw ``T_r``
    ``position_embedding``        ``"add"`` (slot keeps its           ``"overwrite"`` (token +
                                  position)                           position replaced)
    ``roi_background``            ``"black"`` (I ⊗ M)                 ``"mean"`` (0 after
                                                                      normalisation)
    ``cls_predictor``             ``"paper"`` (Linear-GELU-Linear-LN) ``"released"`` (3-layer ReLU)
    ``double_sigmoid``            False                               True
    ``dropout``                   0.2 on ``T^``                       0 (built, never applied)
    ``outer_sigmoid``             False (eqs. 6/12; eq. 9 literal     False
                                  is True)
    ============================  ==================================  ==============================

    Args:
        backbone: CLIP tower architecture (a :class:`~vlsegkit.encoders.TransformersCLIPSpec` dict,
            as :class:`~vlsegkit.CLIPSeg` takes it).
        extract_layers, reduce_dim, decoder_num_heads: the CLIPSeg decoder's kept vision blocks,
            width and heads (rd64-refined: (3, 6, 9), 64, 4).
        decoder_mlp_dim, conditional_layer, complex_upsampler: its MLP width, FiLM level and
            refined upsampler (2048, 0, True).
        image_size: ``(H, W)`` or one int that ``predict`` resizes to (224 in the paper's code).
        image_mean, image_std: normalisation (ImageNet statistics, as the release).
        num_classes: foreground classes K; 1 gives a one-channel sigmoid head, K > 1 a ``K + 1``
            channel softmax head (Xavier-normal init, zero bias, as the release's
            ``output_convolution``).
        prompt_template: the pseudo-prompt template ``t_0`` ("segmentation area of", eq. 3).
        slot_mode: ``"template"`` or ``"released"`` (see the table).
        position_embedding: ``"add"`` or ``"overwrite"``.
        roi_background: ``"black"`` or ``"mean"``.
        cls_predictor: ``"paper"`` or ``"released"``.
        double_sigmoid: the release's second sigmoid on ``T_c``.
        alpha, scale, shift: initial SAN-KD noise weight and inverse z-score (0.2, 1, -0.002).
        dropout: dropout on ``T^`` in training (0.2).
        outer_sigmoid: eq. 9's sigmoid around the mixture.
        freeze_backbone: freeze both CLIP towers (the paper's recipe).
        hooks: hooks the model owns besides its ROI pseudo-token hook.

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts=B strings, masks=(B, K, H, W))`` or
    ``forward(pixel_values)`` -> ``logits (B, 1 or K + 1, H, W)``.
    """

    model_type = "cotexnet"

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        extract_layers: Sequence[int] = (3, 6, 9),
        reduce_dim: int = 64,
        decoder_num_heads: int = 4,
        decoder_mlp_dim: int = 2048,
        conditional_layer: int = 0,
        complex_upsampler: bool = True,
        image_size: int | Sequence[int] = 224,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        num_classes: int = 1,
        prompt_template: str = "segmentation area of",
        slot_mode: str = "template",
        position_embedding: str = "add",
        roi_background: str = "black",
        cls_predictor: str = "paper",
        double_sigmoid: bool = False,
        alpha: float = 0.2,
        scale: float = 1.0,
        shift: float = -0.002,
        dropout: float = 0.2,
        outer_sigmoid: bool = False,
        freeze_backbone: bool = True,
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if slot_mode not in ("template", "released"):
            raise ValueError(f"slot_mode must be 'template' or 'released', got {slot_mode!r}")
        if roi_background not in ("black", "mean"):
            raise ValueError(f"roi_background must be 'black' or 'mean', got {roi_background!r}")
        if not isinstance(prompt_template, str) or not prompt_template.strip():
            raise ValueError(f"prompt_template must be a non-empty string, got {prompt_template!r}")
        self.clipseg = CLIPSeg(
            backbone=backbone,
            extract_layers=extract_layers,
            reduce_dim=reduce_dim,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_dim=decoder_mlp_dim,
            conditional_layer=conditional_layer,
            complex_upsampler=complex_upsampler,
            image_size=image_size,
            image_mean=image_mean,
            image_std=image_std,
            freeze_backbone=freeze_backbone,
        )
        self._set_config_arg(backbone=self.clipseg.config["backbone"])
        self.image_size = self.clipseg.image_size
        self.image_mean, self.image_std = self.clipseg.image_mean, self.clipseg.image_std
        self.num_classes = num_classes
        self.num_outputs = 1 if num_classes == 1 else num_classes + 1
        if num_classes > 1:
            self._replace_head(self.num_outputs)
        self.slot_mode = slot_mode
        self.roi_background = roi_background
        self.prompt_template = " ".join(prompt_template.split())
        self._check_placeholder()
        vision, text = self.clipseg.vision_tower, self.clipseg.text_tower
        self.roi_tokens = ROIPseudoTokens(position_embedding=position_embedding).bind(self._slots())
        self.cls_predictor = CLSEmbeddingPredictor(
            vision.width, text.embed_dim, variant=cls_predictor, double_sigmoid=double_sigmoid
        )
        self.sankd = SANKD(
            alpha=alpha, scale=scale, shift=shift, dropout=dropout, outer_sigmoid=outer_sigmoid
        )
        #: Recompute tower block activations in backward instead of storing them.
        self.gradient_checkpointing = False
        self.hooks = self._bind_hooks(hooks)

    # ------------------------------------------------------------------ parts
    @property
    def vision_tower(self):
        """The frozen CLIP vision tower (shared by the image and the ROI passes)."""
        return self.clipseg.vision_tower

    @property
    def text_tower(self):
        """The frozen CLIP text tower (training only)."""
        return self.clipseg.text_tower

    @property
    def decoder(self):
        """The CLIPSeg FiLM decoder (with a ``K + 1``-channel head for K > 1 classes)."""
        return self.clipseg.decoder

    @property
    def tokenizer(self):
        """The CLIP prompt tokenizer."""
        return self.clipseg.tokenizer

    @property
    def extract_layers(self) -> tuple[int, ...]:
        """Vision blocks whose outputs feed the decoder."""
        return self.clipseg.extract_layers

    def _replace_head(self, channels: int) -> None:
        # The release swaps the last transposed convolution for a (K + 1)-channel one, Xavier-normal.
        up = self.clipseg.decoder.transposed_convolution
        last = up[-1] if isinstance(up, nn.Sequential) else up
        head = nn.ConvTranspose2d(
            last.in_channels, channels, kernel_size=last.kernel_size, stride=last.stride
        )
        nn.init.xavier_normal_(head.weight)
        nn.init.zeros_(head.bias)
        if isinstance(up, nn.Sequential):
            up[-1] = head
        else:
            self.clipseg.decoder.transposed_convolution = head

    def _check_placeholder(self) -> None:
        ids = self.tokenizer.encode(PLACEHOLDER + " " + PLACEHOLDER)
        if len(ids) != 2 or ids[0] != ids[1]:
            raise ValueError(f"the placeholder {PLACEHOLDER!r} is not a single CLIP token")
        self._placeholder_id = int(ids[0])
        self._first_slot = (
            1 + len(self.tokenizer.encode(self.prompt_template))
            if self.slot_mode == "template"
            else RELEASED_SLOT
        )

    def _slots(self) -> HookSlots:
        return HookSlots(
            towers={"vision": self.clipseg.vision_tower, "text": self.clipseg.text_tower},
            kept={"vision": self.clipseg.extract_layers},
            condition_dim=self.clipseg.text_tower.embed_dim,
            tokenizer=self.clipseg.tokenizer,
        )

    def hook_slots(self) -> HookSlots:
        """Towers, the decoder's kept vision blocks and the conditioning width.

        The vision tower runs every block (the [CLS] token ``T_c`` is read after the last one).
        """
        return self._slots()

    def check_hooks(self, hooks: Sequence[TowerHook], *, frozen: bool = False) -> None:
        """Refuse hooks that cannot act in the text-free inference (``predict(images)``,
        ``model(x)``), which runs the vision tower, the [CLS] predictor and the decoder only.

        * Hooks that need the text tower's states there -- lockstep hooks (PVL adapters) and hooks
          that read kept text blocks (shallow bottleneck adapters with ``text=True``) -- would train
          and then fail at inference: refused, owned or attached.
        * With ``frozen`` (a :class:`~vlsegkit.TunedModel`), hooks that change neither the vision
          tower nor the conditioning vector (:meth:`~vlsegkit.encoders.TowerHook.acts_on`; e.g.
          CoOp, CoCoOp) are refused as well: they only shape the text embedding, which reaches
          inference through the [CLS] predictor's distillation -- and that predictor is frozen
          there, so training them could not change any prediction. Owned by the model, they train
          together with the predictor.

        Raises:
            ValueError: naming the hook, the reason and the alternative.
        """
        for hook in hooks:
            name = type(hook).__name__
            text_blocks = sorted(hook.keep_layers("text")) if "text" in hook.towers else []
            if hook.lockstep or text_blocks:
                what = (
                    "steps the vision and text towers together"
                    if hook.lockstep
                    else f"reads the text states of blocks {text_blocks}"
                )
                raise ValueError(
                    f"{name} {what}, but CoTexNet's text-free inference (predict(images), "
                    "model(x)) runs no text tower: it would train and then fail at inference. Use "
                    "hooks that act on the vision tower or the conditioning vector alone (VPT, "
                    "MaPLe, BottleneckAdapters('dense') or BottleneckAdapters('shallow', "
                    "text=False))"
                )
            if frozen and not (hook.acts_on("vision") or hook.acts_on("condition")):
                raise ValueError(
                    f"{name} acts only on the text tower, which CoTexNet's text-free inference "
                    "(predict(images), model(x)) never runs; attached to a frozen CoTexNet (its "
                    "[CLS] predictor frozen too) training it cannot change any prediction. Make it "
                    f"the model's own hook instead -- create_model('cotexnet-...', hooks=[{name}"
                    "(...)]) -- so that the [CLS] predictor trains with it through the "
                    "distillation, or attach a hook that acts on the vision tower (VPT, MaPLe, "
                    "BottleneckAdapters('dense'))"
                )

    # ------------------------------------------------------------------ inputs
    def _resolve_condition(self, condition: str, prompts: Any, masks: Any) -> str:
        if condition not in _CONDITIONS:
            raise ValueError(f"condition must be one of {_CONDITIONS}, got {condition!r}")
        # prepared text carries its ROIs already: the masks are optional then
        if not isinstance(prompts, CoTexNetText) and (prompts is None) != (masks is None):
            raise ValueError(
                "CoTexNet's text conditioning needs prompts and masks together (the masks give the "
                "ROI pseudo-tokens); pass both, or neither for text-free inference"
            )
        textual = prompts is not None
        if condition == "auto":
            return "mixture" if textual and self.training else "image"
        if condition in ("mixture", "text") and not textual:
            raise ValueError(f"condition={condition!r} needs prompts and masks")
        return condition

    def _check_prompts(self, prompts: Any, batch: int) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts] * batch
        if (
            not isinstance(prompts, (list, tuple))
            or len(prompts) != batch
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise ValueError(
                f"prompts must be one real-text string per image (B={batch}) or one string for all, "
                f"got {prompts!r:.200}"
            )
        return list(prompts)

    def _check_masks(self, masks: Any, pixel_values: Tensor) -> Tensor:
        b, _, h, w = pixel_values.shape
        k = self.num_classes
        if not isinstance(masks, Tensor) or masks.shape != (b, k, h, w):
            shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(
                f"masks must be a (B={b}, K={k}, H={h}, W={w}) tensor of class masks in [0, 1], "
                f"got {shape}"
            )
        if not (masks.dtype == torch.bool or masks.is_floating_point()):
            raise ValueError(f"masks must be float or bool, got dtype {masks.dtype}")
        return masks.to(device=pixel_values.device, dtype=pixel_values.dtype)

    def roi_images(self, pixel_values: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ROI images ``R = I ⊗ M`` of every (image, class present) pair (eq. 1).

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images.
            masks: ``(B, K, H, W)`` class masks in [0, 1].

        Returns:
            ``(roi (M, 3, H, W), rows (M,), classes (M,))``: one ROI per class with a nonzero mask,
            image-major and in class order. The background outside the mask is black (the image
            value 0, i.e. ``-mean / std`` after normalisation) or, with ``roi_background="mean"``,
            0 in normalised space (the release's masked fill).
        """
        present = masks.flatten(2).amax(-1) > 0
        rows, classes = present.nonzero(as_tuple=True)
        m = masks[rows, classes][:, None]
        roi = pixel_values[rows] * m
        if self.roi_background == "black":
            mean = pixel_values.new_tensor(self.image_mean)[:, None, None]
            std = pixel_values.new_tensor(self.image_std)[:, None, None]
            roi = roi + (-mean / std) * (1 - m)
        return roi, rows, classes

    def prompt_texts(self, prompts: Sequence[str], counts: Sequence[int]) -> list[str]:
        """The text fed to the tokenizer for each image's real-text prompt and ROI count.

        ``slot_mode="template"``: ``"segmentation area of * * . <T_r>"`` with one placeholder per
        ROI (Fig. 2); ``"released"``: ``T_r`` as it is.
        """
        if self.slot_mode == "released":
            return [p.strip() for p in prompts]
        return [
            " ".join([self.prompt_template, *[PLACEHOLDER] * n, "."]) + (" " + p.strip()).rstrip()
            for p, n in zip(prompts, counts, strict=True)
        ]

    def prepare_text(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str],
        masks: Tensor,
        *,
        hooks: Sequence[TowerHook] = (),
    ) -> CoTexNetText:
        """The data-dependent text side of a training pass, run eagerly (see :class:`CoTexNetText`).

        Pass the result as ``prompts`` to ``forward`` (masks optional then): the pass is the same as
        with the strings and masks, but tensor-only, so it compiles without graph breaks.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images.
            prompts: one real-text prompt per image (or one string for all).
            masks: ``(B, K, H, W)`` class masks in [0, 1].
            hooks: the hooks the forward pass will be given (their text context tokens are
                reserved in the token ids).
        """
        pixel_values = check_pixels(pixel_values)
        all_hooks = (self.roi_tokens, *self._run_hooks(hooks))
        texts = self._check_prompts(prompts, pixel_values.shape[0])
        return self._prepare_text(
            pixel_values, texts, self._check_masks(masks, pixel_values), all_hooks
        )

    def _prepare_text(
        self, pixel_values: Tensor, prompts: list[str], masks: Tensor, hooks: Sequence[TowerHook]
    ) -> CoTexNetText:
        roi, rows, _ = self.roi_images(pixel_values, masks)
        counts = torch.bincount(rows, minlength=len(prompts)).tolist()
        reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        padding = "max_length" if self.slot_mode == "released" else "longest"
        batch = self.tokenizer(self.prompt_texts(prompts, counts), reserve=reserve, padding=padding)
        device = pixel_values.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        # the j-th ROI of an image goes to the j-th slot of its row
        order = (
            torch.cat([torch.arange(n, device=device) for n in counts]) if rows.numel() else rows
        )
        positions = self._first_slot + order
        if rows.numel() and int(positions.max()) >= ids.shape[1]:
            raise ValueError(
                f"the ROI slots reach index {int(positions.max())} but the prompts have only "
                f"{ids.shape[1]} tokens"
            )
        token_ids = ids[rows, positions]
        if self.slot_mode == "template" and bool((token_ids != self._placeholder_id).any()):
            raise ValueError(
                "a prompt lost its ROI placeholders (truncated?); shorten the real-text prompt"
            )
        return CoTexNetText(ids, mask, roi, rows, positions, token_ids)

    def _text_inputs(
        self, pixel_values: Tensor, prompts: list[str], masks: Tensor, hooks: Sequence[TowerHook]
    ) -> tuple[Tensor, Tensor, ROISlots]:
        """Token ids, mask and ROI slots of checked prompts and masks."""
        text = self._prepare_text(pixel_values, prompts, masks, hooks)
        return self._text_slots(text, pixel_values.shape[0])

    def _text_slots(self, text: CoTexNetText, batch: int) -> tuple[Tensor, Tensor, ROISlots]:
        """Token ids, mask and ROI slots (ROI [CLS] tokens from the frozen vision tower)."""
        if text.input_ids.dim() != 2 or text.input_ids.shape[0] != batch:
            raise ValueError(
                f"prepared text must hold one token row per image (B={batch}), got input_ids "
                f"{tuple(text.input_ids.shape)}"
            )
        roi = text.roi
        features = (
            self.vision_tower(roi).state.tokens[:, 0]
            if roi.shape[0]
            else roi.new_zeros(0, self.vision_tower.width)
        )
        return (
            text.input_ids,
            text.attention_mask,
            ROISlots(features, text.rows, text.positions, text.token_ids),
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | CoTexNetText | None = None,
        *,
        masks: Tensor | None = None,
        condition: str = "auto",
        hooks: Sequence[TowerHook] = (),
    ) -> CoTexNetOutput:
        """Segment ``pixel_values``; text conditions training only.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
            prompts: the real-text prompts ``T_r``, one string per image (multi-class: the class
                sentences joined), or None for text-free inference; or their tensor form from
                :meth:`prepare_text` (the pass then has no data-dependent step: it compiles
                with ``fullgraph=True``).
            masks: ``(B, K, H, W)`` class masks in [0, 1] (the ROIs); with ``prompts`` only
                (optional with prepared text, which holds its ROIs).
            condition: ``"auto"`` (``"mixture"`` in train mode when prompts and masks are given,
                else ``"image"``), ``"mixture"`` (SAN-KD training, eq. 11), ``"image"`` (text-free,
                eq. 12; with prompts and masks ``text_embedding`` is still returned for the
                distillation loss) or ``"text"`` (``sigmoid(T_e)·s + m``).
            hooks: extra :class:`~vlsegkit.encoders.TowerHook` s (prompt learners, adapters). In the
                text-free path hooks acting only on the text tower have no effect (their training
                reached ``T_c`` through the distillation); hooks that need the text tower's states
                are refused when bound (:meth:`check_hooks`) and raise here.

        Returns:
            :class:`CoTexNetOutput`.
        """
        hooks = (self.roi_tokens, *self._run_hooks(hooks))
        pixel_values = check_pixels(pixel_values)
        b = pixel_values.shape[0]
        mode = self._resolve_condition(condition, prompts, masks)
        textual = prompts is not None
        ctx = RunContext()
        ids = mask = None
        if textual:
            text = prompts
            if masks is not None:
                masks = self._check_masks(masks, pixel_values)
            if not isinstance(text, CoTexNetText):
                texts = self._check_prompts(prompts, b)
                text = self._prepare_text(pixel_values, texts, masks, hooks)
            ids, mask, ctx.extras[ROI_SLOTS] = self._text_slots(text, b)
            ctx.text_image_index = torch.arange(b, device=pixel_values.device)
        else:
            lockstep = [type(h).__name__ for h in hooks if h.lockstep]
            if lockstep:
                raise ValueError(
                    f"{', '.join(lockstep)} step the vision and text towers together, but "
                    "CoTexNet's text-free path runs no text tower"
                )
        lockstep = textual and any(h.lockstep for h in hooks)
        vision = embed_tower("vision", self.vision_tower, pixel_values, hooks=hooks, ctx=ctx)
        keep = sorted({*self.extract_layers, *_hook_keeps(hooks, "vision")})
        text_embedding = None
        if lockstep:
            text = embed_tower("text", self.text_tower, ids, mask, hooks=hooks, ctx=ctx)
            text_keep = _hook_keeps(hooks, "text")
            run = run_towers(
                {"vision": self.vision_tower, "text": self.text_tower},
                {"vision": vision, "text": text},
                hooks=hooks,
                ctx=ctx,
                keep={"vision": keep, **({"text": text_keep} if text_keep else {})},
                gradient_checkpointing=self.gradient_checkpointing,
            )
            text_embedding = self.text_tower.pool(run.states["text"])
        else:
            run = run_towers(
                {"vision": self.vision_tower},
                {"vision": vision},
                hooks=hooks,
                ctx=ctx,
                keep={"vision": keep},
                gradient_checkpointing=self.gradient_checkpointing,
            )
            if any(h.needs_image_features for h in hooks):
                ctx.image_features = self.vision_tower.pool(run.states["vision"])
            if textual:
                text_embedding = self._encode_text(ids, mask, hooks, ctx)
        cls_token = run.states["vision"].tokens[:, 0]
        predicted = self.cls_predictor(cls_token)
        cond = self.sankd(mode, predicted, text_embedding)
        for hook in hooks:
            cond = hook.condition(cond, ctx)
        acts = [run.kept["vision"][i] for i in self.extract_layers]
        if len({a.content_start for a in acts}) != 1:
            raise ValueError("hooks must present every kept vision block with the same layout")
        logits = self.decoder(
            [a.tokens for a in acts],
            cond.to(acts[0].tokens.dtype),
            grid=acts[0].grid,
            content_start=acts[0].content_start,
        )
        return CoTexNetOutput(
            logits=logits,
            conditional_embeddings=cond[:, None],
            text_embedding=None if text_embedding is None else torch.sigmoid(text_embedding),
            predicted_embedding=predicted,
            condition=mode,
        )

    def _encode_text(
        self, ids: Tensor, mask: Tensor, hooks: Sequence[TowerHook], ctx: RunContext
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

    def image_condition(self, pixel_values: Tensor, *, hooks: Sequence[TowerHook] = ()) -> Tensor:
        """The text-free conditioning ``T^_c = T_c·s + m`` of images (eq. 12), ``(B, E)``, with
        the model's own hooks and ``hooks``."""
        return self(pixel_values, condition="image", hooks=hooks).conditional_embeddings[:, 0]

    # ------------------------------------------------------------------ inference
    def probabilities(self, logits: Tensor) -> Tensor:
        """Sigmoid of one-channel logits, softmax over the ``K + 1`` classes otherwise."""
        return torch.sigmoid(logits) if self.num_outputs == 1 else torch.softmax(logits, dim=1)

    def _predict_probs(
        self, pixel_values: Tensor, prompts: Any = None, hooks: Sequence[TowerHook] = ()
    ) -> Tensor:
        logits = self(pixel_values, condition="image", hooks=hooks).logits
        return self.probabilities(logits.float())

    @torch.no_grad()
    def predict(
        self,
        images: Any,
        prompts: Any = None,
        *,
        batch_size: int = 8,
        progress: bool | None = False,
        hooks: Sequence[TowerHook] = (),
    ) -> Tensor | list[Tensor]:
        """Text-free probabilities at each image's original size (eq. 12): no prompt, no mask.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``).
            prompts: must be None; CoTexNet predicts from the image alone.
            batch_size: images per forward pass.
            progress: a progress bar over the images (None: only when stderr is a terminal).
            hooks: hooks to run besides the model's own (a :class:`~vlsegkit.TunedModel`'s).

        Returns:
            ``(1, H, W)`` foreground probabilities (binary) or ``(K + 1, H, W)`` class
            probabilities (multi-class) for one image, or a list of them.
        """
        if prompts is not None:
            raise ValueError(
                "CoTexNet predicts from the image alone: real-text prompts (with masks) condition "
                "training only; call predict(images)"
            )
        single, items = _as_image_list(images)
        out: list[Tensor] = []
        with eval_mode(self):
            for _, pixels, sizes in self.image_chunks(items, batch_size, progress=progress):
                probs = self._predict_probs(pixels, hooks=hooks)
                for p, size in zip(probs, sizes):
                    up = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)
                    out.append(up[0].cpu())
        return out[0] if single else out

    # ------------------------------------------------------------------ training
    def default_task(self) -> Task:
        """:class:`~vlsegkit.CoTexNetTask` with the paper's loss: Dice + CE + KL (weight 1)."""
        from .cotexnet_task import CoTexNetTask

        return CoTexNetTask()

    # ------------------------------------------------------------------ CLIPSeg weights
    def load_clipseg(self, clipseg: CLIPSeg) -> CoTexNet:
        """Copy a CLIPSeg's towers and decoder into this model (CoTexNet's initialisation).

        Everything but CoTexNet's new modules (ROI mapping, [CLS] predictor, SAN-KD scalars) comes
        from ``clipseg``; with K > 1 classes the new ``K + 1``-channel head keeps its own init.

        Raises:
            CheckpointError: the architectures differ.
        """
        if not isinstance(clipseg, CLIPSeg):
            raise TypeError(f"clipseg must be a CLIPSeg, got {type(clipseg).__name__}")
        state = clipseg.state_dict()
        own = self.clipseg.state_dict()
        if self.num_outputs > 1:
            for key in list(state):
                mismatch = own.get(key) is not None and own[key].shape != state[key].shape
                if mismatch and key.startswith("decoder.transposed_convolution"):
                    state[key] = own[key]
        load_state_dict_strict(self.clipseg, state, source=f"{type(clipseg).__name__} weights")
        return self

    @classmethod
    def from_clipseg(cls, clipseg: CLIPSeg | str | os.PathLike, **kwargs: Any) -> CoTexNet:
        """A CoTexNet initialised from a CLIPSeg (a model, a Hub id or a folder).

        The backbone and decoder settings come from the CLIPSeg; ``kwargs`` set CoTexNet's options
        (``image_size`` defaults to 224, the paper's input size).

        Example:
            >>> model = CoTexNet.from_clipseg("CIDAS/clipseg-rd64-refined")
        """
        if not isinstance(clipseg, CLIPSeg):
            loaded = VLSM.from_pretrained(clipseg)
            if not isinstance(loaded, CLIPSeg):
                raise CheckpointError(f"{clipseg} is not a CLIPSeg checkpoint")
            clipseg = loaded
        config = dict(clipseg.config)
        for key in ("hooks", "freeze_backbone"):
            config.pop(key, None)
        config["image_size"] = 224
        model = cls(**{**config, **kwargs})
        return model.load_clipseg(clipseg).train()


# ---------------------------------------------------------------------- registry
def _from(clipseg: Any, model: CoTexNet) -> CoTexNet:
    if clipseg is None:
        return model
    if not isinstance(clipseg, CLIPSeg):
        loaded = VLSM.from_pretrained(clipseg)
        if not isinstance(loaded, CLIPSeg):
            raise CheckpointError(f"{clipseg} is not a CLIPSeg checkpoint")
        clipseg = loaded
    return model.load_clipseg(clipseg)


@register_model(
    "cotexnet-clipseg-rd64-refined",
    description="CoTexNet on CLIPSeg ViT-B/16 rd64-refined (paper options); clipseg= initialises "
    "it from a CLIPSeg checkpoint, e.g. 'CIDAS/clipseg-rd64-refined'",
)
def cotexnet_clipseg_rd64_refined(*, clipseg: Any = None, **kwargs) -> CoTexNet:
    model = CoTexNet(backbone=hf_clip_vit_b16(), reduce_dim=64, complex_upsampler=True, **kwargs)
    return _from(clipseg, model)


@register_model(
    "cotexnet-clipseg-rd64-refined-released",
    description="CoTexNet with the released code's options (index-5 slot, mean background, "
    "ReLU [CLS] MLP with double sigmoid, no dropout)",
)
def cotexnet_clipseg_rd64_refined_released(*, clipseg: Any = None, **kwargs) -> CoTexNet:
    options = {**RELEASED_OPTIONS, **kwargs}
    model = CoTexNet(backbone=hf_clip_vit_b16(), reduce_dim=64, complex_upsampler=True, **options)
    return _from(clipseg, model)


@register_model(
    "cotexnet-tiny",
    description="A tiny random CoTexNet (CLIPSeg-tiny towers) for tests, demos and CPU runs",
)
def cotexnet_tiny(*, clipseg: Any = None, **kwargs) -> CoTexNet:
    defaults = dict(
        extract_layers=(1, 2, 3), reduce_dim=32, decoder_num_heads=4, decoder_mlp_dim=128,
        complex_upsampler=False, image_size=64,
    )  # fmt: skip
    return _from(clipseg, CoTexNet(backbone=_tiny_backbone(), **{**defaults, **kwargs}))
