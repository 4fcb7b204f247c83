"""Mask files → per-pixel values → binary masks, with the encoding detected per file.

Reading (``read_mask``) turns a mask file of any common kind into one value per pixel:

==============================  ===========================================================
file                            pixel values
==============================  ===========================================================
``1`` (bilevel)                 0 / 255
``L`` (8-bit grey), ``LA``      the grey level (alpha ignored)
``P`` / ``PA`` (palette)        the palette *index* (label value); the palette colours are a
                                fallback for auto-detection when they are all grey
``I;16*`` (16-bit grey), ``I``  the 16-bit value (``I``: 32-bit labels when above 65535)
``F`` (float)                   the float value (NaN raises)
``RGB``, ``RGBA``, other modes  the grey level, when the colour channels are equal (within 8
                                levels for lossy JPEG / WebP files); a colour mask raises
==============================  ===========================================================

Binarising (``binarize``) picks the foreground in this order: the sample's class value (label
maps, ``classes``); the dataset's ``mask_values``; its ``mask_threshold``; else the detected
encoding: values in {0, 1} (foreground 1), in {0, 255} (foreground 255), in {0, 65535} for 16-bit
files, or, for lossy files (JPEG, WebP), 0/255 with compression noise (foreground > 127, medvlsm's
threshold). Anything else raises a ``ValueError`` naming the file and its values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Lossy formats blur 0/255 edges into intermediate values; Pillow cannot tell lossless WebP apart.
_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")
# Channel disagreement tolerated in a grey-looking colour mask of a lossy file (chroma noise).
_LOSSY_CHANNEL_SLACK = 8
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class MaskPixels:
    """Per-pixel values of one mask file.

    Attributes:
        values: ``(H, W)`` integer (uint8 / uint16 / int32) or float32 values.
        full_scale: largest value the file's type can hold (255, 65535, 2**31 - 1); None for float.
        lossy: the file format is lossy (JPEG, WebP).
        kind: description for messages, e.g. "8-bit grey (mode 'L')".
        palette: ``(256, 3)`` palette colours of a ``P`` image, else None.
    """

    values: np.ndarray
    full_scale: int | None
    lossy: bool
    kind: str
    palette: np.ndarray | None = None


def open_image(path: Path, kind: str) -> Image.Image:
    """Open and decode an image file; unreadable files raise ``ValueError`` naming ``path``."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {kind} file '{path}': {err}") from err
    return img


def read_mask(path: Path) -> MaskPixels:
    """Read a mask file into per-pixel values (see the module docstring for each mode)."""
    img = open_image(path, "mask")
    lossy = img.format in _LOSSY_FORMATS
    mode = img.mode
    if mode == "1":
        return MaskPixels(np.asarray(img).astype(np.uint8) * 255, 255, lossy, "bilevel (mode '1')")
    if mode == "L":
        return MaskPixels(np.asarray(img), 255, lossy, "8-bit grey (mode 'L')")
    if mode in ("LA", "La"):
        grey = np.asarray(img.convert("LA"))[..., 0]
        return MaskPixels(grey, 255, lossy, f"8-bit grey (mode {mode!r})")
    if mode in ("P", "PA"):
        index = np.asarray(img)
        index = index[..., 0] if index.ndim == 3 else index
        colours = np.zeros((256, 3), np.uint8)
        flat = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
        colours[: len(flat)] = flat
        return MaskPixels(index, 255, lossy, f"palette (mode {mode!r})", colours)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0:
            raise ValueError(
                f"mask '{path}' (mode {mode!r}) has negative values (down to {lo}); masks must be "
                "non-negative labels or grey levels"
            )
        if hi <= 65535:
            return MaskPixels(
                values.astype(np.uint16), 65535, lossy, f"16-bit grey (mode {mode!r})"
            )
        return MaskPixels(values.astype(np.int32), _INT32_MAX, lossy, f"32-bit labels ({mode!r})")
    if mode == "F":
        values = np.asarray(img)
        if not np.isfinite(values).all():
            raise ValueError(f"mask '{path}' (mode 'F') holds NaN or infinite values")
        return MaskPixels(values, None, lossy, "float (mode 'F')")
    try:
        rgb = np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read mask file '{path}' of mode {mode!r}: {err}") from err
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    worst = int(spread.max()) if spread.size else 0
    if worst > (_LOSSY_CHANNEL_SLACK if lossy else 0):
        r, c = np.unravel_index(int(spread.argmax()), spread.shape)
        raise ValueError(
            f"mask '{path}' is a colour image (mode {mode!r}) whose channels differ, e.g. pixel "
            f"(row {r}, column {c}) = {tuple(int(v) for v in rgb[r, c])}; masks must be grey "
            "(0/1 or 0/255), grey-looking RGB, palette or label images: save it as a "
            "single-channel image with one value per class"
        )
    # Equal channels: the red channel is the grey level; with lossy chroma noise, the luminance.
    grey = rgb[..., 0] if worst == 0 else np.asarray(img.convert("RGB").convert("L"))
    return MaskPixels(
        np.ascontiguousarray(grey), 255, lossy, f"grey-looking colour (mode {mode!r})"
    )


def distinct_values(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a counting pass for 8/16-bit data (faster than sorting)."""
    if values.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(values.ravel(), minlength=1))
    return np.unique(values)


def _shown(values: np.ndarray, limit: int = 8) -> str:
    items = [f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist()]
    more = f", ... ({len(values)} distinct)" if len(values) > limit else ""
    return "{" + ", ".join(items) + more + "}"


def binarize(
    pixels: MaskPixels,
    path: Path,
    *,
    class_value: int | None = None,
    mask_values: tuple[int, ...] | None = None,
    mask_threshold: float | None = None,
) -> np.ndarray:
    """``(H, W)`` bool foreground of one mask (see the module docstring for the order of rules).

    Args:
        pixels: the file's values (``read_mask``).
        path: the file, for messages.
        class_value: label value of the sample's class in a label map (foreground = equal).
        mask_values: foreground values of a binary mask (foreground = any of them).
        mask_threshold: foreground = value > threshold.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        ValueError: the values fit no encoding, the threshold is not below the mask's largest
            value, or none of ``mask_values`` occurs in a mask with non-zero values.
    """
    values = pixels.values
    if class_value is not None:
        return values == class_value
    if mask_values is not None:
        fg = np.isin(values, mask_values)
        if not fg.any() and values.any():
            raise ValueError(
                f"mask '{path}' ({pixels.kind}) has values {_shown(distinct_values(values))}, none "
                f"of them in mask_values={mask_values}: every pixel would be background"
            )
        return fg
    if mask_threshold is not None:
        return _thresholded(pixels, path, mask_threshold)
    return _detected(pixels, path)


def _thresholded(pixels: MaskPixels, path: Path, threshold: float) -> np.ndarray:
    values = pixels.values
    if pixels.full_scale is not None and threshold >= pixels.full_scale:
        raise ValueError(
            f"mask_threshold={threshold:g} is not below the largest value a {pixels.kind} mask "
            f"can hold ({pixels.full_scale}), so mask '{path}' would be all background"
        )
    top = values.max() if values.size else 0
    if top > 0 and threshold >= top:
        raise ValueError(
            f"mask_threshold={threshold:g} is not below the largest value ({top:g}) of mask "
            f"'{path}' ({pixels.kind}), so its non-zero pixels would all be background; "
            "use mask_threshold=0 for 0/1 masks, or leave it None to detect the encoding"
        )
    return values > threshold


def _detected(pixels: MaskPixels, path: Path) -> np.ndarray:
    candidates = [pixels.values]
    if pixels.palette is not None:
        used = distinct_values(pixels.values)
        colours = pixels.palette[used]
        if (colours == colours[:, :1]).all():  # every used palette colour is grey
            candidates.append(pixels.palette[:, 0][pixels.values])
    encodings = [1, 255] + ([65535] if pixels.full_scale == 65535 else [])
    for values in candidates:
        present = distinct_values(values)
        for top in encodings:
            if np.isin(present, (0, top)).all():
                return values == top
        half = 127
        if pixels.lossy and pixels.full_scale == 255 and present[-1] > half:
            return values > half  # 0/255 with JPEG noise around both levels
    shown = _shown(distinct_values(pixels.values))
    names = "0/1, 0/255" + (", 0/65535" if pixels.full_scale == 65535 else "")
    lossy = (
        " (a lossy file: 0/255 masks are read with foreground > 127, but this one has no value "
        "above 127; save masks as PNG)"
        if pixels.lossy
        else ""
    )
    raise ValueError(
        f"mask '{path}' ({pixels.kind}) has values {shown}, which fit no binary mask encoding "
        f"({names}){lossy}; for label maps pass classes={{value: name}}, else pass "
        "mask_values=(foreground values, ...) or mask_threshold=T (foreground = value > T)"
    )
