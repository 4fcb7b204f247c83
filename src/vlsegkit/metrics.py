"""Per-image Dice and IoU for binary masks, and accumulators that average them over a data set.

Both scores are computed per image on binarised masks and then averaged over images ("samplewise"
aggregation), as in the medvlsm / TuneVLSeg evaluation (MONAI ``compute_dice`` / ``compute_iou``
with ``ignore_empty=False``) and MedCLIPSeg's DSC:

    Dice = 2·|P ∩ G| / (|P| + |G|)        IoU = |P ∩ G| / |P ∪ G|

Empty masks. When both the prediction and the ground truth are empty the ratio is 0/0; following
medvlsm (``ignore_empty=False``) such an image scores ``empty_score = 1.0`` -- the model correctly
found nothing. An empty ground truth with a non-empty prediction scores 0. Pass
``empty_score=float("nan")`` to drop empty/empty images from the means instead (MONAI's default
``ignore_empty=True``); ``SegmentationMeter`` averages with NaNs ignored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MetricTracker", "SegmentationMeter", "dice_score", "iou_score"]


def _binary(x: Tensor, threshold: float) -> Tensor:
    # Bool masks are used as they are; anything else counts as foreground strictly above threshold
    # (MedCLIPSeg and MONAI-based pipelines use ``prob > 0.5``).
    return x if x.dtype == torch.bool else x > threshold


def _counts(pred: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ``|P ∩ G|``, ``|P|``, ``|G|`` as int64 ``(B,)`` tensors."""
    if pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(
            f"pred must have shape (B, 1, H, W), got {tuple(pred.shape)}; score several prompts "
            "per image by flattening them into the batch, (B * C, 1, H, W)"
        )
    if target.shape != pred.shape:
        raise ValueError(
            f"target must have the same shape as pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    p = _binary(pred, threshold)
    g = _binary(target, 0.5)  # ground truth in {0, 1} (or bool); soft labels binarised at 0.5
    dims = (1, 2, 3)
    return (p & g).sum(dims), p.sum(dims), g.sum(dims)


def dice_score(
    pred: Tensor, target: Tensor, *, threshold: float = 0.5, empty_score: float = 1.0
) -> Tensor:
    """Per-image Dice coefficient ``2·|P ∩ G| / (|P| + |G|)`` of binarised masks.

    Args:
        pred: ``(B, 1, H, W)`` probabilities (binarised as ``pred > threshold``) or a bool mask.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5) or bool.
        threshold: probability threshold for ``pred``.
        empty_score: score of an image whose prediction and ground truth are both empty (1.0 as in
            medvlsm; NaN to exclude such images from means).

    Returns:
        ``(B,)`` float32 scores in [0, 1] on ``pred``'s device.
    """
    inter, p_sum, g_sum = _counts(pred, target, threshold)
    denom = p_sum + g_sum
    score = 2.0 * inter.float() / denom.clamp_min(1).float()
    return torch.where(denom > 0, score, torch.full_like(score, empty_score))


def iou_score(
    pred: Tensor, target: Tensor, *, threshold: float = 0.5, empty_score: float = 1.0
) -> Tensor:
    """Per-image intersection over union (Jaccard) ``|P ∩ G| / |P ∪ G|`` of binarised masks.

    Args:
        pred: ``(B, 1, H, W)`` probabilities (binarised as ``pred > threshold``) or a bool mask.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5) or bool.
        threshold: probability threshold for ``pred``.
        empty_score: score when both masks are empty (see ``dice_score``).

    Returns:
        ``(B,)`` float32 scores in [0, 1] on ``pred``'s device.
    """
    inter, p_sum, g_sum = _counts(pred, target, threshold)
    union = p_sum + g_sum - inter
    score = inter.float() / union.clamp_min(1).float()
    return torch.where(union > 0, score, torch.full_like(score, empty_score))


class MetricTracker:
    """Running weighted means of named scalar metrics.

    Keeps a float64 sum and a count per name, so it is exact for any number of updates and easy to
    all-reduce across processes later (sum the ``sums`` and ``counts``).

    Example::

        tracker = MetricTracker()
        tracker.update("loss", 0.7, n=8)            # a batch mean over 8 samples
        tracker.update("dice", torch.tensor([1.0, 0.5]))  # per-sample values
        tracker.compute()  # {"loss": 0.7, "dice": 0.75}
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.sums.clear()
        self.counts.clear()

    def update(self, name: str, value: Tensor | float, *, n: int = 1) -> None:
        """Add values for metric ``name``.

        Args:
            name: metric name.
            value: a tensor with one element per sample (``(B,)``; each element counts once), or a
                Python / 0-d scalar that is the mean over ``n`` samples.
            n: number of samples a scalar ``value`` averages over; ignored for per-sample tensors.
        """
        if isinstance(value, Tensor) and value.ndim > 0:
            total, count = float(value.detach().double().sum()), value.numel()
        else:
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            total, count = float(value) * n, n
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def compute(self) -> dict[str, float]:
        """Mean of every metric seen since the last ``reset``."""
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def __repr__(self) -> str:
        means = ", ".join(f"{k}={v:.4f}" for k, v in self.compute().items())
        return f"{type(self).__name__}({means})"


class SegmentationMeter:
    """Accumulates per-image Dice and IoU over batches and reports their means.

    Means are over images, not over batches, so uneven batch sizes do not bias them. NaN scores
    (``empty_score=float("nan")``) are left out of the means.

    Args:
        threshold: probability threshold for predictions.
        empty_score: score of an image with empty prediction and empty ground truth.
    """

    def __init__(self, *, threshold: float = 0.5, empty_score: float = 1.0) -> None:
        self.threshold = threshold
        self.empty_score = empty_score
        self._scores: dict[str, list[Tensor]] = {"dice": [], "iou": []}

    def reset(self) -> None:
        """Forget all accumulated scores."""
        for values in self._scores.values():
            values.clear()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Score a batch and keep the scores.

        Args:
            pred: ``(B, 1, H, W)`` probabilities or bool masks.
            target: ``(B, 1, H, W)`` ground truth.

        Returns:
            ``{"dice": (B,), "iou": (B,)}`` the batch's per-image scores.
        """
        kwargs = {"threshold": self.threshold, "empty_score": self.empty_score}
        batch = {
            "dice": dice_score(pred, target, **kwargs),
            "iou": iou_score(pred, target, **kwargs),
        }
        for name, values in batch.items():
            self._scores[name].append(values.detach().cpu())
        return batch

    def scores(self) -> dict[str, Tensor]:
        """All per-image scores so far, ``{"dice": (N,), "iou": (N,)}``."""
        return {
            name: torch.cat(values) if values else torch.zeros(0)
            for name, values in self._scores.items()
        }

    @property
    def count(self) -> int:
        """Number of images scored."""
        return sum(v.numel() for v in self._scores["dice"])

    def compute(self) -> dict[str, float]:
        """``{"dice": mean, "iou": mean}`` over images (NaN when nothing was scored)."""
        return {name: _nanmean(values) for name, values in self.scores().items()}


def _nanmean(values: Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.double().mean()) if kept.numel() else math.nan
