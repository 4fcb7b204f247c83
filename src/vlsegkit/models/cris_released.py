"""Reading CRIS.pytorch checkpoints (and CLIP ResNet checkpoints): files, key map, shape inference.

``DerrickWang005/CRIS.pytorch``'s ``train.py`` saves ``{"epoch", "cur_iou", "best_iou", "prec",
"state_dict", "optimizer", "scheduler"}`` with ``state_dict`` taken from a ``DistributedDataParallel``
model, so every key starts with ``module.``; medvlsm's and TuneVLSeg's converters strip that prefix
and save the bare state dict. All of these forms are read here, pickles only through
``torch.load(weights_only=True)``.

Key map (CRIS.pytorch module -> vlsegkit :class:`~vlsegkit.CRIS`)::

    backbone.visual.attnpool.connect.*   -> connect.*            (CRIS's residual branch of the pool)
    backbone.visual.*                    -> vision_tower.visual.* (open_clip ModifiedResNet names)
    backbone.{token_embedding, positional_embedding, transformer, ln_final, text_projection}.*
                                         -> text_tower.text.*     (open_clip TextTransformer names)
    neck.* / decoder.* / proj.*          -> unchanged
    backbone.logit_scale                 -> dropped (CLIP's contrastive temperature; CRIS never uses it)

A full CRIS-R50 checkpoint has 662 tensors (146.8 M parameters); all but ``logit_scale`` load.
Widths, depths and resolutions are read from tensor shapes the way CLIP's ``build_model`` reads
them (heads = width / 64); what shapes cannot tell (``word_len``, ``num_head``, ``dropout``) comes
from the caller.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..hub import CheckpointError, load_checkpoint_file

__all__ = [
    "clip_backbone_spec",
    "convert_clip_state_dict",
    "convert_cris_state_dict",
    "infer_cris_config",
    "read_state_dict",
]

_TEXT_PARTS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)
# entries of OpenAI's TorchScript CLIP state dict that are not weights
_CLIP_METADATA = ("input_resolution", "context_length", "vocab_size")
_DROPPED = ("logit_scale", *_CLIP_METADATA)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """A flat ``name -> tensor`` state dict from a CRIS.pytorch / CLIP checkpoint.

    Args:
        source: a state dict, or a file: ``.safetensors``, or a pickle read with
            ``torch.load(weights_only=True)`` holding either the state dict or a training checkpoint
            with it under ``"state_dict"`` (CRIS.pytorch) or ``"model"``.

    Returns:
        The state dict with a DataParallel ``module.`` prefix removed (when every key has it).

    Raises:
        CheckpointError: unreadable / corrupt file, a TorchScript archive (OpenAI's ``RN50.pt``; see
            the message for the one-line conversion), or no name -> tensor mapping.
    """
    if isinstance(source, Mapping):
        obj: Any = dict(source)
        where = "the given state dict"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            obj = load_checkpoint_file(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several unrelated types for bad pickles
                if "TorchScript" in str(e):
                    raise CheckpointError(
                        f"{path} is a TorchScript archive (OpenAI's CLIP .pt files are), which "
                        "vlsegkit does not execute. Convert it once to a plain state dict: "
                        "safetensors.torch.save_file(torch.jit.load(path, map_location='cpu')"
                        ".state_dict(), 'RN50.safetensors'), or use open_clip's Hub copy "
                        "(timm/resnet50_clip.openai, open_clip_model.safetensors)"
                    ) from e
                raise CheckpointError(
                    f"{path} could not be loaded with weights_only=True: {e}"
                ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = dict(obj[key])
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{where} holds no state dict (expected a name -> tensor mapping, possibly under "
            "'state_dict')"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------ key maps
def _map_clip_key(key: str) -> str | None:
    """CLIP (OpenAI / open_clip ``CLIP``) key -> CRIS key, None for dropped entries."""
    if key in _DROPPED:
        return None
    if key.startswith("visual.attnpool.connect."):
        return "connect." + key[len("visual.attnpool.connect.") :]
    if key.startswith("visual."):
        return "vision_tower." + key
    if key.startswith(_TEXT_PARTS):
        return "text_tower.text." + key
    return key


def convert_cris_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a CRIS.pytorch state dict (``module.`` already stripped) to :class:`~vlsegkit.CRIS` keys.

    Returns:
        ``(converted, dropped)``: the renamed tensors and the names of the source entries deliberately
        left out (``backbone.logit_scale``). Unknown keys are kept so the strict load names them.
    """
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("backbone."):
            new = _map_clip_key(key[len("backbone.") :])
        else:
            new = key
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def convert_clip_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a CLIP ResNet state dict (OpenAI / open_clip keys) to the towers' CRIS keys.

    Returns:
        ``(converted, dropped)`` as :func:`convert_cris_state_dict`.
    """
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = _map_clip_key(key)
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


# ------------------------------------------------------------------------------ shapes
def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no {key!r}: not a CLIP ResNet / CRIS state dict")
    return tuple(state[key].shape)


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    return len(found)


def clip_backbone_spec(state: Mapping[str, Tensor], *, prefix: str = "") -> dict[str, Any]:
    """The :class:`~vlsegkit.encoders.OpenCLIPSpec` dict of a CLIP ResNet state dict.

    Read as CLIP's ``build_model`` reads it: stage depths from the ``visual.layer{1..4}.{i}`` block
    indices, stem width from ``visual.layer1.0.conv1``, pretraining size from the attention pool's
    position rows (``(side^2 + 1) -> 32 side`` px), joint width from ``text_projection``, text width /
    length / vocabulary / depth from their tensors, heads = width / 64 on both sides.

    Args:
        state: CLIP keys (``visual.*``, ``token_embedding.weight``, ...), each behind ``prefix``.
        prefix: ``"backbone."`` for a CRIS.pytorch state dict.
    """
    p = prefix
    if f"{p}visual.proj" in state or f"{p}visual.attnpool.positional_embedding" not in state:
        raise CheckpointError(
            "this is not a CLIP ResNet checkpoint (no visual.attnpool.positional_embedding; a ViT "
            "CLIP has visual.proj): CRIS needs a ResNet image encoder"
        )
    layers = [_count(state, rf"^{re.escape(p)}visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4)]
    width = _shape(state, f"{p}visual.layer1.0.conv1.weight")[0]
    rows = _shape(state, f"{p}visual.attnpool.positional_embedding")[0]
    side = round((rows - 1) ** 0.5)
    if side * side + 1 != rows:
        raise CheckpointError(f"attention-pool position table has {rows} rows, not 1 + side^2")
    embed_dim = _shape(state, f"{p}text_projection")[1]
    text_width = _shape(state, f"{p}ln_final.weight")[0]
    return {
        "kind": "open_clip",
        "embed_dim": int(embed_dim),
        "quick_gelu": True,  # OpenAI's CLIP weights are trained with QuickGELU
        "vision_cfg": {
            "layers": layers,
            "width": int(width),
            "head_width": 64,
            "image_size": int(side * 32),
        },
        "text_cfg": {
            "context_length": int(_shape(state, f"{p}positional_embedding")[0]),
            "vocab_size": int(_shape(state, f"{p}token_embedding.weight")[0]),
            "width": int(text_width),
            "heads": int(text_width // 64),
            "layers": _count(state, rf"^{re.escape(p)}transformer\.resblocks\.(\d+)\."),
        },
    }


def infer_cris_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments of :class:`~vlsegkit.CRIS` read from a CRIS.pytorch state dict's shapes.

    Returns ``backbone``, ``fpn_in``, ``fpn_out``, ``vis_dim``, ``word_dim``, ``num_layers`` and
    ``dim_ffn`` (CRIS.pytorch's config names). ``word_len``, ``num_head`` and ``dropout`` cannot be
    read from shapes.
    """
    fpn_in = [
        _shape(state, f"neck.{name}.0.weight")[1]
        for name in ("f3_v_proj", "f2_v_proj", "f1_v_proj")
    ]
    fpn_out = [
        _shape(state, f"neck.{name}.0.weight")[0]
        for name in ("f3_v_proj", "f2_v_proj", "f1_v_proj")
    ]
    return {
        "backbone": clip_backbone_spec(state, prefix="backbone."),
        "fpn_in": [int(c) for c in fpn_in],
        "fpn_out": [int(c) for c in fpn_out],
        "vis_dim": int(_shape(state, "decoder.norm.weight")[0]),
        "word_dim": int(_shape(state, "proj.txt.weight")[1]),
        "num_layers": _count(state, r"^decoder\.layers\.(\d+)\."),
        "dim_ffn": int(_shape(state, "decoder.layers.0.ffn.0.weight")[0]),
    }
