"""Training losses."""

from .dice_bce import DiceBCELoss, dice_bce_loss

__all__ = ["DiceBCELoss", "dice_bce_loss"]
