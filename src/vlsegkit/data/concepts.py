"""CoTexNet's conceptual real-text prompts, built offline from (image, mask) pairs.

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (CoTexNet, *Engineering* 2026), §3.1: an attribute extractor describes each region of
interest with five concepts -- number, shape, size, color and location -- which fill the template

    "[number] [shape] [size] [color] [keyword] area, located in the [location] of the image."

giving the coarse real-text prompt ``T_r`` (e.g. "1 oval large red polyp area, located in the top left
of the image."). The paper asks LLaVA-v1.5-13B (eq. 2); vlsegkit's default extractor,
:class:`MaskAttributeExtractor`, measures the same five concepts on the mask and the image with
``vlsegkit.data``'s mask attributes (connected components, size words, 3x3-grid location, moment-ellipse
shape, palette colour name), so no language model is needed. Any callable
``extractor(image, mask) -> {"number", "shape", "size", "color", "location"}`` plugs in instead (the
:class:`AttributeExtractor` protocol) -- e.g. a LLaVA wrapper -- and :func:`write_prompt_cache` stores the
prompts once per image in the medvlsm JSON annotation format that
:meth:`vlsegkit.data.ImageMaskPromptDataset.from_json` reads, so the extractor never runs during
training (the paper's offline stage). The test set needs no prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .synthetic import _as_2d_mask, mask_attributes
from .templates import colour_name

__all__ = [
    "CONCEPTS",
    "CONCEPT_TEMPLATE",
    "AttributeExtractor",
    "ConceptualPrompts",
    "MaskAttributeExtractor",
    "conceptual_prompt",
    "multiclass_conceptual_prompt",
    "write_prompt_cache",
]

#: The five conceptual attributes of CoTexNet (after Poudel et al.'s attribute list).
CONCEPTS = ("number", "shape", "size", "color", "location")

#: CoTexNet's real-text template (§3.1). ``keyword`` is the dataset keyword without "area"
#: ("polyp", "tumor", "skin lesion", ...).
CONCEPT_TEMPLATE = (
    "{number} {shape} {size} {color} {keyword} area, located in the {location} of the image."
)


@runtime_checkable
class AttributeExtractor(Protocol):
    """Describes one region of interest: ``extractor(image, mask) -> {concept: words}``.

    ``image`` is a ``(3, H, W)`` RGB tensor in [0, 1]; ``mask`` an ``(H, W)`` binary tensor of one
    class. The result maps each of :data:`CONCEPTS` to a short phrase ("1", "oval", "large", "red",
    "top left"). The paper's extractor is LLaVA-v1.5-13B prompted with the ROI image; wrap any
    vision-language model in such a callable and cache its prompts with :func:`write_prompt_cache`.
    """

    def __call__(self, image: Tensor, mask: Tensor) -> Mapping[str, str]: ...


class MaskAttributeExtractor:
    """The default attribute extractor: the five concepts measured on the mask and the image.

    * number: connected components of the mask (8-connectivity, specks of at most
      ``min_area_fraction`` of the image ignored), as digits like the paper's example ("1", "2");
    * shape: round / oval / irregular of the largest component (moment-ellipse rule of
      :func:`vlsegkit.data.mask_attributes`);
    * size: tiny / small / medium / large of the largest component (area thresholds of medvlsm);
    * color: the palette word nearest to the mean colour of the masked pixels
      (:func:`vlsegkit.data.templates.colour_name`);
    * location: the 3x3-grid cell of the largest component's centroid ("top left", "center", ...).

    An empty mask gives ``number="0"`` and ``"no"`` for the other four words, so the prompt stays
    well-formed (CoTexNet's LLaVA prompts always describe a region; negatives are rare in its data).

    Args:
        connectivity: 4 or 8, see :func:`vlsegkit.data.connected_components`.
        min_area_fraction: components this small are ignored.
    """

    def __init__(self, *, connectivity: int = 8, min_area_fraction: float = 1e-4) -> None:
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
        if not 0.0 <= float(min_area_fraction) < 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {min_area_fraction!r}")
        self.connectivity = connectivity
        self.min_area_fraction = float(min_area_fraction)

    def __call__(self, image: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> dict[str, str]:
        """The five concepts of the region ``mask`` of ``image``.

        Args:
            image: ``(3, H, W)`` RGB image in [0, 1] (or uint8).
            mask: ``(H, W)`` or ``(1, H, W)`` binary mask of one class (nonzero = region).

        Returns:
            ``{"number", "shape", "size", "color", "location"}`` words.
        """
        fg = _as_2d_mask(mask)
        comps = mask_attributes(
            fg, connectivity=self.connectivity, min_area_fraction=self.min_area_fraction
        )
        if not comps:
            return {"number": "0", "shape": "no", "size": "no", "color": "no", "location": "no"}
        largest = comps[0]
        return {
            "number": str(len(comps)),
            "shape": largest.shape,
            "size": largest.size,
            "color": colour_name(image, fg) or "no",
            "location": largest.location,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(connectivity={self.connectivity}, "
            f"min_area_fraction={self.min_area_fraction})"
        )


def conceptual_prompt(attributes: Mapping[str, Any], keyword: str) -> str:
    """Fill CoTexNet's template with one region's attributes.

    ``"[number] [shape] [size] [color] [keyword] area, located in the [location] of the image."``

    Args:
        attributes: the five :data:`CONCEPTS` (extra keys are ignored).
        keyword: the class keyword without "area", e.g. ``"polyp"`` (CoTexNet's per-dataset
            keywords: polyp, tumor, ulcer, skin lesion, focal, tissue).

    Returns:
        The prompt sentence.

    Raises:
        ValueError: a missing concept or an empty keyword.
    """
    if not isinstance(keyword, str) or not keyword.strip():
        raise ValueError(f"keyword must be a non-empty string, got {keyword!r}")
    missing = [c for c in CONCEPTS if c not in attributes]
    if missing:
        raise ValueError(f"attributes lack the concept(s) {missing}; expected {list(CONCEPTS)}")
    words = {c: " ".join(str(attributes[c]).split()) for c in CONCEPTS}
    return CONCEPT_TEMPLATE.format(keyword=keyword.strip(), **words)


def multiclass_conceptual_prompt(
    image: Tensor,
    masks: Tensor,
    keywords: Sequence[str],
    *,
    extractor: AttributeExtractor | None = None,
) -> str:
    """The real-text prompt of a multi-class image: one sentence per class present, in class order.

    CoTexNet (§5.4) concatenates the per-class descriptions (about 15 words each).

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        masks: ``(K, H, W)`` binary masks, one per class.
        keywords: K class keywords.
        extractor: attribute extractor (default :class:`MaskAttributeExtractor`).

    Returns:
        The sentences joined by spaces; ``""`` when no class is present.
    """
    if masks.dim() != 3 or len(keywords) != masks.shape[0]:
        raise ValueError(
            f"masks must be (K, H, W) with one keyword per class, got {tuple(masks.shape)} and "
            f"{len(keywords)} keywords"
        )
    extractor = MaskAttributeExtractor() if extractor is None else extractor
    return " ".join(
        conceptual_prompt(extractor(image, m), k)
        for m, k in zip(masks, keywords)
        if bool((m > 0).any())
    )


class ConceptualPrompts(Dataset):
    """A dataset whose prompts are CoTexNet's conceptual real-text prompts of each item's mask.

    Wraps any dataset of ``{"image", "mask", "prompt", ...}`` items (``SyntheticLesions``,
    ``ImageMaskPromptDataset``) and replaces ``prompt`` by :func:`conceptual_prompt` of the
    extractor's attributes of ``(image, mask)``. Items are computed on access (cheap for the
    mask-based extractor); for a slow extractor, cache the prompts with :func:`write_prompt_cache`.

    Args:
        dataset: the base dataset; ``mask`` ``(1, H, W)`` binary, or ``(K, H, W)`` for K classes.
        keyword: class keyword (or one per class for ``(K, H, W)`` masks).
        extractor: attribute extractor (default :class:`MaskAttributeExtractor`).
        mean, std: the normalisation of the base dataset's images, undone before measuring colours.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        keyword: str | Sequence[str] = "lesion",
        extractor: AttributeExtractor | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.dataset = dataset
        self.keywords = (keyword,) if isinstance(keyword, str) else tuple(keyword)
        if not self.keywords or not all(isinstance(k, str) and k.strip() for k in self.keywords):
            raise ValueError(f"keyword must be a non-empty string or strings, got {keyword!r}")
        self.extractor = MaskAttributeExtractor() if extractor is None else extractor
        if not callable(self.extractor):
            raise ValueError(f"extractor must be callable, got {extractor!r}")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def raw_image(self, image: Tensor) -> Tensor:
        """``image`` with the base dataset's normalisation undone, clamped to [0, 1]."""
        if self.std is not None:
            image = image * self.std
        if self.mean is not None:
            image = image + self.mean
        return image.clamp(0, 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        image, mask = self.raw_image(item["image"]), item["mask"]
        if mask.shape[0] != len(self.keywords):
            raise ValueError(
                f"item {index} has {mask.shape[0]} mask channels but {len(self.keywords)} "
                "keyword(s) were given"
            )
        if len(self.keywords) == 1:
            item["prompt"] = conceptual_prompt(self.extractor(image, mask[0]), self.keywords[0])
        else:
            item["prompt"] = multiclass_conceptual_prompt(
                image, mask, self.keywords, extractor=self.extractor
            )
        return item


def write_prompt_cache(
    entries: Iterable[Mapping[str, Any]],
    path: str | Path,
    *,
    keyword: str,
    extractor: AttributeExtractor | None = None,
    key: str = "cotexnet",
) -> list[dict[str, Any]]:
    """Describe every training image once and write the prompts as a medvlsm annotation file.

    CoTexNet runs its LMM once per training image offline and caches the output; this is that
    stage for any extractor. Each entry gives ``img_name``, ``mask_name`` (written through), and
    the ``image`` ``(3, H, W)`` in [0, 1] and ``mask`` ``(H, W)`` tensors to describe; optional
    ``class_name`` / ``mask_value`` are kept. The output JSON is a list of
    ``{"img_name", "mask_name", "prompts": {key: prompt}, ...}`` that
    ``ImageMaskPromptDataset.from_json(path, prompt_key=key)`` reads.

    Args:
        entries: the images to describe (e.g. a generator reading files).
        path: the JSON file to write (atomically).
        keyword: class keyword for the template.
        extractor: attribute extractor (default :class:`MaskAttributeExtractor`).
        key: prompt key in the annotation file.

    Returns:
        The written records.
    """
    from ..hub import atomic_write

    extractor = MaskAttributeExtractor() if extractor is None else extractor
    records = []
    for i, entry in enumerate(entries):
        missing = [k for k in ("img_name", "mask_name", "image", "mask") if k not in entry]
        if missing:
            raise ValueError(f"entry {i} lacks the key(s) {missing}")
        prompt = conceptual_prompt(extractor(entry["image"], entry["mask"]), keyword)
        record: dict[str, Any] = {
            "img_name": str(entry["img_name"]),
            "mask_name": str(entry["mask_name"]),
            "prompts": {key: prompt},
        }
        for extra in ("class_name", "mask_value"):
            if entry.get(extra) is not None:
                record[extra] = entry[extra]
        records.append(record)
    text = json.dumps(records, indent=2) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return records
