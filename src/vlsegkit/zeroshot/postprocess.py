"""From a saliency map to a coarse mask and SAM prompts (MedCLIP-SAMv2 §3.2, Eqs. 17-20).

Two named paths, pure torch / numpy (no OpenCV, scikit-learn or scipy):

``mode="paper"`` (default), as the paper describes it:

1. Otsu's threshold η* on the saliency histogram (``bins`` bins over ``[0, 1]``; Eq. 17):
   ``Y_otsu = λ_S >= η*``.
2. Connected components of ``Y_otsu`` (8-connectivity), each with the confidence
   ``Σ p_i ŷ_i / Σ ŷ_i`` -- its mean saliency (Eq. 18); every component with confidence
   ``> η_c = 0.5`` is kept (Eq. 19), so several regions per class survive.
3. One tight box per kept component, and ``num_points`` positive points drawn without
   replacement inside each kept component (the paper samples "random points that lie within the
   contour"; 5-10 in its ablation). Each component is one SAM prompt.

``mode="released"``, what ``postprocessing/postprocess_saliency_maps.py --postprocess kmeans``
and ``segment-anything/prompt_sam.py`` of the public code do:

1. the map is resized to the image with nearest neighbour and stored as an 8-bit PNG
   (``round(255 λ) / 255``), then resized to 256x256 (nearest) and split by 2-means on the
   intensities (foreground: the cluster with the higher centroid), and resized back (nearest);
2. the ``num_components`` largest connected components are kept (ties keep more; 1 by default,
   2 for lungs in the scripts);
3. one box around all kept components (``multicontour=True``: one per component), its far corner
   clipped to ``(W - 1, H - 1)``; ``num_points`` positive points drawn from all foreground pixels
   (one point set, repeated for every box when boxes and points are combined);
4. after SAM, only the ``K`` largest components of the refined mask are kept, ``K`` the number of
   components of the coarse mask (:attr:`SaliencyPrompts.keep_components`).

The released 2-means is computed exactly (the split of the sorted intensities with the least
within-cluster squared error -- the global optimum, which scikit-learn's Lloyd iterations from
k-means++ seeds reach in practice). Note that 1-D 2-means minimises the same within-class variance
as Otsu's method; the two paths differ in the resolution and quantisation of the map they split,
in the component filter and in the prompts.

Coordinates are pixels of the image: boxes ``(x0, y0, x1, y1)`` with ``x1 = max x + 1`` (the extent
of the pixels, as OpenCV's ``boundingRect``), points ``(x, y)`` at pixel indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.synthetic import connected_components

__all__ = [
    "POINT_PAD_LABEL",
    "ComponentStatistics",
    "SaliencyPrompter",
    "SaliencyPrompts",
    "component_statistics",
    "keep_largest_components",
    "otsu_threshold",
    "two_means_threshold",
]

#: Label of padding points (``SamProcessor``'s ``point_pad_value``; SAM ignores them).
POINT_PAD_LABEL = -10


def _plane(values: Any, name: str) -> Tensor:
    t = torch.as_tensor(values)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name} must be a non-empty (H, W) map, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a float map in [0, 1], got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{name} must hold finite values in [0, 1]")
    return t


def otsu_threshold(saliency: Any, *, bins: int = 256) -> tuple[float, Tensor]:
    """Otsu's threshold on a histogram of ``bins`` equal bins over ``[0, 1]`` (Otsu 1979).

    The split maximises the between-class variance ``w0 w1 (m0 - m1)²`` of the bin centres
    (equivalently, minimises the within-class variance); ties go to the lowest split.

    Args:
        saliency: ``(H, W)`` values in ``[0, 1]``.
        bins: histogram bins (256: the 8-bit grey levels of the usual implementations).

    Returns:
        ``(η*, foreground)``: η* is the lower edge of the first foreground bin, ``foreground`` the
        ``(H, W)`` bool mask of pixels in bins at or above it (``λ >= η*``). A map whose values fall
        into a single bin has no split: η* is ``inf`` and nothing is foreground.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    s = _plane(saliency, "saliency")
    # bin indices computed once, so the mask agrees with the histogram bit for bit
    index = (s * bins).floor().long().clamp_(0, bins - 1)
    counts = torch.bincount(index.flatten(), minlength=bins).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = counts.cumsum(0)[:-1]
    w1 = counts.sum() - w0
    s0 = (counts * centres).cumsum(0)[:-1]
    s1 = (counts * centres).sum() - s0
    valid = (w0 > 0) & (w1 > 0)
    if not bool(valid.any()):
        return math.inf, torch.zeros_like(s, dtype=torch.bool)
    m0 = s0 / w0.clamp_min(1)
    m1 = s1 / w1.clamp_min(1)
    between = torch.where(valid, w0 * w1 * (m0 - m1).square(), -1.0)
    k = int(torch.argmax(between))  # classes {0..k} and {k+1..bins-1}
    return (k + 1) / bins, index > k


def two_means_threshold(values: Any) -> tuple[float, Tensor]:
    """Exact 1-D 2-means of the intensities (the released ``KMeans(n_clusters=2)`` step).

    Every split of the sorted distinct values into a low and a high cluster is scored by the
    within-cluster sum of squares; the best one (ties: the lowest split) is returned.

    Args:
        values: ``(H, W)`` intensities in ``[0, 1]``.

    Returns:
        ``(t, foreground)``: ``t`` the smallest value of the high cluster, ``foreground`` the bool
        mask ``values >= t``. A constant map has one cluster: ``t = inf``, nothing is foreground.
    """
    v = _plane(values, "values")
    distinct, counts = torch.unique(v, return_counts=True)
    if distinct.numel() < 2:
        return math.inf, torch.zeros_like(v, dtype=torch.bool)
    counts = counts.double()
    n0 = counts.cumsum(0)[:-1]
    s0 = (counts * distinct).cumsum(0)[:-1]
    n1 = counts.sum() - n0
    s1 = (counts * distinct).sum() - s0
    # SSE = Σv² - S0²/n0 - S1²/n1: minimising it maximises S0²/n0 + S1²/n1
    k = int(torch.argmax(s0.square() / n0 + s1.square() / n1))
    t = float(distinct[k + 1])
    return t, v >= t


@dataclass
class ComponentStatistics:
    """Per-component statistics of a labelled mask (components ``1 .. K``, raster order).

    Attributes:
        labels: ``(H, W)`` int32 labels (0 background).
        area: ``(K,)`` pixel counts.
        confidence: ``(K,)`` mean saliency inside each component (MedCLIP-SAMv2 Eq. 18).
        boxes: ``(K, 4)`` ``(x0, y0, x1, y1)`` pixel extents, ``x1 = max x + 1``.
    """

    labels: np.ndarray
    area: np.ndarray
    confidence: np.ndarray
    boxes: np.ndarray


def component_statistics(mask: Any, saliency: Any, *, connectivity: int = 8) -> ComponentStatistics:
    """Connected components of ``mask`` with their area, mean ``saliency`` and bounding box.

    Args:
        mask: ``(H, W)`` binary mask.
        saliency: ``(H, W)`` map the confidences are read from.
        connectivity: 8 (OpenCV's default, used by the released code) or 4.
    """
    labels, num = connected_components(
        torch.as_tensor(mask).cpu().numpy(), connectivity=connectivity
    )
    sal = np.asarray(torch.as_tensor(saliency, dtype=torch.float64).cpu())
    if sal.shape != labels.shape:
        raise ValueError(f"saliency {sal.shape} and mask {labels.shape} must have the same shape")
    flat = labels.ravel()
    area = np.bincount(flat, minlength=num + 1)[1:]
    total = np.bincount(flat, weights=sal.ravel(), minlength=num + 1)[1:]
    boxes = np.zeros((num, 4), dtype=np.float64)
    if num:
        ys, xs = np.nonzero(labels)
        lab = labels[ys, xs] - 1
        x0 = np.full(num, np.inf)
        y0 = np.full(num, np.inf)
        x1 = np.full(num, -np.inf)
        y1 = np.full(num, -np.inf)
        np.minimum.at(x0, lab, xs)
        np.minimum.at(y0, lab, ys)
        np.maximum.at(x1, lab, xs)
        np.maximum.at(y1, lab, ys)
        boxes = np.stack([x0, y0, x1 + 1, y1 + 1], axis=1)
    return ComponentStatistics(
        labels=labels,
        area=area,
        confidence=total / np.maximum(area, 1),
        boxes=boxes,
    )


@dataclass
class SaliencyPrompts:
    """A coarse mask and the SAM prompts derived from it, for one image.

    Attributes:
        saliency: ``(H, W)`` float32 saliency at the image's size (what was thresholded).
        coarse: ``(H, W)`` bool coarse segmentation (the kept components).
        boxes: ``(K, 4)`` float32 box prompts ``(x0, y0, x1, y1)``; one SAM prompt each.
        points: ``(G, P, 2)`` float32 point prompts ``(x, y)``: G = K groups (paper: the points of
            each kept component) or 1 (released: points from all foreground pixels).
        point_labels: ``(G, P)`` long: 1 for positive points, ``POINT_PAD_LABEL`` for padding.
        confidence: ``(K,)`` mean saliency of each box's component(s).
        keep_components: the released path's post-SAM filter (keep this many largest components of
            the refined mask); None for the paper's path.
    """

    saliency: Tensor
    coarse: Tensor
    boxes: Tensor
    points: Tensor
    point_labels: Tensor
    confidence: Tensor
    keep_components: int | None = None

    @property
    def empty(self) -> bool:
        """True when no region survived (SAM is then skipped and the mask is empty)."""
        return self.boxes.shape[0] == 0


def _pad_groups(groups: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Point groups of different sizes as ``(G, P, 2)`` coordinates and ``(G, P)`` labels."""
    width = max((len(g) for g in groups), default=0)
    points = torch.zeros(len(groups), width, 2, dtype=torch.float32)
    labels = torch.full((len(groups), width), POINT_PAD_LABEL, dtype=torch.long)
    for k, g in enumerate(groups):
        points[k, : len(g)] = torch.as_tensor(g, dtype=torch.float32)
        labels[k, : len(g)] = 1
    return points, labels


def _sample(xy: np.ndarray, num: int, generator: torch.Generator | None) -> np.ndarray:
    """``min(num, len(xy))`` rows of ``xy`` drawn uniformly without replacement."""
    if len(xy) <= num:
        return xy
    pick = torch.randperm(len(xy), generator=generator)[:num].numpy()
    return xy[np.sort(pick)]


def _keep_largest(labels: np.ndarray, area: np.ndarray, k: int) -> np.ndarray:
    """Ids (1-based) of the components whose area is among the k largest areas (ties kept)."""
    if area.size == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.sort(area)[::-1][:k]
    return np.nonzero(np.isin(area, top))[0] + 1


def keep_largest_components(mask: Any, k: int, *, connectivity: int = 8) -> Tensor:
    """``mask`` with only the components whose area is among the ``k`` largest (ties kept).

    The released ``write_mask_to_folder`` / post-processing rule (``sizes in top_k_sizes``).
    """
    m = torch.as_tensor(mask).cpu().numpy() != 0
    labels, num = connected_components(m, connectivity=connectivity)
    area = np.bincount(labels.ravel(), minlength=num + 1)[1:]
    keep = _keep_largest(labels, area, k)
    return torch.from_numpy(np.isin(labels, keep) & (labels > 0))


@dataclass(frozen=True)
class SaliencyPrompter:
    """Saliency map -> coarse mask -> box / point prompts (see the module docstring).

    Args:
        mode: ``"paper"`` (Otsu + component confidence, the default) or ``"released"`` (2-means on
            the 8-bit 256x256 map + largest components, as the public scripts).
        confidence: the paper's η_c: components with mean saliency above it are kept.
        num_points: positive points per prompt group (the released default 10; the paper's
            ablation uses 5-10).
        num_components: released path: components kept (1; the scripts use 2 for lungs).
        multicontour: released path: one box per component instead of one around all.
        bins: paper path: histogram bins of Otsu's method.
        kmeans_size: released path: side of the map the 2-means runs on.
        connectivity: 8 (OpenCV's default) or 4.
    """

    mode: Literal["paper", "released"] = "paper"
    confidence: float = 0.5
    num_points: int = 10
    num_components: int = 1
    multicontour: bool = False
    bins: int = 256
    kmeans_size: int = 256
    connectivity: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "released"):
            raise ValueError(f"mode must be 'paper' or 'released', got {self.mode!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
            raise ValueError(f"confidence must be a number in [0, 1), got {c!r}")
        for name, low in (("num_points", 1), ("num_components", 1), ("bins", 2),
                          ("kmeans_size", 1)):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity!r}")

    # ------------------------------------------------------------------ resizing
    def resize(self, saliency: Any, size: tuple[int, int] | None) -> Tensor:
        """The ``(h, w)`` map at the image's ``size``: bilinear (paper), or nearest neighbour then
        8-bit quantisation (released: ``cv2.resize(INTER_NEAREST)`` and a PNG round trip)."""
        s = _plane(saliency, "saliency").float()
        if size is not None and tuple(size) != tuple(s.shape):
            mode = "nearest" if self.mode == "released" else "bilinear"
            kw = {} if mode == "nearest" else {"align_corners": False}
            s = F.interpolate(s[None, None], size=tuple(size), mode=mode, **kw)[0, 0]
        if self.mode == "released":
            s = torch.round(s * 255) / 255
        return s.clamp(0, 1)

    # ------------------------------------------------------------------ main
    def __call__(
        self,
        saliency: Any,
        *,
        size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SaliencyPrompts:
        """Coarse mask and prompts of one saliency map.

        Args:
            saliency: ``(h, w)`` map in ``[0, 1]`` (e.g. one map of :class:`M2IBAttributor`).
            size: the image's ``(H, W)``; the map is resized to it first (default: as given).
            generator: draws the points (CPU generator; default the global RNG).

        Returns:
            :class:`SaliencyPrompts` at ``size``.
        """
        s = self.resize(saliency, size)
        if self.mode == "paper":
            return self._paper(s, generator)
        return self._released(s, generator)

    def _paper(self, s: Tensor, generator: torch.Generator | None) -> SaliencyPrompts:
        _, fg = otsu_threshold(s, bins=self.bins)
        stats = component_statistics(fg, s, connectivity=self.connectivity)
        kept = np.nonzero(stats.confidence > self.confidence)[0]
        coarse = np.isin(stats.labels, kept + 1) & (stats.labels > 0)
        groups = []
        for c in kept:
            ys, xs = np.nonzero(stats.labels == c + 1)
            groups.append(_sample(np.stack([xs, ys], axis=1), self.num_points, generator))
        points, labels = _pad_groups(groups)
        return SaliencyPrompts(
            saliency=s,
            coarse=torch.from_numpy(coarse),
            boxes=torch.as_tensor(stats.boxes[kept], dtype=torch.float32).reshape(-1, 4),
            points=points,
            point_labels=labels,
            confidence=torch.as_tensor(stats.confidence[kept], dtype=torch.float32),
        )

    def _released(self, s: Tensor, generator: torch.Generator | None) -> SaliencyPrompts:
        h, w = s.shape
        side = self.kmeans_size
        small = F.interpolate(s[None, None], size=(side, side), mode="nearest")[0, 0]
        _, fg_small = two_means_threshold(small)
        fg = F.interpolate(fg_small[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0
        stats = component_statistics(fg, s, connectivity=self.connectivity)
        keep = _keep_largest(stats.labels, stats.area, self.num_components)
        coarse = np.isin(stats.labels, keep) & (stats.labels > 0)
        if keep.size == 0:
            boxes = np.zeros((0, 4))
            confidence = np.zeros(0)
        elif self.multicontour:
            boxes = stats.boxes[keep - 1]
            confidence = stats.confidence[keep - 1]
        else:
            b = stats.boxes[keep - 1]
            boxes = np.array([[b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]])
            confidence = np.array([float(s.numpy()[coarse].mean())])
        if boxes.size:
            # prompt_sam.py: x1 = min(x + w, W - 1), y1 = min(y + h, H - 1)
            boxes[:, 2] = np.minimum(boxes[:, 2], w - 1)
            boxes[:, 3] = np.minimum(boxes[:, 3], h - 1)
        # candidates in the order of np.argwhere(mask.T > 0): x-major, as (x, y)
        xs, ys = np.nonzero(coarse.T)
        groups = (
            [_sample(np.stack([xs, ys], axis=1), self.num_points, generator)] if xs.size else []
        )
        points, labels = _pad_groups(groups)
        return SaliencyPrompts(
            saliency=s,
            coarse=torch.from_numpy(coarse),
            boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            points=points,
            point_labels=labels,
            confidence=torch.as_tensor(confidence, dtype=torch.float32),
            keep_components=int(keep.size),
        )
