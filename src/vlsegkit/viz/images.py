"""Overlays, colour maps, side-by-side panels and image files (numpy and Pillow only).

Colour maps are piecewise linear in RGB. ``jet``, ``hot`` and ``nipy_spectral`` use matplotlib's
breakpoints (exact); ``viridis`` and ``inferno`` (Smith & van der Walt, CC0) are tabulated at 33
evenly spaced points, within 2/255 of matplotlib's 256-entry tables. ``nipy_spectral`` is the map
the MedCLIPSeg code uses for its uncertainty figures (``specs/medclipseg.md`` §1.6).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLORMAPS",
    "FN_COLOR",
    "FP_COLOR",
    "TP_COLOR",
    "apply_colormap",
    "heatmap_overlay",
    "overlay_mask",
    "overlay_prediction",
    "panel",
    "save_image",
    "to_rgb_uint8",
]

Color = tuple[int, int, int]

#: ``overlay_prediction`` colours: true positives green, false positives red (also
#: ``overlay_mask``'s default), false negatives (missed foreground) blue.
TP_COLOR: Color = (64, 220, 64)
FP_COLOR: Color = (255, 64, 64)
FN_COLOR: Color = (64, 128, 255)


def _even(hex_colors: str) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced breakpoints from space-separated ``rrggbb`` strings: ``(xs (K,), rgb (K, 3))``."""
    rgb = np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in hex_colors.split()])
    return np.linspace(0.0, 1.0, len(rgb)), rgb / 255.0


def _channels(
    *channels: Sequence[tuple[float, float]],
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return tuple((np.array([x for x, _ in c]), np.array([y for _, y in c])) for c in channels)


_VIRIDIS = _even(
    "440154 470d60 48186a 482374 472d7b 453781 424086 3e4989 3b528b 375b8d 33638d 2f6b8e 2c728e "
    "297a8e 26828e 23898e 21918c 1f978b 1f9f88 21a685 27ad81 31b57b 3dbc74 4cc26c 5cc863 6ece58 "
    "81d34d 95d840 aadc32 c0df25 d5e21a eae51a fde725"
)
_INFERNO = _even(
    "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d 8a226a "
    "972766 a32c61 b0315b bc3754 c63d4d d04545 da4e3c e35933 eb6429 f1711f f67e14 f98c0a fb9b06 "
    "fcaa0f fbba1f f9c932 f5d949 f2e865 f3f586 fcffa4"
)
_NIPY_SPECTRAL = _even(
    "000000 770088 880099 0000aa 0000dd 0077dd 0099dd 00aaaa 00aa88 009900 00bb00 00dd00 00ff00 "
    "bbff00 eeee00 ffcc00 ff9900 ff0000 dd0000 cc0000 cccccc"
)


def _split(xs: np.ndarray, rgb: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return tuple((xs, rgb[:, c]) for c in range(3))


# Per channel: (breakpoints, values), interpolated linearly.
_COLORMAPS: dict[str, tuple[tuple[np.ndarray, np.ndarray], ...]] = {
    "gray": _channels(*[((0.0, 0.0), (1.0, 1.0))] * 3),
    "hot": _channels(
        ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
    ),
    "jet": _channels(
        ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
    ),
    "viridis": _split(*_VIRIDIS),
    "inferno": _split(*_INFERNO),
    "nipy_spectral": _split(*_NIPY_SPECTRAL),
}

#: Names accepted by ``apply_colormap`` and ``heatmap_overlay``.
COLORMAPS: tuple[str, ...] = tuple(sorted(_COLORMAPS))


# --------------------------------------------------------------------------- input checks
def to_rgb_uint8(image: Any) -> np.ndarray:
    """An image as an ``(H, W, 3)`` uint8 array.

    Args:
        image: PIL image, numpy ``(H, W)`` / ``(H, W, 3|4)`` (uint8 or float in ``[0, 1]``), or a
            tensor ``(3, H, W)`` / ``(H, W)`` (uint8 or float in ``[0, 1]``). Grey images are
            repeated to three channels, alpha is dropped.

    Returns:
        ``(H, W, 3)`` uint8; uint8 inputs come back bit-exact, floats are rounded from ``x · 255``.

    Raises:
        ValueError: a float image with values outside ``[0, 1]`` (e.g. still normalised).
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        arr = image[..., :3] if image.ndim == 3 and image.shape[-1] in (3, 4) else image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
        return np.ascontiguousarray(arr)
    from ..models.base import to_image_tensor

    t = to_image_tensor(image)
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"image: float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
            "(undo the model's mean/std normalisation first)"
        )
    arr = t.clamp(0, 1).permute(1, 2, 0).double().numpy()
    return np.round(arr * 255).astype(np.uint8)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _plane(x: Any, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A single ``(H, W)`` map from ``(H, W)`` or ``(1, H, W)``, checked against ``size``."""
    arr = _to_numpy(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        expected = "(H, W) or (1, H, W)" if size is None else f"{size} (H, W) or (1, *{size})"
        raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    if size is not None and arr.shape != tuple(size):
        raise ValueError(f"{name} must have the image's shape (H, W) = {size}, got {arr.shape}")
    return arr


def _binary(x: Any, name: str, size: tuple[int, int]) -> np.ndarray:
    arr = _plane(x, name, size)
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(
                f"{name} must be binary (bool or 0/1), got values such as {values[:4]}; threshold "
                "probabilities first (or use overlay_prediction)"
            )
    return arr.astype(bool)


def _color(color: Sequence[int], name: str) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64)
    if c.shape != (3,) or (c < 0).any() or (c > 255).any():
        raise ValueError(f"{name} must be 3 values in [0, 255] (R, G, B), got {color}")
    return c


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _blend(image: np.ndarray, where: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    # Same float32 arithmetic and truncation as vlsegkit.demo.overlay, so both look identical.
    out = image.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * color.astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _edge(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a background 4-neighbour; ``np.roll`` wraps, as ``vlsegkit.demo.overlay``."""
    inner = np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return mask & ~inner


# --------------------------------------------------------------------------- overlays
def overlay_mask(
    image: Any,
    mask: Any,
    *,
    color: Sequence[int] = FP_COLOR,
    alpha: float = 0.45,
    outline: bool = True,
) -> np.ndarray:
    """Tint the pixels of a binary mask and (optionally) draw its outline in full colour.

    Each mask pixel becomes ``(1 - alpha) · image + alpha · color`` (truncated to uint8); with
    ``outline`` the mask pixels that touch the background (4-neighbourhood) are painted ``color``.
    Pixels outside the mask are returned unchanged. The blending is ``vlsegkit.demo.overlay``'s.

    Args:
        image: the picture (any form ``to_rgb_uint8`` accepts), size ``(H, W)``.
        mask: ``(H, W)`` or ``(1, H, W)`` bool / 0-1 array or tensor.
        color: RGB tint in ``[0, 255]``.
        alpha: tint opacity in ``[0, 1]``.
        outline: paint the mask's border pixels in ``color``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    _check_alpha(alpha)
    rgb = to_rgb_uint8(image)
    m = _binary(mask, "mask", rgb.shape[:2])
    c = _color(color, "color")
    out = _blend(rgb, m, c, alpha)
    if outline:
        out[_edge(m)] = c.astype(np.uint8)
    return out


def overlay_prediction(
    image: Any,
    prediction: Any,
    target: Any | None = None,
    *,
    threshold: float = 0.5,
    alpha: float = 0.45,
) -> np.ndarray:
    """Overlay a predicted mask, coloured by agreement with the ground truth when it is given.

    Without ``target`` the thresholded prediction is drawn with ``overlay_mask`` (red, outlined).
    With ``target`` every pixel is classified and tinted: true positives green ``TP_COLOR``, false
    positives red ``FP_COLOR``, false negatives (missed lesion) blue ``FN_COLOR``; true negatives
    stay untouched.

    Args:
        image: the picture, size ``(H, W)``.
        prediction: ``(H, W)`` or ``(1, H, W)`` probabilities (thresholded with ``> threshold``) or
            a binary mask.
        target: optional ``(H, W)`` / ``(1, H, W)`` binary ground truth.
        threshold: probability threshold for ``prediction``.
        alpha: tint opacity in ``[0, 1]``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    _check_alpha(alpha)
    rgb = to_rgb_uint8(image)
    size = rgb.shape[:2]
    pred = _plane(prediction, "prediction", size)
    pred = pred.astype(bool) if pred.dtype == bool else pred > threshold
    if target is None:
        return overlay_mask(rgb, pred, alpha=alpha)
    gt = _binary(target, "target", size)
    out = rgb
    for where, color in ((pred & gt, TP_COLOR), (pred & ~gt, FP_COLOR), (~pred & gt, FN_COLOR)):
        out = _blend(out, where, np.asarray(color, np.float64), alpha)
    return out


# --------------------------------------------------------------------------- heat maps
def apply_colormap(
    values: Any,
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Colour a 2-D map: ``t = clip((v - vmin) / (vmax - vmin), 0, 1)`` through a colour map.

    Args:
        values: ``(H, W)`` or ``(1, H, W)`` array or tensor (uncertainty, saliency, probability).
        cmap: one of ``COLORMAPS``.
        vmin: value drawn with the map's first colour; default ``values.min()`` (min-max scaling).
        vmax: value drawn with the map's last colour; default ``values.max()``. A constant map
            (``vmax == vmin``) is drawn with the first colour.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if cmap not in _COLORMAPS:
        raise ValueError(f"cmap must be one of {COLORMAPS}, got {cmap!r}")
    v = _plane(values, "values").astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError("values must be finite (no NaN or inf)")
    lo = float(v.min()) if vmin is None else float(vmin)
    hi = float(v.max()) if vmax is None else float(vmax)
    if hi < lo:
        raise ValueError(f"vmax must be >= vmin, got vmin={lo}, vmax={hi}")
    t = np.zeros_like(v) if hi == lo else np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.stack([np.interp(t, xs, ys) for xs, ys in _COLORMAPS[cmap]], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def heatmap_overlay(
    image: Any,
    values: Any,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colour-mapped heat map (saliency, uncertainty) over an image.

    ``out = round((1 - alpha) · image + alpha · apply_colormap(values))`` at every pixel.

    Args:
        image: the picture, size ``(H, W)``.
        values: ``(H, W)`` or ``(1, H, W)`` map at the image's size.
        cmap, vmin, vmax: see ``apply_colormap``.
        alpha: heat-map opacity in ``[0, 1]``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    _check_alpha(alpha)
    rgb = to_rgb_uint8(image)
    heat = apply_colormap(_plane(values, "values", rgb.shape[:2]), cmap=cmap, vmin=vmin, vmax=vmax)
    out = (1 - alpha) * rgb.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.round(out).astype(np.uint8)


# --------------------------------------------------------------------------- panels and files
def panel(
    tiles: Sequence[Any],
    *,
    caption: str | None = None,
    gap: int = 2,
    background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Tiles side by side (e.g. image | ground truth | prediction), with an optional caption above.

    Args:
        tiles: images of the same height (anything ``to_rgb_uint8`` accepts).
        caption: one line of text drawn in black on an 18-pixel strip above the tiles.
        gap: background pixels between tiles.
        background: RGB colour of the gaps and caption strip.

    Returns:
        ``(H [+ 18], sum(W_i) + gap · (n - 1), 3)`` uint8.
    """
    if not tiles:
        raise ValueError("tiles must hold at least one image")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    arrays = [to_rgb_uint8(t) for t in tiles]
    heights = {a.shape[0] for a in arrays}
    if len(heights) != 1:
        raise ValueError(f"tiles must all have the same height, got heights {sorted(heights)}")
    bg = _color(background, "background").astype(np.uint8)
    spacer = np.broadcast_to(bg, (arrays[0].shape[0], gap, 3))
    parts: list[np.ndarray] = []
    for a in arrays:
        parts += [a, spacer] if gap else [a]
    row = np.concatenate(parts[:-1] if gap else parts, axis=1)
    if caption is None:
        return row
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (row.shape[1], 18), tuple(int(x) for x in bg))
    ImageDraw.Draw(strip).text((4, 3), caption, fill="black")
    return np.concatenate([np.asarray(strip), row], axis=0)


def save_image(image: Any, path: str | os.PathLike) -> Path:
    """Write an image (RGB, or an ``(H, W)`` bool / uint8 mask as greyscale 0/255) to ``path``.

    The format follows the suffix (PNG recommended: lossless). Parent folders are created. The
    file is written under a temporary name in the same folder and then renamed over ``path``
    (``os.replace``), so an interrupted write never leaves a truncated picture.

    Raises:
        ValueError: the suffix is not an image format Pillow can write.
    """
    from PIL import Image

    from ..hub import atomic_write

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"path must end with an image suffix such as .png, got {str(path)!r}")
    if isinstance(image, Image.Image) and image.mode in ("RGB", "L"):
        return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
    arr = _to_numpy(image)
    if arr.ndim == 2 and arr.dtype == bool:
        pil = Image.fromarray(arr.astype(np.uint8) * 255, mode="L")
    elif arr.ndim == 2 and arr.dtype == np.uint8:
        pil = Image.fromarray(arr, mode="L")
    else:
        pil = Image.fromarray(to_rgb_uint8(arr))
    return atomic_write(path, lambda tmp: pil.save(tmp, format=fmt))
