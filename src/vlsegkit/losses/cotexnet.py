"""CoTexNet's joint objective: Dice + cross-entropy on the masks plus the SAN-KD distillation (eq. 15).

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (CoTexNet, *Engineering* 2026), §3.3: ``L = L_seg(f(I; T'), M) + L_KL(T_c, T_e)`` with
``L_seg`` "the sum of Dice and cross-entropy losses". The release (``main.py``,
``train_utils/train_and_eval.py``) uses MONAI's ``DiceCELoss`` with its defaults and weights the KL
term by 10.

* Dice (MONAI ``DiceLoss`` defaults): per image and channel ``1 - (2Σpg + ε)/(Σp + Σg + ε)``,
  ``ε = 1e-5``, averaged over images and channels; ``p = sigmoid(logits)`` (one channel) or
  ``softmax(logits)`` over the ``K + 1`` classes against one-hot targets (background included).
* Cross-entropy: ``BCEWithLogits(logits, g)`` (one channel) or softmax cross-entropy over classes.
  ``released_double_sigmoid=True`` reproduces the release, whose ``DiceCELoss`` received sigmoid
  probabilities, so its BCE term saw ``sigmoid(sigmoid(logits))``.
* KL: :func:`~vlsegkit.layers.sankd_kl_divergence` of the predicted embedding ``T_c`` against
  ``stopgrad(sigmoid(T_e))``, weight ``kl_weight`` (paper 1, release 10).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.sankd import sankd_kl_divergence

__all__ = ["CoTexNetLoss", "class_targets", "soft_dice_loss"]


def _finite_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def soft_dice_loss(probs: Tensor, target: Tensor, *, smooth: float = 1e-5) -> Tensor:
    """MONAI-style Dice loss, one value per (image, channel) averaged.

    Args:
        probs: ``(B, C, H, W)`` probabilities.
        target: ``(B, C, H, W)`` targets in [0, 1].
        smooth: ``ε`` added to numerator and denominator.

    Returns:
        Scalar ``mean_{b,c} 1 - (2Σpg + ε)/(Σp + Σg + ε)``.
    """
    p, g = probs.flatten(2).float(), target.flatten(2).float()
    dice = (2 * (p * g).sum(-1) + smooth) / (p.sum(-1) + g.sum(-1) + smooth)
    return (1 - dice).mean()


def class_targets(masks: Tensor) -> Tensor:
    """``(B, K, H, W)`` class masks -> ``(B, H, W)`` labels: 0 background, ``k + 1`` for class k.

    A pixel in several masks takes the class with the largest mask value (the first on ties).
    """
    fg = masks > 0.5
    return torch.where(
        fg.any(1), masks.argmax(1) + 1, torch.zeros_like(masks[:, 0], dtype=torch.long)
    )


class CoTexNetLoss(nn.Module):
    """``dice_weight·Dice + ce_weight·CE + kl_weight·KL`` on a :class:`~vlsegkit.CoTexNetOutput`.

    Args:
        kl_weight: weight of the distillation term (paper 1, release 10).
        dice_weight, ce_weight: weights of the segmentation terms (1 and 1, MONAI's defaults).
        smooth: Dice ``ε``.
        temperature: KL temperature ``τ`` (1).
        released_double_sigmoid: the release's BCE on sigmoid probabilities (binary only).

    ``terms(output, masks)`` takes masks ``(B, K, H, W)`` in [0, 1] and returns ``{"loss",
    "dice_loss", "ce_loss", "kl_loss"}`` (unweighted terms, weighted total).
    """

    def __init__(
        self,
        *,
        kl_weight: float = 1.0,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        temperature: float = 1.0,
        released_double_sigmoid: bool = False,
    ) -> None:
        super().__init__()
        self.kl_weight = _finite_weight("kl_weight", kl_weight)
        self.dice_weight = _finite_weight("dice_weight", dice_weight)
        self.ce_weight = _finite_weight("ce_weight", ce_weight)
        self.smooth = _finite_weight("smooth", smooth)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.released_double_sigmoid = bool(released_double_sigmoid)

    def segmentation_terms(self, logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """``(dice, ce)`` of logits ``(B, 1 or K + 1, H, W)`` against masks ``(B, K, H, W)``."""
        logits = logits.float()
        masks = masks.float()
        if logits.shape[1] == 1:
            if masks.shape != logits.shape:
                raise ValueError(
                    f"one-channel logits {tuple(logits.shape)} need masks of the same shape, got "
                    f"{tuple(masks.shape)}"
                )
            probs = torch.sigmoid(logits)
            ce_input = probs if self.released_double_sigmoid else logits
            ce = F.binary_cross_entropy_with_logits(ce_input, masks)
            return soft_dice_loss(probs, masks, smooth=self.smooth), ce
        if masks.shape[1] != logits.shape[1] - 1 or masks.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"(K + 1)-channel logits {tuple(logits.shape)} need (B, K, H, W) masks, got "
                f"{tuple(masks.shape)}"
            )
        labels = class_targets(masks)
        onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
        dice = soft_dice_loss(torch.softmax(logits, 1), onehot, smooth=self.smooth)
        return dice, F.cross_entropy(logits, labels)

    def terms(self, output: Any, target: Tensor) -> dict[str, Tensor]:
        """Named loss terms of a :class:`~vlsegkit.CoTexNetOutput` against ``(B, K, H, W)`` masks."""
        dice, ce = self.segmentation_terms(output.logits, target)
        if output.text_embedding is None or output.predicted_embedding is None:
            raise ValueError(
                "the KL term needs the text embedding: call CoTexNet with prompts and masks"
            )
        kl = sankd_kl_divergence(
            output.predicted_embedding, output.text_embedding, temperature=self.temperature
        )
        loss = self.dice_weight * dice + self.ce_weight * ce + self.kl_weight * kl
        return {"loss": loss, "dice_loss": dice, "ce_loss": ce, "kl_loss": kl}

    def forward(self, output: Any, target: Tensor) -> Tensor:
        """The weighted total (``terms(...)["loss"]``)."""
        return self.terms(output, target)["loss"]

    def extra_repr(self) -> str:
        return (
            f"kl_weight={self.kl_weight}, dice_weight={self.dice_weight}, "
            f"ce_weight={self.ce_weight}, released_double_sigmoid={self.released_double_sigmoid}"
        )
