"""Steppable encoder towers over upstream CLIP-family modules.

- transformers CLIP / CLIPSeg: :class:`HFCLIPVisionTower`, :class:`HFCLIPTextTower`
  (:func:`from_clip_model` builds both from a model).
- open_clip: :class:`OpenCLIPVisionTower` (built-in ViT), :class:`OpenCLIPTextTower`,
  :class:`TimmViTTower` (open_clip's timm trunk, BiomedCLIP-style), :class:`HFBertTextTower`
  (open_clip's Hugging Face BERT text encoder); :func:`towers_from_open_clip` builds both.
"""

from .base import Hook, TokenState, Tower, TowerOutput, attention_bias
from .hf_clip import HFCLIPTextTower, HFCLIPVisionTower, from_clip_model
from .lockstep import run_lockstep
from .open_clip import (
    HFBertTextTower,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    TimmViTTower,
    towers_from_open_clip,
)

__all__ = [
    "HFBertTextTower",
    "HFCLIPTextTower",
    "HFCLIPVisionTower",
    "Hook",
    "OpenCLIPTextTower",
    "OpenCLIPVisionTower",
    "TimmViTTower",
    "TokenState",
    "Tower",
    "TowerOutput",
    "attention_bias",
    "from_clip_model",
    "run_lockstep",
    "towers_from_open_clip",
]
