"""Training curves from ``fit``'s per-epoch records: drawn with Pillow, or matplotlib if asked.

``vlsegkit.train.fit`` sends one record per optimiser step (``step``, ``epoch``, ``loss``, ``lr``)
and one per epoch (``step``, ``epoch``, ``train_loss``, the other ``train_*`` loss terms and the
``val_*`` metrics) to ``log_fn`` and to ``log_dir/metrics.jsonl``. The epoch records are the ones with
a ``train_loss`` key; every numeric key of them is a curve except ``epoch``, ``step`` and sample
counts (keys ending in ``count``, such as ``evaluate``'s ``val_count``). Curves named ``train_*``
share the "training" panel, ``val_*`` the "validation" panel, anything else an "other" panel.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import _text
from .images import save_image

__all__ = [
    "CURVE_COLORS",
    "plot_training_curves",
    "read_epoch_records",
    "training_curves_image",
]

Color = tuple[int, int, int]

#: Colour of the k-th curve (in order of first appearance), cycling: matplotlib's ``tab10``.
CURVE_COLORS: tuple[Color, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

_GRID: Color = (228, 228, 228)
_AXIS: Color = (90, 90, 90)
_PANELS = (("train_", "training"), ("val_", "validation"), ("", "other"))
_NOT_CURVES = ("epoch", "step")


# --------------------------------------------------------------------------- records
def read_epoch_records(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The epoch records of a run: from ``metrics.jsonl`` or from a list of records.

    Args:
        source: a path to a JSON-lines file written by ``fit(log_dir=...)``, or the records
            themselves (e.g. collected with ``fit(..., log_fn=records.append)``). Step records are
            dropped: an epoch record is one with a ``train_loss`` key. ``null`` values (``fit``
            writes non-finite numbers as ``null``) become NaN.

    Returns:
        The epoch records in order, as new dicts.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: there is no epoch record.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records, unreadable = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # e.g. the last line of a run that was killed mid-write
                unreadable += 1
                continue
            if isinstance(record, dict):
                records.append(record)
        if unreadable:
            warnings.warn(f"{path}: skipped {unreadable} unreadable line(s)", stacklevel=2)
        where = str(path)
    else:
        records, where = list(source), "records"
    epochs = [
        {k: math.nan if v is None else v for k, v in r.items()}
        for r in records
        if "train_loss" in r
    ]
    if not epochs:
        raise ValueError(
            f"{where}: no epoch records (records with a 'train_loss' key, written by fit after "
            "every epoch)"
        )
    return epochs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_curve(key: str) -> bool:
    # Sample counts (val_count) are bookkeeping: plotted, they would squash the metrics' scale.
    return key not in _NOT_CURVES and not key.endswith("count")


def _series(records: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(x, {name: values})``: x is the 1-based epoch when epochs increase, else the order."""
    names: list[str] = []
    for r in records:
        names += [k for k, v in r.items() if _is_curve(k) and _is_number(v) and k not in names]
    epochs = [r.get("epoch") for r in records]
    if all(_is_number(e) for e in epochs) and all(b > a for a, b in itertools.pairwise(epochs)):
        x = np.asarray(epochs, dtype=np.float64) + 1  # fit counts epochs from 0
    else:  # e.g. records of several fit(epochs=1) calls, each starting at epoch 0
        x = np.arange(1, len(records) + 1, dtype=np.float64)
    values = {
        name: np.asarray(
            [float(r[name]) if _is_number(r.get(name)) else math.nan for r in records],
            dtype=np.float64,
        )
        for name in names
    }
    return x, values


def _panels(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        title = next(t for prefix, t in _PANELS if name.startswith(prefix))
        groups.setdefault(title, []).append(name)
    return [(title, groups[title]) for _, title in _PANELS if title in groups]


# --------------------------------------------------------------------------- ticks
def _nice_step(span: float, max_ticks: int) -> float:
    raw = span / max(1, max_ticks - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _nice_range(lo: float, hi: float, max_ticks: int = 6) -> tuple[float, float, float]:
    """``(lo, hi, step)`` widened to whole steps of 1, 2, 2.5 or 5 x 10^k."""
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, max_ticks)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10**decimals % 1 > 1e-6:  # 2.5 x 10^k needs one more digit
        decimals += 1
    return f"{value:.{decimals}f}" if decimals else f"{round(value):d}"


# --------------------------------------------------------------------------- Pillow renderer
def _draw_panel(
    canvas: Image.Image,
    box: tuple[int, int, int, int],
    title: str,
    x: np.ndarray,
    series: list[tuple[str, np.ndarray, Color]],
    fonts: tuple[Any, Any],
    legend_top: int,
) -> None:
    """One panel: title, axes with ticks and grid, the curves, and their legend below."""
    body, small = fonts
    left, top, right, _ = box
    draw = ImageDraw.Draw(canvas)
    step_h = _text.line_height(small)
    draw.text((left, top), title, font=body, fill=_text.TEXT)

    finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in series])
    y_lo, y_hi, y_step = _nice_range(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    x_lo, x_hi = (x.min() - 1, x.max() + 1) if x.size == 1 else (x.min(), x.max())
    x_step = max(1.0, _nice_step(x_hi - x_lo, 8))  # whole epochs
    y_labels = [_tick_label(v, y_step) for v in np.arange(y_lo, y_hi + y_step / 2, y_step).tolist()]
    label_w = max(_text.text_width(s, small) for s in y_labels)
    plot = (
        left + label_w + 10,
        top + _text.line_height(body) + 6,
        right - 8,
        legend_top - 2 * step_h - 8,
    )
    px0, py0, px1, py1 = plot

    # Ticks stay on round values; the view is 3% wider so that no dot sits on the frame.
    xv_lo, xv_hi = x_lo - 0.03 * (x_hi - x_lo), x_hi + 0.03 * (x_hi - x_lo)
    yv_lo, yv_hi = y_lo - 0.03 * (y_hi - y_lo), y_hi + 0.03 * (y_hi - y_lo)

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        return (
            px0 + (xv - xv_lo) / (xv_hi - xv_lo) * (px1 - px0),
            py1 - (yv - yv_lo) / (yv_hi - yv_lo) * (py1 - py0),
        )

    for value, label in zip(np.arange(y_lo, y_hi + y_step / 2, y_step).tolist(), y_labels):
        _, yy = to_px(x_lo, value)
        draw.line((px0, yy, px1, yy), fill=_GRID)
        draw.text(
            (px0 - 6 - _text.text_width(label, small), yy - step_h // 2 + 1),
            label,
            font=small,
            fill=_AXIS,
        )
    first_tick = math.ceil(x_lo / x_step) * x_step
    for value in np.arange(first_tick, x_hi + x_step / 2, x_step).tolist():
        xx, _ = to_px(value, y_lo)
        draw.line((xx, py0, xx, py1), fill=_GRID)
        draw.line((xx, py1, xx, py1 + 4), fill=_AXIS)
        label = _tick_label(value, x_step)
        draw.text(
            (xx - _text.text_width(label, small) // 2, py1 + 6), label, font=small, fill=_AXIS
        )
    draw.text(
        ((px0 + px1) // 2 - _text.text_width("epoch", small) // 2, py1 + 6 + step_h),
        "epoch",
        font=small,
        fill=_AXIS,
    )
    draw.rectangle(plot, outline=_AXIS)

    markers = len(x) <= 60
    for _, values, color in series:
        ok = np.isfinite(values)
        points = [to_px(a, b) for a, b in zip(x.tolist(), values.tolist())]
        run: list[tuple[float, float]] = []
        for point, good in [*zip(points, ok.tolist()), (None, False)]:
            if good:
                run.append(point)
                continue
            if len(run) > 1:  # a NaN (or the end) closes the current stretch of line
                draw.line(run, fill=color, width=2, joint="curve")
            run = []
        if markers:
            for (cx, cy), good in zip(points, ok.tolist()):
                if good:
                    draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=color)

    # Legend: a short line in the curve's colour before each name, flowing onto new lines.
    lx, ly = left, legend_top
    for name, _, color in series:
        need = 22 + _text.text_width(name, small) + 14
        if lx > left and lx + need > right:
            lx, ly = left, ly + step_h
        draw.line((lx, ly + step_h // 2, lx + 16, ly + step_h // 2), fill=color, width=2)
        draw.text((lx + 22, ly), name, font=small, fill=_text.TEXT)
        lx += need


def _legend_lines(names: list[str], small: Any, width: int) -> int:
    lines, x = 1, 0
    for name in names:
        need = 22 + _text.text_width(name, small) + 14
        if x > 0 and x + need > width:
            lines, x = lines + 1, 0
        x += need
    return lines


def training_curves_image(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    title: str | None = "Training curves",
    panel_size: tuple[int, int] = (480, 320),
    font_size: int = 14,
) -> Image.Image:
    """Draw the per-epoch curves with Pillow: one panel per group, side by side.

    Each panel has its title, a y axis with round ticks (1, 2, 2.5 or 5 x 10^k), whole-epoch x
    ticks, a light grid, the curves (2 px lines, a dot per epoch up to 60 epochs; a missing or
    non-finite value breaks the line) and a legend underneath. Curve k (in order of first
    appearance over all panels) is drawn in ``CURVE_COLORS[k % 10]``. The x axis is the 1-based
    epoch (``epoch + 1``) when the records' epochs increase, else the record's position (as when
    the records come from several ``fit(..., epochs=1)`` calls).

    Args:
        records: ``metrics.jsonl`` path or records (see ``read_epoch_records``).
        title: text above the panels (``None`` for none).
        panel_size: ``(width, height)`` of each panel in pixels, legend included.
        font_size: text size in pixels.

    Returns:
        An RGB ``PIL.Image.Image`` of width ``20 + panels · width`` (plus 10 px between panels).
    """
    epochs = read_epoch_records(records)
    x, values = _series(epochs)
    colors = {name: CURVE_COLORS[k % len(CURVE_COLORS)] for k, name in enumerate(values)}
    groups = _panels(values)
    pw, ph = panel_size
    if pw < 160 or ph < 120:
        raise ValueError(f"panel_size must be at least (160, 120), got {panel_size}")
    body, small = _text.font(font_size), _text.font(max(8, font_size - 2))
    margin, between = 10, 10
    width = 2 * margin + len(groups) * pw + (len(groups) - 1) * between
    heading = _text.font(font_size + 4)
    title_lines = [] if title is None else _text.wrap(title, heading, width - 2 * margin)
    top = margin + _text.block_height(title_lines, heading) + (4 if title_lines else 0)
    legend_h = max(_legend_lines(names, small, pw) for _, names in groups) * _text.line_height(
        small
    )
    canvas = Image.new("RGB", (width, top + ph + legend_h + margin), _text.BACKGROUND)
    _text.draw_lines(ImageDraw.Draw(canvas), (margin, margin), title_lines, heading)
    for k, (panel_title, names) in enumerate(groups):
        left = margin + k * (pw + between)
        _draw_panel(
            canvas,
            (left, top, left + pw, top + ph),
            panel_title,
            x,
            [(name, values[name], colors[name]) for name in names],
            (body, small),
            legend_top=top + ph,
        )
    return canvas


# --------------------------------------------------------------------------- files
def _matplotlib_figure(records: list[dict[str, Any]], title: str | None) -> Any:
    from matplotlib.figure import Figure

    x, values = _series(records)
    groups = _panels(values)
    fig = Figure(figsize=(5 * len(groups), 3.8), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (panel_title, names) in zip(axes, groups):
        for name in names:
            index = list(values).index(name) % len(CURVE_COLORS)
            color = tuple(c / 255 for c in CURVE_COLORS[index])
            ax.plot(
                x, values[name], marker="o" if len(x) <= 60 else None, ms=3, color=color, label=name
            )
        ax.set(title=panel_title, xlabel="epoch")
        ax.grid(True, color="0.9")
        ax.legend(loc="best", fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = "Training curves",
    backend: str = "pillow",
) -> Path:
    """Write the per-epoch training curves (loss terms, validation metrics) to a PNG, atomically.

    Args:
        records: the epoch records of a run, or a path to its ``metrics.jsonl`` (see
            ``read_epoch_records``); step records among them are ignored.
        path: output file (PNG recommended); parent folders are created. Written to a temporary
            file and renamed, so an interrupted run never leaves a broken picture.
        title: text above the panels.
        backend: ``"pillow"`` (default: ``training_curves_image``, no extra needed, the same
            pixels everywhere), ``"matplotlib"`` (needs ``vlsegkit[viz]``; without it, warns in
            one line and draws with Pillow) or ``"auto"`` (matplotlib when installed).

    Returns:
        ``path`` as a ``Path``.
    """
    if backend not in ("pillow", "matplotlib", "auto"):
        raise ValueError(f"backend must be 'pillow', 'matplotlib' or 'auto', got {backend!r}")
    epochs = read_epoch_records(records)
    if backend != "pillow":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if backend == "matplotlib":
                warnings.warn(
                    'matplotlib is not installed (pip install "vlsegkit[viz]"): training curves '
                    "drawn with Pillow instead",
                    stacklevel=2,
                )
        else:
            from ..hub import atomic_write

            fig = _matplotlib_figure(epochs, title)
            return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return save_image(training_curves_image(epochs, title=title), path)
