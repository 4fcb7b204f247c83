"""MedCLIPSeg's training objective: Dice + BCE on the masks plus the soft patch contrastive term."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from .contrastive import SoftPatchContrastiveLoss
from .dice_bce import dice_bce_loss

__all__ = ["MedCLIPSegLoss"]


class MedCLIPSegLoss(nn.Module):
    """MedCLIPSeg's total loss ``L = w_d L_Dice + w_b L_BCE + w_c L_SoftCon`` (eq. 23, Appendix D).

    Koleilat et al., "MedCLIPSeg" (CVPR 2026). The paper (and the released code) use
    ``0.5 Dice + 0.5 BCE + 0.1 L_SoftCon`` with ``tau = 0.2``. The segmentation part is the per-image
    soft Dice and BCE of :func:`~vlsegkit.losses.dice_bce_loss` (see its docstring for the released
    code's row-wise MONAI quirk), the contrastive part :class:`~vlsegkit.losses.SoftPatchContrastiveLoss`
    on the final patch tokens and global text embeddings of a
    :class:`~vlsegkit.models.MedCLIPSegOutput` (every (image, prompt) pair is one contrastive row).

    Args:
        dice_weight: weight of the soft Dice term (0.5).
        bce_weight: weight of the BCE term (0.5).
        softcon_weight: weight ``lambda_SoftCon`` of the soft patch contrastive term (0.1).
        temperature: contrastive temperature ``tau`` (0.2).
        softcon_variant: ``"paper"`` (eqs. 20-22) or ``"released"`` (official training code).
        smooth: Dice smoothing (see :class:`~vlsegkit.losses.DiceBCELoss`).

    Shapes:
        ``forward(output, masks)``: ``output.logits (B, C, H, W)``, ``output.patch_tokens
        (B, C, P, E)``, ``output.text_embeddings (B, C, E)``; ``masks`` like the logits (or
        ``(B, H, W)`` when ``C = 1``), values in [0, 1]. Returns a scalar.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        softcon_weight: float = 0.1,
        temperature: float = 0.2,
        softcon_variant: Literal["paper", "released"] = "paper",
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("dice_weight", dice_weight),
            ("bce_weight", bce_weight),
            ("softcon_weight", softcon_weight),
        ):
            if not (isinstance(value, (int, float)) and value >= 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.softcon_weight = float(softcon_weight)
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0 (it defines Dice on empty masks), got {smooth}")
        self.smooth = float(smooth)
        self.softcon = SoftPatchContrastiveLoss(temperature=temperature, variant=softcon_variant)

    def terms(self, output: Any, masks: Tensor) -> dict[str, Tensor]:
        """``{"loss": total, "dice_loss", "bce_loss", "softcon_loss"}`` (parts unweighted)."""
        logits = getattr(output, "logits", None)
        patches = getattr(output, "patch_tokens", None)
        text = getattr(output, "text_embeddings", None)
        if not isinstance(logits, Tensor) or patches is None or text is None:
            raise ValueError(
                "MedCLIPSegLoss needs a MedCLIPSegOutput (logits, patch_tokens, text_embeddings), "
                f"got {type(output).__name__}"
            )
        if masks.dim() == 3 and logits.dim() == 4 and logits.shape[1] == 1:
            masks = masks.unsqueeze(1)
        if masks.shape != logits.shape:
            raise ValueError(
                f"masks must have the shape of output.logits {tuple(logits.shape)} (B, C, H, W), "
                f"or (B, H, W) for one prompt per image; got {tuple(masks.shape)}"
            )
        target = masks.to(logits.dtype)
        dice = dice_bce_loss(logits, target, dice_weight=1.0, bce_weight=0.0, smooth=self.smooth)
        bce = dice_bce_loss(logits, target, dice_weight=0.0, bce_weight=1.0, smooth=self.smooth)
        softcon = self.softcon(patches.flatten(0, 1).float(), text.flatten(0, 1).float())
        total = self.dice_weight * dice + self.bce_weight * bce + self.softcon_weight * softcon
        return {"loss": total, "dice_loss": dice, "bce_loss": bce, "softcon_loss": softcon}

    def forward(self, output: Any, masks: Tensor) -> Tensor:
        """Total loss (scalar); see :meth:`terms` for the parts."""
        return self.terms(output, masks)["loss"]

    def extra_repr(self) -> str:
        return (
            f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, "
            f"softcon_weight={self.softcon_weight}"
        )
