"""Procedurally generated lesion images with masks and attribute prompts built from the masks.

``SyntheticLesions`` draws dermoscopy- or endoscopy-like images: a textured background (smooth
illumination gradients, blotchy low-frequency noise, sensor noise, lens vignetting, specular
highlights) with one to three lesions (round, oval or irregular blobs with speckled, shaded
interiors and soft borders). It exists so that every model, loss and training loop of vlsegkit can be
exercised end to end without downloading a medical dataset.

The prompts follow the attribute prompts of the medvlsm transfer-learning study (Poudel et al.,
"Exploring Transfer Learning in Medical Image Segmentation using Vision-Language Models", MIDL 2024;
prompt P6 "{number} {size} {shape} {class}, located in {location} of the image"). As in their
attribute scripts, every attribute is measured on the final binary mask -- never taken from the
generator's parameters -- so the words stay right when blobs overlap or are clipped by the border:

* number: connected components of the mask (``connected_components``), in words;
* size: component area / image area: ``> 0.30`` large, ``> 0.08`` medium, ``< 0.001`` tiny, else
  small (medvlsm's thresholds; components of ``<= 1e-4`` of the image are ignored as specks);
* location: the cell of a 3x3 grid holding the component centroid (top left ... bottom right);
* shape: round / oval / irregular from the component's second moments (see ``mask_attributes``).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "ComponentAttributes",
    "SyntheticLesions",
    "attribute_prompt",
    "collate_prompts",
    "connected_components",
    "mask_attributes",
]

_NUMBER_WORDS = (
    "no",
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
)
_GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Preposition that reads naturally before each grid cell ("in the center", "on the left", ...).
_LOCATION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# Moment-ellipse agreement below which a component is called irregular, and the axis ratio above
# which a regular component is oval rather than round. Tuned on discrete disks / ellipses / blobs.
_REGULAR_IOU = 0.95
_ROUND_RATIO = 1.3
_MIN_SHAPE_PIXELS = 40


# --------------------------------------------------------------------------- connected components
def _as_2d_mask(mask: np.ndarray | Tensor, name: str = "mask") -> np.ndarray:
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (1, H, W), got {mask.shape}")
    return mask != 0


@dataclass(frozen=True)
class _Runs:
    """Horizontal foreground runs ``[start, end)`` of a mask, in raster order, with component ids."""

    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    label: np.ndarray  # (num_runs,) component id in 1..num
    num: int


def _label_runs(fg: np.ndarray, connectivity: int) -> _Runs:
    """Run-length union-find: merge foreground runs on neighbouring rows that touch."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = fg.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = fg
    step = np.diff(padded, axis=1)
    rows, cols = np.nonzero(step)
    # Each run contributes a +1 (start) then a -1 (exclusive end) on the same row, in that order.
    starts, ends = cols[0::2], cols[1::2]
    rows = rows[0::2]
    num_runs = len(rows)
    if num_runs == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Runs(empty, empty, empty, empty.astype(np.int32), 0)

    parent = list(range(num_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Runs on rows r and r + 1 touch when their column spans overlap (widened by one for corners).
    reach = 1 if connectivity == 8 else 0
    row_first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s, e = starts.tolist(), ends.tolist()
    for r in range(h - 1):
        i, i_end = row_first[r], row_first[r + 1]
        j, j_end = i_end, row_first[r + 2]
        while i < i_end and j < j_end:
            if s[i] < e[j] + reach and s[j] < e[i] + reach:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            # Advance whichever run finishes first; it cannot touch anything further right.
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(num_runs)])
    # A root is the first run of its component, so sorted unique roots = raster order of components.
    _, label = np.unique(roots, return_inverse=True)
    return _Runs(rows, starts, ends, label.astype(np.int32) + 1, int(label.max()) + 1)


def connected_components(
    mask: np.ndarray | Tensor, *, connectivity: int = 8
) -> tuple[np.ndarray, int]:
    """Label the connected foreground components of a 2-D binary mask (scipy-free).

    A run-length union-find: foreground runs are found per row with numpy, runs on neighbouring rows
    that touch are merged in a Python loop over runs (a few hundred for lesion masks), and the labels
    are painted back, so it is fast without scipy.

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` array or tensor; nonzero pixels are foreground.
        connectivity: 4 (edge neighbours, ``scipy.ndimage.label``'s default) or 8 (edges and
            corners).

    Returns:
        ``(labels, num)``: ``labels`` is an ``(H, W)`` int32 array with 0 for background and
        ``1..num`` for the components, numbered in raster order of their first pixel.
    """
    fg = _as_2d_mask(mask)
    runs = _label_runs(fg, connectivity)
    h, w = fg.shape
    labels = np.zeros((h, w), dtype=np.int32)
    # Pixel j of run k sits at flat index (row_k * w + start_k) + j.
    lengths = runs.ends - runs.starts
    offsets = np.cumsum(lengths) - lengths
    flat = np.repeat(runs.rows * w + runs.starts - offsets, lengths) + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(runs.label, lengths)
    return labels, runs.num


# --------------------------------------------------------------------------- attributes from a mask
@dataclass(frozen=True)
class ComponentAttributes:
    """Attributes of one connected lesion component, measured on the mask.

    Attributes:
        area_fraction: component pixels / image pixels.
        size: "tiny" | "small" | "medium" | "large".
        location: one of the nine 3x3-grid cells, e.g. "top left", "center".
        shape: "round" | "oval" | "irregular".
        centroid: ``(y, x)`` in pixel-index coordinates.
        axis_ratio: major / minor axis of the moment-matched ellipse (>= 1).
        ellipse_iou: IoU between the component and its moment-matched ellipse.
    """

    area_fraction: float
    size: str
    location: str
    shape: str
    centroid: tuple[float, float]
    axis_ratio: float
    ellipse_iou: float


def _size_word(area_fraction: float) -> str:
    if area_fraction > 0.30:
        return "large"
    if area_fraction > 0.08:
        return "medium"
    if area_fraction < 0.001:
        return "tiny"
    return "small"


def _shape_word(axis_ratio: float, ellipse_iou: float, num_pixels: int) -> str:
    # A handful of pixels cannot look irregular in any meaningful sense.
    if num_pixels >= _MIN_SHAPE_PIXELS and ellipse_iou < _REGULAR_IOU:
        return "irregular"
    return "round" if axis_ratio <= _ROUND_RATIO else "oval"


def _run_moments(runs: _Runs) -> tuple[np.ndarray, ...]:
    """Per-component pixel count and centred second moments, summed in closed form over runs."""
    r = runs.rows.astype(np.float64)
    a, b = runs.starts.astype(np.float64), runs.ends.astype(np.float64) - 1  # inclusive columns
    n = b - a + 1
    sum_x = n * (a + b) / 2
    sum_xx = (b * (b + 1) * (2 * b + 1) - (a - 1) * a * (2 * a - 1)) / 6

    def per_component(values: np.ndarray) -> np.ndarray:
        return np.bincount(runs.label, weights=values, minlength=runs.num + 1)[1:]

    count = per_component(n)
    cy, cx = per_component(n * r) / count, per_component(sum_x) / count
    # + 1/12: each pixel is a unit square, not a point, so its own extent adds to the spread.
    var_y = per_component(n * r * r) / count - cy * cy + 1 / 12
    var_x = per_component(sum_xx) / count - cx * cx + 1 / 12
    cov = per_component(r * sum_x) / count - cy * cx
    return count, cy, cx, var_y, var_x, cov


def _ellipse_overlap(runs: _Runs, cy, cx, var_y, var_x, cov) -> tuple[np.ndarray, np.ndarray]:
    """Axis ratio of each component's moment-matched ellipse, and how many of its pixels it covers.

    The ellipse with the component's second moments ``S`` is ``d^T S^-1 d <= 4``. Its chord on each
    run's row is solved in closed form, so counting covered pixels needs no per-pixel work.
    """
    half_gap = np.hypot((var_y - var_x) / 2, cov)
    major = (var_y + var_x) / 2 + half_gap
    minor = np.maximum((var_y + var_x) / 2 - half_gap, 1e-12)
    det = var_y * var_x - cov * cov
    k = runs.label - 1
    dy = runs.rows - cy[k]
    # d^T S^-1 d = (var_x dy^2 - 2 cov dy dx + var_y dx^2) / det <= 4, a quadratic in dx.
    qa, qb, qc = var_y[k], -cov[k] * dy, var_x[k] * dy * dy - 4 * det[k]
    disc = qb * qb - qa * qc
    root = np.sqrt(np.maximum(disc, 0))
    lo = np.ceil(cx[k] + (-qb - root) / qa)
    hi = np.floor(cx[k] + (-qb + root) / qa)
    covered = np.minimum(hi, runs.ends - 1) - np.maximum(lo, runs.starts) + 1
    covered = np.where(disc >= 0, np.maximum(covered, 0), 0)
    inside = np.bincount(runs.label, weights=covered, minlength=runs.num + 1)[1:]
    return np.sqrt(major / minor), inside, 4 * np.pi * np.sqrt(major * minor)


def mask_attributes(
    mask: np.ndarray | Tensor,
    *,
    connectivity: int = 8,
    min_area_fraction: float = 1e-4,
) -> list[ComponentAttributes]:
    """Measure number, size, location and shape of the lesions in a binary mask.

    Location is the 3x3-grid cell of the component centroid. Shape compares the component with the
    ellipse of equal centroid and second moments: if their IoU is below 0.95 (and the component has
    at least 40 pixels) it is "irregular"; otherwise "round" when the ellipse's axis ratio is at most
    1.3 and "oval" above. (medvlsm asked a VQA model for the shape; a geometric rule keeps vlsegkit
    free of model downloads and deterministic.)

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` binary mask; nonzero = lesion.
        connectivity: 4 or 8 (see ``connected_components``).
        min_area_fraction: components covering at most this fraction of the image are ignored as
            specks (medvlsm's 1e-4).

    Returns:
        One ``ComponentAttributes`` per kept component, largest first (ties in raster order).
    """
    fg = _as_2d_mask(mask)
    h, w = fg.shape
    runs = _label_runs(fg, connectivity)
    if runs.num == 0:
        return []
    count, cy, cx, var_y, var_x, cov = _run_moments(runs)
    ratio, inside, ellipse_area = _ellipse_overlap(runs, cy, cx, var_y, var_x, cov)
    iou = inside / (count + ellipse_area - inside)
    found = []
    for i in range(runs.num):
        fraction = float(count[i]) / (h * w)
        if fraction <= min_area_fraction:
            continue
        row = min(int(3 * (cy[i] + 0.5) / h), 2)
        col = min(int(3 * (cx[i] + 0.5) / w), 2)
        found.append(
            ComponentAttributes(
                area_fraction=fraction,
                size=_size_word(fraction),
                location=_GRID[row][col],
                shape=_shape_word(float(ratio[i]), float(iou[i]), int(count[i])),
                centroid=(float(cy[i]), float(cx[i])),
                axis_ratio=float(ratio[i]),
                ellipse_iou=float(iou[i]),
            )
        )
    # Largest first; sorted() is stable so equal areas keep raster order.
    return sorted(found, key=lambda a: -a.area_fraction)


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def attribute_prompt(
    mask: np.ndarray | Tensor,
    *,
    noun: str = "lesion",
    connectivity: int = 8,
    min_area_fraction: float = 1e-4,
    max_listed: int = 3,
) -> str:
    """Describe a binary mask in words: number, size, shape and location of its components.

    Examples: ``"one small round lesion at the top left of the image"``, ``"two lesions, one large
    oval lesion in the center and one tiny round lesion at the bottom right of the image"``, ``"no
    lesion in the image"``.

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` binary mask.
        noun: the class word (plural formed with "s").
        connectivity: 4 or 8 (see ``connected_components``).
        min_area_fraction: components this small are ignored (see ``mask_attributes``).
        max_listed: at most this many components (the largest) are described one by one; the rest
            are summarised as ", plus k smaller lesions".

    Returns:
        The prompt string.
    """
    if max_listed < 1:
        raise ValueError(f"max_listed must be >= 1, got {max_listed}")
    comps = mask_attributes(mask, connectivity=connectivity, min_area_fraction=min_area_fraction)
    if not comps:
        return f"no {noun} in the image"
    phrases = [f"one {c.size} {c.shape} {noun} {_LOCATION_PHRASE[c.location]}" for c in comps]
    if len(comps) == 1:
        return f"{phrases[0]} of the image"
    listed = phrases[:max_listed]
    body = ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]
    prompt = f"{_number_word(len(comps))} {noun}s, {body} of the image"
    rest = len(comps) - len(listed)
    if rest:
        prompt += f", plus {_number_word(rest)} smaller {noun}{'s' if rest > 1 else ''}"
    return prompt


# --------------------------------------------------------------------------- procedural images
@functools.cache
def _spline_taps(factor: int) -> np.ndarray:
    """``(factor, 4)`` cubic B-spline weights of the 4 nearest cells at each sub-cell position."""
    f = ((np.arange(factor) + 0.5) / factor)[:, None]
    taps = np.concatenate(
        [(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], axis=1
    )
    return (taps / 6.0).astype(np.float32)


def _upsample_last(grid: np.ndarray, factor: int) -> np.ndarray:
    """B-spline upsample the last axis of ``(..., C + 3)`` to ``(..., C * factor)``.

    Written as four shifted multiply-adds rather than a matmul: numpy's BLAS threads stall badly on
    busy machines (tens of ms for a tiny product), plain elementwise work does not.
    """
    cells = grid.shape[-1] - 3
    taps = _spline_taps(factor)
    out = grid[..., 0:cells, None] * taps[:, 0]
    for k in range(1, 4):
        out += grid[..., k : k + cells, None] * taps[:, k]
    return out.reshape(*grid.shape[:-1], cells * factor)


def _noise_field(
    rng: np.random.Generator,
    h: int,
    w: int,
    cells: int,
    *,
    coarser: Sequence[tuple[int, float]] = (),
) -> np.ndarray:
    """Smooth ``(h, w)`` float32 noise with about ``cells`` blobs along the shorter side, std ~1.

    Cubic B-spline interpolation of a coarse grid of normals: smooth (C2), no overshoot and no
    visible grid pattern. ``coarser`` adds octaves ``(cells_i, amplitude_i)`` with fewer, larger
    blobs; they are summed on the coarse grid so the full-resolution pass is paid once.
    """
    factor = max(1, round(min(h, w) / max(cells, 1)))
    ch, cw = -(-h // factor), -(-w // factor)
    # 2.1: the spline averages ~4 cells per axis, which shrinks the std of unit normals to ~0.48.
    grid = 2.1 * rng.standard_normal((ch + 3, cw + 3)).astype(np.float32)
    for octave_cells, amplitude in coarser:
        # The final spline smooths these a little more; harmless for already-smooth octaves.
        grid_cells = max(1, round(octave_cells * min(ch, cw) / min(h, w)))
        grid += amplitude * _noise_field(rng, ch + 3, cw + 3, grid_cells)
    rows = _upsample_last(np.ascontiguousarray(grid.T), factor).T  # (ch * factor, cw + 3)
    return _upsample_last(np.ascontiguousarray(rows[:h]), factor)[:, :w]


# Area-fraction ranges of the tiny / small / medium / large classes the generator aims for.
_AREA_RANGES = ((0.0004, 0.001), (0.001, 0.08), (0.08, 0.3), (0.3, 0.45))


@dataclass(frozen=True)
class _Style:
    background: tuple[float, float, float]
    lesion: tuple[float, float, float]


_STYLES = {
    # Dermoscopy: beige/pink skin, brown pigmented lesions.
    "skin": _Style(background=(0.86, 0.68, 0.58), lesion=(0.42, 0.26, 0.17)),
    # Endoscopy: red mucosa, paler pink dome-shaped polyps.
    "endoscopy": _Style(background=(0.74, 0.33, 0.27), lesion=(0.93, 0.58, 0.50)),
}


def _white_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform noise; from raw bytes because it is ~10x faster than normals."""
    raw = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape)
    return (raw.astype(np.float32) - 127.5) * np.float32(1 / 73.9)


# The lesion border r(theta) is tabulated against a cheap monotonic "pseudo-angle" in (-2, 2) so the
# per-pixel work is a lookup instead of arctan2 plus several cosines.
_ANGLE_BINS = 1024
_PSEUDO = -2 + 4 * (np.arange(_ANGLE_BINS) + 0.5) / _ANGLE_BINS
_TABLE_THETA = np.arctan2(np.sign(_PSEUDO) * (1 - np.abs(1 - np.abs(_PSEUDO))), 1 - np.abs(_PSEUDO))


def _border_radius(u: np.ndarray, v: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Relative border radius ``1 + sum_k a_k cos(k theta + phi_k)`` at each pixel's polar angle."""
    harmonics = np.arange(2, 2 + len(amp))[:, None]
    table = 1 + (amp[:, None] * np.cos(harmonics * _TABLE_THETA + phase[:, None])).sum(0)
    pseudo = 1 - u / (np.abs(u) + np.abs(v) + 1e-12)
    pseudo = np.where(v < 0, -pseudo, pseudo)
    index = ((pseudo + 2) * (_ANGLE_BINS / 4)).astype(np.int32)
    return table.astype(np.float32)[np.clip(index, 0, _ANGLE_BINS - 1)]


def _draw_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    style_name: str,
    *,
    size_probs: Sequence[float],
) -> None:
    """Blend one lesion into ``image`` ``(3, h, w)`` and OR its footprint into ``mask`` (in place)."""
    _, h, w = image.shape
    scale = math.sqrt(h * w)
    # Pick a size class first so tiny and large lesions are not rare, then a log-uniform area in it.
    # The class is only a target: the prompt re-measures the mask after overlaps and clipping.
    lo, hi = _AREA_RANGES[rng.choice(len(_AREA_RANGES), p=size_probs)]
    lo = max(lo, 12 / (h * w))  # at least a dozen pixels, so tiny lesions survive small images
    area = math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo))))
    kind = rng.choice(["round", "oval", "irregular"], p=[0.35, 0.3, 0.35])
    aspect = {"round": 1.0, "oval": rng.uniform(1.5, 2.3), "irregular": rng.uniform(1.0, 1.6)}[kind]
    r0 = math.sqrt(area / math.pi) * scale
    semi_a, semi_b = r0 * math.sqrt(aspect), r0 / math.sqrt(aspect)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    num_harmonics = 5
    amp = (rng.uniform(0.12, 0.25) if kind == "irregular" else 0.012) / np.sqrt(
        np.arange(1, num_harmonics + 1)
    )
    amp = amp * rng.uniform(0.3, 1.0, num_harmonics)
    phase = rng.uniform(0, 2 * np.pi, num_harmonics)
    edge = rng.uniform(0.6, 4.0 if style_name == "skin" else 2.0)  # border softness in pixels
    rot = rng.uniform(0, np.pi)

    reach = semi_a * (1 + amp.sum()) + 2 * edge + 2
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    u = (math.cos(rot) * dx + math.sin(rot) * dy) / semi_a
    v = (math.cos(rot) * dy - math.sin(rot) * dx) / semi_b
    rho = np.sqrt(u * u + v * v)
    border = _border_radius(u, v, amp, phase)
    depth = (border - rho) * r0  # ~signed distance to the border in pixels, positive inside
    alpha = np.clip(depth / edge + 0.5, 0.0, 1.0)
    radial = np.minimum(rho / border, 1.0)

    colour = np.asarray(_STYLES[style_name].lesion, np.float32)
    colour = colour * rng.uniform(0.85, 1.15, 3).astype(np.float32) * rng.uniform(0.75, 1.3)
    ph, pw = y1 - y0, x1 - x0
    if style_name == "skin":
        # Darker core, lighter rim, uneven pigmentation and dark speckles of a pigment network.
        speckle = _noise_field(rng, ph, pw, max(3, int(r0 / 3)), coarser=[(2, 0.5)])
        shade = (0.7 + 0.4 * radial + 0.06 * speckle) * (1 - 0.25 * np.maximum(speckle - 0.6, 0))
    else:
        # A dome lit from one side, with a darker rim where the polyp meets the mucosa.
        light = rng.uniform(0, 2 * np.pi)
        rim = radial * radial
        shade = 1.0 + 0.2 * (math.cos(light) * u + math.sin(light) * v) - 0.15 * rim * rim
        shade = shade + 0.06 * _noise_field(rng, ph, pw, max(2, int(r0 / 6)))
    shade = shade * (1 + rng.uniform(0.02, 0.08) * _white_noise(rng, (ph, pw)))
    region = image[:, y0:y1, x0:x1]
    region += alpha * (colour[:, None, None] * shade - region)
    mask[y0:y1, x0:x1] |= depth > 0


def _render(
    rng: np.random.Generator, h: int, w: int, style_name: str, num_lesions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one ``(3, h, w)`` float32 image in [0, 1] and its ``(h, w)`` bool mask."""
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - 0.5
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w - 0.5

    base = np.asarray(_STYLES[style_name].background, np.float32)
    base = base + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    tilt = rng.uniform(0.1, 0.4)
    shading = 1.0 + tilt * (math.cos(angle) * xx + math.sin(angle) * yy)
    # Fine pores over medium mottling over large blotches, in a single full-resolution pass.
    octaves = [(int(rng.integers(3, 7)), 3.0), (int(rng.integers(8, 14)), 1.2)]
    texture = _noise_field(rng, h, w, max(16, min(h, w) // 5), coarser=octaves)
    image = base[:, None, None] * (shading + 0.03 * texture)
    # A hue drift across the field, so the background is not just one tint.
    hue = rng.uniform(-0.04, 0.04, 3).astype(np.float32)[:, None, None]
    hue_angle = rng.uniform(0, 2 * np.pi)
    image += hue * (math.cos(hue_angle) * xx + math.sin(hue_angle) * yy)

    mask = np.zeros((h, w), dtype=bool)
    for _ in range(num_lesions):
        # Several large lesions would merge into one; only a lone lesion may be large.
        probs = (0.1, 0.45, 0.3, 0.15) if num_lesions == 1 else (0.15, 0.65, 0.2, 0.0)
        _draw_lesion(rng, image, mask, style_name, size_probs=probs)

    r2 = yy * yy + xx * xx
    if style_name == "endoscopy":
        scale = math.sqrt(h * w)
        for _ in range(int(rng.integers(2, 7))):  # specular reflections of the scope's light
            sy, sx = rng.uniform(0, h), rng.uniform(0, w)
            sr = rng.uniform(0.004, 0.015) * scale
            y0, y1 = max(int(sy - 3 * sr), 0), min(int(sy + 3 * sr) + 1, h)
            x0, x1 = max(int(sx - 3 * sr), 0), min(int(sx + 3 * sr) + 1, w)
            gy = np.exp(-((np.arange(y0, y1, dtype=np.float32) + 0.5 - sy) ** 2) / (2 * sr * sr))
            gx = np.exp(-((np.arange(x0, x1, dtype=np.float32) + 0.5 - sx) ** 2) / (2 * sr * sr))
            spot = np.minimum(1.6 * gy[:, None] * gx[None, :], 1.0)
            region = image[:, y0:y1, x0:x1]
            region += (1.0 - region) * spot
        q = np.minimum(r2 / 0.49, 1.0)
        light = 1.0 - rng.uniform(0.45, 0.75) * q * np.sqrt(q)  # scope light falls off to the edges
    elif rng.random() < 0.4:  # a dermoscope's round field of view, dark outside
        radius = rng.uniform(0.55, 0.72)
        light = 0.08 + 0.92 * np.clip((radius - np.sqrt(r2)) / 0.03, 0, 1)
    else:
        light = np.ones_like(r2)
    image *= light
    image += 0.012 * _white_noise(rng, (1, h, w))  # sensor noise
    return np.clip(image, 0.0, 1.0, out=image), mask


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, numbers.Integral):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s >= 8 for s in size):
        raise ValueError(f"{name} must be an int or (h, w) of ints >= 8, got {size}")
    return int(size[0]), int(size[1])


def _channel_stats(value: Sequence[float] | None, name: str, default: float) -> Tensor:
    if value is None:
        return torch.full((3, 1, 1), default)
    stats = torch.as_tensor(value, dtype=torch.float32).flatten()
    if stats.numel() == 1:
        stats = stats.expand(3)
    if stats.shape != (3,):
        raise ValueError(f"{name} must be a float or 3 floats (one per RGB channel), got {value}")
    return stats.reshape(3, 1, 1).clone()


class SyntheticLesions(Dataset):
    """Deterministic procedural dataset of lesion images, binary masks and attribute prompts.

    Item ``i`` is generated by a numpy generator seeded from ``(seed, i)``, so it is identical whatever
    order, process or DataLoader worker asks for it. Exactly ``round(negative_fraction * length)``
    items (chosen by ``seed`` and ``length``) are negatives: no lesion, empty mask, prompt ``"no lesion in the
    image"``. Half of the images look like dermoscopy (pigmented lesions on skin), half like
    endoscopy (polyps on mucosa).

    Args:
        length: number of items.
        image_size: ``H`` (square) or ``(H, W)``.
        seed: base seed.
        negative_fraction: fraction of lesion-free items, in ``[0, 1]``.
        prompt_style: ``"attributes"`` (number, size, shape, location in words, built from the mask
            with ``attribute_prompt``) or ``"class"`` (always ``"lesion"``).
        mean: optional per-channel mean subtracted from the ``[0, 1]`` image (e.g. ImageNet's).
        std: optional per-channel std the image is divided by (default 1 when only ``mean`` is set).

    Items are dicts: ``image`` float32 ``(3, H, W)``, ``mask`` float32 ``(1, H, W)`` in {0, 1},
    ``prompt`` str, ``index`` int. Batch them with ``collate_prompts``. ``render(i)`` gives the raw
    numpy image and mask, ``is_negative(i)`` whether item ``i`` is lesion-free. Generation takes a
    few milliseconds per item at 64-352 px (numpy only, no BLAS calls).
    """

    def __init__(
        self,
        *,
        length: int = 64,
        image_size: int | Sequence[int] = 224,
        seed: int = 0,
        negative_fraction: float = 0.0,
        prompt_style: str = "attributes",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(length, numbers.Integral) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 0.0 <= negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")
        if prompt_style not in ("attributes", "class"):
            raise ValueError(f"prompt_style must be 'attributes' or 'class', got {prompt_style!r}")
        self.length = int(length)
        self.image_size = _pair(image_size, "image_size")
        self.seed = int(seed)
        self.negative_fraction = float(negative_fraction)
        self.prompt_style = prompt_style
        self.mean = _channel_stats(mean, "mean", 0.0)
        self.std = _channel_stats(std, "std", 1.0)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {std}")
        self._normalize = mean is not None or std is not None
        num_negative = round(self.negative_fraction * length)
        order = np.random.default_rng([self.seed, length, 0x5EED]).permutation(length)
        self._negative = np.zeros(length, dtype=bool)
        self._negative[order[:num_negative]] = True

    def __len__(self) -> int:
        return self.length

    def is_negative(self, index: int) -> bool:
        """Whether item ``index`` has no lesion."""
        return bool(self._negative[self._check_index(index)])

    def _check_index(self, index: int) -> int:
        index = operator.index(index)  # numpy / torch integer scalars too; floats are refused
        if not -self.length <= index < self.length:
            raise IndexError(
                f"index {index} out of range for SyntheticLesions of length {self.length}"
            )
        return index % self.length

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``(3, H, W)`` float32 image in [0, 1] and ``(H, W)`` bool mask of item ``index``."""
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        style = "skin" if rng.random() < 0.5 else "endoscopy"
        num = 0 if self._negative[index] else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        return _render(rng, *self.image_size, style, num)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image, mask = self.render(index)
        prompt = attribute_prompt(mask) if self.prompt_style == "attributes" else "lesion"
        image_t = torch.from_numpy(image)
        if self._normalize:
            image_t = (image_t - self.mean) / self.std
        return {
            "image": image_t,
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "prompt": prompt,
            "index": index,
        }


def collate_prompts(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors are stacked, ints become a long tensor, the rest become lists.

    Args:
        batch: items with the same keys, e.g. from ``SyntheticLesions``: ``image (3, H, W)``,
            ``mask (1, H, W)``, ``prompt`` str, ``index`` int.

    Returns:
        ``{"image": (B, 3, H, W), "mask": (B, 1, H, W), "prompt": list[str], "index": (B,)}`` (plus
        any other keys, collated by the same rules).
    """
    if len(batch) == 0:
        raise ValueError("batch must contain at least one item")
    keys = list(batch[0].keys())
    for item in batch:
        if list(item.keys()) != keys:
            raise ValueError(f"every batch item must have keys {keys}, got {list(item.keys())}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(
                    f"batch[*][{key!r}] must all have the same shape, got {sorted(shapes)}"
                )
            out[key] = torch.stack(values)
        elif isinstance(first, int) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = list(values)
    return out
