"""``VLSM``: the base class of every vlsegkit model, with Hub save / load and preprocessing.

A model is described by a JSON-serialisable config (``model.config``) that rebuilds it without weights
(``Model.from_config``); ``save_pretrained`` writes that config as ``config.json`` (with ``model_type``
and ``vlsegkit_format_version``) plus ``model.safetensors``. ``VLSM.from_pretrained`` reads the config,
picks the class registered for its ``model_type`` and loads the weights strictly. Upstream checkpoint
layouts (e.g. a transformers CLIPSeg repository) are recognised and converted on load by the class that
claims them (``_from_foreign``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import (
    CONFIG_NAME,
    PICKLE_NAMES,
    SAFETENSORS_NAME,
    CheckpointError,
    load_checkpoint_file,
    load_state_dict_strict,
    read_json,
    resolve_file,
    save_safetensors,
    write_json,
)

__all__ = ["VLSM", "ImageInput", "SegmentationOutput", "to_image_tensor"]

FORMAT_VERSION = 1
_MODEL_TYPES: dict[str, type[VLSM]] = {}

ImageInput = Any  # PIL.Image.Image | np.ndarray | Tensor


@dataclass
class SegmentationOutput:
    """Output of a VLSM forward pass.

    Attributes:
        logits: ``(B, C, H, W)`` mask logits at input resolution, one channel per prompt.
        conditional_embeddings: ``(B, C, E)`` the conditions the decoder used.
        extras: model-specific tensors (e.g. patch tokens for auxiliary losses).
    """

    logits: Tensor
    conditional_embeddings: Tensor | None = None
    extras: dict[str, Tensor] | None = None


def to_image_tensor(image: ImageInput) -> Tensor:
    """One image as a float ``(3, H, W)`` tensor in ``[0, 1]``.

    Accepts a PIL image, a numpy array ``(H, W)``, ``(H, W, 3|4)`` (uint8 in ``[0, 255]`` or float in
    ``[0, 1]``), or a tensor ``(3, H, W)`` / ``(H, W)`` (uint8 or float in ``[0, 1]``). Grey images are
    repeated to three channels; an alpha channel is dropped.
    """
    if not isinstance(image, (Tensor, np.ndarray)):
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - pillow is a dependency
            raise TypeError(f"unsupported image type {type(image).__name__}") from e
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"images must be PIL images, numpy arrays or tensors, got {type(image).__name__}"
            )
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
        elif arr.ndim not in (2,):
            raise ValueError(f"numpy images must be (H, W) or (H, W, 3), got shape {arr.shape}")
        t = torch.from_numpy(np.array(arr, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    else:
        t = image
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"tensor images must be (3, H, W) or (H, W), got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    else:
        t = t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError("images must have non-zero height and width")
    return t


def _pairing(batch: int, rows: int) -> Tensor:
    """``(B, C)`` index of the condition row each output channel uses.

    One row per image when ``rows == B`` (the transformers convention), else every image with every
    row (C = rows).
    """
    if rows == batch:
        return torch.arange(batch).view(batch, 1)
    return torch.arange(rows).view(1, rows).expand(batch, rows)


def _needs_grad(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether a frozen tower must record its graph (something upstream of it wants gradients)."""
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for p in module.parameters()) or any(t.requires_grad for t in inputs)


class VLSM(nn.Module):
    """Base class of vision-language segmentation models.

    Subclasses set ``model_type``, implement ``config`` (JSON-serialisable constructor arguments) and
    ``forward``, and may override ``_from_foreign`` to accept upstream checkpoint layouts. They inherit
    Hub I/O, ``predict`` preprocessing and the frozen / trainable split.

    Class attributes:
        model_type: registry key written to ``config.json``.
        image_size: ``(H, W)`` the model resizes inputs to in ``predict``.
        image_mean, image_std: normalisation applied in ``predict`` / ``preprocess``.
    """

    model_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_type:
            _MODEL_TYPES[cls.model_type] = cls

    # -------------------------------------------------------------- configuration
    @property
    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VLSM:
        """Build a model (random weights) from ``config``, dispatching on ``model_type``."""
        config = dict(config)
        model_type = config.pop("model_type", cls.model_type)
        config.pop("vlsegkit_format_version", None)
        target = _MODEL_TYPES.get(model_type)
        if target is None:
            raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(_MODEL_TYPES)}")
        if cls is not VLSM and not issubclass(target, cls):
            raise ValueError(f"config is for {target.__name__}, not {cls.__name__}")
        return target(**config)

    # -------------------------------------------------------------- parameters
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with ``requires_grad`` (what an optimizer should receive)."""
        return (p for p in self.parameters() if p.requires_grad)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)

    # -------------------------------------------------------------- preprocessing
    image_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → normalised with the model's mean / std."""
        mean = images.new_tensor(self.image_mean)[:, None, None]
        std = images.new_tensor(self.image_std)[:, None, None]
        return (images - mean) / std

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> tuple[Tensor, list]:
        """Resize + normalise images for ``forward``.

        Returns:
            ``pixel_values (B, 3, *image_size)`` and the list of original ``(H, W)`` sizes.
        """
        if isinstance(images, (list, tuple)) or (isinstance(images, Tensor) and images.dim() == 4):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("predict() needs at least one image")
        tensors = [to_image_tensor(im) for im in items]
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        device = next(self.parameters()).device
        batch = torch.stack(
            [
                F.interpolate(
                    t[None].to(device),
                    size=self.image_size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
                for t in tensors
            ]
        )
        return self.normalize(batch), sizes

    # -------------------------------------------------------------- Hub I/O
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) to ``save_directory``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), directory / SAFETENSORS_NAME)
        config = {
            **self.config,
            "model_type": self.model_type,
            "vlsegkit_format_version": FORMAT_VERSION,
        }
        write_json(directory / CONFIG_NAME, config)
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload vlsegkit model",
        revision: str | None = None,
    ) -> str:
        """Save to a temporary folder and upload it to the Hub repository ``repo_id``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )
        return str(info)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> VLSM:
        """Load a model from a Hub repo id or a local folder, returning the right class.

        vlsegkit folders (``config.json`` with ``vlsegkit_format_version``) load directly; upstream
        layouts (e.g. transformers CLIPSeg) are converted by the class that recognises them. Loading is
        strict: missing or unexpected keys, wrong shapes and corrupt files raise ``CheckpointError``.
        The model is returned in eval mode.
        """
        kw = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        config_path = resolve_file(id_or_path, CONFIG_NAME, **kw)
        config = read_json(config_path)
        if "vlsegkit_format_version" in config:
            version = config["vlsegkit_format_version"]
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{config_path}: vlsegkit_format_version {version!r} is newer than this "
                    f"vlsegkit understands ({FORMAT_VERSION}); upgrade vlsegkit"
                )
            model = cls.from_config(config)
            weights = resolve_file(id_or_path, SAFETENSORS_NAME, **kw)
            load_state_dict_strict(model, load_checkpoint_file(weights), source=str(weights))
            return model._mark_source(id_or_path, revision).eval()
        for klass in _MODEL_TYPES.values():
            if (cls is VLSM or issubclass(klass, cls)) and klass._claims_foreign(config):
                model = klass._from_foreign(id_or_path, config, **kw)
                return model._mark_source(id_or_path, revision).eval()
        raise CheckpointError(
            f"{config_path} is neither a vlsegkit config (no 'vlsegkit_format_version') nor an "
            f"upstream layout vlsegkit can convert (model_type={config.get('model_type')!r})"
        )

    #: Where ``from_pretrained`` loaded the weights from (Hub id or folder) and the revision asked
    #: for; None for models built from a config. Prompt learners record these to find their base.
    name_or_path: str | None = None
    revision: str | None = None

    def _mark_source(self, id_or_path, revision: str | None) -> VLSM:
        self.name_or_path = str(id_or_path)
        self.revision = revision
        return self

    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return False

    @classmethod
    def _from_foreign(cls, id_or_path, config: dict[str, Any], **hub_kwargs) -> VLSM:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _load_weights_file(id_or_path, **hub_kwargs) -> tuple[dict[str, Tensor], str]:
        """State dict from ``model.safetensors``, else ``pytorch_model.bin`` (weights_only)."""
        for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
            path = resolve_file(id_or_path, name, required=False, **hub_kwargs)
            if path is not None:
                return load_checkpoint_file(path), str(path)
        raise CheckpointError(
            f"no weights found in {id_or_path}: expected {SAFETENSORS_NAME} or {PICKLE_NAMES[0]}"
        )
