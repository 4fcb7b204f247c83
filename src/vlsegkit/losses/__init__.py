"""Training losses: Dice + BCE on mask logits, MedCLIPSeg's soft patch contrastive loss and its total,
MedCLIP-SAMv2's DHN-NCE and its family (DCL, HN-NCE, InfoNCE) on image-text embeddings."""

from .contrastive import SoftPatchContrastiveLoss, soft_patch_contrastive_loss
from .cotexnet import CoTexNetLoss
from .dhn_nce import (
    DCLLoss,
    DHNNCELoss,
    HNNCELoss,
    InfoNCELoss,
    dhn_nce_directions,
    dhn_nce_loss,
)
from .dice_bce import DiceBCELoss, dice_bce_loss
from .medclipseg import MedCLIPSegLoss

__all__ = [
    "CoTexNetLoss",
    "DCLLoss",
    "DHNNCELoss",
    "DiceBCELoss",
    "HNNCELoss",
    "InfoNCELoss",
    "MedCLIPSegLoss",
    "SoftPatchContrastiveLoss",
    "dhn_nce_directions",
    "dhn_nce_loss",
    "dice_bce_loss",
    "soft_patch_contrastive_loss",
]
