"""Training losses: Dice + BCE on mask logits, MedCLIPSeg's soft patch contrastive loss and its total."""

from .contrastive import SoftPatchContrastiveLoss, soft_patch_contrastive_loss
from .cotexnet import CoTexNetLoss
from .dice_bce import DiceBCELoss, dice_bce_loss
from .medclipseg import MedCLIPSegLoss

__all__ = [
    "CoTexNetLoss",
    "DiceBCELoss",
    "MedCLIPSegLoss",
    "SoftPatchContrastiveLoss",
    "dice_bce_loss",
    "soft_patch_contrastive_loss",
]
