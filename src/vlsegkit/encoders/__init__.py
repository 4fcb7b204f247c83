"""Steppable encoder towers over upstream CLIP-family modules, the hook protocol and the runner.

- :class:`Tower`, :class:`TokenState`: the stepping interface; :func:`run_towers`: the one layer loop;
  :class:`TowerHook`, :class:`HookSlots`, :class:`RunContext`: what acts inside the towers.
- transformers CLIP / CLIPSeg: :class:`HFCLIPVisionTower`, :class:`HFCLIPTextTower`
  (:func:`from_clip_model` builds both from a model).
- :class:`TextCache`, :func:`unique_token_rows`: each distinct prompt encoded once (per batch, and
  optionally across calls while the text tower is frozen).
- open_clip: :class:`OpenCLIPVisionTower` (built-in ViT), :class:`OpenCLIPTextTower`,
  :class:`TimmViTTower` (open_clip's timm trunk, BiomedCLIP-style), :class:`HFBertTextTower`
  (open_clip's Hugging Face BERT text encoder); :func:`towers_from_open_clip` builds both.
- open_clip CLIP ResNet: :class:`OpenCLIPResNetTower` -- not a token tower: multi-scale feature maps
  (:class:`ResNetFeatures`) and attention pooling, for dense decoders such as CRIS's.
"""

from .base import TokenState, Tower, TowerOutput, attention_bias
from .factory import (
    BertText,
    OpenCLIPResNet,
    OpenCLIPSpec,
    OpenCLIPText,
    OpenCLIPViT,
    TimmViT,
    Towers,
    TowerSpec,
    TransformersCLIPSpec,
    create_towers,
    tower_spec_from_dict,
)
from .hf_clip import HFCLIPTextTower, HFCLIPVisionTower, from_clip_model
from .hooks import HookSlots, RunContext, Tap, TowerHook
from .open_clip import (
    HFBertTextTower,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    TimmViTTower,
    towers_from_open_clip,
)
from .open_clip_resnet import OpenCLIPResNetTower, ResNetFeatures
from .runner import TowerRun, check_layers, embed_tower, run_towers
from .text_cache import TextCache, unique_token_rows

__all__ = [
    "BertText",
    "HFBertTextTower",
    "HFCLIPTextTower",
    "HFCLIPVisionTower",
    "HookSlots",
    "OpenCLIPResNet",
    "OpenCLIPResNetTower",
    "OpenCLIPSpec",
    "OpenCLIPText",
    "OpenCLIPTextTower",
    "OpenCLIPViT",
    "OpenCLIPVisionTower",
    "ResNetFeatures",
    "RunContext",
    "Tap",
    "TextCache",
    "TimmViT",
    "TimmViTTower",
    "TokenState",
    "Tower",
    "TowerHook",
    "TowerOutput",
    "TowerRun",
    "TowerSpec",
    "Towers",
    "TransformersCLIPSpec",
    "attention_bias",
    "check_layers",
    "create_towers",
    "embed_tower",
    "from_clip_model",
    "run_towers",
    "tower_spec_from_dict",
    "towers_from_open_clip",
    "unique_token_rows",
]
