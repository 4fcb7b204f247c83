"""NSD, Hausdorff distances, Brier score and ECE: hand-computed cases, slow float64 references,
empty-mask conventions, meters, and parity with MONAI when it is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlsegkit.metrics import (
    CalibrationMeter,
    SegmentationMeter,
    brier_score,
    dice_score,
    expected_calibration_error,
    hausdorff_distance,
    hd95,
    mask_boundary,
    normalized_surface_dice,
    surface_distances,
)

SQRT2 = math.sqrt(2)


def square(size=8, rows=(1, 4), cols=(1, 4), extra=()):
    """``(1, 1, size, size)`` float mask with a filled rectangle and optional single pixels."""
    m = torch.zeros(1, 1, size, size)
    m[0, 0, rows[0] : rows[1], cols[0] : cols[1]] = 1
    for y, x in extra:
        m[0, 0, y, x] = 1
    return m


# --------------------------------------------------------------------------- slow references
def ref_boundary(mask: np.ndarray) -> list[tuple[int, int]]:
    """Foreground pixels with a 4-neighbour that is background or outside the image."""
    h, w = mask.shape
    out = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if not (0 <= ny < h and 0 <= nx < w) or not mask[ny, nx]:
                    out.append((y, x))
                    break
    return out


def ref_directed(src, dst, sy=1.0, sx=1.0) -> list[float]:
    return [min(math.hypot((y - v) * sy, (x - u) * sx) for v, u in dst) for y, x in src]


def ref_percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), written out."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def ref_surface(pred: np.ndarray, gt: np.ndarray, tol: float, q: float | None, spacing=(1, 1)):
    bp, bg = ref_boundary(pred), ref_boundary(gt)
    d_pg, d_gp = ref_directed(bp, bg, *spacing), ref_directed(bg, bp, *spacing)
    nsd = (sum(d <= tol for d in d_pg) + sum(d <= tol for d in d_gp)) / (len(d_pg) + len(d_gp))
    if q is None:
        hd = max(max(d_pg), max(d_gp))
    else:
        hd = max(ref_percentile(d_pg, q), ref_percentile(d_gp, q))
    return nsd, hd


def random_masks(n: int, size: int, seed: int) -> torch.Tensor:
    """Blobby random masks (unions of discs and rectangles plus speckle), never empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        m = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2).tolist()
            r = rng.uniform(1.5, size / 3)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            y0, x0 = rng.integers(0, size - 3, 2)
            m[y0 : y0 + rng.integers(1, 6), x0 : x0 + rng.integers(1, 6)] = True
        m |= rng.random((size, size)) < 0.01
        out[i, 0] = m
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- boundaries
def test_mask_boundary_hand_cases():
    full = torch.ones(4, 4, dtype=torch.bool)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = False  # the image border is a background neighbour
    assert torch.equal(mask_boundary(full), expected)
    plus = torch.zeros(5, 5, dtype=torch.bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    only_centre_inside = plus.clone()
    only_centre_inside[2, 2] = False
    assert torch.equal(mask_boundary(plus), only_centre_inside)
    assert not mask_boundary(torch.zeros(3, 3)).any()
    # Batched input is handled per image.
    both = mask_boundary(torch.stack([full, plus[:4, :4]]))
    assert torch.equal(both[0], expected)


def test_surface_distances_hand_computed():
    # GT: 3x3 square rows/cols 1..3; prediction: the same square shifted one column right.
    gt, pred = square(), square(cols=(2, 5))
    d_pg, d_gp = surface_distances(pred[0, 0], gt[0, 0])
    # Boundary pixels in raster order; the centre pixel of each square is not on the boundary.
    # pred (1,2)(1,3)(1,4)(2,2)(2,4)(3,2)(3,3)(3,4) -> 0 0 1 1 1 0 0 1
    # gt   (1,1)(1,2)(1,3)(2,1)(2,3)(3,1)(3,2)(3,3) -> 1 0 0 1 1 1 0 0
    assert d_pg.dtype == torch.float64
    assert d_pg.tolist() == [0, 0, 1, 1, 1, 0, 0, 1]
    assert d_gp.tolist() == [1, 0, 0, 1, 1, 1, 0, 0]
    assert normalized_surface_dice(pred, gt, tolerance=0.5).item() == pytest.approx(8 / 16)
    assert normalized_surface_dice(pred, gt, tolerance=1.0).item() == 1.0
    # 95th percentile of [0,0,0,0,1,1,1,1]: position 6.65 between two ones.
    assert hd95(pred, gt).item() == 1.0
    d, empty = surface_distances(pred[0, 0], torch.zeros(8, 8))
    assert torch.isinf(d).all() and d.numel() == 8 and empty.numel() == 0


def test_outlier_pixel_nsd_and_percentile_interpolation():
    # Prediction = GT square + one isolated pixel at (6, 6), 3·sqrt(2) from the GT corner (3, 3).
    gt, pred = square(), square(extra=[(6, 6)])
    far = 3 * SQRT2
    # pred -> gt distances: eight 0s and one 3·sqrt(2); gt -> pred: all 0.
    # 95th percentile of 9 values: position 0.95·8 = 7.6 -> 0 + 0.6·(far − 0).
    assert hd95(pred, gt).item() == pytest.approx(0.6 * far, abs=1e-6)
    assert hausdorff_distance(pred, gt, percentile=None).item() == pytest.approx(far, abs=1e-6)
    assert hausdorff_distance(pred, gt, percentile=100).item() == pytest.approx(far, abs=1e-6)
    assert hausdorff_distance(pred, gt, percentile=50).item() == 0.0
    # NSD at 2 px: 8 of 9 prediction boundary pixels and 8 of 8 GT pixels are within tolerance.
    assert normalized_surface_dice(pred, gt).item() == pytest.approx(16 / 17)
    assert normalized_surface_dice(pred, gt, tolerance=far).item() == 1.0  # d <= tol inclusive
    # Anisotropic pixels: rows twice as far apart -> distance sqrt((3·2)² + 3²) = 3·sqrt(5).
    hd = hausdorff_distance(pred, gt, percentile=None, spacing=(2.0, 1.0))
    assert hd.item() == pytest.approx(3 * math.sqrt(5), abs=1e-6)
    assert hausdorff_distance(pred, gt, percentile=None, spacing=0.5).item() == pytest.approx(
        far / 2, abs=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_match_float64_reference(seed):
    pred = random_masks(3, 14, seed)
    gt = random_masks(3, 14, seed + 100)
    nsd = normalized_surface_dice(pred, gt, tolerance=1.5, backend="torch")
    hd = hd95(pred, gt, backend="torch")
    hd_max = hausdorff_distance(pred, gt, percentile=None, spacing=(1.0, 1.7), backend="torch")
    for b in range(3):
        p, g = pred[b, 0].numpy() > 0.5, gt[b, 0].numpy() > 0.5
        ref_nsd, ref_hd = ref_surface(p, g, 1.5, 95)
        _, ref_max = ref_surface(p, g, 1.5, None, spacing=(1.0, 1.7))
        assert nsd[b].item() == pytest.approx(ref_nsd, abs=1e-6)
        assert hd[b].item() == pytest.approx(ref_hd, abs=1e-5)
        assert hd_max[b].item() == pytest.approx(ref_max, abs=1e-5)
    # Identical masks: perfect NSD, zero distance.
    assert torch.equal(normalized_surface_dice(gt, gt), torch.ones(3))
    assert torch.equal(hd95(gt, gt), torch.zeros(3))


def test_probabilities_thresholds_dtypes_and_device_of_surface_metrics():
    gt, pred = square(), square(extra=[(6, 6)])
    probs = pred * 0.8 + 0.1  # foreground 0.9, background 0.1
    ref = hd95(pred, gt)
    for p in (probs, probs.bfloat16(), probs.double(), pred.bool()):
        out = hd95(p, gt)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref)
    # Above every probability: the prediction is empty.
    assert math.isnan(hd95(probs, gt, threshold=0.95).item())
    assert normalized_surface_dice(probs, gt, threshold=0.95).item() == 0.0


def test_empty_mask_conventions():
    empty, gt = torch.zeros(1, 1, 8, 8), square()
    # NSD: empty/empty -> empty_score (1 by default), one empty -> 0.
    assert normalized_surface_dice(empty, empty).item() == 1.0
    assert math.isnan(normalized_surface_dice(empty, empty, empty_score=math.nan).item())
    assert normalized_surface_dice(empty, gt).item() == 0.0
    assert normalized_surface_dice(gt, empty).item() == 0.0
    # HD: NaN by default for any empty mask (MONAI), configurable.
    assert math.isnan(hd95(empty, empty).item()) and math.isnan(hd95(empty, gt).item())
    assert hd95(empty, empty, empty_score=0.0).item() == 0.0
    assert hd95(gt, empty, missing_score=math.inf).item() == math.inf
    assert hd95(empty, gt, missing_score=11.3).item() == pytest.approx(11.3)
    # Mixed batch: each image gets its own convention.
    batch_pred = torch.cat([empty, gt, empty, gt])
    batch_gt = torch.cat([empty, empty, gt, gt])
    out = normalized_surface_dice(batch_pred, batch_gt, empty_score=0.5)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.0, 1.0]))


def test_monai_backend_parity():
    pytest.importorskip("scipy.ndimage")
    pytest.importorskip("monai.metrics")
    pred = random_masks(4, 20, 7)
    gt = random_masks(4, 20, 8)
    pred[3] = 0  # one empty prediction: conventions must be applied identically
    for fn, kw in (
        (normalized_surface_dice, {"tolerance": 2.0}),
        (normalized_surface_dice, {"tolerance": 1.0, "spacing": (1.5, 0.5)}),
        (hausdorff_distance, {"percentile": 95.0}),
        (hausdorff_distance, {"percentile": None, "spacing": (2.0, 1.0)}),
    ):
        ours = fn(pred, gt, backend="torch", **kw)
        theirs = fn(pred, gt, backend="monai", **kw)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, equal_nan=True)


def test_monai_backend_missing_names_the_extra():
    try:
        import monai.metrics  # noqa: F401
        import scipy.ndimage  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"vlsegkit\[metrics\]"):
            hd95(square(), square(), backend="monai")
        # "auto" falls back to the built-in computation instead.
        assert hd95(square(), square(), backend="auto").item() == 0.0
    else:
        pytest.skip("MONAI is installed")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hd95(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)), r"\(B, 1, H, W\)"),
        (lambda: hd95(square(), torch.zeros(1, 1, 8, 9)), r"target must have the same shape"),
        (lambda: normalized_surface_dice(square(), square(), tolerance=-1), "tolerance"),
        (lambda: hausdorff_distance(square(), square(), percentile=101), "percentile"),
        (lambda: hd95(square(), square(), spacing=(1.0, 2.0, 3.0)), r"\(spacing_y, spacing_x\)"),
        (lambda: hd95(square(), square(), spacing=0), "spacing"),
        (lambda: hd95(square(), square(), backend="scipy"), "backend"),
        (lambda: surface_distances(torch.zeros(4, 4), torch.zeros(4, 5)), r"\(H, W\)"),
    ],
)
def test_surface_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- calibration
def grid(*values):
    """``(1, 1, 1, N)`` float64 tensor."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


def ref_ece(p: list[float], y: list[int], bins: int, mode: str) -> float:
    groups: dict[int, list[tuple[float, float]]] = {}
    for prob, label in zip(p, y, strict=True):
        if mode == "top_label":
            conf, acc = max(prob, 1 - prob), float((prob > 0.5) == bool(label))
        else:
            conf, acc = prob, float(label)
        k = min(math.floor(conf * bins), bins - 1)
        groups.setdefault(k, []).append((conf, acc))
    total = 0.0
    for items in groups.values():
        mean_conf = sum(c for c, _ in items) / len(items)
        mean_acc = sum(a for _, a in items) / len(items)
        total += len(items) / len(p) * abs(mean_acc - mean_conf)
    return total


def test_ece_hand_computed_both_modes():
    p, y = grid(0.9, 0.8, 0.3, 0.1), grid(1, 0, 0, 0)
    # top-label: confidences 0.9 0.8 0.7 0.9, correct 1 0 1 1; bins 9: (0.9, acc 1) x2,
    # 8: (0.8, acc 0), 7: (0.7, acc 1) -> 2/4·0.1 + 1/4·0.8 + 1/4·0.3 = 0.325.
    assert expected_calibration_error(p, y, num_bins=10).item() == pytest.approx(0.325)
    # The modes differ once both sides of 0.5 share a top-label bin: p = 0.9 and 0.1, y = 1 1.
    p2, y2 = grid(0.9, 0.1), grid(1, 1)
    # top-label: both confidence 0.9, accuracy 1/2 -> |0.5 − 0.9| = 0.4.
    assert expected_calibration_error(p2, y2, num_bins=10).item() == pytest.approx(0.4)
    # positive: bins 9 and 1 -> (|1 − 0.9| + |1 − 0.1|) / 2 = 0.5.
    assert expected_calibration_error(p2, y2, num_bins=10, mode="positive").item() == (
        pytest.approx(0.5)
    )
    # Perfectly confident and right -> 0; confident and wrong -> 1.
    assert expected_calibration_error(grid(1.0, 0.0), grid(1, 0)).item() == 0.0
    assert expected_calibration_error(grid(1.0, 0.0), grid(0, 1)).item() == 1.0


def test_ece_bin_edges_and_random_reference():
    # 0.2 sits on the edge of bins 1 and 2 (of 10): it belongs to [0.2, 0.3); 1.0 to the last bin.
    p, y = grid(0.2, 1.0), grid(0, 1)
    ref = ref_ece([0.2, 1.0], [0, 1], 10, "positive")
    assert ref == pytest.approx(0.1)
    assert expected_calibration_error(p, y, num_bins=10, mode="positive").item() == (
        pytest.approx(ref)
    )
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 6, 7, generator=gen)
    target = (torch.rand(3, 1, 6, 7, generator=gen) < probs).float()
    for mode in ("top_label", "positive"):
        for bins in (1, 7, 15):
            out = expected_calibration_error(probs, target, num_bins=bins, mode=mode)
            for b in range(3):
                ref = ref_ece(
                    probs[b].flatten().double().tolist(),
                    target[b].flatten().int().tolist(),
                    bins,
                    mode,
                )
                assert out[b].item() == pytest.approx(ref, abs=1e-6)


def test_brier_score_values_gradient_and_dtypes():
    p, y = grid(0.9, 0.8, 0.3, 0.1), grid(1, 0, 0, 0)
    # (0.01 + 0.64 + 0.09 + 0.01) / 4 = 0.1875
    assert brier_score(p, y).item() == pytest.approx(0.1875)
    assert brier_score(p, y).dtype == torch.float64
    assert brier_score(p.float(), y).dtype == torch.float32
    assert brier_score(p.bfloat16(), y).item() == pytest.approx(0.1875, abs=2e-3)
    assert brier_score(p > 0.5, y).item() == pytest.approx(0.25)  # hard masks: error rate
    leaf = p.clone().requires_grad_(True)
    brier_score(leaf, y).sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * (p - y) / 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: brier_score(grid(1.5), grid(1)), r"probabilities in \[0, 1\].*sigmoid"),
        (lambda: expected_calibration_error(grid(-0.1), grid(1)), r"probabilities"),
        (lambda: brier_score(grid(1).long(), grid(1)), "float probability or bool"),
        (lambda: expected_calibration_error(grid(0.5), grid(1), num_bins=0), "num_bins"),
        (lambda: expected_calibration_error(grid(0.5), grid(1), mode="max"), "mode"),
        (lambda: brier_score(grid(0.5)[0], grid(1)[0]), r"\(B, 1, H, W\)"),
    ],
)
def test_calibration_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_calibration_meter_pools_pixels():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(5, 1, 4, 6, generator=gen)
    target = (torch.rand(5, 1, 4, 6, generator=gen) < 0.4).float()
    meter = CalibrationMeter(num_bins=10)
    meter.update(probs[:2], target[:2])
    meter.update(probs[2:], target[2:])
    assert meter.count == 5 * 24
    pooled = meter.compute()
    # Pooled = the per-image formula on all pixels laid side by side as one image.
    flat_p, flat_y = probs.reshape(1, 1, 1, -1), target.reshape(1, 1, 1, -1)
    ece = expected_calibration_error(flat_p, flat_y, num_bins=10).item()
    assert pooled["ece"] == pytest.approx(ece, abs=1e-6)
    assert pooled["brier"] == pytest.approx(brier_score(flat_p, flat_y).item(), abs=1e-6)
    # ... which is not the mean of per-image ECEs.
    per_image = expected_calibration_error(probs, target, num_bins=10).mean().item()
    assert abs(pooled["ece"] - per_image) > 1e-3
    rel = meter.reliability()
    assert rel["count"].sum() == 120
    used = rel["count"] > 0
    assert torch.isnan(rel["confidence"][~used]).all()
    lo = torch.arange(10, dtype=torch.float64)[used] / 10
    assert ((rel["confidence"][used] >= lo) & (rel["confidence"][used] < lo + 0.1)).all()
    meter.reset()
    assert meter.count == 0 and math.isnan(meter.compute()["ece"])


# --------------------------------------------------------------------------- meter
def test_segmentation_meter_all_metrics_match_functions():
    pred = random_masks(4, 12, 3) * 0.7 + 0.15  # probabilities 0.85 / 0.15
    gt = random_masks(4, 12, 4)
    gt[1] = 0  # an empty GT with a non-empty prediction: HD95 NaN, dropped from the mean
    names = ("dice", "iou", "nsd", "hd95", "hd", "brier", "ece")
    meter = SegmentationMeter(metrics=names, tolerance=1.0, backend="torch")
    meter.update(pred[:1], gt[:1])
    batch = meter.update(pred[1:], gt[1:])
    assert set(batch) == set(names) and meter.count == 4
    scores = meter.scores()
    torch.testing.assert_close(scores["dice"], dice_score(pred, gt))
    nsd = normalized_surface_dice(pred, gt, tolerance=1.0)
    torch.testing.assert_close(scores["nsd"], nsd)
    hd = hd95(pred, gt)
    torch.testing.assert_close(scores["hd95"], hd, equal_nan=True)
    torch.testing.assert_close(scores["ece"], expected_calibration_error(pred, gt))
    result = meter.compute()
    assert math.isnan(scores["hd95"][1])
    assert result["hd95"] == pytest.approx(hd[[0, 2, 3]].double().mean().item(), abs=1e-6)
    assert result["brier"] == pytest.approx(brier_score(pred, gt).double().mean().item())
    assert result["hd"] >= result["hd95"]
    # Default meter is unchanged: Dice and IoU only.
    assert SegmentationMeter().metrics == ("dice", "iou")
    with pytest.raises(ValueError, match="metrics must be distinct names"):
        SegmentationMeter(metrics=("dice", "f1"))
    with pytest.raises(ValueError, match="metrics must be distinct names"):
        SegmentationMeter(metrics=("dice", "dice"))


def test_surface_metric_speed_on_realistic_masks():
    # A 352x352 pair with long boundaries stays fast with the chunked exact distances.
    yy, xx = torch.meshgrid(torch.arange(352), torch.arange(352), indexing="ij")
    gt = (((yy - 170) ** 2 + (xx - 180) ** 2) < 120**2).float()[None, None]
    pred = (((yy - 176) ** 2 + (xx - 170) ** 2) < 118**2).float()[None, None]
    out = hd95(pred, gt, backend="torch")
    # Two circles whose centres are sqrt(136) ≈ 11.7 apart with radii 120 and 118.
    assert 5 < out.item() < 14
    assert 0 < normalized_surface_dice(pred, gt, backend="torch").item() < 1
