"""Contact sheets a person can read: overlay sheets across the score range, uncertainty sheets.

Both are drawn with numpy and Pillow only and return a ``PIL.Image.Image`` (RGB); text uses Pillow's
bundled default font, so no font file is needed. Small images are enlarged by a whole factor with
nearest-neighbour sampling (each pixel becomes a sharp square, masks stay exact) until their longer
side reaches ``tile`` pixels; larger images are reduced to ``tile`` (Lanczos for the picture,
nearest for masks). Masks and probabilities are thresholded at their own resolution first, so scores
are computed on the model's output, not on the enlarged picture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from . import _text
from .images import (
    FN_COLOR,
    FP_COLOR,
    TP_COLOR,
    _plane,
    _to_numpy,
    apply_colormap,
    overlay_mask,
    overlay_prediction,
    save_image,
    to_rgb_uint8,
)

__all__ = [
    "RankedExample",
    "dice_per_image",
    "overlay_sheet",
    "save_overlay_sheet",
    "select_examples",
    "uncertainty_sheet",
]

# Layout, in pixels.
_MARGIN = 10  # around the sheet
_GAP = 6  # between tiles of a row
_ROW_GAP = 14  # between rows
_BAR = 12  # colour-bar height


# --------------------------------------------------------------------------- example selection
class RankedExample(NamedTuple):
    """One example chosen by ``select_examples``.

    Attributes:
        index: position of the example in the scores (and in the images, masks, ... given).
        rank: 1 for the best score, ``len(scores)`` for the worst.
        label: ``"best"``, ``"worst"``, ``"median"``, or a percentile such as ``"75th percentile"``
            (the share of the other examples that score lower).
    """

    index: int
    rank: int
    label: str


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _rank_label(position: int, count: int) -> str:
    """Name of the example at 0-based ``position`` in best-to-worst order among ``count``."""
    if count == 1:
        return "only example"
    if position == 0:
        return "best"
    if position == count - 1:
        return "worst"
    if 2 * position == count - 1:
        return "median"
    # Percent of the other examples that score below this one; kept off 0 and 100, which would
    # read as worst / best.
    percent = min(99, max(1, round(100 * (count - 1 - position) / (count - 1))))
    return f"{_ordinal(percent)} percentile"


def select_examples(
    scores: Sequence[float] | np.ndarray,
    n: int = 6,
    *,
    mode: str | Sequence[int] = "spread",
    higher_is_better: bool = True,
) -> list[RankedExample]:
    """Choose which examples to show, and name where each sits in the score range.

    Examples are ranked best to worst (ties keep their original order). ``mode``:

    * ``"spread"``: ``n`` ranks evenly spaced from best to worst, ``linspace(0, len - 1, n)``
      rounded half up — the best, the worst and, for odd ``n`` and an odd number of scores, the
      median — so a sheet shows the whole range, not only the easy or hard cases. Scores ``[0.1, 0.9, 0.5, 0.3, 0.7]`` with ``n=3`` give indices ``[1, 2, 0]``
      labelled best, median, worst.
    * ``"best"`` / ``"worst"``: the ``n`` best (best first) or worst (worst first).
    * ``"first"``: the first ``n`` in the given order.
    * a sequence of indices: exactly those, in that order.

    Args:
        scores: one finite score per candidate (e.g. per-image Dice).
        n: how many to choose (all of them if there are fewer); ignored for explicit indices.
        mode: see above.
        higher_is_better: ``False`` for losses and distances, where the lowest score is best.

    Returns:
        ``RankedExample(index, rank, label)`` per chosen example, in display order.

    Raises:
        ValueError: empty or non-finite scores, ``n < 1``, an unknown mode or an index out of range.
    """
    values = np.asarray(_to_numpy(scores), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite (no NaN or inf): drop or re-score such examples")
    count = values.size
    # Stable sort on the negated score keeps ties in their original order for both directions.
    order = np.argsort(-values if higher_is_better else values, kind="stable")
    position = np.empty(count, dtype=np.int64)
    position[order] = np.arange(count)

    if isinstance(mode, str):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        k = min(n, count)
        if mode == "spread":
            # Ranks at least 1 apart when k <= count, so rounding never picks one twice.
            picks = order[np.floor(np.linspace(0, count - 1, k) + 0.5).astype(np.int64)]
        elif mode == "best":
            picks = order[:k]
        elif mode == "worst":
            picks = order[::-1][:k]
        elif mode == "first":
            picks = np.arange(k)
        else:
            raise ValueError(
                f"mode must be 'spread', 'best', 'worst', 'first' or a list of indices, got {mode!r}"
            )
    else:
        picks = np.asarray([int(i) for i in mode], dtype=np.int64)
        if picks.size == 0:
            raise ValueError("mode: the list of indices is empty")
        bad = picks[(picks < 0) | (picks >= count)]
        if bad.size:
            raise ValueError(f"mode: index {int(bad[0])} is out of range for {count} scores")
    return [
        RankedExample(int(i), int(position[i]) + 1, _rank_label(int(position[i]), count))
        for i in picks
    ]


def dice_per_image(
    masks: Any, probs: Any, *, threshold: float = 0.5, empty_score: float = 1.0
) -> np.ndarray:
    """Dice of each thresholded prediction against its mask: ``2|P∩G| / (|P| + |G|)``.

    The convention of ``vlsegkit.metrics.dice_score``: an image whose prediction and ground truth
    are both empty scores ``empty_score`` (1.0: nothing to find, nothing found).

    Args:
        masks: binary ground truths, ``(B, 1, H, W)`` / ``(B, H, W)`` or a list of ``(H, W)`` /
            ``(1, H, W)`` (sizes may differ between images).
        probs: probabilities of the same sizes, thresholded with ``> threshold``.
        threshold: probability threshold.
        empty_score: score when both masks are empty.

    Returns:
        ``(B,)`` float64.
    """
    gts, ps = _items(masks, "masks"), _items(probs, "probs")
    _same_length(("masks", gts), ("probs", ps))
    out = np.empty(len(gts), dtype=np.float64)
    for i, (g, p) in enumerate(zip(gts, ps)):
        gt = _mask_plane(g, f"masks[{i}]", None)
        pred = _plane(p, f"probs[{i}]", gt.shape) > threshold
        denom = int(pred.sum()) + int(gt.sum())
        out[i] = empty_score if denom == 0 else 2.0 * int((pred & gt).sum()) / denom
    return out


# --------------------------------------------------------------------------- input handling
def _items(x: Any, name: str) -> list[Any]:
    """Split a batch (array / tensor with a leading batch axis) or a sequence into items."""
    if isinstance(x, (list, tuple)):
        return list(x)
    if hasattr(x, "detach") or isinstance(x, np.ndarray):
        # Tensors stay tensors: a (3, H, W) tensor is an image, a (3, H, W) array is not.
        if x.ndim < 3:
            raise ValueError(
                f"{name} must be a batch (B, ...) or a list with one entry per image, "
                f"got shape {tuple(x.shape)}"
            )
        return [x[i] for i in range(x.shape[0])]
    raise TypeError(f"{name} must be a list, numpy array or tensor, got {type(x).__name__}")


def _same_length(*named: tuple[str, list[Any] | None]) -> int:
    lengths = {label: len(items) for label, items in named if items is not None}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"one entry per image is needed in each argument, got {listed}")
    return next(iter(lengths.values()))


def _mask_plane(x: Any, name: str, size: tuple[int, int] | None) -> np.ndarray:
    arr = _plane(x, name, size)
    if arr.dtype != bool and not np.isin(np.unique(arr), (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1)")
    return arr.astype(bool)


def _target_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """Size after enlarging by a whole factor to a longer side >= tile, or reducing to tile."""
    longest = max(h, w)
    if longest <= tile:
        k = math.ceil(tile / longest)
        return h * k, w * k
    scale = tile / longest
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == size:
        return rgb
    enlarge = size[0] >= rgb.shape[0]
    resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(rgb).resize(size[::-1], resample))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize(size[::-1], Image.Resampling.NEAREST)) > 127


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape == size:
        return values
    enlarge = size[0] >= values.shape[0]
    resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX
    img = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(img.resize(size[::-1], resample), dtype=np.float64)


def _finite_map(x: Any, name: str, size: tuple[int, int]) -> np.ndarray:
    arr = _plane(x, name, size).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


# --------------------------------------------------------------------------- drawing helpers
def _paste(canvas: Image.Image, tile: np.ndarray, xy: tuple[int, int]) -> None:
    canvas.paste(Image.fromarray(tile), xy)


def _colour_bar(
    canvas: Image.Image,
    xy: tuple[int, int],
    width: int,
    vmin: float,
    vmax: float,
    cmap: str,
    fnt: _text.Font,
) -> int:
    """A horizontal colour bar with its end values underneath; returns the y below it."""
    x, y = xy
    ramp = np.linspace(0.0, 1.0, max(2, width))[None].repeat(_BAR, axis=0)
    _paste(canvas, apply_colormap(ramp, cmap=cmap, vmin=0.0, vmax=1.0), (x, y))
    draw = ImageDraw.Draw(canvas)
    # The frame goes around the gradient, so that its end colours stay visible.
    draw.rectangle((x - 1, y - 1, x + width, y + _BAR), outline=_text.MUTED)
    y += _BAR + 3
    # Rounding noise such as -1e-10 on an entropy map reads as 0 at the bar's precision.
    tiny = 1e-6 * max(abs(vmin), abs(vmax))
    low, high = (_text.format_value(0.0 if abs(v) <= tiny else v) for v in (vmin, vmax))
    draw.text((x, y), low, font=fnt, fill=_text.MUTED)
    draw.text((x + width - _text.text_width(high, fnt), y), high, font=fnt, fill=_text.MUTED)
    return y + _text.line_height(fnt)


def _colour_bar_height(fnt: _text.Font) -> int:
    return _BAR + 3 + _text.line_height(fnt)


def _legend_items(
    canvas: Image.Image, xy: tuple[int, int], items: Sequence[tuple[Any, str]], fnt: Any, width: int
) -> int:
    """Colour swatches with labels, flowing onto new lines; returns the y below them."""
    draw = ImageDraw.Draw(canvas)
    step = _text.line_height(fnt)
    box = max(8, step - 6)
    x0, (x, y) = xy[0], xy
    for color, label in items:
        need = box + 6 + _text.text_width(label, fnt) + 18
        if x > x0 and x + need > x0 + width:
            x, y = x0, y + step
        draw.rectangle((x, y + 2, x + box, y + 2 + box), fill=tuple(color), outline=_text.MUTED)
        draw.text((x + box + 6, y), label, font=fnt, fill=_text.TEXT)
        x += need
    return y + step


def _legend_height(items: Sequence[tuple[Any, str]], fnt: Any, width: int) -> int:
    # Lay the legend out on a scratch canvas of the right width; cheaper than duplicating the flow.
    scratch = Image.new("RGB", (width + 1, 1))
    return _legend_items(scratch, (0, 0), items, fnt, width)


# --------------------------------------------------------------------------- overlay sheet
def overlay_sheet(
    images: Any,
    masks: Any | None,
    probs: Any,
    prompts: Sequence[str] | str | None = None,
    *,
    scores: Sequence[float] | np.ndarray | None = None,
    score_name: str = "Dice",
    select: str | Sequence[int] = "spread",
    n: int = 6,
    higher_is_better: bool = True,
    tile: int = 256,
    threshold: float = 0.5,
    errors: bool = False,
    uncertainty: Any | None = None,
    uncertainty_range: tuple[float, float] | None = None,
    uncertainty_cmap: str = "inferno",
    columns: Sequence[str] | None = None,
    title: str | None = None,
    font_size: int = 14,
) -> Image.Image:
    """A sheet of example rows — image | ground truth | prediction [| uncertainty] — with titles.

    Every row is headed by where the example sits in the score range (best, median, worst or a
    percentile), its score (per-image Dice unless ``scores`` are given), its index and its prompt,
    wrapped over as many lines as it needs (never cut off). Column titles run along the top, a
    legend along the bottom. Rows are chosen by ``select_examples`` from all the images given, so
    pass the whole validation set (or a large part) and let the sheet pick.

    Args:
        images: B pictures: a list (PIL, ``(H, W[, 3])`` uint8 / ``[0, 1]`` float arrays,
            ``(3, H, W)`` tensors) or a batch ``(B, 3, H, W)`` tensor / ``(B, H, W, 3)`` array.
            De-normalise network inputs first (floats outside ``[0, 1]`` are refused).
        masks: B binary ground truths at the images' sizes (``(H, W)`` / ``(1, H, W)`` each, or a
            ``(B, 1, H, W)`` batch), or ``None`` for unlabelled images (no ground-truth column;
            then rows follow ``scores`` if given, else the given order).
        probs: B foreground probability maps at the images' sizes (e.g. ``model.predict`` output
            or ``model(x, t).logits.sigmoid()``), thresholded with ``> threshold``.
        prompts: B prompt strings, one string for every image, or ``None``.
        scores: one score per image used to rank and label rows; default the per-image Dice
            (``dice_per_image``) of the thresholded ``probs`` against ``masks``.
        score_name: what ``scores`` are, for the row titles (e.g. ``"IoU"``).
        select: ``"spread"`` (best to worst, evenly spaced; default), ``"best"``, ``"worst"``,
            ``"first"``, or a list of indices (see ``select_examples``).
        n: number of rows.
        higher_is_better: ``False`` when a lower score is better (losses, distances).
        tile: minimum tile size in pixels (the longer side; see the module notes on scaling).
        threshold: probability threshold for the prediction column and the default Dice.
        errors: colour the prediction by agreement with the ground truth (true positives green,
            false positives red, misses blue) instead of tinting it red.
        uncertainty: optional B maps (e.g. MC entropy) drawn as a fourth column with
            ``uncertainty_cmap`` on one scale for the whole sheet.
        uncertainty_range: ``(vmin, vmax)`` of that scale; default the range of the shown maps
            (pass ``(0, math.log(2))`` for binary entropy in nats to compare sheets).
        uncertainty_cmap: one of ``vlsegkit.viz.COLORMAPS``.
        columns: column titles, one per column; default ``("image", "ground truth",
            "prediction", "uncertainty")`` without the columns that are not drawn.
        title: text above everything; default says how many examples are shown and how they
            were chosen, with the mean score over all B images.
        font_size: text size in pixels (Pillow's scalable default font; see ``_text.font``).

    Returns:
        An RGB ``PIL.Image.Image``. Its width is ``2·10 + k·W + 6·(k - 1)`` for k columns of tile
        width W; its height grows with the number of rows and of prompt lines.

    Raises:
        ValueError: arguments of different lengths, maps that do not match their image's size,
            non-binary masks, ``tile < 16``, or ``columns`` of the wrong length.
    """
    if not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile must be an int >= 16, got {tile!r}")
    pictures = _items(images, "images")
    gts = None if masks is None else _items(masks, "masks")
    maps = _items(probs, "probs")
    uncs = None if uncertainty is None else _items(uncertainty, "uncertainty")
    if isinstance(prompts, str) or prompts is None:
        texts = [prompts] * len(pictures)
    else:
        texts = list(prompts)
    count = _same_length(
        ("images", pictures), ("masks", gts), ("probs", maps), ("prompts", texts),
        ("uncertainty", uncs),
    )  # fmt: skip
    if count == 0:
        raise ValueError("images must hold at least one image")

    if scores is not None:
        score_values = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
        if score_values.size != count:
            raise ValueError(
                f"scores must have one value per image ({count}), got {score_values.size}"
            )
    elif gts is not None:
        score_values = dice_per_image(gts, maps, threshold=threshold)
    else:
        score_values = None
    if score_values is None:
        # Nothing to rank by: the given order (or the given indices).
        mode = "first" if isinstance(select, str) else select
        chosen = select_examples(np.zeros(count), n, mode=mode)
    else:
        chosen = select_examples(score_values, n, mode=select, higher_is_better=higher_is_better)

    rows = [
        _prepare_row(e, pictures, maps, gts, uncs, tile=tile, threshold=threshold) for e in chosen
    ]
    if uncs is None:
        vmin = vmax = 0.0
    elif uncertainty_range is None:  # one scale for the sheet, so rows can be compared
        vmin = min(float(r.unc.min()) for r in rows)
        vmax = max(float(r.unc.max()) for r in rows)
    else:
        vmin, vmax = (float(v) for v in uncertainty_range)
        if not vmax >= vmin:
            raise ValueError(
                f"uncertainty_range must be (vmin, vmax) with vmax >= vmin, got {uncertainty_range}"
            )

    names = ["image"] + ([] if gts is None else ["ground truth"]) + ["prediction"]
    names += [] if uncs is None else ["uncertainty"]
    if columns is not None:
        if len(columns) != len(names):
            raise ValueError(
                f"columns must name the {len(names)} columns drawn ({', '.join(names)}), "
                f"got {len(columns)}"
            )
        names = [str(c) for c in columns]

    # Layout: every column as wide as the widest tile; text wraps to the sheet's inner width.
    cell_w = max(r.rgb.shape[1] for r in rows)
    ncols = len(names)
    width = 2 * _MARGIN + ncols * cell_w + (ncols - 1) * _GAP
    text_w = width - 2 * _MARGIN
    body, small = _text.font(font_size), _text.font(max(8, font_size - 2))
    heading = _text.font(font_size + 4)
    if title is None:
        title = _default_title(len(rows), count, select, score_values, score_name)
    title_lines = _text.wrap(title, heading, text_w)
    column_lines = [_text.wrap(name, body, cell_w) for name in names]
    header_h = max(_text.block_height(lines, body) for lines in column_lines)
    heads, prompt_lines = [], []
    for r in rows:
        i = r.example.index
        parts = [f"#{i}"]
        if score_values is not None:
            parts = [
                r.example.label,
                f"{score_name} {score_values[i]:.3f}",
                f"#{i} (rank {r.example.rank} of {count})",
            ]
        heads.append(_text.wrap(" · ".join(parts), body, text_w))
        prompt = texts[i]
        prompt_lines.append(
            [] if prompt is None else _text.wrap(f"prompt: {prompt}", small, text_w)
        )
    if errors and gts is not None:
        legend = [(TP_COLOR, "ground truth / correct"), (FP_COLOR, "false positive")]
        legend.append((FN_COLOR, "missed"))
    else:
        legend = [] if gts is None else [(TP_COLOR, "ground truth")]
        legend.append((FP_COLOR, f"prediction (p > {threshold:g})"))
    bar_h = 0 if uncs is None else _colour_bar_height(small) + 4

    height = _MARGIN + _text.block_height(title_lines, heading) + 6 + header_h + 4
    for r, head, lines in zip(rows, heads, prompt_lines):
        height += _text.block_height(head, body) + _text.block_height(lines, small)
        height += 2 + r.rgb.shape[0] + _ROW_GAP
    height += bar_h + _legend_height(legend, small, text_w) + _MARGIN

    canvas = Image.new("RGB", (width, height), _text.BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _text.draw_lines(draw, (_MARGIN, _MARGIN), title_lines, heading) + 6
    xs = [_MARGIN + c * (cell_w + _GAP) for c in range(ncols)]
    for x, lines in zip(xs, column_lines):
        _text.draw_lines(draw, (x, y), lines, body, width=cell_w, align="center")
    y += header_h + 4
    for r, head, lines in zip(rows, heads, prompt_lines):
        y = _text.draw_lines(draw, (_MARGIN, y), head, body)
        y = _text.draw_lines(draw, (_MARGIN, y), lines, small, fill=_text.MUTED) + 2
        tiles = [r.rgb]
        if r.gt is not None:
            tiles.append(overlay_mask(r.rgb, r.gt, color=TP_COLOR))
        if errors and r.gt is not None:
            tiles.append(overlay_prediction(r.rgb, r.pred, r.gt))
        else:
            tiles.append(overlay_mask(r.rgb, r.pred, color=FP_COLOR))
        if r.unc is not None:
            tiles.append(apply_colormap(r.unc, cmap=uncertainty_cmap, vmin=vmin, vmax=vmax))
        for x, t in zip(xs, tiles):
            _paste(canvas, t, (x + (cell_w - t.shape[1]) // 2, y))
        y += r.rgb.shape[0] + _ROW_GAP
    if uncs is not None:
        _colour_bar(canvas, (xs[-1], y), cell_w, vmin, vmax, uncertainty_cmap, small)
        label = f"{names[-1]} scale"
        label_x = max(_MARGIN, xs[-1] - 8 - _text.text_width(label, small))
        draw.text((label_x, y - 2), label, font=small, fill=_text.MUTED)
        y += bar_h
    _legend_items(canvas, (_MARGIN, y), legend, small, text_w)
    return canvas


class _Row(NamedTuple):
    """One sheet row at tile resolution."""

    example: RankedExample
    rgb: np.ndarray
    pred: np.ndarray
    gt: np.ndarray | None
    unc: np.ndarray | None


def _prepare_row(
    example: RankedExample,
    pictures: list[Any],
    maps: list[Any],
    gts: list[Any] | None,
    uncs: list[Any] | None,
    *,
    tile: int,
    threshold: float,
) -> _Row:
    """Check one example's arrays against its image and bring them to tile resolution.

    The prediction is thresholded (and the masks read) at the image's own resolution, then
    resized with nearest neighbour, so the tiles show exactly the pixels that were scored.
    """
    i = example.index
    rgb = to_rgb_uint8(pictures[i])
    size = rgb.shape[:2]
    pred = _plane(maps[i], f"probs[{i}]", size) > threshold
    gt = None if gts is None else _mask_plane(gts[i], f"masks[{i}]", size)
    unc = None if uncs is None else _finite_map(uncs[i], f"uncertainty[{i}]", size)
    target = _target_size(*size, tile)
    return _Row(
        example,
        _resize_rgb(rgb, target),
        _resize_mask(pred, target),
        None if gt is None else _resize_mask(gt, target),
        None if unc is None else _resize_map(unc, target),
    )


def _default_title(
    shown: int, count: int, select: Any, scores: np.ndarray | None, score_name: str
) -> str:
    how = (
        {
            "spread": f"across the {score_name} range, best to worst",
            "best": f"with the best {score_name}",
            "worst": f"with the worst {score_name}",
            "first": "in the given order",
        }.get(select, "chosen by index")
        if isinstance(select, str)
        else "chosen by index"
    )
    if scores is None:
        return f"{shown} of {count} examples"
    return f"{shown} of {count} examples {how} (mean {score_name} {scores.mean():.3f} over all {count})"


def save_overlay_sheet(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Draw ``overlay_sheet(*args, **kwargs)`` and write it to ``path`` atomically.

    The picture is written to a temporary file in the same folder and renamed over ``path``, so a
    crash never leaves a half-written PNG. The format follows the suffix (PNG recommended).

    Returns:
        ``path`` as a ``Path``.
    """
    return save_image(overlay_sheet(*args, **kwargs), path)


# --------------------------------------------------------------------------- uncertainty sheet
def uncertainty_sheet(
    image: Any,
    mean: Any,
    entropy: Any,
    aleatoric: Any,
    epistemic: Any,
    *,
    prompt: str | None = None,
    mask: Any | None = None,
    tile: int = 256,
    threshold: float = 0.5,
    cmap: str = "inferno",
    shared_scale: bool = False,
    title: str | None = None,
    font_size: int = 14,
) -> Image.Image:
    """Monte Carlo uncertainty of one image: mean probability, entropy, aleatoric, epistemic.

    Five panels side by side — the image (with the ground-truth outline when ``mask`` is given),
    the mean foreground probability (viridis on ``[0, 1]`` with the ``threshold`` contour), and
    the total entropy ``H(p̄)`` and its two parts, aleatoric ``mean_s H(p_s)`` and epistemic
    ``H(p̄) - mean_s H(p_s)`` (``cmap``) — each titled, each map with a colour bar giving its value
    range. These are the fields of ``MedCLIPSeg.predict_with_uncertainty``'s ``UncertaintyOutput``
    for one image (``result.mean[i]`` etc., ``(1, H, W)`` at the image's size).

    Args:
        image: the picture (any form ``to_rgb_uint8`` accepts), size ``(H, W)``.
        mean, entropy, aleatoric, epistemic: ``(H, W)`` or ``(1, H, W)`` maps at the image's size.
        prompt: the text prompt, printed (wrapped) under the title.
        mask: optional binary ground truth; outlined on the image and scored (Dice) in the title.
        tile: minimum panel size in pixels (longer side).
        threshold: probability threshold for the contour and the Dice.
        cmap: colour map of the three uncertainty maps (one of ``vlsegkit.viz.COLORMAPS``).
        shared_scale: draw the three uncertainty maps on one scale ``[0, max]`` (comparable
            colours; entropy = aleatoric + epistemic) instead of each on its own range (default,
            which shows where each part sits even when epistemic is much smaller).
        title: first line; default ``"Monte Carlo uncertainty"``.
        font_size: text size in pixels.

    Returns:
        An RGB ``PIL.Image.Image``.
    """
    if not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile must be an int >= 16, got {tile!r}")
    rgb = to_rgb_uint8(image)
    size = rgb.shape[:2]
    p = _finite_map(mean, "mean", size)
    if p.min() < 0 or p.max() > 1:
        raise ValueError("mean must be probabilities in [0, 1]")
    maps = {
        "entropy (total)": _finite_map(entropy, "entropy", size),
        "aleatoric (expected entropy)": _finite_map(aleatoric, "aleatoric", size),
        "epistemic (mutual information)": _finite_map(epistemic, "epistemic", size),
    }
    gt = None if mask is None else _mask_plane(mask, "mask", size)
    pred = p > threshold

    target = _target_size(*size, tile)
    big = _resize_rgb(rgb, target)
    pred_big = _resize_mask(pred, target)
    first = big if gt is None else overlay_mask(big, _resize_mask(gt, target), color=TP_COLOR)
    prob_tile = apply_colormap(_resize_map(p, target), cmap="viridis", vmin=0.0, vmax=1.0)
    # The thresholded prediction as a thin white contour on the probability map.
    prob_tile = overlay_mask(prob_tile, pred_big, color=(255, 255, 255), alpha=0.0)
    panels: list[tuple[str, np.ndarray, tuple[float, float, str] | None]] = [
        ("image + ground truth" if gt is not None else "image", first, None),
        ("mean probability", prob_tile, (0.0, 1.0, "viridis")),
    ]
    if shared_scale:
        top = max(float(m.max()) for m in maps.values())
        ranges = dict.fromkeys(maps, (0.0, top))
    else:
        ranges = {k: (float(m.min()), float(m.max())) for k, m in maps.items()}
    for name, values in maps.items():
        lo, hi = ranges[name]
        heat = apply_colormap(_resize_map(values, target), cmap=cmap, vmin=lo, vmax=hi)
        panels.append((name, heat, (lo, hi, cmap)))

    th, tw = target
    ncols = len(panels)
    width = 2 * _MARGIN + ncols * tw + (ncols - 1) * _GAP
    text_w = width - 2 * _MARGIN
    body, small, heading = (
        _text.font(font_size),
        _text.font(max(8, font_size - 2)),
        _text.font(font_size + 4),
    )
    head = title or "Monte Carlo uncertainty"
    if gt is not None:
        denom = int(pred.sum()) + int(gt.sum())
        dice = 1.0 if denom == 0 else 2.0 * int((pred & gt).sum()) / denom
        head += f" · Dice {dice:.3f} (p > {threshold:g})"
    title_lines = _text.wrap(head, heading, text_w)
    prompt_lines = [] if prompt is None else _text.wrap(f"prompt: {prompt}", small, text_w)
    column_lines = [_text.wrap(name, body, tw) for name, _, _ in panels]
    header_h = max(_text.block_height(lines, body) for lines in column_lines)
    height = _MARGIN + _text.block_height(title_lines, heading)
    height += _text.block_height(prompt_lines, small) + 6 + header_h + 2 + th + 4
    height += _colour_bar_height(small) + _MARGIN

    canvas = Image.new("RGB", (width, height), _text.BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _text.draw_lines(draw, (_MARGIN, _MARGIN), title_lines, heading)
    y = _text.draw_lines(draw, (_MARGIN, y), prompt_lines, small, fill=_text.MUTED) + 6
    xs = [_MARGIN + c * (tw + _GAP) for c in range(ncols)]
    for x, lines in zip(xs, column_lines):
        _text.draw_lines(draw, (x, y), lines, body, width=tw, align="center")
    y += header_h + 2
    for x, (_, picture, scale) in zip(xs, panels):
        _paste(canvas, picture, (x, y))
        if scale is not None:
            _colour_bar(canvas, (x, y + th + 4), tw, scale[0], scale[1], scale[2], small)
    return canvas
