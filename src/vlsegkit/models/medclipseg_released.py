"""Loading MedCLIPSeg's released checkpoints: file reading and the key map.

The official code (``HealthX-Lab/MedCLIPSeg``, Koleilat et al., CVPR 2026) saves
``{"model": CustomCLIP.state_dict(), "epoch", "optimizer", "scheduler", "best_loss"}`` as
``*_latest.pth`` (Hub repo ``TahaKoleilat/MedCLIPSeg``). Its module names differ from vlsegkit's in a
few prefixes (:data:`RELEASED_KEY_MAP`) and in one wrapper: the official ``PVL_Adapter`` keeps its
vision down-projection inside an ``nn.Sequential``, so released files name it
``pvl_adapters.{n}.proj_vis_down.0.weight`` where vlsegkit's :class:`~vlsegkit.layers.PVLAdapter` has
``proj_vis_down.weight``. ``logit_scale`` is the only released tensor vlsegkit has no use for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import Tensor

from .._loading import start_finite_check
from ..hub import CheckpointError, load_checkpoint_file, torch_load_weights_only

__all__ = [
    "RELEASED_KEY_MAP",
    "convert_released_state_dict",
    "load_released_state_dict",
    "released_checkpoint_name",
]

RELEASED_REPO_ID = "TahaKoleilat/MedCLIPSeg"

#: Released (official ``CustomCLIP.state_dict()``) key prefix -> vlsegkit key prefix. Keys are
#: renamed by their first matching prefix; the rest of the name is unchanged (but see
#: :func:`convert_released_state_dict` for the vision down-projection).
RELEASED_KEY_MAP: dict[str, str] = {
    "vision_model.": "vision_tower.visual.",
    "text_model.": "text_tower.text.",
    "pvl_adapters.": "pvl_adapters.",
    "mask_head.": "head.mask_head.",
    "upscale.": "head.upscale.",
}
# Released keys that carry nothing vlsegkit uses: CLIP's temperature, BERT's pooler (MedCLIPSeg
# pools the last hidden [CLS]) and position / token-type buffers older transformers persisted.
_DROPPED_PREFIXES = ("logit_scale", "text_model.transformer.pooler.")
_DROPPED_SUFFIXES = ("position_ids", "token_type_ids")
# the official PVL_Adapter wraps the vision down-projection in nn.Sequential(Linear)
_SEQUENTIAL_DOWN = re.compile(r"^(pvl_adapters\.\d+\.proj_vis_down)\.0\.")


def convert_released_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a released ``CustomCLIP`` state dict to vlsegkit's MedCLIPSeg keys.

    ``logit_scale``, an unused BERT pooler and persisted ``position_ids`` / ``token_type_ids``
    buffers are dropped; a leading ``module.`` (DataParallel) is stripped;
    ``pvl_adapters.{n}.proj_vis_down.0.*`` becomes ``pvl_adapters.{n}.proj_vis_down.*``. Unknown keys
    are kept so the strict load names them.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_DROPPED_PREFIXES) or key.endswith(_DROPPED_SUFFIXES):
            continue
        key = _SEQUENTIAL_DOWN.sub(r"\1.", key)
        for old, new in RELEASED_KEY_MAP.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def released_checkpoint_name(dataset: str, *, percentage: int = 100, seed: int = 666) -> str:
    """Path of a released checkpoint inside the Hub repo ``TahaKoleilat/MedCLIPSeg``.

    ``{dataset}[_{percentage}]/trained_models/seed{seed}/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth``
    (the official ``utils/download_ckpt.py`` layout), e.g. ``released_checkpoint_name("BUSI")``.
    """
    folder = dataset if percentage == 100 else f"{dataset}_{percentage}"
    return f"{folder}/trained_models/seed{seed}/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"


def load_released_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state dict of a released MedCLIPSeg training checkpoint.

    The official ``train.py`` saves ``{"model": state_dict, "epoch", "optimizer", "scheduler",
    "best_loss"}``; the file is read with ``torch.load(weights_only=True)`` (no arbitrary pickle code),
    memory-mapped (:func:`vlsegkit.hub.torch_load_weights_only`: the optimiser state is never read),
    and the ``"model"`` (or ``"state_dict"``) entry returned; its check for NaN / inf starts in the
    background (picked up by the strict load). A flat state dict, pickled or
    ``.safetensors`` (read by :func:`vlsegkit.hub.load_checkpoint_file`), is accepted as well.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or no name -> tensor mapping inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_checkpoint_file(path, check_in_background=True)
    obj = torch_load_weights_only(path)  # memory-mapped: nothing is copied
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} holds no MedCLIPSeg state dict (expected a name -> tensor mapping, possibly "
            "under 'model')"
        )
    start_finite_check(obj.values())  # overlaps building the model
    return obj
