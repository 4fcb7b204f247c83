"""Property-based bad-input tests of the data entry points: ``to_image_tensor``, the metrics, the
losses and the ``ImageMaskPromptDataset`` file reader.

Each test draws shapes, dtypes, value ranges (NaN and infinities included) and options, and checks
the one of two documented outcomes that a plain re-statement of the documented rules predicts:

* a result, compared with that re-statement (values, ranges); or
* a ``ValueError`` whose message names the argument at fault.

The re-statements below are written from the docstrings, not from the implementation, and use
numpy in float64 where the code uses torch.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vlsegkit.data import ImageMaskPromptDataset, to_image_tensor
from vlsegkit.losses import dice_bce_loss, soft_patch_contrastive_loss
from vlsegkit.metrics import SegmentationMeter, brier_score, dice_score, iou_score

# Small examples and no deadline: the whole module runs in a few seconds on 2 CPU cores.
FAST = settings(max_examples=60, deadline=None)
FILES = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # each example writes and reads two PNG files


class Refused(Exception):
    """The re-statement predicts a ValueError whose message contains ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__(fragment)
        self.fragment = fragment


def check(call, predict):
    """Run ``predict()`` (the re-statement) and ``call()``; they must agree on the outcome.

    Returns:
        ``(result, expected)`` when both give a value; None when both refused alike.
    """
    try:
        expected = predict()
    except Refused as refused:
        with pytest.raises(ValueError) as info:
            call()
        assert refused.fragment in str(info.value), (refused.fragment, str(info.value))
        return None
    return call(), expected


# --------------------------------------------------------------------------- strategies
def float_elements(width: int) -> st.SearchStrategy[float]:
    """Mostly valid [0, 1] values, sometimes a 0-255 scale, slightly out of range, NaN or inf."""
    return st.one_of(
        st.floats(0, 1, width=width),
        # Around the 1e-3 rounding slack (bounds exactly representable in float16).
        st.floats(-0.001953125, 1.001953125, width=width),
        st.floats(-0.0078125, 1.0078125, width=width),
        st.floats(0, 255, width=width),
        st.floats(width=width),  # anything, NaN and infinities included
    )


DIMS = st.sampled_from([0, 1, 2, 3, 4, 5, 7])
IMAGE_DTYPES = [
    np.uint8,
    np.uint16,
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
]


@st.composite
def image_arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(IMAGE_DTYPES)))
    shape = tuple(draw(st.lists(DIMS, min_size=1, max_size=4)))
    if dtype.kind == "f":
        elements = float_elements(8 * dtype.itemsize)
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return draw(hnp.arrays(dtype, shape, elements=elements))


# --------------------------------------------------------------------------- to_image_tensor
CHANNELS = (1, 3, 4)


def expected_image(arr: np.ndarray, convention: str) -> tuple[np.ndarray, bool]:
    """The documented conversion: ``(3, H, W)`` float64 and whether the layout was ambiguous."""
    if arr.dtype.kind in "iu" and arr.dtype not in (np.uint8, np.uint16):
        raise Refused("image: dtype")
    ambiguous = False
    if arr.ndim == 2:
        hwc = arr[..., None]
    elif arr.ndim == 3:
        last, first = arr.shape[2] in CHANNELS, arr.shape[0] in CHANNELS
        if not (last or first):
            raise Refused("image: a ")
        ambiguous = last and first
        layout = convention if ambiguous else ("hwc" if last else "chw")
        hwc = arr if layout == "hwc" else np.moveaxis(arr, 0, -1)
    else:
        raise Refused("image: a ")
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise Refused("image: height and width must be non-zero")
    x = hwc.astype(np.float64)
    if arr.dtype == np.uint8:
        x = x / 255
    elif arr.dtype == np.uint16:
        x = x / 65535
    elif arr.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise Refused("image: float images must be finite")
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise Refused("image: float images must be in [0, 1]")
        x = np.clip(x, 0, 1)
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
    return x.transpose(2, 0, 1), ambiguous


def assert_image_matches(arr, make_input, convention):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = check(
            lambda: to_image_tensor(make_input(arr)), lambda: expected_image(arr, convention)
        )
    if outcome is None:
        return
    out, (expected, ambiguous) = outcome
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert bool(((out >= 0) & (out <= 1)).all())
    # float32 rounding of x / 255, x / 65535 and of float64 input: within one float32 ulp of 1.
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1.2e-7)
    ambiguity = [w for w in caught if "reads as" in str(w.message)]
    assert bool(ambiguity) == ambiguous
    assert all(str(w.message).startswith("image: ") for w in ambiguity)


@FAST
@given(image_arrays())
def test_to_image_tensor_numpy(arr):
    assert_image_matches(arr, lambda a: a, "hwc")


@FAST
@given(image_arrays())
def test_to_image_tensor_tensors(arr):
    assume(arr.dtype != np.uint16 or getattr(torch, "uint16", None) is not None)
    assert_image_matches(arr, torch.from_numpy, "chw")


PIL_CASES = {
    # mode: (array dtype, channels, element strategy)
    "L": (np.uint8, 0, st.integers(0, 255)),
    "RGB": (np.uint8, 3, st.integers(0, 255)),
    "RGBA": (np.uint8, 4, st.integers(0, 255)),
    "I;16": (np.uint16, 0, st.integers(0, 65535)),
    "I": (np.int32, 0, st.integers(-3, 70000)),
    "F": (np.float32, 0, float_elements(32)),
}


@FAST
@given(st.sampled_from(sorted(PIL_CASES)), st.integers(1, 5), st.integers(1, 5), st.data())
def test_to_image_tensor_pil_modes(mode, h, w, data):
    dtype, channels, elements = PIL_CASES[mode]
    shape = (h, w, channels) if channels else (h, w)
    arr = data.draw(hnp.arrays(dtype, shape, elements=elements))
    img = Image.fromarray(arr)
    assert img.mode == mode

    def predict():
        if mode == "I":  # 32-bit integers are read as 16-bit data
            if arr.min() < 0 or arr.max() > 65535:
                raise Refused("image: PIL mode 'I'")
            return expected_image(arr.astype(np.uint16), "hwc")[0]
        return expected_image(arr, "hwc")[0]

    outcome = check(lambda: to_image_tensor(img), predict)
    if outcome is not None:
        out, expected = outcome
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1.2e-7)


# --------------------------------------------------------------------------- metrics
@st.composite
def prediction_pairs(draw):
    b, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape = (b, 1, h, w)
    pred = draw(hnp.arrays(np.float32, shape, elements=float_elements(32)))
    target = draw(
        st.one_of(
            hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0])),
            hnp.arrays(np.float32, shape, elements=float_elements(32)),
        )
    )
    threshold = draw(st.one_of(st.floats(0.01, 0.99), st.floats()))
    return pred, target, threshold


def check_probabilities(pred: np.ndarray, target: np.ndarray) -> None:
    if np.isnan(pred).any() or pred.min() < 0 or pred.max() > 1:
        raise Refused("pred must hold probabilities in [0, 1]")
    if np.isnan(target).any() or target.min() < 0 or target.max() > 1:
        raise Refused("target must hold ground truth in [0, 1]")


def overlap_scores(pred, target, threshold):
    """Per-image (Dice, IoU) as in the module docstring; both empty scores 1."""
    if not 0 < threshold < 1:
        raise Refused("threshold must be a probability strictly between 0 and 1")
    check_probabilities(pred, target)
    p = (pred > np.float32(threshold)).reshape(len(pred), -1)
    g = (target > 0.5).reshape(len(pred), -1)
    inter, ps, gs = (p & g).sum(1), p.sum(1), g.sum(1)
    union = ps + gs - inter
    dice = np.where(ps + gs > 0, 2 * inter / np.maximum(ps + gs, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dice, iou


@FAST
@given(prediction_pairs())
def test_dice_iou_and_meter(pair):
    pred, target, threshold = pair
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    outcome = check(
        lambda: (dice_score(p, t, threshold=threshold), iou_score(p, t, threshold=threshold)),
        lambda: overlap_scores(pred, target, threshold),
    )
    if outcome is not None:
        (dice, iou), (dice_ref, iou_ref) = outcome
        np.testing.assert_allclose(dice.numpy(), dice_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(iou.numpy(), iou_ref, rtol=1e-6, atol=1e-7)
    if not 0 < threshold < 1:
        with pytest.raises(ValueError, match="threshold"):
            SegmentationMeter(threshold=threshold)


@FAST
@given(prediction_pairs())
def test_brier_score(pair):
    pred, target, _ = pair

    def predict():
        check_probabilities(pred, target)
        return ((pred.astype(np.float64) - (target > 0.5)) ** 2).reshape(len(pred), -1).mean(1)

    outcome = check(lambda: brier_score(torch.from_numpy(pred), torch.from_numpy(target)), predict)
    if outcome is not None:
        out, expected = outcome
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- losses
# Finite weights are drawn up to 1e6: far larger ones (~1e38) overflow float32 to an inf loss, which
# is loud rather than silent and left to the user.
WEIGHTS = st.one_of(
    st.floats(0, 2),
    st.floats(-1e6, 1e6),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]),
)


@st.composite
def loss_inputs(draw):
    shape = (
        draw(st.integers(0, 2)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    logits = draw(hnp.arrays(np.float32, shape, elements=st.floats(-20, 20, width=32)))
    target = draw(
        st.one_of(
            hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0])),
            hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)),
            hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 255.0, -1.0])),
            hnp.arrays(np.float32, shape, elements=float_elements(32)),
        )
    )
    weights = {"dice_weight": draw(WEIGHTS), "bce_weight": draw(WEIGHTS)}
    smooth = draw(
        st.one_of(
            st.just(1.0),
            st.floats(1e-5, 2),
            st.floats(-1e6, 1e6),
            st.sampled_from([0.0, math.nan, math.inf, 1e300]),
        )
    )
    return logits, target, weights, smooth


def dice_bce_reference(logits, target, dice_weight, bce_weight, smooth):
    """Mean over (b, c) of the class docstring's per-channel formula, in float64."""
    for name, value in (("dice_weight", dice_weight), ("bce_weight", bce_weight)):
        if not math.isfinite(value) or abs(value) > 3.4028234663852886e38:  # float32 max
            raise Refused(f"{name} must be a finite number")
        if value < 0:
            raise Refused(f"{name} must be >= 0")
    if dice_weight == 0 and bce_weight == 0:
        raise Refused("both 0")
    if not math.isfinite(smooth) or abs(smooth) > 3.4028234663852886e38:
        raise Refused("smooth must be a finite number")
    if smooth <= 0:
        raise Refused("smooth must be > 0")
    if logits.size == 0:
        raise Refused("logits must not be empty")
    if np.isnan(target).any() or target.min() < 0 or target.max() > 1:
        raise Refused("target must hold values in [0, 1]")
    x, g = logits.astype(np.float64), target.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    dims = (2, 3)
    dice = 1 - (2 * (p * g).sum(dims) + smooth) / (p.sum(dims) + g.sum(dims) + smooth)
    # -[g log p + (1 - g) log(1 - p)] in the stable log-sum-exp form on logits.
    bce = (np.maximum(x, 0) - x * g + np.log1p(np.exp(-np.abs(x)))).mean(dims)
    return float((dice_weight * dice + bce_weight * bce).mean())


@FAST
@given(loss_inputs())
def test_dice_bce_loss(inputs):
    logits, target, weights, smooth = inputs
    outcome = check(
        lambda: dice_bce_loss(
            torch.from_numpy(logits), torch.from_numpy(target), smooth=smooth, **weights
        ),
        lambda: dice_bce_reference(logits, target, smooth=smooth, **weights),
    )
    if outcome is not None:
        loss, expected = outcome
        assert math.isfinite(loss.item()) and loss.item() >= 0
        # float32 against float64: "1 - ratio" cancels, so the error scales with the weights (and
        # the BCE with the logits' size, at most 20 here).
        scale = 1 + weights["dice_weight"] + 21 * weights["bce_weight"]
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6 * scale)


@FAST
@given(
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 4),
    st.one_of(st.floats(1e-4, 1), st.floats()),
    st.sampled_from(["paper", "released"]),
    st.integers(0, 2**16),
)
def test_soft_patch_contrastive_loss(b, p, d, temperature, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    patches, text = torch.randn(b, p, d, generator=gen), torch.randn(b, d, generator=gen)

    def predict():
        if not (math.isfinite(temperature) and temperature >= 1e-4):
            raise Refused("temperature must be a finite number >= 0.0001")
        if 0 in (b, p, d):
            raise Refused("patch_tokens must have shape (B, P, D) with B, P, D >= 1")

    outcome = check(
        lambda: soft_patch_contrastive_loss(
            patches, text, temperature=temperature, variant=variant
        ),
        predict,
    )
    if outcome is not None:
        loss = outcome[0].item()
        # Soft cross-entropies with non-negative targets: finite and >= 0 (eq. 21).
        assert math.isfinite(loss) and loss >= -1e-6


# --------------------------------------------------------------------------- dataset reader
VALUE_SETS = [(0, 1), (0, 255), (0, 65535), (1,), (0,), (0, 7, 200), (0, 128), (3, 9)]


@st.composite
def mask_files(draw):
    values = draw(st.sampled_from(VALUE_SETS))
    dtype = np.uint16 if max(values) > 255 else draw(st.sampled_from([np.uint8, np.uint16]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    mask = draw(hnp.arrays(dtype, (h, w), elements=st.sampled_from(values)))
    image_dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    image_shape = (h, w, 3) if image_dtype == np.uint8 else (h, w)
    image = draw(hnp.arrays(image_dtype, image_shape))
    option = draw(st.sampled_from(["none", "threshold", "values", "both"]))
    kwargs = {}
    if option in ("threshold", "both"):
        kwargs["mask_threshold"] = draw(
            st.one_of(st.sampled_from([0, 0.5, 127, 255, 65535]), st.floats())
        )
    if option in ("values", "both"):
        kwargs["mask_values"] = draw(
            st.one_of(
                st.lists(st.sampled_from([1, 7, 255, 65535]), min_size=1, max_size=2),
                st.lists(st.integers(-2, 300), max_size=2),
            )
        )
    layout = draw(st.sampled_from(["folder", "json"]))
    return mask, image, kwargs, layout


def expected_mask(mask: np.ndarray, kwargs: dict, path: str) -> np.ndarray:
    """The documented rules for a grey 8- or 16-bit mask file."""
    threshold, values = kwargs.get("mask_threshold"), kwargs.get("mask_values")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise Refused("mask_threshold must be None")
    if values is not None and (not values or min(values) < 0):
        raise Refused("mask_values must be")
    if threshold is not None and values is not None:
        raise Refused("exclusive")
    full = 255 if mask.dtype == np.uint8 else 65535
    present = set(np.unique(mask).tolist())
    if values is not None:
        fg = np.isin(mask, values)
        if not fg.any() and mask.any():
            raise Refused(f"mask '{path}'")
        return fg
    if threshold is not None:
        if threshold >= full or (mask.max() > 0 and threshold >= mask.max()):
            raise Refused(f"mask '{path}'")
        return mask > threshold
    for top in (1, 255) + ((65535,) if full == 65535 else ()):
        if present <= {0, top}:
            return mask == top
    raise Refused(f"mask '{path}'")


@FILES
@given(mask_files())
def test_dataset_reader(files):
    mask, image, kwargs, layout = files
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        Image.fromarray(image).save(root / "images" / "a.png")
        Image.fromarray(mask).save(root / "masks" / "a.png")
        mask_path = str(root / "masks" / "a.png")

        def build():
            if layout == "json":
                (root / "anns").mkdir(exist_ok=True)
                entry = {"img_name": "a.png", "mask_name": "a.png", "prompts": "x"}
                (root / "anns" / "train.json").write_text(json.dumps([entry]))
                return ImageMaskPromptDataset.from_medvlsm(root, image_size=None, **kwargs)
            return ImageMaskPromptDataset.from_folder(root, image_size=None, **kwargs)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome = check(lambda: build()[0], lambda: expected_mask(mask, kwargs, mask_path))
        if outcome is None:
            return
        item, fg = outcome
        assert torch.equal(item["mask"][0], torch.from_numpy(fg).float())
        empty_warnings = [w for w in caught if "masks checked" in str(w.message)]
        assert bool(empty_warnings) == (not fg.any())
        # The image: the documented scale of its bit depth, and to_image_tensor of the file.
        scale = 255.0 if image.dtype == np.uint8 else 65535.0
        grey_or_rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
        np.testing.assert_allclose(
            item["image"].double().numpy(),
            grey_or_rgb.transpose(2, 0, 1) / scale,
            rtol=0,
            atol=1.2e-7,
        )
        assert torch.equal(item["image"], to_image_tensor(Image.open(root / "images" / "a.png")))
