"""Segmentation and calibration metrics for binary masks, per image and aggregated over a data set.

Overlap. Dice and IoU are computed per image on binarised masks and then averaged over images
("samplewise" aggregation), as in the medvlsm / TuneVLSeg evaluation (MONAI ``compute_dice`` /
``compute_iou`` with ``ignore_empty=False``) and MedCLIPSeg's DSC:

    Dice = 2·|P ∩ G| / (|P| + |G|)        IoU = |P ∩ G| / |P ∪ G|

Boundaries. The normalised surface Dice (NSD, Nikolov et al. 2021, "Clinically applicable
segmentation of head and neck anatomy for radiotherapy", arXiv 1809.04430) and the (percentile)
Hausdorff distance compare the boundaries ∂P and ∂G of the two masks. A boundary pixel is a
foreground pixel with a background 4-neighbour (pixels outside the image count as background), i.e.
``mask XOR binary_erosion(mask)`` as in MONAI. With ``d(x, S)`` the Euclidean distance from pixel
``x`` to the nearest pixel of ``S`` (scaled by the pixel ``spacing``):

    NSD_τ = (|{x ∈ ∂P : d(x, ∂G) ≤ τ}| + |{y ∈ ∂G : d(y, ∂P) ≤ τ}|) / (|∂P| + |∂G|)
    HD_q  = max(q-th percentile of {d(x, ∂G)}_{x ∈ ∂P}, q-th percentile of {d(y, ∂P)}_{y ∈ ∂G})

with τ = 2 pixels by default (MedCLIP-SAMv2) and q = 95 for HD95 (CoTexNet), percentiles with
linear interpolation (``numpy.percentile`` / ``torch.quantile``). Boundaries are counted in pixels,
which is MONAI's ``compute_surface_dice(use_subvoxels=False)``; DeepMind's ``surface-distance``
package weights boundary elements by their length instead and can differ by a few percent.
Distances are exact: every boundary point is compared with every boundary point of the other mask
(in chunks), so no scipy distance transform is needed. When MONAI is installed
(``pip install 'vlsegkit[metrics]'``) ``backend="auto"`` hands NSD and HD to it instead; both
backends return the same numbers, with the conventions below.

Calibration. For probabilities ``p`` and ground truth ``y`` the Brier score is the pixel mean of
``(p - y)²`` (Brier 1950), and the expected calibration error (Guo et al. 2017, "On calibration of
modern neural networks") splits the pixels into ``num_bins`` equal-width confidence bins
``[k/M, (k+1)/M)`` (the last one closed) and sums the gap between accuracy and confidence:

    ECE = Σ_k (n_k / n) · |acc_k − conf_k|

``mode="top_label"`` (default) uses the confidence ``max(p, 1 − p)`` of the predicted label
``p > 0.5`` and its correctness; ``mode="positive"`` bins the foreground probability ``p`` itself
and compares it with the foreground frequency (a reliability diagram of the positive class).

Empty masks (per image; every convention is a keyword argument):

==========  =============================  ==============================  =======================
metric      prediction and GT both empty   exactly one of them empty       keyword
==========  =============================  ==============================  =======================
Dice, IoU   ``empty_score = 1.0``          0                               ``empty_score``
NSD         ``empty_score = 1.0``          0                               ``empty_score``
HD / HD95   ``empty_score = nan``          ``missing_score = nan``         both
==========  =============================  ==============================  =======================

Dice, IoU and NSD follow medvlsm and MedCLIP-SAMv2 (an empty/empty image scores 1: the model
correctly found nothing); pass ``empty_score=float("nan")`` for MONAI's behaviour (such images are
left out of means). The Hausdorff distance is undefined without two boundaries; like MONAI (and
CoTexNet, which drops NaNs) it is NaN by default, and ``missing_score=float("inf")`` or a finite
penalty (e.g. the image diagonal) makes missed lesions count. The meters average with NaNs ignored.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CalibrationMeter",
    "MetricTracker",
    "SegmentationMeter",
    "brier_score",
    "dice_score",
    "expected_calibration_error",
    "hausdorff_distance",
    "hd95",
    "iou_score",
    "mask_boundary",
    "normalized_surface_dice",
    "pixel_accuracy",
    "retrieval_accuracy",
    "retrieval_hits",
    "retrieval_ranks",
    "soft_dice_score",
    "surface_distances",
]

_EXTRA_HINT = "install the optional extra with `pip install 'vlsegkit[metrics]'` (monai and scipy)"
# Pairwise distances are computed in blocks of at most this many entries (~32 MB in float64).
_CHUNK = 1 << 22


def _binary(x: Tensor, threshold: float) -> Tensor:
    # Bool masks are used as they are; anything else counts as foreground strictly above threshold
    # (MedCLIPSeg and MONAI-based pipelines use ``prob > 0.5``).
    return x if x.dtype == torch.bool else x > threshold


def _check_threshold(threshold: float) -> None:
    # 0 and 1 are excluded: "p > 0" calls every non-zero probability foreground and "p > 1" nothing.
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0 < threshold < 1
    ):
        raise ValueError(
            f"threshold must be a probability strictly between 0 and 1, got {threshold!r}"
        )


def _check_values(pred: Tensor, target: Tensor) -> None:
    """``pred`` and ``target`` in [0, 1] without NaN: one min/max reduction each, one device sync."""
    checked = [
        (name, t)
        for name, t in (("pred", pred), ("target", target))
        if t.dtype != torch.bool and t.numel() > 0
    ]
    if not checked:
        return
    bounds = torch.stack(
        [bound.double() for _, t in checked for bound in torch.aminmax(t.detach())]
    ).tolist()
    for i, (name, _) in enumerate(checked):
        lo, hi = bounds[2 * i], bounds[2 * i + 1]
        if lo >= 0 and hi <= 1:  # False for NaN, which aminmax propagates
            continue
        found = (
            "NaN values" if math.isnan(lo) or math.isnan(hi) else f"values in [{lo:.4g}, {hi:.4g}]"
        )
        if name == "pred":
            raise ValueError(
                "pred must hold probabilities in [0, 1] (apply torch.sigmoid to logits first) or be "
                f"a bool mask, got {found}"
            )
        raise ValueError(
            "target must hold ground truth in [0, 1] (divide 0/255 masks by 255) or be a bool "
            f"mask, got {found}"
        )


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(
            f"pred must have shape (B, 1, H, W), got {tuple(pred.shape)}; score several prompts "
            "per image by flattening them into the batch, (B * C, 1, H, W)"
        )
    if target.shape != pred.shape:
        raise ValueError(
            f"target must have the same shape as pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    _check_values(pred, target)


def _binary_pair(pred: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Validated ``(B, H, W)`` bool prediction and ground truth."""
    _check_threshold(threshold)
    _check_pair(pred, target)
    # Ground truth in {0, 1} (or bool); soft labels are binarised at 0.5.
    return _binary(pred, threshold)[:, 0], _binary(target, 0.5)[:, 0]


def _counts(pred: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ``|P ∩ G|``, ``|P|``, ``|G|`` as int64 ``(B,)`` tensors."""
    p, g = _binary_pair(pred, target, threshold)
    dims = (1, 2)
    return (p & g).sum(dims), p.sum(dims), g.sum(dims)


def dice_score(
    pred: Tensor, target: Tensor, *, threshold: float = 0.5, empty_score: float = 1.0
) -> Tensor:
    """Per-image Dice coefficient ``2·|P ∩ G| / (|P| + |G|)`` of binarised masks.

    Args:
        pred: ``(B, 1, H, W)`` probabilities in [0, 1] (binarised as ``pred > threshold``) or a
            bool mask; logits and NaN raise.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.
        threshold: probability threshold for ``pred``, strictly between 0 and 1.
        empty_score: score of an image whose prediction and ground truth are both empty (1.0 as in
            medvlsm; NaN to exclude such images from means).

    Returns:
        ``(B,)`` float32 scores in [0, 1] on ``pred``'s device.

    Raises:
        ValueError: shapes differ from ``(B, 1, H, W)``, values outside [0, 1] or NaN in ``pred``
            or ``target``, or ``threshold`` not in (0, 1).
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
        pred: ``(B, 1, H, W)`` probabilities in [0, 1] (binarised as ``pred > threshold``) or a
            bool mask; logits and NaN raise.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.
        threshold: probability threshold for ``pred``, strictly between 0 and 1.
        empty_score: score when both masks are empty (see ``dice_score``).

    Returns:
        ``(B,)`` float32 scores in [0, 1] on ``pred``'s device.

    Raises:
        ValueError: shapes differ from ``(B, 1, H, W)``, values outside [0, 1] or NaN in ``pred``
            or ``target``, or ``threshold`` not in (0, 1).
    """
    inter, p_sum, g_sum = _counts(pred, target, threshold)
    union = p_sum + g_sum - inter
    score = inter.float() / union.clamp_min(1).float()
    return torch.where(union > 0, score, torch.full_like(score, empty_score))


def soft_dice_score(pred: Tensor, target: Tensor, *, empty_score: float = 1.0) -> Tensor:
    """Per-image Dice of soft probabilities, ``2·Σ p·g / (Σ p + Σ g)`` (no threshold).

    CoTexNet reports this Dice (torchmetrics ``DiceScore`` run on the sigmoid probabilities in its
    released evaluation): a confident correct prediction scores higher than a hesitant one.

    Args:
        pred: ``(B, 1, H, W)`` probabilities in [0, 1] (bool masks are taken as 0/1).
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (soft labels are used as they are).
        empty_score: score when ``Σ p + Σ g = 0``.

    Returns:
        ``(B,)`` float32 scores in [0, 1].
    """
    _check_pair(pred, target)
    p, g = pred.double().flatten(1), target.double().flatten(1)
    denom = p.sum(1) + g.sum(1)
    score = 2.0 * (p * g).sum(1) / denom.clamp_min(1e-12)
    return torch.where(denom > 0, score, torch.full_like(score, empty_score)).float()


def pixel_accuracy(pred: Tensor, target: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Per-image pixel accuracy ``|{P = G}| / (H·W)`` of binarised masks (CoTexNet's PA).

    Args:
        pred: ``(B, 1, H, W)`` probabilities (binarised as ``pred > threshold``) or bool.
        target: ``(B, 1, H, W)`` ground truth (binarised at 0.5) or bool.
        threshold: probability threshold, strictly between 0 and 1.

    Returns:
        ``(B,)`` float32 accuracies in [0, 1].
    """
    p, g = _binary_pair(pred, target, threshold)
    return (p == g).flatten(1).float().mean(1)


# --------------------------------------------------------------------------- surface distances
def mask_boundary(mask: Tensor) -> Tensor:
    """Boundary pixels of binary masks: foreground pixels with a background 4-neighbour.

    Equals ``mask ^ scipy.ndimage.binary_erosion(mask)`` with the default cross-shaped structuring
    element and pixels outside the image counted as background (MONAI's ``get_mask_edges``).

    Args:
        mask: ``(..., H, W)`` bool (or 0/1) masks.

    Returns:
        ``(..., H, W)`` bool boundary masks.
    """
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape (..., H, W), got {tuple(mask.shape)}")
    fg = mask.bool()
    # Zero padding makes the image border a background neighbour.
    padded = torch.nn.functional.pad(fg.to(torch.uint8), (1, 1, 1, 1)).bool()
    interior = (
        padded[..., :-2, 1:-1]
        & padded[..., 2:, 1:-1]
        & padded[..., 1:-1, :-2]
        & padded[..., 1:-1, 2:]
    )
    return fg & ~interior


def _spacing_pair(spacing: float | Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    if isinstance(spacing, numbers.Real):
        spacing = (float(spacing), float(spacing))
    values = tuple(float(s) for s in spacing)
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"spacing must be a positive number or (spacing_y, spacing_x), got {spacing!r}"
        )
    return values


def _nearest_distances(src: Tensor, dst: Tensor) -> Tensor:
    """Euclidean distance from each ``src`` point ``(n, 2)`` to the nearest ``dst`` point."""
    out = torch.empty(src.shape[0], dtype=src.dtype, device=src.device)
    step = max(1, _CHUNK // max(dst.shape[0], 1))
    for start in range(0, src.shape[0], step):
        block = src[start : start + step]
        # The matrix-multiply shortcut of cdist loses precision to cancellation; distances between
        # nearby boundary points must be exact, so use the direct difference form.
        dist = torch.cdist(block, dst, compute_mode="donot_use_mm_for_euclid_dist")
        out[start : start + step] = dist.amin(dim=1)
    return out


def surface_distances(
    pred: Tensor, target: Tensor, *, spacing: float | Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """Directed boundary distances between two 2-D binary masks (exact, brute force).

    Args:
        pred: ``(H, W)`` bool (or 0/1) mask.
        target: ``(H, W)`` bool (or 0/1) mask.
        spacing: pixel size, a number or ``(spacing_y, spacing_x)``; distances are in these units
            (default 1: pixels).

    Returns:
        ``(d_pred_to_target, d_target_to_pred)``: float64 tensors with, for every boundary pixel of
        ``pred`` (resp. ``target``) in raster order, the distance to the nearest boundary pixel of
        the other mask. ``inf`` when the other mask is empty; empty tensors for an empty mask.
    """
    if pred.ndim != 2 or target.shape != pred.shape:
        raise ValueError(
            "pred and target must be (H, W) masks of the same shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    scale = torch.tensor(_spacing_pair(spacing), dtype=torch.float64, device=pred.device)
    points = [mask_boundary(m).nonzero().to(torch.float64) * scale for m in (pred, target)]

    def directed(src: Tensor, dst: Tensor) -> Tensor:
        if dst.shape[0] == 0:
            return torch.full((src.shape[0],), math.inf, dtype=torch.float64, device=src.device)
        return _nearest_distances(src, dst)

    return directed(points[0], points[1]), directed(points[1], points[0])


@functools.cache
def _monai_import_error() -> str | None:
    """None when MONAI's surface metrics are usable, else why not (checked once per process)."""
    try:
        import monai.metrics  # noqa: F401
        import scipy.ndimage  # noqa: F401  (MONAI's surface metrics need scipy)
    except ImportError as err:
        return str(err)
    return None


def _check_backend(backend: str) -> str:
    if backend not in ("auto", "torch", "monai"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'monai', got {backend!r}")
    if backend == "torch":
        return backend
    error = _monai_import_error()
    if error is None:
        return "monai"
    if backend == "monai":
        raise ImportError(f"backend='monai' needs MONAI and scipy ({error}): {_EXTRA_HINT}")
    return "torch"


def _monai_surface(
    kind: str, pred: Tensor, target: Tensor, value: float | None, spacing: tuple[float, float]
) -> Tensor:
    """NSD (``value`` = tolerance) or HD (``value`` = percentile or None) per image via MONAI."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    # A single foreground channel with include_background=True: MONAI scores exactly that channel.
    y_pred = pred[:, None].float().cpu()
    y = target[:, None].float().cpu()
    if kind == "nsd":
        out = compute_surface_dice(
            y_pred, y, class_thresholds=[value], include_background=True, spacing=list(spacing)
        )
    else:
        out = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=value, spacing=list(spacing)
        )
    return out[:, 0].to(device=pred.device, dtype=torch.float64)


def _surface_scores(
    kind: str,
    pred: Tensor,
    target: Tensor,
    *,
    value: float | None,
    threshold: float,
    spacing: float | Sequence[float] | None,
    empty_score: float,
    missing_score: float,
    backend: str,
) -> Tensor:
    p, g = _binary_pair(pred, target, threshold)
    spacing_yx = _spacing_pair(spacing)
    backend = _check_backend(backend)
    p_any, g_any = p.flatten(1).any(1), g.flatten(1).any(1)
    both = p_any & g_any
    scores = torch.empty(p.shape[0], dtype=torch.float64, device=pred.device)
    if bool(both.any()):
        if backend == "monai":
            scores[both] = _monai_surface(kind, p[both], g[both], value, spacing_yx)
        else:
            for b in both.nonzero()[:, 0].tolist():
                d_pg, d_gp = surface_distances(p[b], g[b], spacing=spacing_yx)
                scores[b] = _nsd(d_pg, d_gp, value) if kind == "nsd" else _hd(d_pg, d_gp, value)
    scores[~p_any & ~g_any] = empty_score
    scores[p_any ^ g_any] = missing_score
    return scores.float()


def _nsd(d_pg: Tensor, d_gp: Tensor, tolerance: float) -> Tensor:
    correct = (d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()
    return correct.double() / (d_pg.numel() + d_gp.numel())


def _hd(d_pg: Tensor, d_gp: Tensor, percentile: float | None) -> Tensor:
    if percentile is None:
        return torch.maximum(d_pg.max(), d_gp.max())
    q = percentile / 100
    return torch.maximum(torch.quantile(d_pg, q), torch.quantile(d_gp, q))


def normalized_surface_dice(
    pred: Tensor,
    target: Tensor,
    *,
    tolerance: float = 2.0,
    threshold: float = 0.5,
    spacing: float | Sequence[float] | None = None,
    empty_score: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Per-image normalised surface Dice (NSD) at a boundary tolerance.

    ``NSD_τ = (|{x ∈ ∂P : d(x, ∂G) ≤ τ}| + |{y ∈ ∂G : d(y, ∂P) ≤ τ}|) / (|∂P| + |∂G|)`` (Nikolov
    et al. 2021), boundary pixels counted as in MONAI ``compute_surface_dice`` (see the module
    docstring).

    Args:
        pred: ``(B, 1, H, W)`` probabilities in [0, 1] (binarised as ``pred > threshold``) or a
            bool mask; logits and NaN raise.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.
        tolerance: τ, the accepted boundary deviation in ``spacing`` units (pixels by default; 2 as
            in MedCLIP-SAMv2).
        threshold: probability threshold for ``pred``, strictly between 0 and 1.
        spacing: pixel size, a number or ``(spacing_y, spacing_x)`` (default 1).
        empty_score: score when both masks are empty (1.0; NaN for MONAI's behaviour). Exactly
            one empty mask scores 0.
        backend: ``"auto"`` (MONAI if installed, else the built-in exact computation),
            ``"torch"`` (built-in) or ``"monai"`` (ImportError naming the ``vlsegkit[metrics]``
            extra if MONAI or scipy is missing).

    Returns:
        ``(B,)`` float32 scores in [0, 1] on ``pred``'s device.
    """
    if not (isinstance(tolerance, numbers.Real) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return _surface_scores(
        "nsd",
        pred,
        target,
        value=float(tolerance),
        threshold=threshold,
        spacing=spacing,
        empty_score=empty_score,
        missing_score=0.0,
        backend=backend,
    )


def hausdorff_distance(
    pred: Tensor,
    target: Tensor,
    *,
    percentile: float | None = 95.0,
    threshold: float = 0.5,
    spacing: float | Sequence[float] | None = None,
    empty_score: float = math.nan,
    missing_score: float = math.nan,
    backend: str = "auto",
) -> Tensor:
    """Per-image symmetric (percentile) Hausdorff distance between mask boundaries.

    ``HD_q = max(P_q{d(x, ∂G)}_{x ∈ ∂P}, P_q{d(y, ∂P)}_{y ∈ ∂G})`` with ``P_q`` the q-th
    percentile (linear interpolation), as MONAI ``compute_hausdorff_distance``; q = 95 is HD95
    (CoTexNet), ``percentile=None`` the classical maximum.

    Args:
        pred: ``(B, 1, H, W)`` probabilities in [0, 1] (binarised as ``pred > threshold``) or a
            bool mask; logits and NaN raise.
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.
        percentile: q in [0, 100], or None for the maximum distance.
        threshold: probability threshold for ``pred``, strictly between 0 and 1.
        spacing: pixel size, a number or ``(spacing_y, spacing_x)``; distances are in these units.
        empty_score: value when both masks are empty (NaN: undefined, dropped from meter means).
        missing_score: value when exactly one mask is empty (NaN as MONAI; ``inf`` or a finite
            penalty such as the image diagonal to count missed or hallucinated lesions).
        backend: ``"auto"``, ``"torch"`` or ``"monai"`` (see ``normalized_surface_dice``).

    Returns:
        ``(B,)`` float32 distances on ``pred``'s device.
    """
    if percentile is not None and not (
        isinstance(percentile, numbers.Real) and 0 <= percentile <= 100
    ):
        raise ValueError(f"percentile must be in [0, 100] or None, got {percentile!r}")
    return _surface_scores(
        "hd",
        pred,
        target,
        value=None if percentile is None else float(percentile),
        threshold=threshold,
        spacing=spacing,
        empty_score=empty_score,
        missing_score=missing_score,
        backend=backend,
    )


def hd95(pred: Tensor, target: Tensor, **kwargs: Any) -> Tensor:
    """The 95th-percentile Hausdorff distance, ``hausdorff_distance(..., percentile=95)``.

    Args:
        pred: ``(B, 1, H, W)`` probabilities or bool mask.
        target: ``(B, 1, H, W)`` ground truth.
        **kwargs: any other keyword of ``hausdorff_distance``.

    Returns:
        ``(B,)`` float32 distances.
    """
    return hausdorff_distance(pred, target, percentile=95.0, **kwargs)


# --------------------------------------------------------------------------- calibration
def _probabilities(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validated float64 ``(B, H*W)`` probabilities and {0, 1} ground truth."""
    if not (pred.dtype == torch.bool or pred.is_floating_point()):
        raise ValueError(f"pred must be a float probability or bool tensor, got {pred.dtype}")
    _check_pair(pred, target)  # shapes, and values in [0, 1]
    return pred.double().flatten(1), _binary(target, 0.5).flatten(1).double()


def brier_score(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image Brier score, the pixel mean of ``(p − y)²`` (Brier 1950; lower is better).

    Differentiable in ``pred``: it is the mean squared error of the probabilities.

    Args:
        pred: ``(B, 1, H, W)`` foreground probabilities in [0, 1].
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.

    Returns:
        ``(B,)`` scores in [0, 1], float32 (float64 for float64 input).
    """
    prob, y = _probabilities(pred, target)
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return (prob - y).square().mean(1).to(out_dtype)


def _check_calibration_args(num_bins: int, mode: str) -> None:
    if not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if mode not in ("top_label", "positive"):
        raise ValueError(f"mode must be 'top_label' or 'positive', got {mode!r}")


def _calibration_bins(
    pred: Tensor, target: Tensor, num_bins: int, mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image, per-bin pixel counts, confidence and accuracy sums, each ``(B, M)`` float64."""
    _check_calibration_args(num_bins, mode)
    prob, y = _probabilities(pred, target)
    if mode == "top_label":
        fg = prob > 0.5
        conf = torch.where(fg, prob, 1 - prob)
        acc = (fg.double() == y).double()
    else:
        conf, acc = prob, y
    # Bins [k/M, (k+1)/M); confidence 1 falls in the last bin.
    index = (conf * num_bins).floor().long().clamp_(0, num_bins - 1)
    shape = (prob.shape[0], num_bins)
    counts = torch.zeros(shape, dtype=torch.float64, device=prob.device)
    conf_sum, acc_sum = torch.zeros_like(counts), torch.zeros_like(counts)
    counts.scatter_add_(1, index, torch.ones_like(conf))
    conf_sum.scatter_add_(1, index, conf)
    acc_sum.scatter_add_(1, index, acc)
    return counts, conf_sum, acc_sum


def _ece_from_bins(counts: Tensor, conf_sum: Tensor, acc_sum: Tensor) -> Tensor:
    # Σ_k (n_k / n)·|acc_k − conf_k| = Σ_k |Σacc_k − Σconf_k| / n: no division by empty bins.
    return (acc_sum - conf_sum).abs().sum(-1) / counts.sum(-1).clamp_min(1)


def expected_calibration_error(
    pred: Tensor, target: Tensor, *, num_bins: int = 15, mode: str = "top_label"
) -> Tensor:
    """Per-image expected calibration error over the image's pixels (Guo et al. 2017).

    ``ECE = Σ_k (n_k / n)·|acc_k − conf_k|`` over ``num_bins`` equal-width confidence bins; see the
    module docstring for the two ``mode`` definitions. For the data-set ECE pooled over all
    pixels use ``CalibrationMeter``.

    Args:
        pred: ``(B, 1, H, W)`` foreground probabilities in [0, 1].
        target: ``(B, 1, H, W)`` ground truth in {0, 1} (binarised at 0.5; values outside [0, 1]
            raise) or bool.
        num_bins: number of equal-width bins on [0, 1] (15 as torchmetrics).
        mode: ``"top_label"`` (confidence of the predicted label) or ``"positive"`` (foreground
            probability against foreground frequency).

    Returns:
        ``(B,)`` float32 errors in [0, 1].
    """
    return _ece_from_bins(*_calibration_bins(pred, target, num_bins, mode)).float()


class CalibrationMeter:
    """Pools pixels over batches for the data-set ECE, Brier score and reliability diagram.

    Unlike the per-image mean of ``expected_calibration_error``, the bins collect every pixel of
    every image, which is the usual "ECE of a segmentation model".

    Args:
        num_bins: number of equal-width confidence bins.
        mode: ``"top_label"`` or ``"positive"`` (see ``expected_calibration_error``).
    """

    def __init__(self, *, num_bins: int = 15, mode: str = "top_label") -> None:
        _check_calibration_args(num_bins, mode)
        self.num_bins = int(num_bins)
        self.mode = mode
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated pixels."""
        zeros = torch.zeros(self.num_bins, dtype=torch.float64)
        self._counts, self._conf, self._acc = zeros.clone(), zeros.clone(), zeros.clone()
        self._squared_error = 0.0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of ``(B, 1, H, W)`` probabilities and ground-truth masks."""
        counts, conf, acc = _calibration_bins(pred, target, self.num_bins, self.mode)
        self._counts += counts.sum(0).cpu()
        self._conf += conf.sum(0).cpu()
        self._acc += acc.sum(0).cpu()
        prob, y = _probabilities(pred, target)
        self._squared_error += float((prob - y).square().sum())

    @property
    def count(self) -> int:
        """Number of pixels seen."""
        return int(self._counts.sum())

    def compute(self) -> dict[str, float]:
        """``{"ece": ..., "brier": ...}`` over all pixels seen (NaN when nothing was seen)."""
        if self.count == 0:
            return {"ece": math.nan, "brier": math.nan}
        ece = float(_ece_from_bins(self._counts, self._conf, self._acc))
        return {"ece": ece, "brier": self._squared_error / self.count}

    def reliability(self) -> dict[str, Tensor]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (NaN for empty bins), float64."""
        safe = self._counts.clamp_min(1)
        empty = self._counts == 0
        nan = torch.full_like(safe, math.nan)
        return {
            "count": self._counts.clone(),
            "confidence": torch.where(empty, nan, self._conf / safe),
            "accuracy": torch.where(empty, nan, self._acc / safe),
        }


# --------------------------------------------------------------------------- aggregation
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


_METRICS = ("dice", "iou", "nsd", "hd95", "hd", "brier", "ece")


class SegmentationMeter:
    """Accumulates per-image scores over batches and reports their means over images.

    Means are over images, not over batches, so uneven batch sizes do not bias them. NaN scores
    (e.g. ``empty_score=float("nan")``, or HD95 with an empty mask) are left out of the means.

    Args:
        metrics: names to compute, any of ``"dice"``, ``"iou"``, ``"nsd"``, ``"hd95"``, ``"hd"``
            (maximum), ``"brier"``, ``"ece"`` (per-image ECE; see ``CalibrationMeter`` for the
            pooled one). Brier and ECE need probabilities, not bool masks.
        threshold: probability threshold for predictions, strictly between 0 and 1 (else
            ``ValueError``).
        empty_score: score of an image with empty prediction and empty ground truth for Dice, IoU
            and NSD (the Hausdorff distances keep their NaN conventions).
        tolerance: NSD tolerance in ``spacing`` units.
        spacing: pixel size for NSD / HD, a number or ``(spacing_y, spacing_x)``.
        num_bins: ECE bins.
        backend: ``"auto"``, ``"torch"`` or ``"monai"`` for NSD / HD.
    """

    def __init__(
        self,
        *,
        metrics: Sequence[str] = ("dice", "iou"),
        threshold: float = 0.5,
        empty_score: float = 1.0,
        tolerance: float = 2.0,
        spacing: float | Sequence[float] | None = None,
        num_bins: int = 15,
        backend: str = "auto",
    ) -> None:
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in _METRICS]
        if not metrics or unknown or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be distinct names among {_METRICS}, got {metrics!r}")
        self.metrics = metrics
        _check_threshold(threshold)
        self.threshold = threshold
        self.empty_score = empty_score
        self.tolerance = tolerance
        self.spacing = spacing
        self.num_bins = num_bins
        self.backend = backend
        self._scores: dict[str, list[Tensor]] = {name: [] for name in metrics}

    def reset(self) -> None:
        """Forget all accumulated scores."""
        for values in self._scores.values():
            values.clear()

    def _score(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        overlap = {"threshold": self.threshold, "empty_score": self.empty_score}
        surface = {"threshold": self.threshold, "spacing": self.spacing, "backend": self.backend}
        if name == "dice":
            return dice_score(pred, target, **overlap)
        if name == "iou":
            return iou_score(pred, target, **overlap)
        if name == "nsd":
            return normalized_surface_dice(
                pred, target, tolerance=self.tolerance, empty_score=self.empty_score, **surface
            )
        if name in ("hd95", "hd"):
            return hausdorff_distance(
                pred, target, percentile=95.0 if name == "hd95" else None, **surface
            )
        if name == "brier":
            return brier_score(pred, target)
        return expected_calibration_error(pred, target, num_bins=self.num_bins)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Score a batch and keep the scores.

        Args:
            pred: ``(B, 1, H, W)`` probabilities or bool masks.
            target: ``(B, 1, H, W)`` ground truth.

        Returns:
            ``{name: (B,)}`` the batch's per-image scores, one entry per requested metric.
        """
        batch = {name: self._score(name, pred, target) for name in self.metrics}
        for name, values in batch.items():
            self._scores[name].append(values.detach().float().cpu())
        return batch

    def scores(self) -> dict[str, Tensor]:
        """All per-image scores so far, ``{name: (N,)}``."""
        return {
            name: torch.cat(values) if values else torch.zeros(0)
            for name, values in self._scores.items()
        }

    @property
    def count(self) -> int:
        """Number of images scored."""
        return sum(v.numel() for v in self._scores[self.metrics[0]])

    def compute(self) -> dict[str, float]:
        """``{name: mean}`` over images, NaNs ignored (NaN when nothing was scored)."""
        return {name: _nanmean(values) for name, values in self.scores().items()}


def _nanmean(values: Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.double().mean()) if kept.numel() else math.nan


# --------------------------------------------------------------------------- image-text retrieval
# Cross-modal retrieval of paired embeddings (MedCLIP-SAMv2 §3.4.1 / Table 2): image i's caption is
# text i. For image query i, the rank of its caption is the number of texts scoring *strictly*
# higher (so identical captions elsewhere in the set -- common in medical data -- tie in its favour,
# whatever order a sort would pick); it is found in the top k when that rank is < k. Text queries
# are scored the same way over the images.


def _check_pairs(image_embeds: Tensor, text_embeds: Tensor) -> None:
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(x, Tensor) or x.dim() != 2 or 0 in x.shape or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be a floating-point (N, D) tensor with N, D >= 1, got {shape}"
            )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must have the same shape (N, D) (row i of each is pair i), "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return ks


def retrieval_ranks(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """Rank of the true partner of every query in a square similarity matrix.

    Args:
        similarity: ``(N, N)`` scores, ``similarity[i, j]`` between image ``i`` and text ``j``;
            the pairs are the diagonal.

    Returns:
        ``(image_to_text, text_to_image)``, each ``(N,)`` long: for image ``i`` the number of texts
        scoring strictly higher than text ``i``; for text ``j`` the number of images scoring strictly
        higher than image ``j``. 0 means retrieved first (or tied for first: :func:`retrieval_hits`
        breaks ties).
    """
    if not isinstance(similarity, Tensor) or similarity.dim() != 2:
        raise ValueError(
            f"similarity must be an (N, N) tensor, got {getattr(similarity, 'shape', similarity)!r}"
        )
    n, m = similarity.shape
    if n != m or n == 0:
        raise ValueError(f"similarity must be a non-empty square (N, N) matrix, got {(n, m)}")
    positive = similarity.diagonal()
    return (
        (similarity > positive[:, None]).sum(dim=1),
        (similarity > positive[None, :]).sum(dim=0),
    )


@torch.no_grad()
def retrieval_hits(
    image_embeds: Tensor, text_embeds: Tensor, *, ks: Sequence[int] = (1, 5)
) -> dict[str, Tensor]:
    """Per-query top-k hits of image-to-text and text-to-image retrieval within one set of pairs.

    Embeddings are compared by cosine similarity (L2-normalised here, in float32 or wider).

    Args:
        image_embeds: ``(N, D)`` image embeddings.
        text_embeds: ``(N, D)`` text embeddings; text ``i`` is the caption of image ``i``.
        ks: the ``k`` of top-k (default top-1 and top-5).

    Ties are broken at random, in expectation: a partner scoring below ``h`` candidates and equal
    to ``t`` others is among the ``k`` best with probability ``clamp((k - h) / (t + 1), 0, 1)``,
    what an arbitrary tie-break (an argsort, as open_clip's evaluation uses) gives on average. So
    embeddings that collapsed to one vector score chance (``k / N``), not 1, and two identical
    captions share the credit (0.5 each at top-1, 1 at top-2).

    Returns:
        ``{"i2t_top{k}": (N,), "t2i_top{k}": (N,)}``: the probability that the query's partner is
        among its ``k`` best matches (1.0 / 0.0 without ties; means are the top-k accuracies).

    Raises:
        ValueError: bad shapes or ``ks``, or embeddings that are not finite (a diverged model
            would otherwise rank its NaN partner first).
    """
    _check_pairs(image_embeds, text_embeds)
    ks = _check_ks(ks)
    dtype = torch.promote_types(image_embeds.dtype, torch.float32)
    image = torch.nn.functional.normalize(image_embeds.to(dtype), dim=-1)
    text = torch.nn.functional.normalize(text_embeds.to(dtype), dim=-1)
    similarity = image @ text.T
    if not torch.isfinite(similarity).all():
        raise ValueError("image_embeds / text_embeds must be finite, got NaN or inf")
    positive = similarity.diagonal()
    out: dict[str, Tensor] = {}
    for name, scores, partner in (
        ("i2t", similarity, positive[:, None]),  # rows: each image over the texts
        ("t2i", similarity.T, positive[:, None]),  # rows: each text over the images
    ):
        higher = (scores > partner).sum(dim=1).to(dtype)
        ties = (scores == partner).sum(dim=1).to(dtype) - 1  # the partner equals itself
        for k in ks:
            out[f"{name}_top{k}"] = ((k - higher) / (ties + 1)).clamp(0.0, 1.0)
    return {key: out[key] for key in [f"i2t_top{k}" for k in ks] + [f"t2i_top{k}" for k in ks]}


@torch.no_grad()
def retrieval_accuracy(
    image_embeds: Tensor,
    text_embeds: Tensor,
    *,
    ks: Sequence[int] = (1, 2),
    batch_size: int | None = 50,
    runs: int = 5,
    generator: torch.Generator | None = None,
) -> dict[str, tuple[float, float]]:
    """Top-k retrieval accuracy with MedCLIP-SAMv2's protocol (Table 2: ROCO, top-1 / top-2).

    Each run shuffles the pairs, splits them into consecutive batches of ``batch_size`` (the last one
    may be smaller) and retrieves within each batch (:func:`retrieval_hits`); the accuracy of a run
    is the mean over all queries. The paper reports mean ± std over 5 runs with batches of 50.

    Args:
        image_embeds: ``(N, D)`` image embeddings.
        text_embeds: ``(N, D)`` text embeddings, paired row by row.
        ks: the ``k`` of top-k (the paper: 1 and 2).
        batch_size: pairs per retrieval batch; None retrieves within the whole set (then one run
            is enough: the order does not matter).
        runs: number of shuffled runs.
        generator: random generator of the shuffles (reproducible runs); None uses the global RNG.

    Returns:
        ``{"i2t_top{k}": (mean, std), "t2i_top{k}": (mean, std)}`` over runs, accuracies in
        ``[0, 1]``; the std is the sample std (0 for a single run).
    """
    _check_pairs(image_embeds, text_embeds)
    ks = _check_ks(ks)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    n = image_embeds.shape[0]
    size = n if batch_size is None else batch_size
    per_run: dict[str, list[float]] = {}
    for _ in range(runs):
        order = torch.randperm(n, generator=generator).to(image_embeds.device)
        hits: dict[str, list[Tensor]] = {}
        for start in range(0, n, size):
            rows = order[start : start + size]
            for key, value in retrieval_hits(image_embeds[rows], text_embeds[rows], ks=ks).items():
                hits.setdefault(key, []).append(value)
        for key, values in hits.items():
            per_run.setdefault(key, []).append(float(torch.cat(values).double().mean()))
    out = {}
    for key, values in per_run.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = float(t.std()) if len(values) > 1 else 0.0
        out[key] = (float(t.mean()), std)
    return out
