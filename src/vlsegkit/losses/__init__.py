"""Training losses: Dice + BCE on mask logits and MedCLIPSeg's soft patch contrastive loss."""

from .contrastive import SoftPatchContrastiveLoss, soft_patch_contrastive_loss
from .dice_bce import DiceBCELoss, dice_bce_loss

__all__ = [
    "DiceBCELoss",
    "SoftPatchContrastiveLoss",
    "dice_bce_loss",
    "soft_patch_contrastive_loss",
]
