"""Per-image Dice / IoU on hand-computed cases, and the accumulating meters."""

from __future__ import annotations

import math

import pytest
import torch

from vlsegkit.metrics import (
    CalibrationMeter,
    MetricTracker,
    SegmentationMeter,
    brier_score,
    dice_score,
    hausdorff_distance,
    iou_score,
    normalized_surface_dice,
)


def masks(*grids):
    """Stack 2-D lists of 0/1 into a ``(B, 1, H, W)`` float tensor."""
    return torch.tensor(grids, dtype=torch.float32)[:, None]


# 4x4 cases, counted by hand:
# 0: |P| = 3, |G| = 4, |P∩G| = 2 -> Dice 4/7, IoU 2/5
# 1: identical 2-pixel masks      -> Dice 1,   IoU 1
# 2: disjoint, 1 and 2 pixels     -> Dice 0,   IoU 0
# 3: both empty                   -> empty_score
# 4: empty GT, 1-pixel prediction -> 0
PRED = masks(
    [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]],
)
TARGET = masks(
    [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
)
DICE = [4 / 7, 1.0, 0.0, 1.0, 0.0]
IOU = [2 / 5, 1.0, 0.0, 1.0, 0.0]


def test_hand_computed_dice_and_iou():
    dice = dice_score(PRED, TARGET)
    iou = iou_score(PRED, TARGET)
    assert dice.shape == (5,) and dice.dtype == torch.float32
    torch.testing.assert_close(dice, torch.tensor(DICE), rtol=0, atol=1e-7)
    torch.testing.assert_close(iou, torch.tensor(IOU), rtol=0, atol=1e-7)


def test_empty_score_convention():
    empty = torch.zeros(1, 1, 4, 4)
    for value in (1.0, 0.0):
        assert dice_score(empty, empty, empty_score=value).item() == value
        assert iou_score(empty, empty, empty_score=value).item() == value
    assert math.isnan(dice_score(empty, empty, empty_score=float("nan")).item())
    # The convention only applies to empty/empty: a false positive on an empty GT is still 0.
    assert dice_score(PRED[4:], TARGET[4:], empty_score=1.0).item() == 0.0


def test_threshold_probabilities_and_bool_inputs():
    probs = PRED * 0.9 + (1 - PRED) * 0.2  # foreground 0.9, background 0.2
    torch.testing.assert_close(dice_score(probs, TARGET), torch.tensor(DICE), rtol=0, atol=1e-7)
    # Strictly above the threshold counts: at 0.9 nothing is foreground any more.
    assert dice_score(probs[:1], TARGET[:1], threshold=0.9).item() == 0.0
    assert dice_score(probs[:1], TARGET[:1], threshold=0.1).item() == pytest.approx(
        2 * 4 / (16 + 4)
    )
    torch.testing.assert_close(
        dice_score(PRED.bool(), TARGET.bool()), torch.tensor(DICE), rtol=0, atol=1e-7
    )


def test_random_masks_match_float64_formula():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 1, 13, 17, generator=gen)
    target = (torch.rand(6, 1, 13, 17, generator=gen) > 0.7).float()
    p = (pred > 0.5).double().flatten(1)
    g = target.double().flatten(1)
    inter = (p * g).sum(1)
    dice_ref = 2 * inter / (p.sum(1) + g.sum(1))
    iou_ref = inter / (p.sum(1) + g.sum(1) - inter)
    torch.testing.assert_close(dice_score(pred, target).double(), dice_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(iou_score(pred, target).double(), iou_ref, rtol=1e-6, atol=1e-7)
    # Identity between the two for non-empty masks: IoU = Dice / (2 - Dice).
    d = dice_score(pred, target)
    torch.testing.assert_close(iou_score(pred, target), d / (2 - d), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("pred_shape", "target_shape", "match"),
    [
        ((2, 4, 4), (2, 4, 4), r"pred must have shape \(B, 1, H, W\)"),
        ((2, 3, 4, 4), (2, 3, 4, 4), r"\(B \* C, 1, H, W\)"),
        ((2, 1, 4, 4), (2, 1, 4, 5), r"target must have the same shape as pred \(2, 1, 4, 4\)"),
    ],
)
def test_shape_errors(pred_shape, target_shape, match):
    for fn in (dice_score, iou_score):
        with pytest.raises(ValueError, match=match):
            fn(torch.zeros(pred_shape), torch.zeros(target_shape))


# --------------------------------------------------------------------------- bad values
# Logits: PRED as scores of +-4 (sigmoid > 0.5 exactly where PRED is 1), which the old code
# thresholded at 0.5 as if they were probabilities (foreground = score > 0.5) without a word.
LOGITS = PRED * 8 - 4


@pytest.mark.parametrize("fn", [dice_score, iou_score, normalized_surface_dice, hausdorff_distance])
def test_logits_and_nan_predictions_raise(fn):
    with pytest.raises(
        ValueError, match=r"pred must hold probabilities in \[0, 1\].*sigmoid.*\[-4, 4\]"
    ):
        fn(LOGITS, TARGET)
    nan = PRED.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"pred must hold probabilities.*got NaN values"):
        fn(nan, TARGET)
    with pytest.raises(ValueError, match=r"pred must hold probabilities"):
        fn(PRED * float("inf"), TARGET)


@pytest.mark.parametrize("fn", [dice_score, iou_score, brier_score])
def test_targets_outside_0_1_and_nan_raise(fn):
    with pytest.raises(ValueError, match=r"target must hold ground truth in \[0, 1\].*\[0, 255\]"):
        fn(PRED, TARGET * 255)
    with pytest.raises(ValueError, match=r"target must .*\[-1, 1\]"):
        fn(PRED, TARGET * 2 - 1)
    nan = TARGET.clone()
    nan[1, 0, 2, 2] = float("nan")  # used to be read as background
    with pytest.raises(ValueError, match=r"target must .*got NaN values"):
        fn(PRED, nan)


def test_integer_and_bool_masks_in_0_1_are_accepted():
    expected = torch.tensor(DICE)
    for dtype in (torch.uint8, torch.int64, torch.bool):
        got = dice_score(PRED.to(dtype), TARGET.to(dtype))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("threshold", [float("nan"), 0.0, 1.0, 2.0, -0.5, True, "0.5", None])
def test_thresholds_outside_0_1_raise_everywhere(threshold):
    match = r"threshold must be a probability strictly between 0 and 1"
    for fn in (dice_score, iou_score, normalized_surface_dice, hausdorff_distance):
        with pytest.raises(ValueError, match=match):
            fn(PRED, TARGET, threshold=threshold)
    with pytest.raises(ValueError, match=match):
        SegmentationMeter(threshold=threshold)


def test_calibration_meter_refuses_nan():
    meter = CalibrationMeter()
    with pytest.raises(ValueError, match=r"pred must hold probabilities.*NaN"):
        meter.update(torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2))
    assert meter.count == 0


def test_segmentation_meter_averages_over_images_not_batches():
    meter = SegmentationMeter()
    first = meter.update(PRED[:1], TARGET[:1])  # batch of 1 (Dice 4/7)
    meter.update(PRED[1:], TARGET[1:])  # batch of 4
    torch.testing.assert_close(first["dice"], torch.tensor([4 / 7]))
    assert meter.count == 5
    result = meter.compute()
    assert result["dice"] == pytest.approx(sum(DICE) / 5, abs=1e-7)
    assert result["iou"] == pytest.approx(sum(IOU) / 5, abs=1e-7)
    # The mean of batch means would be (4/7 + 0.5) / 2, which is different.
    assert result["dice"] != pytest.approx((4 / 7 + sum(DICE[1:]) / 4) / 2, abs=1e-3)
    torch.testing.assert_close(meter.scores()["iou"], torch.tensor(IOU))
    meter.reset()
    assert meter.count == 0 and math.isnan(meter.compute()["dice"])


def test_segmentation_meter_nan_empty_score_drops_empty_images():
    meter = SegmentationMeter(empty_score=float("nan"))
    meter.update(PRED, TARGET)
    kept = [d for i, d in enumerate(DICE) if i != 3]
    assert meter.compute()["dice"] == pytest.approx(sum(kept) / 4, abs=1e-7)
    strict = SegmentationMeter(threshold=0.95)
    # Nothing is above 0.95, so every prediction is empty: only the two empty GTs score (1 each).
    strict.update(PRED * 0.9, TARGET)
    assert strict.compute()["dice"] == pytest.approx(2 / 5)


def test_metric_tracker_weighted_means():
    tracker = MetricTracker()
    tracker.update("loss", 1.0, n=3)
    tracker.update("loss", torch.tensor(3.0), n=1)
    tracker.update("dice", torch.tensor([1.0, 0.0, 0.5]))
    result = tracker.compute()
    assert result["loss"] == pytest.approx((3 * 1.0 + 3.0) / 4)
    assert result["dice"] == pytest.approx(0.5)
    assert tracker.counts == {"loss": 4, "dice": 3}
    assert "loss=1.5000" in repr(tracker)
    with pytest.raises(ValueError, match="n must be"):
        tracker.update("loss", 1.0, n=0)
    tracker.reset()
    assert tracker.compute() == {}
