"""vlsegkit: text-driven (vision-language) medical image segmentation in PyTorch.

Public names are imported on first use (PEP 562), so ``import vlsegkit`` and the command line's
``--help`` stay fast; ``vlsegkit.CLIPSeg`` loads the model module (and torch) when it is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> module that defines it
_EXPORTS = {
    "FiLMDecoder": "vlsegkit.decoders",
    "TokenState": "vlsegkit.encoders",
    "Tower": "vlsegkit.encoders",
    "TowerHook": "vlsegkit.encoders",
    "HookSlots": "vlsegkit.encoders",
    "RunContext": "vlsegkit.encoders",
    "run_towers": "vlsegkit.encoders",
    "create_towers": "vlsegkit.encoders",
    "CheckpointError": "vlsegkit.hub",
    "PixelTextHead": "vlsegkit.layers",
    "PVLAdapter": "vlsegkit.layers",
    "PVLAttention": "vlsegkit.layers",
    "LearnableUpsampler": "vlsegkit.layers",
    "DiceBCELoss": "vlsegkit.losses",
    "MedCLIPSegLoss": "vlsegkit.losses",
    "SoftPatchContrastiveLoss": "vlsegkit.losses",
    "DHNNCELoss": "vlsegkit.losses",
    "DCLLoss": "vlsegkit.losses",
    "HNNCELoss": "vlsegkit.losses",
    "InfoNCELoss": "vlsegkit.losses",
    "DualEncoder": "vlsegkit.models",
    "DualEncoderOutput": "vlsegkit.models",
    "SupportsRetrieval": "vlsegkit.models",
    "ContrastiveTask": "vlsegkit.contrastive",
    "VLSM": "vlsegkit.models",
    "CLIPSeg": "vlsegkit.models",
    "BiomedCLIPSeg": "vlsegkit.models",
    "CRIS": "vlsegkit.models",
    "CRISOutput": "vlsegkit.models",
    "MedCLIPSeg": "vlsegkit.models",
    "CoTexNet": "vlsegkit.models",
    "CoTexNetOutput": "vlsegkit.models",
    "CoTexNetTask": "vlsegkit.models.cotexnet_task",
    "COTEXNET_RECIPES": "vlsegkit.models.cotexnet_task",
    "CoTexNetLoss": "vlsegkit.losses",
    "SANKD": "vlsegkit.layers",
    "ROIPseudoTokens": "vlsegkit.adapters",
    "SupportsTextFree": "vlsegkit.models",
    "TunedModel": "vlsegkit.models",
    "load_tuned": "vlsegkit.models",
    "SegmentationOutput": "vlsegkit.models",
    "CLIPSegOutput": "vlsegkit.models",
    "MedCLIPSegOutput": "vlsegkit.models",
    "SupportsHooks": "vlsegkit.models",
    "SupportsDecoderFeatures": "vlsegkit.models",
    "SupportsUncertainty": "vlsegkit.models",
    "probabilistic_attention": "vlsegkit.ops",
    "CoOp": "vlsegkit.prompts",
    "CoCoOp": "vlsegkit.prompts",
    "VPT": "vlsegkit.prompts",
    "MaPLe": "vlsegkit.prompts",
    "SharedSeparate": "vlsegkit.prompts",
    "SharedAttention": "vlsegkit.prompts",
    "PVLAdapters": "vlsegkit.adapters",
    "BottleneckAdapters": "vlsegkit.adapters",
    "create_model": "vlsegkit.registry",
    "list_models": "vlsegkit.registry",
    "list_hooks": "vlsegkit.registry",
    "Task": "vlsegkit.tasks",
    "SegmentationTask": "vlsegkit.tasks",
    "UncertaintyOutput": "vlsegkit.uncertainty",
    "BertTokenizer": "vlsegkit.tokenizers",
    "CLIPTokenizer": "vlsegkit.tokenizers",
    "TextBatch": "vlsegkit.tokenizers",
    "load_tokenizer": "vlsegkit.tokenizers",
    # MedCLIP-SAMv2: M2IB attribution, zero-shot pipeline, weak supervision
    "M2IBAttributor": "vlsegkit.attribution",
    "MedCLIPSAM": "vlsegkit.zeroshot",
    "SAMRefiner": "vlsegkit.zeroshot",
    "SaliencyPrompter": "vlsegkit.zeroshot",
    "CheckpointEnsemble": "vlsegkit.weak",
    "CyclicSchedule": "vlsegkit.weak",
    "PseudoLabelTask": "vlsegkit.weak",
}

__all__ = [
    "COTEXNET_RECIPES",
    "CRIS",
    "SANKD",
    "VLSM",
    "VPT",
    "BertTokenizer",
    "BiomedCLIPSeg",
    "BottleneckAdapters",
    "CLIPSeg",
    "CLIPSegOutput",
    "CLIPTokenizer",
    "CRISOutput",
    "CheckpointEnsemble",
    "CheckpointError",
    "CoCoOp",
    "CoOp",
    "CoTexNet",
    "CoTexNetLoss",
    "CoTexNetOutput",
    "CoTexNetTask",
    "ContrastiveTask",
    "CyclicSchedule",
    "DCLLoss",
    "DHNNCELoss",
    "DiceBCELoss",
    "DualEncoder",
    "DualEncoderOutput",
    "FiLMDecoder",
    "HNNCELoss",
    "HookSlots",
    "InfoNCELoss",
    "LearnableUpsampler",
    "M2IBAttributor",
    "MaPLe",
    "MedCLIPSAM",
    "MedCLIPSeg",
    "MedCLIPSegLoss",
    "MedCLIPSegOutput",
    "PVLAdapter",
    "PVLAdapters",
    "PVLAttention",
    "PixelTextHead",
    "PseudoLabelTask",
    "ROIPseudoTokens",
    "RunContext",
    "SAMRefiner",
    "SaliencyPrompter",
    "SegmentationOutput",
    "SegmentationTask",
    "SharedAttention",
    "SharedSeparate",
    "SoftPatchContrastiveLoss",
    "SupportsDecoderFeatures",
    "SupportsHooks",
    "SupportsRetrieval",
    "SupportsTextFree",
    "SupportsUncertainty",
    "Task",
    "TextBatch",
    "TokenState",
    "Tower",
    "TowerHook",
    "TunedModel",
    "UncertaintyOutput",
    "__version__",
    "create_model",
    "create_towers",
    "list_hooks",
    "list_models",
    "load_tokenizer",
    "load_tuned",
    "probabilistic_attention",
    "run_towers",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlsegkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static tools (type checkers, IDEs, mkdocstrings) see the real names
    from .adapters import BottleneckAdapters, PVLAdapters, ROIPseudoTokens
    from .attribution import M2IBAttributor
    from .contrastive import ContrastiveTask
    from .decoders import FiLMDecoder
    from .encoders import HookSlots, RunContext, TokenState, Tower, TowerHook, run_towers
    from .encoders.factory import create_towers
    from .hub import CheckpointError
    from .layers import SANKD, LearnableUpsampler, PixelTextHead, PVLAdapter, PVLAttention
    from .losses import (
        CoTexNetLoss,
        DCLLoss,
        DHNNCELoss,
        DiceBCELoss,
        HNNCELoss,
        InfoNCELoss,
        MedCLIPSegLoss,
        SoftPatchContrastiveLoss,
    )
    from .models import (
        CRIS,
        VLSM,
        BiomedCLIPSeg,
        CLIPSeg,
        CLIPSegOutput,
        CoTexNet,
        CoTexNetOutput,
        CRISOutput,
        DualEncoder,
        DualEncoderOutput,
        MedCLIPSeg,
        MedCLIPSegOutput,
        SegmentationOutput,
        SupportsDecoderFeatures,
        SupportsHooks,
        SupportsRetrieval,
        SupportsTextFree,
        SupportsUncertainty,
        TunedModel,
        load_tuned,
    )
    from .models.cotexnet_task import COTEXNET_RECIPES, CoTexNetTask
    from .ops import probabilistic_attention
    from .prompts import VPT, CoCoOp, CoOp, MaPLe, SharedAttention, SharedSeparate
    from .registry import create_model, list_hooks, list_models
    from .tasks import SegmentationTask, Task
    from .tokenizers import BertTokenizer, CLIPTokenizer, TextBatch, load_tokenizer
    from .uncertainty import UncertaintyOutput
    from .weak import CheckpointEnsemble, CyclicSchedule, PseudoLabelTask
    from .zeroshot import MedCLIPSAM, SaliencyPrompter, SAMRefiner
