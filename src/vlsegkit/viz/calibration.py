"""Calibration: reliability-diagram statistics (numpy) and the diagram itself (matplotlib)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .images import _to_numpy

__all__ = ["Calibration", "calibration_curve", "reliability_diagram", "save_reliability_diagram"]


@dataclass(frozen=True)
class Calibration:
    """Per-bin statistics of a binary reliability diagram.

    Attributes:
        bin_edges: ``(num_bins + 1,)`` equal-width edges on ``[0, 1]``.
        confidence: ``(num_bins,)`` mean predicted foreground probability in each bin (NaN if empty).
        frequency: ``(num_bins,)`` observed foreground fraction in each bin (NaN if empty).
        counts: ``(num_bins,)`` pixels per bin.
        ece: expected calibration error ``Σ_b (n_b / N) · |frequency_b - confidence_b|``.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray
    counts: np.ndarray
    ece: float


def calibration_curve(probs: Any, targets: Any, *, num_bins: int = 10) -> Calibration:
    """Bin pixel probabilities and compare them with how often the pixel is foreground.

    The binary form of the reliability diagram and expected calibration error of Guo et al., "On
    Calibration of Modern Neural Networks" (ICML 2017): bin ``b = min(floor(p · B), B - 1)`` on the
    foreground probability ``p`` (like ``sklearn.calibration.calibration_curve`` with uniform bins),
    then ``ECE = Σ_b (n_b / N) · |mean(y)_b - mean(p)_b|``.

    Args:
        probs: foreground probabilities in ``[0, 1]``, any shape (e.g. ``(B, 1, H, W)``).
        targets: binary ground truth of the same shape.
        num_bins: number of equal-width bins (>= 1).

    Returns:
        ``Calibration``.
    """
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    p = _to_numpy(probs).astype(np.float64).reshape(-1)
    y = _to_numpy(targets).astype(np.float64)
    if y.shape != _to_numpy(probs).shape:
        raise ValueError(
            f"targets must have the shape of probs {_to_numpy(probs).shape}, got {y.shape}"
        )
    y = y.reshape(-1)
    if p.size == 0:
        raise ValueError("probs must not be empty")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be probabilities in [0, 1] (apply a sigmoid to logits)")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("targets must be binary (0/1)")
    index = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=num_bins) / counts
        frequency = np.bincount(index, weights=y, minlength=num_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(frequency[filled] - confidence[filled])) / p.size)
    return Calibration(np.linspace(0, 1, num_bins + 1), confidence, frequency, counts, ece)


def reliability_diagram(
    probs: Any,
    targets: Any,
    *,
    num_bins: int = 10,
    title: str | None = None,
    ax: Any | None = None,
) -> Any:
    """Draw a reliability diagram (observed foreground frequency per confidence bin) with matplotlib.

    Bars show ``calibration_curve``'s ``frequency`` per bin, the dashed diagonal is perfect
    calibration, red hatched bars mark the gap to it, and the legend reports the ECE.

    Args:
        probs: foreground probabilities in ``[0, 1]``, any shape.
        targets: binary ground truth of the same shape.
        num_bins: equal-width bins.
        title: axes title.
        ax: matplotlib axes to draw on; default a new 4 x 4 inch figure (no pyplot state touched).

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: matplotlib is missing (install ``vlsegkit[viz]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'reliability_diagram needs matplotlib: pip install "vlsegkit[viz]"'
        ) from e
    cal = calibration_curve(probs, targets, num_bins=num_bins)
    if ax is None:
        ax = Figure(figsize=(4, 4)).add_subplot()
    centers = (cal.bin_edges[:-1] + cal.bin_edges[1:]) / 2
    width = 1.0 / num_bins
    filled = cal.counts > 0
    ax.bar(centers[filled], cal.frequency[filled], width=width, edgecolor="black", label="observed")
    gap = cal.confidence[filled] - cal.frequency[filled]
    ax.bar(
        centers[filled], gap, bottom=cal.frequency[filled], width=width, color="red", alpha=0.3,
        hatch="//", edgecolor="red", label=f"gap (ECE {cal.ece:.3f})",
    )  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency")
    ax.set_title(title or "Reliability diagram")
    ax.legend(loc="upper left")
    return ax.figure


def save_reliability_diagram(
    probs: Any,
    targets: Any,
    path: str | os.PathLike,
    *,
    num_bins: int = 10,
    title: str | None = None,
) -> Path | None:
    """Write ``reliability_diagram`` to ``path`` (PNG), or skip it in one line without matplotlib.

    For scripts that should still run without the ``viz`` extra (the demo, the docs): when
    matplotlib is missing, nothing is written, one ``UserWarning`` says so and how to install it,
    and ``None`` is returned. The file is written to a temporary name and renamed over ``path``.

    Args:
        probs: foreground probabilities in ``[0, 1]``, any shape.
        targets: binary ground truth of the same shape.
        path: output file; parent folders are created.
        num_bins: equal-width bins.
        title: axes title.

    Returns:
        ``path`` as a ``Path``, or ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            'reliability diagram skipped: matplotlib is not installed (pip install "vlsegkit[viz]")',
            stacklevel=2,
        )
        return None
    from ..hub import atomic_write

    fig = reliability_diagram(probs, targets, num_bins=num_bins, title=title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
