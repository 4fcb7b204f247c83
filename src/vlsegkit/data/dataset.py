"""Image / mask / prompt datasets read from disk: medvlsm-TuneVLSeg JSON files and plain folders.

Every sample is a binary triple (image, text prompt, binary mask), the class-agnostic formulation of
medvlsm (Poudel et al., MIDL 2024) and TuneVLSeg (Adhikari et al., ACCV 2024): a multi-class mask is
expanded into one sample per class, whose prompt names the class and whose target is that class's
binary mask.

Two layouts are read:

* **medvlsm / TuneVLSeg JSON** (``ImageMaskPromptDataset.from_json`` / ``from_medvlsm``):
  ``<root>/{images/, masks/, anns/{train,val,test}.json}``; each JSON entry is one triple
  ``{"img_name": ..., "mask_name": ..., "prompts": {"p0": str, "p1": str | [str], ...}}`` (extra
  keys such as ``bbox`` or ``sentences`` are ignored). Masks are 0/255 PNG or JPEG files.
* **Plain folders** (``ImageMaskPromptDataset.from_folder``): ``<root>/images/<stem>.<ext>`` and
  ``<root>/masks/<stem><mask_suffix>.<ext>``, an optional ``prompts.json`` (``{stem: prompt(s)}``)
  and ``metadata.json`` (``{stem: {"view": ..., "age": ...}}``). With ``classes`` the masks are
  label maps and each class present gives a sample; images without any class are kept as negatives.

A prompt value that is a list means "sample one uniformly at random each time" (medvlsm); the key is
chosen by ``prompt_key`` (``"p1"``, ``"random"`` = any key but ``p0``, or a list of keys).
``templates`` builds the prompts from the (augmented) mask instead, with the attribute templates of
``vlsegkit.data.templates``. Augmentations are torchvision ``transforms.v2`` transforms applied
jointly to a ``tv_tensors.Image`` and a ``tv_tensors.Mask``.

Accepted files. Images: any file Pillow reads, converted as ``vlsegkit.data.images.to_image_tensor``
converts the same image given to ``predict`` (8-bit / 255, 16-bit / 65535, grey repeated to RGB,
alpha dropped). Masks of binary samples: 0/1 or 0/255 grey (8- or 16-bit, also 0/65535), bilevel,
palette, or RGB(A) whose channels are equal, detected per file; or any values with explicit
``mask_values`` / ``mask_threshold``. Label maps (``classes`` / ``mask_value``): the pixel value
(palette index) is the class. See ``ImageMaskPromptDataset`` for the exact rules and errors.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ._masks import binarize, distinct_values, open_image, read_mask
from .images import decode_image
from .synthetic import _channel_stats, _pair
from .templates import PromptTemplates, get_templates

__all__ = ["ImageMaskPromptDataset", "SegmentationSample"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
Prompts = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class SegmentationSample:
    """One (image, class, prompts) triple of an ``ImageMaskPromptDataset``.

    Attributes:
        image: image file.
        mask: mask file.
        prompts: ``{key: (prompt, ...)}``; empty when prompts come from templates or the class name.
        class_name: name of the class this sample segments (None: the templates' default).
        class_value: mask pixel value of the class in a label map; None for a binary mask
            (foreground from the dataset's ``mask_values`` / ``mask_threshold``, or the mask
            encoding detected per file).
        metadata: image metadata for attribute templates (view, age, sex, ...).
    """

    image: Path
    mask: Path
    prompts: Prompts = field(default_factory=dict)
    class_name: str | None = None
    class_value: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- file reading
def _read_image(path: Path) -> Tensor:
    """``(3, H, W)`` image of a file: uint8 for 8-bit files, else float32 in [0, 1].

    The conversion is ``vlsegkit.data.images.to_image_tensor``'s (``decode_image`` is it without the
    final ``/ 255`` of uint8), so a file read here and the same file opened with PIL and given to
    ``predict`` become the same tensor, 16-bit files included.
    """
    img = open_image(path, "image")
    try:
        return decode_image(img)
    except ValueError as err:
        raise ValueError(f"image file '{path}': {err}") from err


def _normalize_prompts(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    """``{key: (prompts,)}`` from a string, a list of strings or a ``{key: str | [str]}`` dict."""
    if isinstance(value, str) or (
        isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray))
    ):
        value = {"p1": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"prompts of {where} must be a string, a list or a dict, got {value!r}")
    out = {}
    for key, prompts in value.items():
        prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"prompt {key!r} of {where} must be a string or a non-empty list of strings, "
                f"got {value[key]!r}"
            )
        out[str(key)] = prompts
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} '{path}' is not valid JSON: {err}") from err


def _lookup(table: Mapping[str, Any], image: Path) -> Any:
    """Entry of a per-image table keyed by file name or by stem."""
    if image.name in table:
        return table[image.name]
    return table.get(image.stem)


def _check_threshold(value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"mask_threshold must be None (detect the encoding) or a finite number >= 0, "
            f"got {value!r}"
        )
    return float(value)


def _check_mask_values(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, numbers.Integral) else value
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or not values
        or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values
        )
    ):
        raise ValueError(
            f"mask_values must be an int >= 0 or a non-empty list of them (the foreground pixel "
            f"values, e.g. (255,) or (1,)), got {value!r}"
        )
    return tuple(int(v) for v in values)


def _class_map(classes: Mapping[int, str] | Sequence[str] | None) -> dict[int, str] | None:
    if classes is None:
        return None
    if isinstance(classes, Mapping):
        items = dict(classes)
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        items = {i + 1: name for i, name in enumerate(classes)}
    else:
        raise ValueError(
            f"classes must map mask values to class names or list names for values 1, 2, ..., "
            f"got {classes!r}"
        )
    if not items or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and isinstance(n, str)
        for v, n in items.items()
    ):
        raise ValueError(f"classes must map int mask values to str class names, got {classes!r}")
    return {int(v): n for v, n in items.items()}


# --------------------------------------------------------------------------- dataset
class ImageMaskPromptDataset(Dataset):
    """(image, prompt, binary mask) samples read from disk, resized and optionally augmented.

    Build it with ``from_json`` / ``from_medvlsm`` (medvlsm-TuneVLSeg annotation files) or
    ``from_folder`` (``images/`` + ``masks/``), or directly from ``SegmentationSample`` records.
    Items match ``SyntheticLesions``: ``image`` float32 ``(3, H, W)`` (in [0, 1], or normalised with
    ``mean`` / ``std``), ``mask`` float32 ``(1, H, W)`` in {0, 1}, ``prompt`` str, ``index`` int;
    batch them with ``collate_prompts``.

    Per item: read the image (``vlsegkit.data.images.to_image_tensor``'s conversion) and the mask,
    take the sample's binary mask, resize both to ``image_size`` (image ``interpolation``, mask
    nearest), apply ``transform(image, mask)`` to the ``tv_tensors.Image`` and ``tv_tensors.Mask``
    jointly, build prompts (``templates`` on the final mask and image, else the sample's prompts,
    else its class name), pick one (see ``prompt_key``), then normalise the image.

    Masks. Each mask file is decoded to one value per pixel (8- or 16-bit grey, palette index,
    bilevel, float, or the grey level of an RGB(A) mask whose channels are equal; a colour mask
    raises). The foreground of a binary sample is, in this order: the pixels equal to one of
    ``mask_values``; the pixels above ``mask_threshold``; else the encoding detected per file:
    values in {0, 1}, in {0, 255}, in {0, 65535} (16-bit), or a lossy (JPEG / WebP) 0/255 mask
    with compression noise (foreground > 127). A label-map sample (``classes``, ``mask_value``)
    takes the pixels equal to its class value. A mask that fits none of these, a threshold not below
    the mask's largest value, or ``mask_values`` absent from a non-empty mask raises a
    ``ValueError`` naming the file. At construction ``check_masks`` masks, evenly spaced over the
    samples, are read: a bad encoding fails early, and a warning names the count when all of them
    are empty (usually a wrong encoding option, e.g. a threshold of 127 on 0/1 masks).

    Args:
        samples: the records.
        image_size: output ``H`` (square) or ``(H, W)``; None keeps each image's size.
        prompt_key: key of the prompt to use (``"p1"``), ``"random"`` (uniform over every key but
            ``"p0"``, as medvlsm's ``prompt_type="random"``), or a list of keys to sample from. A
            key holding a list of prompts samples one of them uniformly.
        templates: ``PromptTemplates`` or a family name (``"endoscopy"``, ``"busi"``, ``"camus"``,
            ...) to build attribute prompts from each final mask, image and metadata; overrides
            the samples' own prompts.
        transform: joint augmentation ``transform(image, mask) -> (image, mask)`` on a
            ``tv_tensors.Image`` ``(3, H, W)`` (uint8 for 8-bit files; float32 in [0, 1] for
            16-bit and float files) and a ``tv_tensors.Mask`` ``(1, H, W)`` uint8 in {0, 1}
            (torchvision ``transforms.v2``); it must keep the ``image_size``.
        mean: optional per-channel mean subtracted from the [0, 1] image.
        std: optional per-channel std the image is divided by.
        mask_threshold: None (default) detects each binary mask's encoding (see "Masks" above);
            a number ``T >= 0`` makes the foreground ``pixel > T`` on the file's own scale
            (0 for 0/1 masks, 127 for 0/255 masks, 32767 for 16-bit ones; a file whose largest
            value is not above ``T`` raises unless it is empty).
        mask_values: foreground pixel values of binary masks, e.g. ``(255,)``, ``(1,)`` or
            ``(1, 2)``; an int is one value. Exclusive with ``mask_threshold``. For palette
            images these are palette indices. Label-map samples (``class_value`` set) ignore
            both options.
        interpolation: image resize interpolation, ``"bilinear"`` (medvlsm), ``"bicubic"``
            (TuneVLSeg) or ``"nearest"``.
        seed: None draws prompts and augmentations from the global ``random`` / torch generators
            (DataLoader workers seed them); an int makes item ``i`` a function of
            ``(seed, epoch, i)`` (see ``set_epoch``).
        check_files: check at construction that every file exists.
        check_masks: how many masks (evenly spaced over the samples) to read at construction to
            check their encoding and warn when all of them are empty; 0 reads none (also needed
            with ``check_files=False`` when the files do not exist yet).
    """

    def __init__(
        self,
        samples: Sequence[SegmentationSample],
        *,
        image_size: int | Sequence[int] | None = 224,
        prompt_key: str | Sequence[str] = "p1",
        templates: PromptTemplates | str | None = None,
        transform: Callable[[Any, Any], Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        mask_threshold: float | None = None,
        mask_values: int | Sequence[int] | None = None,
        interpolation: str = "bilinear",
        seed: int | None = None,
        check_files: bool = True,
        check_masks: int = 16,
    ) -> None:
        self.samples = list(samples)
        if not all(isinstance(s, SegmentationSample) for s in self.samples):
            raise ValueError("samples must be SegmentationSample records")
        self.image_size = None if image_size is None else _pair(image_size, "image_size")
        if isinstance(prompt_key, str):
            self.prompt_key: str | tuple[str, ...] = prompt_key
        else:
            self.prompt_key = tuple(prompt_key)
            if not self.prompt_key or not all(isinstance(k, str) for k in self.prompt_key):
                raise ValueError(f"prompt_key must be a str or a list of str, got {prompt_key!r}")
        self.templates = get_templates(templates) if isinstance(templates, str) else templates
        if self.templates is not None and not isinstance(self.templates, PromptTemplates):
            raise ValueError(f"templates must be PromptTemplates or a name, got {templates!r}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable, got {transform!r}")
        self.transform = transform
        self.mean = _channel_stats(mean, "mean", 0.0)
        self.std = _channel_stats(std, "std", 1.0)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {std}")
        self._normalize = mean is not None or std is not None
        self.mask_threshold = _check_threshold(mask_threshold)
        self.mask_values = _check_mask_values(mask_values)
        if self.mask_threshold is not None and self.mask_values is not None:
            raise ValueError(
                "mask_threshold and mask_values are exclusive ways to choose the foreground; "
                f"got mask_threshold={mask_threshold!r} and mask_values={mask_values!r}"
            )
        if interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}"
            )
        self.interpolation = _INTERPOLATION[interpolation]
        if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be None or a non-negative int, got {seed!r}")
        self.seed = seed
        self.epoch = 0
        if isinstance(check_masks, bool) or not isinstance(check_masks, numbers.Integral):
            raise ValueError(f"check_masks must be an int >= 0, got {check_masks!r}")
        if check_masks < 0:
            raise ValueError(f"check_masks must be an int >= 0, got {check_masks!r}")
        if check_files:
            self._check_files()
        if check_masks:
            self._check_masks(int(check_masks))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_json(
        cls,
        annotations: str | Path | Sequence[Mapping[str, Any]],
        *,
        image_dir: str | Path | None = None,
        mask_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> ImageMaskPromptDataset:
        """Read a medvlsm / TuneVLSeg annotation file (a JSON list of triples).

        Each entry needs ``img_name`` and ``mask_name`` (paths relative to ``image_dir`` /
        ``mask_dir``) and ``prompts`` (``{"p0": str, "p1": str | [str], ...}``, or a single string
        or list, taken as ``p1``); optional ``class_name``, ``mask_value`` (label value in a
        multi-class mask) and ``metadata``. Other keys are ignored.

        Args:
            annotations: the JSON file, or the already-loaded list of entries.
            image_dir: image folder (default: ``<json folder>/../images``, medvlsm's layout).
            mask_dir: mask folder (default: ``<json folder>/../masks``).
            **kwargs: ``ImageMaskPromptDataset`` options.

        Returns:
            The dataset, one sample per entry.
        """
        source = "annotations"
        if isinstance(annotations, (str, Path)):
            path = Path(annotations)
            if not path.is_file():
                raise FileNotFoundError(f"annotation file '{path}' does not exist")
            source = f"annotation file '{path}'"
            root = path.parent.parent
            image_dir = root / "images" if image_dir is None else image_dir
            mask_dir = root / "masks" if mask_dir is None else mask_dir
            annotations = _load_json(path, "annotation file")
        elif image_dir is None or mask_dir is None:
            raise ValueError("image_dir and mask_dir are needed when annotations is a list")
        if isinstance(annotations, Mapping) or not isinstance(annotations, Sequence):
            raise ValueError(f"{source} must hold a JSON list of entries")
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        samples = []
        for i, entry in enumerate(annotations):
            where = f"entry {i} of {source}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be a JSON object, got {entry!r}")
            missing = [k for k in ("img_name", "mask_name", "prompts") if k not in entry]
            if missing:
                raise ValueError(f"{where} lacks the key(s) {missing}")
            value = entry.get("mask_value")
            samples.append(
                SegmentationSample(
                    image=image_dir / entry["img_name"],
                    mask=mask_dir / entry["mask_name"],
                    prompts=_normalize_prompts(entry["prompts"], where),
                    class_name=entry.get("class_name"),
                    class_value=None if value is None else int(value),
                    metadata=dict(entry.get("metadata") or {}),
                )
            )
        return cls(samples, **kwargs)

    @classmethod
    def from_medvlsm(
        cls, root: str | Path, split: str = "train", **kwargs: Any
    ) -> ImageMaskPromptDataset:
        """Read ``<root>/anns/<split>.json``, images in ``<root>/images``, masks in ``<root>/masks``.

        Args:
            root: dataset folder of the medvlsm / TuneVLSeg release, e.g. ``data/kvasir_polyp``.
            split: annotation file name without ``.json`` (``train``, ``val``, ``test``, ``testB``).
            **kwargs: ``ImageMaskPromptDataset`` options.

        Returns:
            The dataset.
        """
        root = Path(root)
        return cls.from_json(
            root / "anns" / f"{split}.json",
            image_dir=root / "images",
            mask_dir=root / "masks",
            **kwargs,
        )

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        images: str = "images",
        masks: str = "masks",
        mask_suffix: str = "",
        classes: Mapping[int, str] | Sequence[str] | None = None,
        class_name: str | None = None,
        absent_classes: bool = False,
        prompts_file: str | None = "prompts.json",
        metadata_file: str | None = "metadata.json",
        **kwargs: Any,
    ) -> ImageMaskPromptDataset:
        """Read ``<root>/<images>/<stem>.<ext>`` with masks ``<root>/<masks>/<stem><suffix>.<ext>``.

        Binary masks (``classes=None``) give one sample per image, negatives (empty masks)
        included, segmenting ``class_name``. Label-map masks (``classes`` given) give one sample per
        class present in the image; an image with no class present gives one negative sample per
        class; ``absent_classes=True`` gives every class for every image (empty targets for the
        absent ones). Label maps are read once here to find the classes present.

        ``prompts.json`` maps a file name or stem to a prompt, a list of prompts or a
        ``{"p1": ..., "p2": ...}`` dict (a string or list counts as ``p1``); with ``classes``, to
        ``{class_name: prompts}``. Without a prompt entry (and without ``templates``) the prompt is
        the class name. ``metadata.json`` maps a file name or stem to metadata for templates.

        Args:
            root: dataset folder.
            images: image sub-folder.
            masks: mask sub-folder.
            mask_suffix: appended to the image stem to name its mask (``"_mask"`` for BUSI,
                ``"_segmentation"`` for ISIC), any image extension.
            classes: ``{mask value: class name}`` or names of values 1, 2, ... (CAMUS:
                ``vlsegkit.data.templates.CAMUS_CLASSES``).
            class_name: class of binary masks (default: the templates' class name with
                ``templates``, else "lesion").
            absent_classes: also emit samples for classes absent from an image.
            prompts_file: optional prompts file name in ``root`` (None to ignore).
            metadata_file: optional metadata file name in ``root`` (None to ignore).
            **kwargs: ``ImageMaskPromptDataset`` options.

        Returns:
            The dataset.
        """
        root = Path(root)
        image_dir, mask_dir = root / images, root / masks
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder '{image_dir}' does not exist")
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder '{mask_dir}' does not exist")
        class_map = _class_map(classes)
        if class_name is None and kwargs.get("templates") is None:
            class_name = "lesion"
        tables = []
        for name, what in ((prompts_file, "prompts file"), (metadata_file, "metadata file")):
            path = root / name if name else None
            table = _load_json(path, what) if path is not None and path.is_file() else {}
            if not isinstance(table, Mapping):
                raise ValueError(f"{what} '{path}' must hold a JSON object keyed by image")
            tables.append(table)
        prompt_table, metadata_table = tables

        image_files = sorted(
            p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if mask_suffix and image_dir.resolve() == mask_dir.resolve():
            # One shared folder (BUSI's "x.png" + "x_mask.png"): masks are not images.
            image_files = [p for p in image_files if not p.stem.endswith(mask_suffix)]
        if not image_files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{image_dir}'")
        mask_files: dict[str, Path] = {}
        for path in sorted(mask_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                mask_files.setdefault(path.stem, path)  # a.jpg before a.png: sorted order wins
        samples = []
        for image in image_files:
            mask = mask_files.get(image.stem + mask_suffix)
            if mask is None:
                raise FileNotFoundError(
                    f"no mask for image '{image}': expected "
                    f"'{mask_dir / (image.stem + mask_suffix)}.<ext>' with ext in {IMAGE_EXTENSIONS}"
                )
            metadata = _lookup(metadata_table, image) or {}
            if not isinstance(metadata, Mapping):
                raise ValueError(
                    f"image '{image.name}' in the metadata file must map to a JSON object, "
                    f"got {metadata!r}"
                )
            metadata = dict(metadata)
            entry = _lookup(prompt_table, image)
            where = f"image '{image.name}' in the prompts file"
            if class_map is None:
                prompts = {} if entry is None else _normalize_prompts(entry, where)
                samples.append(SegmentationSample(image, mask, prompts, class_name, None, metadata))
                continue
            per_class = entry or {}
            if not isinstance(per_class, Mapping) or set(per_class) - set(class_map.values()):
                raise ValueError(
                    f"{where} must map class names {sorted(class_map.values())} to prompts, "
                    f"got {entry!r}"
                )
            present = set(distinct_values(read_mask(mask).values).tolist())
            kept = [v for v in class_map if v in present]
            if absent_classes or not kept:
                kept = list(class_map)
            for value in kept:
                name = class_map[value]
                prompts = per_class.get(name)
                prompts = {} if prompts is None else _normalize_prompts(prompts, where)
                samples.append(SegmentationSample(image, mask, prompts, name, value, metadata))
        return cls(samples, **kwargs)

    def _check_files(self) -> None:
        missing = list(
            dict.fromkeys(
                str(path)
                for s in self.samples
                for path in (s.image, s.mask)
                if not Path(path).is_file()
            )
        )
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} dataset file(s) missing: {shown}{more}")

    def _check_masks(self, count: int) -> None:
        """Binarise ``count`` evenly spaced masks; warn if every one of them is empty."""
        if not self.samples:
            return
        picked = np.unique(np.linspace(0, len(self) - 1, min(count, len(self))).round().astype(int))
        empty = sum(not self._binary_mask(self.samples[i]).any() for i in picked.tolist())
        if empty == len(picked):
            warnings.warn(
                f"all {empty} masks checked of the {len(self)} samples are empty (no foreground "
                "pixel); if that is not expected, check mask_threshold / mask_values / classes "
                "(check_masks sets how many masks are checked)",
                UserWarning,
                stacklevel=3,
            )

    def _binary_mask(self, sample: SegmentationSample) -> np.ndarray:
        """``(H, W)`` bool foreground of a sample's mask file."""
        path = Path(sample.mask)
        return binarize(
            read_mask(path),
            path,
            class_value=sample.class_value,
            mask_values=self.mask_values,
            mask_threshold=self.mask_threshold,
        )

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Distinct class names of the samples, in order of first appearance."""
        return tuple(dict.fromkeys(s.class_name for s in self.samples if s.class_name))

    def set_epoch(self, epoch: int) -> None:
        """Use a new draw of prompts and augmentations per epoch when ``seed`` is set."""
        self.epoch = operator.index(epoch)

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of length {len(self)}")
        return index % len(self)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """The raw image and binary mask of a sample, before resizing.

        Returns:
            ``(3, H, W)`` image, uint8 for 8-bit files, else float32 in [0, 1]
            (``to_image_tensor(PIL.Image.open(file))`` equals it divided by 255 when uint8), and
            the ``(1, H, W)`` uint8 mask in {0, 1}.
        """
        sample = self.samples[self._check_index(index)]
        image = _read_image(Path(sample.image))
        binary = self._binary_mask(sample)
        if binary.shape != tuple(image.shape[1:]):
            raise ValueError(
                f"mask '{sample.mask}' has size (H, W) = {binary.shape} but image "
                f"'{sample.image}' has {tuple(image.shape[1:])}"
            )
        return image, torch.from_numpy(binary.astype(np.uint8))[None]

    def _augment(self, image: Tensor, mask: Tensor, index: int) -> tuple[Tensor, Tensor]:
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.image_size is not None:
            size = list(self.image_size)
            image = TF.resize(image, size, interpolation=self.interpolation, antialias=True)
            if image.is_floating_point():
                # Bicubic overshoots; uint8 results saturate, so float ones are clamped alike.
                image = image.clamp_(0, 1)
            mask = TF.resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)
        if self.transform is not None:
            if self.seed is None:
                image, mask = self.transform(image, mask)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self._item_seed(index, 1))
                    image, mask = self.transform(image, mask)
        image, mask = image.as_subclass(Tensor), mask.as_subclass(Tensor)
        expected = self.image_size or tuple(image.shape[-2:])
        if image.shape != (3, *expected) or mask.shape != (1, *expected):
            raise ValueError(
                f"transform must return an image (3, H, W) and a mask (1, H, W) with (H, W) = "
                f"{expected}, got {tuple(image.shape)} and {tuple(mask.shape)}"
            )
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        return image, (mask > 0).float()

    def _item_seed(self, index: int, stream: int) -> int:
        words = np.random.SeedSequence([self.seed, self.epoch, index, stream]).generate_state(2)
        return int(words[0]) << 32 | int(words[1])

    def _prompts(self, sample: SegmentationSample, image: Tensor, mask: Tensor) -> Prompts:
        if self.templates is not None:
            found = self.templates.prompts(
                mask[0].numpy(), image=image, metadata=sample.metadata, class_name=sample.class_name
            )
            return {k: tuple(v) for k, v in found.items()}
        if sample.prompts:
            return sample.prompts
        return {"p0": ("",), "p1": (sample.class_name or "",)}

    def _choose(self, prompts: Prompts, index: int, rng: random.Random | Any) -> str:
        if self.prompt_key == "random":
            keys = [k for k in prompts if k != "p0"] or list(prompts)
        else:
            keys = [self.prompt_key] if isinstance(self.prompt_key, str) else self.prompt_key
            missing = [k for k in keys if k not in prompts]
            if missing:
                sample = self.samples[index]
                raise KeyError(
                    f"prompt key(s) {missing} not available for item {index} "
                    f"('{Path(sample.image).name}'); its prompts have keys {sorted(prompts)}"
                )
        choices = prompts[rng.choice(keys)]
        return rng.choice(choices) if len(choices) > 1 else choices[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        sample = self.samples[index]
        image, mask = self._augment(*self.load(index), index)
        rng = random if self.seed is None else random.Random(self._item_seed(index, 0))
        prompt = self._choose(self._prompts(sample, image, mask), index, rng)
        if self._normalize:
            image = (image - self.mean) / self.std
        return {"image": image, "mask": mask, "prompt": prompt, "index": index}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(samples={len(self)}, image_size={self.image_size}, "
            f"prompt_key={self.prompt_key!r}, classes={list(self.class_names)})"
        )
