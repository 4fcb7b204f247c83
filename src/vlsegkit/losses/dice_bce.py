"""Weighted soft Dice + binary cross-entropy on mask logits.

MedCLIPSeg (Koleilat et al., "MedCLIPSeg: Probabilistic Vision-Language Adaptation for
Data-Efficient and Generalizable Medical Image Segmentation", CVPR 2026), eq. 23 and Appendix D:
``L = λ_Seg·L_Seg + λ_SoftCon·L_SoftCon`` with ``λ_Seg·L_Seg = 0.5·L_Dice + 0.5·L_BCE``. This module
is the segmentation part, ``dice_weight·L_Dice + bce_weight·L_BCE``.

Dice smoothing. The released MedCLIPSeg code uses ``monai.losses.DiceLoss(sigmoid=True)`` with
MONAI's default ``smooth_nr = smooth_dr = 1e-5``, added to numerator and denominator. It also
passes ``(B, H, W)`` tensors without a channel axis, so MONAI treats image rows as channels and
averages a per-row Dice over rows 1..H-1 (see ``specs/medclipseg.md`` §2.1). vlsegkit implements the
paper's intent, a per-image (per sample and channel) soft Dice, with one ``smooth`` added to both
numerator and denominator. The default ``smooth=1.0`` (the usual choice of smp / many U-Net codes)
keeps the loss and its gradient bounded on empty masks, where ``1e-5`` pushes every pixel's
probability to exactly 0 before the empty term stops contributing; pass ``smooth=1e-5`` to use
MONAI's value.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiceBCELoss", "dice_bce_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(logits: Tensor, target: Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(
            f"logits must have shape (B, C, H, W) (or (B, C, *spatial)), got {tuple(logits.shape)}"
        )
    if target.shape != logits.shape:
        raise ValueError(
            f"target must have the same shape as logits {tuple(logits.shape)} "
            f"(B, C, H, W), got {tuple(target.shape)}"
        )
    if logits.numel() == 0:
        # The mean over no sample or no pixel is NaN, which would reach the optimiser unnoticed.
        raise ValueError(
            f"logits must not be empty (a batch of size 0, no channel or no pixel), got shape "
            f"{tuple(logits.shape)}"
        )
    # The range check reads values back to the host (one sync): compiled graphs skip it, as they
    # skip every data-dependent check (torch.compile would otherwise break the graph here).
    if target.dtype != torch.bool and not torch.compiler.is_compiling():
        # One reduction and one device sync per call, not one per element.
        lo, hi = torch.stack(torch.aminmax(target.detach())).tolist()
        if not (lo >= 0 and hi <= 1):  # also False for NaN, which aminmax propagates
            found = "NaN" if math.isnan(lo) or math.isnan(hi) else f"values in [{lo:.4g}, {hi:.4g}]"
            raise ValueError(
                f"target must hold values in [0, 1] (binary masks or soft labels), got {found}; "
                "divide 0/255 masks by 255"
            )


# The loss is computed in (at least) float32: a larger weight or smooth becomes inf there, and
# inf * 0 or inf / inf make the loss NaN.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_number(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or abs(value) > _FLOAT32_MAX
    ):
        raise ValueError(f"{name} must be a finite number (in float32 range), got {value!r}")


def _check_options(dice_weight: float, bce_weight: float, smooth: float, reduction: str) -> None:
    for name, value in (("dice_weight", dice_weight), ("bce_weight", bce_weight)):
        _check_number(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if dice_weight == 0 and bce_weight == 0:
        raise ValueError(
            "dice_weight and bce_weight are both 0: the loss would be 0 and train nothing"
        )
    _check_number("smooth", smooth)
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0 (it defines Dice on empty masks), got {smooth}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def dice_bce_loss(
    logits: Tensor,
    target: Tensor,
    *,
    dice_weight: float = 0.5,
    bce_weight: float = 0.5,
    smooth: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of ``DiceBCELoss``; see the class for the equations and arguments."""
    if not torch.compiler.is_compiling():  # Python-number checks; torch.compile traces floats
        _check_options(dice_weight, bce_weight, smooth, reduction)
    _check_inputs(logits, target)
    # fp16/bf16 logits are promoted to fp32 (sums over H*W pixels overflow or lose precision in half
    # precision); fp64 stays fp64 so gradcheck works.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(dtype)
        t = target.to(dtype)
        dims = tuple(range(2, x.ndim))
        prob = torch.sigmoid(x)
        overlap = (prob * t).sum(dims)
        total = prob.sum(dims) + t.sum(dims)
        dice = 1.0 - (2.0 * overlap + smooth) / (total + smooth)
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(dims)
        loss = dice_weight * dice + bce_weight * bce
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class DiceBCELoss(nn.Module):
    """Weighted soft Dice + BCE-with-logits for binary (per-channel) masks.

    For each sample ``b`` and channel ``c``, with ``p = sigmoid(logits)`` and sums over pixels::

        L_Dice[b, c] = 1 - (2·Σ p·g + smooth) / (Σ p + Σ g + smooth)
        L_BCE[b, c]  = mean over pixels of -[g·log p + (1 - g)·log(1 - p)]
        L[b, c]      = dice_weight·L_Dice[b, c] + bce_weight·L_BCE[b, c]

    The defaults give MedCLIPSeg's ``0.5·L_Dice + 0.5·L_BCE`` (eq. 23, λ_Seg = 0.5). The BCE uses the
    log-sum-exp form on logits, and everything is computed in at least fp32 with autocast disabled,
    so fp16/bf16 logits under autocast give no overflow or NaN. See the module docstring for why
    ``smooth`` defaults to 1 and how to match the released code's MONAI value.

    Args:
        dice_weight: weight of the soft Dice term.
        bce_weight: weight of the BCE term.
        smooth: added to the Dice numerator and denominator (> 0); makes an empty target with an
            empty prediction score a loss of 0.
        reduction: "mean" (over samples and channels), "sum", or "none" (returns ``(B, C)``).

    Shapes:
        logits: ``(B, C, H, W)`` raw scores (any ``(B, C, *spatial)`` works).
        target: same shape, values in [0, 1] (binary masks or soft labels; bool is accepted).
        output: scalar, or ``(B, C)`` for ``reduction="none"``.

    Raises:
        ValueError: at construction, a weight that is negative, NaN or infinite, both weights 0,
            or ``smooth`` not a finite number > 0; per call, mismatched shapes, empty ``logits``
            (a batch of size 0), or ``target`` values outside [0, 1] or NaN (e.g. 0/255 masks).
            NaN / inf ``logits`` are not checked: they give a NaN loss.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        smooth: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_options(dice_weight, bce_weight, smooth, reduction)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return dice_bce_loss(
            logits,
            target,
            dice_weight=self.dice_weight,
            bce_weight=self.bce_weight,
            smooth=self.smooth,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, "
            f"smooth={self.smooth}, reduction={self.reduction!r}"
        )
