"""Attribute prompts P0..P9 built from a mask, the image and metadata, per dataset family.

The medvlsm transfer-learning study (Poudel et al., "Exploring Transfer Learning in Medical Image
Segmentation using Vision-Language Models", MIDL 2024, §3.3, Table 2 and appendix B.2) prompts each
dataset with up to ten templates of increasing detail, filled with attributes a1..a14:

* from the mask: a4 size, a5 number, a6 location (and, here, a2 shape);
* from the image: a3 colour (the paper asks a VQA model; here the mean colour is named);
* from metadata: a8 view, a9 pathologies, a10 cardiac cycle, a11 sex, a12 age, a13 image quality,
  a14 tumour type;
* fixed per dataset: a1 class name, a7 general class descriptions.

Measured attributes reuse ``vlsegkit.data.synthetic``: connected components (8-connectivity,
components of at most 1e-4 of the image ignored), size words (> 0.30 large, > 0.08 medium, < 0.001
tiny, else small), the centroid's cell on a 3x3 grid, and a moment-ellipse shape word (round, oval,
irregular). As in the released annotation files, several components give the distinct sizes and
locations joined by ", " (largest component first), e.g. "two large orange round polyp, located in
top left, center of the image". The shape is that of the largest component.

Templates use a tiny syntax (see ``render_template``): ``{field}`` placeholders and ``[...]``
optional segments that disappear when a field inside them is unknown, so a missing colour or age
drops its words instead of failing. A list-valued field (the five general descriptions, say) gives
one prompt per value; a dataset loader then samples one at random, as the paper does.

``PromptTemplates.prompts(mask, ...)`` returns ``{"p0": [...], "p1": [...], ...}`` in the JSON
form of the medvlsm / TuneVLSeg annotation files (``vlsegkit.data.ImageMaskPromptDataset`` reads
both).
"""

from __future__ import annotations

import itertools
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from .synthetic import _as_2d_mask, mask_attributes

__all__ = [
    "CAMUS_CLASSES",
    "CHEXLOCALIZE_CLASSES",
    "DATASET_TEMPLATES",
    "GENERAL_DESCRIPTIONS",
    "PromptTemplates",
    "colour_name",
    "get_templates",
    "mask_prompt_fields",
    "normalize_metadata",
    "number_to_words",
    "render_template",
]

Field = str | Sequence[str] | None

# --------------------------------------------------------------------------- numbers in words
_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """English words for ``0 <= n <= 999``, hyphenated like num2words (used by medvlsm).

    Examples: ``7 -> "seven"``, ``46 -> "forty-six"``, ``105 -> "one hundred and five"``.

    Args:
        n: a non-negative integer below 1000.

    Returns:
        The number in words.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= 999:
        raise ValueError(f"n must be an int in [0, 999], got {n!r}")
    n = int(n)
    if n >= 100:
        rest = n % 100
        head = f"{_ONES[n // 100]} hundred"
        return head if rest == 0 else f"{head} and {number_to_words(rest)}"
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


# --------------------------------------------------------------------------- attributes
# Reference RGB of each colour word; the words are those the medvlsm VQA answers used.
_PALETTE = {
    "white": (0.95, 0.95, 0.95),
    "gray": (0.5, 0.5, 0.5),
    "black": (0.05, 0.05, 0.05),
    "red": (0.8, 0.1, 0.1),
    "pink": (0.95, 0.6, 0.65),
    "orange": (0.95, 0.55, 0.15),
    "yellow": (0.95, 0.9, 0.2),
    "brown": (0.45, 0.27, 0.12),
    "tan": (0.82, 0.7, 0.55),
    "green": (0.15, 0.6, 0.2),
    "blue": (0.15, 0.3, 0.8),
    "purple": (0.5, 0.2, 0.6),
}


def colour_name(image: np.ndarray | Tensor, mask: np.ndarray | Tensor) -> str | None:
    """Name the mean colour of the masked pixels: the nearest word of a small RGB palette.

    A deterministic stand-in for the OFA visual-question answers medvlsm used for attribute a3.

    Args:
        image: ``(3, H, W)`` RGB image, float in [0, 1] or uint8.
        mask: ``(H, W)`` or ``(1, H, W)`` binary mask; nonzero = region to describe.

    Returns:
        A colour word such as ``"pink"``, or None for an empty mask.
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    fg = _as_2d_mask(mask)
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1:] != fg.shape:
        raise ValueError(
            f"image must have shape (3, H, W) = (3, {fg.shape[0]}, {fg.shape[1]}) to match the "
            f"mask, got {image.shape}"
        )
    if not fg.any():
        return None
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    mean = image[:, fg].astype(np.float64).mean(1) / scale
    names = list(_PALETTE)
    refs = np.array([_PALETTE[n] for n in names])
    return names[int(np.argmin(((refs - mean) ** 2).sum(1)))]


def _join_distinct(words: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(words))


def mask_prompt_fields(
    mask: np.ndarray | Tensor,
    *,
    image: np.ndarray | Tensor | None = None,
    connectivity: int = 8,
    min_area_fraction: float = 1e-4,
) -> dict[str, str | None]:
    """Prompt fields measured on a binary mask (and optionally the image).

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` binary mask.
        image: optional ``(3, H, W)`` RGB image for the ``color`` field.
        connectivity: 4 or 8 (see ``connected_components``).
        min_area_fraction: components this small are ignored (see ``mask_attributes``).

    Returns:
        ``number`` (in words, "zero" for no component), ``s`` ("s" for several components, else
        ""), ``size`` / ``location`` (distinct words of the components, largest first, joined by
        ", "), ``shape`` (largest component), ``color`` (None without image); the last four are
        None when no component is kept.
    """
    comps = mask_attributes(mask, connectivity=connectivity, min_area_fraction=min_area_fraction)
    n = len(comps)
    fields: dict[str, str | None] = {
        "number": number_to_words(n) if n < 1000 else str(n),
        "s": "s" if n > 1 else "",
        "size": _join_distinct([c.size for c in comps]) if comps else None,
        "location": _join_distinct([c.location for c in comps]) if comps else None,
        "shape": comps[0].shape if comps else None,
        "color": None,
    }
    if image is not None and comps:
        fields["color"] = colour_name(image, mask)
    return fields


_VIEWS = {"2ch": "two-chamber", "4ch": "four-chamber"}
_CYCLES = {"ed": "diastole", "es": "systole", "end-diastole": "diastole", "end-systole": "systole"}
_SEXES = {"f": "female", "m": "male", "female": "female", "male": "male"}
_ALIASES = {
    "gender": "sex",
    "phase": "cycle",
    "cardiac_cycle": "cycle",
    "image_quality": "quality",
    "imagequality": "quality",
    "tumour_type": "tumor_type",
    "type": "tumor_type",
    "pathology": "pathologies",
    "labels": "pathologies",
}


def normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Field]:
    """Turn image metadata into prompt fields (keys lower-cased, codes spelled out).

    ``view`` "2CH"/"4CH" -> "two-chamber"/"four-chamber"; ``cycle`` (or ``phase``) "ED"/"ES" ->
    "diastole"/"systole"; ``sex`` (or ``gender``) "F"/"M" -> "female"/"male"; ``age`` -> words
    ("sixty-four"); ``quality`` (or ``image_quality``) lower-cased; ``tumor_type`` "benign" /
    "malignant" also sets ``tumor_regularity`` "regular" / "irregular" (BUSI's second template
    variant); ``pathologies`` lists are joined by ", ". Other keys pass through as strings (lists
    of strings stay lists, giving one prompt per value).

    Args:
        metadata: mapping such as ``{"view": "2CH", "cycle": "ED", "sex": "F", "age": 64}``.

    Returns:
        A new dict of fields; None values are dropped.
    """
    out: dict[str, Field] = {}
    for raw_key, value in (metadata or {}).items():
        if value is None:
            continue
        key = _ALIASES.get(str(raw_key).lower(), str(raw_key).lower())
        if key == "age":
            try:
                out["age"] = number_to_words(int(value))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"metadata 'age' must be an int in [0, 999], got {value!r}"
                ) from err
        elif key == "pathologies" and not isinstance(value, str):
            out[key] = ", ".join(str(v) for v in value)
        elif isinstance(value, str):
            text = value.strip()
            lower = text.lower()
            if key == "view":
                text = _VIEWS.get(lower, text)
            elif key == "cycle":
                text = _CYCLES.get(lower, lower)
            elif key == "sex":
                text = _SEXES.get(lower, lower)
            elif key in ("quality", "tumor_type"):
                text = lower
            out[key] = text
        elif isinstance(value, Sequence):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    tumor = out.get("tumor_type")
    if isinstance(tumor, str) and "tumor_regularity" not in out:
        regularity = {"benign": "regular", "malignant": "irregular"}.get(tumor)
        if regularity:
            out["tumor_regularity"] = regularity
    return out


# --------------------------------------------------------------------------- template syntax
_TOKEN = re.compile(r"\[|\]|\{(\w+)\}|[^\[\]{]+|\{")


def _parse(template: str) -> list:
    """Nested list of literal strings, ``("field", name)`` tuples and sub-lists (optional parts)."""
    stack: list[list] = [[]]
    for match in _TOKEN.finditer(template):
        token = match.group(0)
        if token == "[":
            stack.append([])
        elif token == "]":
            if len(stack) == 1:
                raise ValueError(f"unbalanced ']' in template {template!r}")
            part = stack.pop()
            stack[-1].append(part)
        elif match.group(1):
            stack[-1].append(("field", match.group(1)))
        elif token == "{":
            raise ValueError(f"unclosed or empty '{{' placeholder in template {template!r}")
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise ValueError(f"unbalanced '[' in template {template!r}")
    return stack[0]


def _known(value: Field) -> bool:
    return value is not None and not (not isinstance(value, str) and len(value) == 0)


def _fill(parts: list, fields: Mapping[str, str], optional: bool) -> str | None:
    """Text of ``parts``; None if an optional part lacks a field (a required one raises)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, tuple):
            name = part[1]
            if name not in fields:
                if optional:
                    return None
                raise KeyError(
                    f"template field {name!r} is unknown; give it a value or put it inside an "
                    f"optional [...] segment (known fields: {sorted(fields)})"
                )
            out.append(fields[name])
        else:
            out.append(_fill(part, fields, optional=True) or "")
    return "".join(out)


def _fields_in(parts: list) -> list[str]:
    names = []
    for part in parts:
        if isinstance(part, tuple):
            names.append(part[1])
        elif isinstance(part, list):
            names.extend(_fields_in(part))
    return names


def _tidy(text: str) -> str:
    # Dropped segments leave double spaces and spaces before punctuation behind.
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:])", r"\1", text)


def render_template(template: str, fields: Mapping[str, Field]) -> list[str]:
    """Fill a prompt template; one prompt per combination of list-valued fields.

    Syntax: ``{name}`` is replaced by ``fields[name]``; ``[...]`` is an optional segment, kept only
    when every field directly inside it is known (segments nest). A field is unknown when it is
    missing, None or an empty list; an unknown field outside any optional segment raises KeyError.
    Runs of spaces are collapsed and spaces before ``, . ; :`` removed.

    Example: ``render_template("[{size} ][{color} ]{cls}[, located in {location}]", {"cls":
    "polyp", "size": "small"})`` -> ``["small polyp"]``.

    Args:
        template: the template string (``[``, ``]``, ``{`` and ``}`` are reserved).
        fields: field values: a string, a list of strings (expanded), or None (unknown).

    Returns:
        The distinct prompts, in the order of the list values.
    """
    parts = _parse(template)
    used = dict.fromkeys(n for n in _fields_in(parts) if n in fields and _known(fields[n]))
    scalar = {n: fields[n] for n in used if isinstance(fields[n], str)}
    listed = [n for n in used if not isinstance(fields[n], str)]
    prompts = []
    for combo in itertools.product(*[list(fields[n]) for n in listed]):
        values = {**scalar, **dict(zip(listed, combo, strict=True))}
        prompts.append(_tidy(_fill(parts, values, optional=False)))
    return list(dict.fromkeys(prompts))


# --------------------------------------------------------------------------- per-dataset templates
def _freeze(templates: Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in templates.items()}


@dataclass(frozen=True)
class PromptTemplates:
    """A dataset family's prompt templates ``p0..pK`` and the fields they are filled with.

    Args:
        name: family name, e.g. ``"endoscopy"``.
        templates: ``{"p0": template or [templates], ...}`` for masks with at least one component;
            several templates for a key are alternatives (e.g. CAMUS's "of the heart" / "in the
            cardiac ultrasound").
        negative: templates for empty masks (keys not listed fall back to ``templates``).
        defaults: default field values (``cls``, ``description``, ...), overridden by measured
            fields, then by metadata, then by explicit ``fields``.
        capitalize: upper-case the first letter of every prompt.
    """

    name: str
    templates: Mapping[str, tuple[str, ...]]
    negative: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    defaults: Mapping[str, Field] = field(default_factory=dict)
    capitalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", _freeze(self.templates))
        object.__setattr__(self, "negative", _freeze(self.negative))
        for template in itertools.chain(*self.templates.values(), *self.negative.values()):
            _parse(template)  # fail at definition time on a malformed template

    @property
    def keys(self) -> tuple[str, ...]:
        """Prompt keys, e.g. ``("p0", ..., "p9")``."""
        return tuple(self.templates)

    def render(self, fields: Mapping[str, Field] | None = None, *, negative: bool = False):
        """Fill every template with ``defaults`` updated by ``fields``.

        Args:
            fields: field values (see ``render_template``).
            negative: use the templates for an empty mask.

        Returns:
            ``{key: [prompts]}`` for every key.
        """
        values = {**self.defaults, **(fields or {})}
        out: dict[str, list[str]] = {}
        for key, templates in self.templates.items():
            chosen = self.negative.get(key, templates) if negative else templates
            prompts = [p for t in chosen for p in render_template(t, values)]
            if self.capitalize:
                prompts = [p[:1].upper() + p[1:] for p in prompts]
            out[key] = list(dict.fromkeys(prompts))
        return out

    def prompts(
        self,
        mask: np.ndarray | Tensor,
        *,
        image: np.ndarray | Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
        class_name: str | None = None,
        connectivity: int = 8,
        min_area_fraction: float = 1e-4,
    ) -> dict[str, list[str]]:
        """Prompts for one (image, binary mask) pair.

        Args:
            mask: ``(H, W)`` or ``(1, H, W)`` binary mask of the class being prompted.
            image: optional ``(3, H, W)`` RGB image (float in [0, 1] or uint8) for the colour.
            metadata: image metadata (see ``normalize_metadata``).
            class_name: overrides the family's default class name (field ``cls``).
            connectivity: 4 or 8.
            min_area_fraction: components this small are ignored.

        Returns:
            ``{"p0": [...], ...}``; the negative templates are used when no component is kept.
        """
        measured = mask_prompt_fields(
            mask, image=image, connectivity=connectivity, min_area_fraction=min_area_fraction
        )
        fields: dict[str, Field] = {k: v for k, v in measured.items() if v is not None}
        fields.update(normalize_metadata(metadata))
        if class_name is not None:
            fields["cls"] = class_name
        return self.render(fields, negative=measured["size"] is None)


_ATTRS = "[{number}] [{size}] [{color}] [{shape}] {cls}"
_NON_RADIOLOGY = {
    "p0": "",
    "p1": "{cls}",
    "p2": "[{shape}] {cls}",
    "p3": "[{color}] [{shape}] {cls}",
    "p4": "[{size}] [{color}] [{shape}] {cls}",
    "p5": _ATTRS,
    "p6": _ATTRS + "[, located in {location} of the image]",
    "p7": "{cls} which is {description}",
    "p8": _ATTRS + " which is {description}",
    "p9": _ATTRS + " which is {description}[ located in {location} of the image]",
}
_NON_RADIOLOGY_NEGATIVE = {f"p{k}": "no {cls} in the image" for k in range(1, 10)}

GENERAL_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    # medvlsm appendix B.2, Table 5 (the released JSON files carry a few typos of these).
    "endoscopy": (
        "a projecting growth of tissue",
        "often a bumpy flesh in rectum",
        "a small lump in the lining of colon",
        "a tissue growth that often resemble mushroom-like stalks",
        "an abnormal growth of tissues projecting from a mucous membrane",
    ),
    "skin": (
        "a spot with dark speckles",
        "a spot with irregular texture",
        "a dark sore with irregular texture",
        "an irregular sore with speckles",
        "a rough wound on skin",
    ),
    "ulcer": (
        "a wound in foot and toes",
        "a sore in foot and toes",
        "a sore in skin of foot and toe",
        "an abnormality in foot and toes",
        "an open sore or lesion in foot and toes",
    ),
}

_BUSI_TAIL = " in the breast ultrasound image."
_BUSI = {
    "p0": "",
    "p1": "Tumor" + _BUSI_TAIL,
    "p2": ("[{tumor_type}] tumor" + _BUSI_TAIL, "[{tumor_regularity}-shaped] tumor" + _BUSI_TAIL),
    "p3": (
        "{number} [{tumor_type}] tumor{s}" + _BUSI_TAIL,
        "{number} [{tumor_regularity}-shaped] tumor{s}" + _BUSI_TAIL,
    ),
    "p4": (
        "{number} {size} [{tumor_type}] tumor{s}" + _BUSI_TAIL,
        "{number} {size} [{tumor_regularity}-shaped] tumor{s}" + _BUSI_TAIL,
    ),
    "p5": (
        "{number} {size} [{tumor_type}] tumor{s} at the {location}" + _BUSI_TAIL,
        "{number} {size} [{tumor_regularity}-shaped] tumor{s} at the {location}" + _BUSI_TAIL,
    ),
    "p6": (
        "{number} {size} {shape}-shaped [{tumor_type}] tumor{s} at the {location}" + _BUSI_TAIL,
        "{number} {size} {shape}-shaped [{tumor_regularity}] tumor{s} at the {location}"
        + _BUSI_TAIL,
    ),
}
_BUSI_NEGATIVE = {f"p{k}": "No tumor" + _BUSI_TAIL for k in range(1, 7)}


def _camus(*clauses: str, view: bool = True, shape: bool = False) -> tuple[str, str]:
    label = "{cls}[ of {shape} shape]" if shape else "{cls}"
    view = "[ in {view} view]" if view else ""
    rest = "".join(clauses)
    return (
        f"{label}{view} of the heart{rest}.",
        f"{label}{view} in the cardiac ultrasound{rest}.",
    )


_CYCLE = "[ at end of the {cycle} cycle]"
_SEX = "[ of a {sex}]"
_AGE_SEX = "[ of a[ {age}-year-old] {sex}]"
_QUALITY = "[ with {quality} image quality]"
_CAMUS = {
    "p0": "",
    "p1": _camus(view=False),
    "p2": _camus(),
    "p3": _camus(_CYCLE),
    "p4": _camus(_CYCLE, _SEX),
    "p5": _camus(_CYCLE, _AGE_SEX),
    "p6": _camus(_CYCLE, _AGE_SEX, _QUALITY),
    "p7": _camus(_CYCLE, _AGE_SEX, _QUALITY, shape=True),
}
_CAMUS_NEGATIVE = {
    f"p{k}": ("No {cls} of the heart.", "No {cls} in the cardiac ultrasound.") for k in range(1, 8)
}

_CXR_P4 = (
    "{cls}[ of shape {shape}][, and located in {location}][ of the {view} view] of a Chest Xray."
)
_CHEXLOCALIZE = {
    "p0": "",
    "p1": "{cls} in a chest Xray.",
    "p2": "{cls} in[ the {view} view of] a Chest Xray.",
    "p3": "{cls}[ of shape {shape}] in[ the {view} view of] a Chest Xray.",
    "p4": _CXR_P4,
    "p5": _CXR_P4 + "[ {pathologies} are present.]",
    "p6": "{cls} in a Chest Xray.[ {pathologies} are present.]",
}
_CHEXLOCALIZE_NEGATIVE = {f"p{k}": "No {cls} in a chest Xray." for k in range(1, 7)}

CAMUS_CLASSES: dict[int, str] = {
    1: "Left ventricular cavity",
    2: "Myocardium",
    3: "Left atrium cavity",
}
"""CAMUS label values and class names (medvlsm's ``mask_1/2/3``)."""

CHEXLOCALIZE_CLASSES: tuple[str, ...] = (
    "Airspace Opacity",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Lung Lesion",
    "Pleural Effusion",
    "Pneumothorax",
    "Support Devices",
)
"""The ten CheXlocalize pathologies, named as in the medvlsm annotation files."""


def _non_radiology(name: str, cls: str) -> PromptTemplates:
    return PromptTemplates(
        name=name,
        templates=_NON_RADIOLOGY,
        negative=_NON_RADIOLOGY_NEGATIVE,
        defaults={"cls": cls, "description": GENERAL_DESCRIPTIONS[name]},
    )


DATASET_TEMPLATES: dict[str, PromptTemplates] = {
    "endoscopy": _non_radiology("endoscopy", "polyp"),
    "skin": _non_radiology("skin", "skin melanoma"),
    "ulcer": _non_radiology("ulcer", "foot ulcer"),
    "busi": PromptTemplates(name="busi", templates=_BUSI, negative=_BUSI_NEGATIVE, capitalize=True),
    "camus": PromptTemplates(
        name="camus", templates=_CAMUS, negative=_CAMUS_NEGATIVE, capitalize=True
    ),
    "chexlocalize": PromptTemplates(
        name="chexlocalize",
        templates=_CHEXLOCALIZE,
        negative=_CHEXLOCALIZE_NEGATIVE,
        capitalize=True,
    ),
}
"""Templates of the medvlsm study: endoscopy (P0-P9, polyp), skin (ISIC, "skin melanoma"), ulcer
(DFU, "foot ulcer"), BUSI (P0-P6), CAMUS (P0-P7) and CheXlocalize (P0-P6)."""

_ALIASES_DATASETS = {
    "polyp": "endoscopy",
    "kvasir": "endoscopy",
    "clinicdb": "endoscopy",
    "bkai": "endoscopy",
    "isic": "skin",
    "dfu": "ulcer",
}


def get_templates(name: str) -> PromptTemplates:
    """The ``PromptTemplates`` of a dataset family by name (aliases: polyp, kvasir, isic, dfu...).

    Args:
        name: a key of ``DATASET_TEMPLATES`` or an alias, case-insensitive.

    Returns:
        The templates.
    """
    key = _ALIASES_DATASETS.get(name.lower(), name.lower())
    if key not in DATASET_TEMPLATES:
        known = sorted([*DATASET_TEMPLATES, *_ALIASES_DATASETS])
        raise KeyError(f"unknown prompt template family {name!r}; known: {known}")
    return DATASET_TEMPLATES[key]
