"""Prompt tuning for frozen vision-language segmentation models (TuneVLSeg's context learners).

Adhikari et al., "TuneVLSeg: Prompt Tuning Benchmark for Vision-Language Segmentation Models"
(ACCV 2024). Every learner is a :class:`~vlsegkit.encoders.TowerHook`, so one implementation serves
CLIP text towers (EOS pooling), BERT text towers (CLS pooling) and ViT vision towers, on every model
with hook slots (CLIPSeg, MedCLIPSeg):

- textual: :class:`CoOp` (deep), :class:`CoCoOp` (image-conditioned);
- visual: :class:`VPT` (shallow / deep);
- multimodal: :class:`MaPLe`, :class:`SharedSeparate`, :class:`SharedAttention`;
- :class:`LearnableUpsampler`: residual 5x5 conv head on the decoder's penultimate features;
- ``learner.attach(model)`` freezes the model and trains only the learner (+ upsampler), as a
  :class:`~vlsegkit.TunedModel` whose ``save_pretrained`` stores only those weights plus the base's
  id, revision and fingerprint.

Example:
    >>> from vlsegkit import VLSM
    >>> from vlsegkit.prompts import MaPLe
    >>> base = VLSM.from_pretrained("CIDAS/clipseg-rd64")
    >>> tuned = MaPLe(depth=9).attach(base)
    >>> classes = ["polyp", "tumor"]                          # one list per image: C = 2
    >>> tuned(pixel_values, [classes] * len(pixel_values)).logits.shape   # (B, 2, H, W)
"""

from ..layers.upsampler import LearnableUpsampler
from ..models.tuned import TunedModel, base_fingerprint, load_tuned
from .base import ContextLearner, DecoderPrompts, PromptSet
from .multimodal import MaPLe, PromptTransformerLayer, SharedAttention, SharedSeparate
from .projector import PromptProjector
from .text import CoCoOp, CoOp
from .visual import VPT

__all__ = [
    "VPT",
    "CoCoOp",
    "CoOp",
    "ContextLearner",
    "DecoderPrompts",
    "LearnableUpsampler",
    "MaPLe",
    "PromptProjector",
    "PromptSet",
    "PromptTransformerLayer",
    "SharedAttention",
    "SharedSeparate",
    "TunedModel",
    "base_fingerprint",
    "load_tuned",
]
