"""Pictures of the zero-shot pipeline (MedCLIP-SAMv2): image | saliency | coarse + prompts | SAM.

``zeroshot_panel`` draws one image's four stages side by side at the image's own size (what
``vlsegkit zeroshot`` writes as ``*_overlay.png``); ``zeroshot_sheet`` stacks several images' stages
into a titled sheet with column headings (the pipeline figure of the documentation). Box prompts are
drawn as rectangles, positive points as small filled squares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import _text
from .images import TP_COLOR, _plane, heatmap_overlay, overlay_mask, panel, to_rgb_uint8
from .sheets import _GAP, _MARGIN, _ROW_GAP, _resize_map, _resize_mask, _resize_rgb, _target_size

__all__ = ["BOX_COLOR", "POINT_COLOR", "draw_prompts", "zeroshot_panel", "zeroshot_sheet"]

#: Colours of box prompts (amber) and positive point prompts (cyan).
BOX_COLOR = (255, 200, 0)
POINT_COLOR = (0, 230, 255)
#: ``overlay_mask`` colours of the coarse mask (violet) and of SAM's mask (red).
COARSE_COLOR = (170, 90, 255)
SAM_COLOR = (255, 64, 64)


def _as_array(x: Any, shape_tail: tuple[int, ...], name: str) -> np.ndarray | None:
    if x is None:
        return None
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if arr.ndim != len(shape_tail) + 1 or arr.shape[1:] != shape_tail:
        if not (arr.size == 0):
            raise ValueError(f"{name} must have shape (K, {', '.join(map(str, shape_tail))})")
        return None
    return arr


def draw_prompts(
    image: Any,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    *,
    scale: float = 1.0,
    width: int = 2,
) -> np.ndarray:
    """Draw box prompts (rectangles) and positive point prompts (filled squares) on an image.

    Args:
        image: the picture (anything ``to_rgb_uint8`` accepts).
        boxes: ``(K, 4)`` ``(x0, y0, x1, y1)`` in pixels of the original image.
        points: ``(K, 2)`` or ``(G, P, 2)`` ``(x, y)`` pixel coordinates.
        point_labels: labels matching ``points``; only points labelled 1 are drawn (0 negative and
            -10 padding are skipped).
        scale: factor from original-image pixels to ``image``'s pixels (for enlarged tiles).
        width: line width of the rectangles.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    canvas = Image.fromarray(to_rgb_uint8(image).copy())
    draw = ImageDraw.Draw(canvas)
    box_arr = _as_array(boxes, (4,), "boxes")
    if box_arr is not None:
        for x0, y0, x1, y1 in box_arr * scale:
            draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=BOX_COLOR,
                           width=width)  # fmt: skip
    if points is not None:
        pts = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points, float)
        pts = pts.reshape(-1, 2)
        labels = (
            np.ones(len(pts))
            if point_labels is None
            else np.asarray(
                point_labels.detach().cpu() if hasattr(point_labels, "detach") else point_labels
            ).reshape(-1)
        )
        if len(labels) != len(pts):
            raise ValueError(f"point_labels has {len(labels)} entries for {len(pts)} points")
        r = max(1, width)
        for (x, y), lab in zip(pts * scale, labels):
            if lab == 1:
                cx, cy = x + scale / 2, y + scale / 2
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=POINT_COLOR)
    return np.asarray(canvas)


def zeroshot_panel(
    image: Any,
    saliency: Any,
    coarse: Any,
    mask: Any,
    *,
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
    alpha: float = 0.45,
    cmap: str = "jet",
    caption: str | None = None,
) -> np.ndarray:
    """The four stages of one image side by side, at the image's size.

    image | saliency (``cmap`` heat map over the image) | coarse mask (violet) with the box and
    point prompts | SAM mask (red), each mask outlined.

    Args:
        image: the picture, size ``(H, W)``.
        saliency: ``(H, W)`` map in ``[0, 1]``.
        coarse, mask: ``(H, W)`` binary masks.
        boxes, points, point_labels: the prompts (see :func:`draw_prompts`).
        alpha: opacity of the heat map and mask tints.
        cmap: colour map of the saliency (drawn on the fixed range ``[0, 1]``).
        caption: optional line above the tiles.

    Returns:
        ``(H [+ 18], 4 W + 6, 3)`` uint8.
    """
    rgb = to_rgb_uint8(image)
    size = rgb.shape[:2]
    sal = _plane(saliency, "saliency", size).astype(np.float64)
    heat = heatmap_overlay(rgb, sal, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    coarse_tile = overlay_mask(rgb, _plane(coarse, "coarse", size) != 0, color=COARSE_COLOR,
                               alpha=alpha)  # fmt: skip
    coarse_tile = draw_prompts(coarse_tile, boxes, points, point_labels, width=1)
    sam_tile = overlay_mask(rgb, _plane(mask, "mask", size) != 0, color=SAM_COLOR, alpha=alpha)
    return panel([rgb, heat, coarse_tile, sam_tile], caption=caption)


def zeroshot_sheet(
    rows: Sequence[dict[str, Any]],
    *,
    tile: int = 192,
    title: str | None = None,
    note: str | None = None,
    alpha: float = 0.45,
    cmap: str = "jet",
    font_size: int = 14,
) -> Image.Image:
    """A titled sheet of zero-shot results: one row per image, four columns (the pipeline figure).

    Args:
        rows: dicts with ``image``, ``saliency``, ``coarse``, ``mask`` and optionally ``boxes``,
            ``points``, ``point_labels`` (the prompts), ``target`` (a ground-truth mask: outlined
            in green on the image and scored by Dice in the row's label) and ``label`` (text).
            ``vlsegkit.zeroshot.ZeroShotResult`` fields fit directly.
        tile: minimum tile size in pixels (longer side); small images are enlarged by a whole
            factor with nearest-neighbour sampling.
        title: first line; default ``"MedCLIP-SAMv2 zero-shot pipeline"``.
        note: a smaller line under the title (e.g. which models drew the sheet).
        alpha, cmap: as in :func:`zeroshot_panel`.
        font_size: text size in pixels.

    Returns:
        An RGB ``PIL.Image.Image``.
    """
    if not rows:
        raise ValueError("rows must hold at least one result")
    if not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile must be an int >= 16, got {tile!r}")
    headings = ["image", "M2IB saliency", "coarse mask + prompts", "SAM mask"]
    prepared = []
    for k, row in enumerate(rows):
        missing = {"image", "saliency", "coarse", "mask"} - set(row)
        if missing:
            raise ValueError(f"rows[{k}] is missing {sorted(missing)}")
        rgb = to_rgb_uint8(row["image"])
        size = rgb.shape[:2]
        target = _target_size(*size, tile)
        factor = target[1] / size[1]
        big = _resize_rgb(rgb, target)
        sal = _resize_map(_plane(row["saliency"], "saliency", size).astype(np.float64), target)
        coarse = _resize_mask(_plane(row["coarse"], "coarse", size) != 0, target)
        mask = _resize_mask(_plane(row["mask"], "mask", size) != 0, target)
        label = row.get("label")
        first = big
        if row.get("target") is not None:
            gt = _plane(row["target"], "target", size) != 0
            first = overlay_mask(big, _resize_mask(gt, target), color=TP_COLOR, alpha=0.0)
            pred = _plane(row["mask"], "mask", size) != 0
            denom = int(pred.sum()) + int(gt.sum())
            dice = 1.0 if denom == 0 else 2.0 * int((pred & gt).sum()) / denom
            label = f"{label + ' · ' if label else ''}SAM Dice {dice:.2f}"
        coarse_tile = overlay_mask(big, coarse, color=COARSE_COLOR, alpha=alpha)
        coarse_tile = draw_prompts(coarse_tile, row.get("boxes"), row.get("points"),
                                   row.get("point_labels"), scale=factor)  # fmt: skip
        tiles = [
            first,
            heatmap_overlay(big, sal, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0),
            coarse_tile,
            overlay_mask(big, mask, color=SAM_COLOR, alpha=alpha),
        ]
        prepared.append((label, tiles, target))

    tw = max(t[2][1] for t in prepared)
    width = 2 * _MARGIN + 4 * tw + 3 * _GAP
    text_w = width - 2 * _MARGIN
    body, small, heading = (_text.font(font_size), _text.font(max(8, font_size - 2)),
                            _text.font(font_size + 4))  # fmt: skip
    title_lines = _text.wrap(title or "MedCLIP-SAMv2 zero-shot pipeline", heading, text_w)
    note_lines = [] if note is None else _text.wrap(note, small, text_w)
    head_lines = [_text.wrap(h, body, tw) for h in headings]
    head_h = max(_text.block_height(lines, body) for lines in head_lines)
    label_lines = [[] if lab is None else _text.wrap(lab, small, text_w) for lab, _, _ in prepared]
    height = (
        _MARGIN
        + _text.block_height(title_lines, heading)
        + _text.block_height(note_lines, small)
        + 6
        + head_h
        + 2
    )
    for lines, (_, _, target) in zip(label_lines, prepared):
        height += _text.block_height(lines, small) + target[0] + _ROW_GAP
    height += _MARGIN - _ROW_GAP

    canvas = Image.new("RGB", (width, height), _text.BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _text.draw_lines(draw, (_MARGIN, _MARGIN), title_lines, heading)
    y = _text.draw_lines(draw, (_MARGIN, y), note_lines, small, fill=_text.MUTED) + 6
    xs = [_MARGIN + c * (tw + _GAP) for c in range(4)]
    for x, lines in zip(xs, head_lines):
        _text.draw_lines(draw, (x, y), lines, body, width=tw, align="center")
    y += head_h + 2
    for lines, (_, tiles, target) in zip(label_lines, prepared):
        y = _text.draw_lines(draw, (_MARGIN, y), lines, small, fill=_text.MUTED)
        for x, t in zip(xs, tiles):
            canvas.paste(Image.fromarray(t), (x, y))
        y += target[0] + _ROW_GAP
    return canvas
