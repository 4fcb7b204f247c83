"""vlsegkit.viz: pixel values of overlays and heat maps, colour-map anchors, calibration numbers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlsegkit import viz


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)


@pytest.fixture
def square() -> np.ndarray:
    mask = np.zeros((12, 16), dtype=bool)
    mask[3:9, 4:12] = True
    return mask


def _blend_reference(image: np.ndarray, color, alpha: float) -> np.ndarray:
    """float64 ``(1 - a) · image + a · color``, truncated like the uint8 cast."""
    return np.floor((1 - alpha) * image.astype(np.float64) + alpha * np.asarray(color, np.float64))


# --------------------------------------------------------------------------- image conversion
def test_to_rgb_uint8_accepts_every_image_form(image):
    assert viz.to_rgb_uint8(image) is not image
    np.testing.assert_array_equal(viz.to_rgb_uint8(image), image)
    np.testing.assert_array_equal(viz.to_rgb_uint8(Image.fromarray(image)), image)
    rgba = np.concatenate([image, np.full((12, 16, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(viz.to_rgb_uint8(rgba), image)
    grey = image[..., 0]
    np.testing.assert_array_equal(viz.to_rgb_uint8(grey), np.repeat(grey[..., None], 3, -1))
    chw = torch.from_numpy(image).permute(2, 0, 1).double() / 255
    np.testing.assert_array_equal(viz.to_rgb_uint8(chw.float()), image)
    half = torch.full((3, 2, 2), 0.5)
    assert (viz.to_rgb_uint8(half) == 128).all()  # round(127.5) = 128


def test_to_rgb_uint8_refuses_normalised_images():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*normalisation"):
        viz.to_rgb_uint8(torch.randn(3, 4, 4) * 3)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        viz.to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


# --------------------------------------------------------------------------- overlays
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.45, 1.0])
def test_overlay_mask_tints_the_mask_and_leaves_the_rest(image, square, alpha):
    color = (10, 200, 90)
    out = viz.overlay_mask(image, square, color=color, alpha=alpha, outline=False)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[~square], image[~square])
    expected = _blend_reference(image, color, alpha)
    assert np.abs(out[square].astype(int) - expected[square]).max() <= 1
    if alpha == 1.0:
        assert (out[square] == color).all()


def test_overlay_mask_outline_is_full_colour(image, square):
    color = (255, 0, 255)
    out = viz.overlay_mask(image, square, color=color, alpha=0.25)
    border = square.copy()
    border[4:8, 5:11] = False  # the square's one-pixel rim
    interior = square & ~border
    assert (out[border] == color).all()
    expected = _blend_reference(image, color, 0.25)
    assert np.abs(out[interior].astype(int) - expected[interior]).max() <= 1
    np.testing.assert_array_equal(out[~square], image[~square])


def test_overlay_mask_accepts_tensors(image, square):
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    mask = torch.from_numpy(square)[None].to(torch.bfloat16)
    np.testing.assert_array_equal(
        viz.overlay_mask(chw, mask), viz.overlay_mask(image, square.astype(np.uint8))
    )


def test_overlay_mask_bad_inputs(image, square):
    with pytest.raises(ValueError, match=r"mask must have the image's shape \(H, W\) = \(12, 16\)"):
        viz.overlay_mask(image, square[:, :8])
    with pytest.raises(ValueError, match=r"mask must have shape"):
        viz.overlay_mask(image, square[None, None])
    with pytest.raises(ValueError, match="binary"):
        viz.overlay_mask(image, square * 0.7)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        viz.overlay_mask(image, square, alpha=1.5)
    with pytest.raises(ValueError, match=r"color must be 3 values"):
        viz.overlay_mask(image, square, color=(1, 2))


def test_overlay_prediction_colours_agreement(image):
    probs = np.zeros((12, 16))
    probs[:, :8] = 0.9  # predicted foreground: left half
    target = np.zeros((12, 16), dtype=bool)
    target[:6] = True  # true foreground: top half
    alpha = 0.5
    out = viz.overlay_prediction(image, probs, target, alpha=alpha)
    regions = {
        viz.TP_COLOR: (slice(0, 6), slice(0, 8)),
        viz.FP_COLOR: (slice(6, 12), slice(0, 8)),
        viz.FN_COLOR: (slice(0, 6), slice(8, 16)),
    }
    for color, where in regions.items():
        expected = _blend_reference(image[where], color, alpha)
        assert np.abs(out[where].astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(out[6:, 8:], image[6:, 8:])  # true negatives untouched
    # Without ground truth: the thresholded prediction, outlined.
    np.testing.assert_array_equal(
        viz.overlay_prediction(image, torch.from_numpy(probs)[None], threshold=0.95), image
    )
    np.testing.assert_array_equal(
        viz.overlay_prediction(image, probs, alpha=alpha),
        viz.overlay_mask(image, probs > 0.5, alpha=alpha),
    )
    with pytest.raises(ValueError, match=r"prediction must have the image's shape"):
        viz.overlay_prediction(image, probs.T)
    with pytest.raises(ValueError, match="target must be binary"):
        viz.overlay_prediction(image, probs, probs)


# --------------------------------------------------------------------------- colour maps
@pytest.mark.parametrize(
    ("cmap", "low", "high"),
    [
        ("gray", (0, 0, 0), (255, 255, 255)),
        ("hot", (11, 0, 0), (255, 255, 255)),  # 0.0416 · 255 = 10.6
        ("jet", (0, 0, 128), (128, 0, 0)),  # (0, 0, 0.5) and (0.5, 0, 0)
        ("viridis", (0x44, 0x01, 0x54), (0xFD, 0xE7, 0x25)),
        ("inferno", (0x00, 0x00, 0x04), (0xFC, 0xFF, 0xA4)),
        ("nipy_spectral", (0, 0, 0), (204, 204, 204)),
    ],
)
def test_colormap_endpoints(cmap, low, high):
    values = np.array([[-5.0, 0.0, 1.0, 7.0]])
    out = viz.apply_colormap(values, cmap=cmap, vmin=0.0, vmax=1.0)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == tuple(out[0, 1]) == low  # below vmin clips to the first colour
    assert tuple(out[0, 2]) == tuple(out[0, 3]) == high


def test_colormap_interior_values():
    t = np.array([[0.5, 0.125, 0.375]])
    np.testing.assert_array_equal(
        viz.apply_colormap(t[:, :1], cmap="gray", vmin=0, vmax=1)[0, 0], 128
    )
    jet = viz.apply_colormap(t, cmap="jet", vmin=0, vmax=1)[0]
    # Hand-evaluated from jet's breakpoints: red 0→1 on [0.35, 0.66], blue 1→0 on [0.34, 0.65].
    assert tuple(jet[1]) == (0, 0, 255)
    assert tuple(jet[2]) == (round(255 * 0.025 / 0.31), 255, round(255 * 0.275 / 0.31))
    red = round(255 * 0.15 / 0.31)
    assert tuple(jet[0]) == (red, 255, red)


def test_colormap_scaling_defaults_to_min_max():
    values = torch.tensor([[2.0, 3.0, 4.0]])
    out = viz.apply_colormap(values, cmap="gray")
    assert out[0, :, 0].tolist() == [0, 128, 255]
    constant = viz.apply_colormap(np.full((2, 2), 0.3), cmap="viridis")
    assert (constant == (0x44, 0x01, 0x54)).all()
    # viridis is perceptually ordered: its lightness proxy grows along the map.
    ramp = viz.apply_colormap(np.linspace(0, 1, 64)[None], cmap="viridis")[0].astype(float)
    assert (np.diff(ramp @ [0.299, 0.587, 0.114]) > 0).all()


def test_colormap_bad_inputs():
    with pytest.raises(ValueError, match="cmap must be one of"):
        viz.apply_colormap(np.zeros((2, 2)), cmap="rainbow")
    with pytest.raises(ValueError, match="finite"):
        viz.apply_colormap(np.array([[0.0, math.nan]]))
    with pytest.raises(ValueError, match="vmax must be >= vmin"):
        viz.apply_colormap(np.zeros((2, 2)), vmin=1, vmax=0)
    with pytest.raises(ValueError, match=r"values must have shape \(H, W\)"):
        viz.apply_colormap(np.zeros((2, 2, 2)))


def test_colormaps_match_matplotlib():
    mpl = pytest.importorskip("matplotlib")
    t = np.arange(256, dtype=np.float64)[None] / 255  # matplotlib's own LUT sample points
    for name in viz.COLORMAPS:
        ref = np.round(mpl.colormaps[name](t)[0, :, :3] * 255)
        ours = viz.apply_colormap(t, cmap=name, vmin=0, vmax=1)[0].astype(np.float64)
        assert np.abs(ours - ref).max() <= 2, name


def test_heatmap_overlay_blends_the_colour_map(image):
    values = np.linspace(0, 1, 12 * 16).reshape(12, 16)
    heat = viz.apply_colormap(values, cmap="jet")
    np.testing.assert_array_equal(viz.heatmap_overlay(image, values, alpha=1.0), heat)
    np.testing.assert_array_equal(viz.heatmap_overlay(image, values, alpha=0.0), image)
    out = viz.heatmap_overlay(image, torch.from_numpy(values).float(), alpha=0.3)
    expected = np.round(0.7 * image.astype(np.float64) + 0.3 * heat.astype(np.float64))
    assert np.abs(out.astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match=r"values must have the image's shape"):
        viz.heatmap_overlay(image, values[:6])


# --------------------------------------------------------------------------- panels and files
def test_panel_places_tiles_and_caption(image):
    other = np.zeros((12, 5, 3), np.uint8)
    out = viz.panel([image, other, image], gap=3, background=(1, 2, 3))
    assert out.shape == (12, 16 + 3 + 5 + 3 + 16, 3)
    np.testing.assert_array_equal(out[:, :16], image)
    assert (out[:, 16:19] == (1, 2, 3)).all()
    np.testing.assert_array_equal(out[:, 19:24], other)
    np.testing.assert_array_equal(out[:, -16:], image)
    captioned = viz.panel([image], caption="one small lesion")
    assert captioned.shape == (30, 16, 3)
    np.testing.assert_array_equal(captioned[18:], image)
    assert (captioned[:18] != 255).any()  # the text was drawn
    with pytest.raises(ValueError, match="same height"):
        viz.panel([image, image[:5]])
    with pytest.raises(ValueError, match="at least one"):
        viz.panel([])


def test_save_image_round_trips(tmp_path, image, square):
    rgb = Image.open(viz.save_image(image, tmp_path / "a" / "rgb.png"))
    np.testing.assert_array_equal(np.asarray(rgb), image)
    mask = Image.open(viz.save_image(square, tmp_path / "mask.png"))
    assert mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask), square.astype(np.uint8) * 255)


# --------------------------------------------------------------------------- calibration
def _calibration_reference(p: np.ndarray, y: np.ndarray, bins: int):
    """Slow float64 loop over pixels."""
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for pi, yi in zip(p.ravel().tolist(), y.ravel().tolist()):
        b = min(math.floor(pi * bins), bins - 1)
        sums[b][0] += pi
        sums[b][1] += yi
        sums[b][2] += 1
    ece = sum(n * abs(sy / n - sp / n) for sp, sy, n in sums if n) / p.size
    conf = [sp / n if n else math.nan for sp, _, n in sums]
    freq = [sy / n if n else math.nan for _, sy, n in sums]
    return conf, freq, [n for *_, n in sums], ece


@pytest.mark.parametrize("bins", [1, 7, 10])
def test_calibration_curve_matches_reference(bins):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 1, 9, 11, generator=gen) ** 2
    probs[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    targets = (torch.rand(probs.shape, generator=gen) < probs).float()
    cal = viz.calibration_curve(probs, targets, num_bins=bins)
    conf, freq, counts, ece = _calibration_reference(probs.double().numpy(), targets.numpy(), bins)
    np.testing.assert_allclose(cal.confidence, conf, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cal.frequency, freq, rtol=1e-12)
    assert cal.counts.tolist() == counts
    assert cal.ece == pytest.approx(ece, abs=1e-7)
    np.testing.assert_allclose(cal.bin_edges, np.linspace(0, 1, bins + 1))


def test_calibration_of_a_calibrated_and_an_overconfident_model():
    # Probability 0.25 on 8 pixels of which exactly 2 are foreground: perfectly calibrated.
    probs = np.full(8, 0.25)
    targets = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    assert viz.calibration_curve(probs, targets).ece == pytest.approx(0.0, abs=1e-12)
    # Always 0.95 sure, right half the time: ECE = |0.5 - 0.95|.
    cal = viz.calibration_curve(np.full(4, 0.95), np.array([1, 0, 1, 0]))
    assert cal.ece == pytest.approx(0.45)
    assert cal.counts[-1] == 4 and np.isnan(cal.frequency[:-1]).all()


def test_calibration_bf16_probabilities_are_exact_in_float64():
    probs = torch.linspace(0, 1, 50).to(torch.bfloat16)
    targets = (torch.arange(50) % 3 == 0).float()
    cal = viz.calibration_curve(probs, targets, num_bins=5)
    ref = viz.calibration_curve(probs.double(), targets, num_bins=5)
    np.testing.assert_array_equal(cal.counts, ref.counts)
    assert cal.ece == ref.ece


def test_calibration_bad_inputs():
    with pytest.raises(ValueError, match=r"targets must have the shape of probs \(2, 3\)"):
        viz.calibration_curve(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        viz.calibration_curve(np.array([0.5, 1.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="binary"):
        viz.calibration_curve(np.array([0.5, 0.2]), np.array([0.5, 1]))
    with pytest.raises(ValueError, match="num_bins must be an int >= 1"):
        viz.calibration_curve(np.array([0.5]), np.array([1]), num_bins=0)
    with pytest.raises(ValueError, match="must not be empty"):
        viz.calibration_curve(np.zeros(0), np.zeros(0))


def test_reliability_diagram_names_the_extra_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"vlsegkit\[viz\]"):
        viz.reliability_diagram(np.array([0.2, 0.8]), np.array([0, 1]))


def test_reliability_diagram_draws_the_calibration_curve():
    pytest.importorskip("matplotlib")
    probs = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95])
    targets = np.array([0, 1, 0, 1, 1, 0])
    fig = viz.reliability_diagram(probs, targets, num_bins=10, title="test")
    ax = fig.axes[0]
    observed = ax.containers[0]
    heights = sorted(round(bar.get_height(), 6) for bar in observed)
    cal = viz.calibration_curve(probs, targets, num_bins=10)
    assert heights == sorted(np.round(cal.frequency[cal.counts > 0], 6).tolist())
    assert ax.get_title() == "test"
    assert f"{cal.ece:.3f}" in " ".join(t.get_text() for t in ax.get_legend().get_texts())


# --------------------------------------------------------------------------- text
def test_wrap_keeps_every_word_and_fits_the_width():
    from vlsegkit.viz import _text

    fnt = _text.font(14)
    text = "one tiny oval lesion at the top of the image and " * 6 + "end"
    lines = _text.wrap(text, fnt, 200)
    assert len(lines) > 3
    assert " ".join(lines) == text  # nothing cut, only the break spaces are dropped
    assert all(_text.text_width(line, fnt) <= 200 for line in lines)
    word = "x" * 200  # a single word wider than the line is split, not dropped
    pieces = _text.wrap(word, fnt, 50)
    assert "".join(pieces) == word and len(pieces) > 1
    assert _text.wrap("first\nsecond", fnt, 500) == ["first", "second"]


def test_bitmap_font_fallback(monkeypatch):
    """Pillow < 10.1 (no size argument) gets the bitmap font, and sheets still draw."""
    from PIL import ImageFont

    from vlsegkit.viz import _text

    bitmap = ImageFont.load_default_imagefont()  # what load_default() was before Pillow 10.1

    def old_pillow(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    _text.font.cache_clear()
    try:
        assert _text.font(20) is _text.font(14) is bitmap  # one fixed font for every size
        assert _text.line_height(bitmap) > 0 and _text.wrap("a b c", bitmap, 8) == ["a", "b", "c"]
        sheet = viz.overlay_sheet(
            [np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8))], [np.zeros((8, 8))], "a prompt"
        )
        assert sheet.width == 2 * 10 + 3 * 256 + 2 * 6
    finally:
        _text.font.cache_clear()


# --------------------------------------------------------------------------- example selection
def test_select_examples_spread_is_worst_median_best():
    picks = viz.select_examples([0.1, 0.9, 0.5, 0.3, 0.7], n=3)
    assert [p.index for p in picks] == [1, 2, 0]
    assert [p.label for p in picks] == ["best", "median", "worst"]
    assert [p.rank for p in picks] == [1, 3, 5]


def test_select_examples_modes_and_labels():
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    every = viz.select_examples(scores, n=10)  # more than there are: all, best to worst
    assert [p.index for p in every] == [1, 4, 2, 3, 0]
    assert [p.label for p in every] == [
        "best", "75th percentile", "median", "25th percentile", "worst",
    ]  # fmt: skip
    assert [p.index for p in viz.select_examples(scores, 2, mode="best")] == [1, 4]
    assert [p.index for p in viz.select_examples(scores, 2, mode="worst")] == [0, 3]
    assert [p.index for p in viz.select_examples(scores, 2, mode="first")] == [0, 1]
    low = viz.select_examples(scores, 3, higher_is_better=False)  # e.g. a loss
    assert [(p.index, p.label) for p in low] == [(0, "best"), (2, "median"), (1, "worst")]
    assert viz.select_examples(scores, mode=[3]) == [viz.RankedExample(3, 4, "25th percentile")]
    # Ties keep their order (3, 0, 1, 4, 2, 5); 6 scores and n=3: ranks 1, 4 (3.5 rounded up), 6.
    tied = viz.select_examples([0.5, 0.5, 0.2, 0.9, 0.5, 0.1], n=3)
    assert [(p.index, p.rank) for p in tied] == [(3, 1), (4, 4), (5, 6)]
    assert tied[1].label == "40th percentile"  # 2 of the 5 others score lower
    # Ranks are evenly spread and never repeated.
    many = viz.select_examples(np.linspace(1, 0, 64), n=6)
    assert [p.rank for p in many] == [1, 14, 26, 39, 51, 64]
    assert viz.select_examples([0.3], n=3) == [viz.RankedExample(0, 1, "only example")]


def test_select_examples_bad_inputs():
    with pytest.raises(ValueError, match="finite"):
        viz.select_examples([0.1, math.nan])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        viz.select_examples([])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        viz.select_examples([0.1], n=0)
    with pytest.raises(ValueError, match="mode must be"):
        viz.select_examples([0.1], mode="random")
    with pytest.raises(ValueError, match="index 5 is out of range for 2 scores"):
        viz.select_examples([0.1, 0.2], mode=[0, 5])


def test_dice_per_image():
    masks = np.zeros((3, 1, 4, 4))
    masks[0, 0, :2] = 1  # 8 pixels
    masks[1, 0, 0, 0] = 1
    probs = np.zeros((3, 1, 4, 4))
    probs[0, 0, :1] = 0.9  # 4 predicted, all inside: 2·4 / (4 + 8)
    probs[1, 0, 3, 3] = 0.7  # disjoint
    dice = viz.dice_per_image(masks, torch.from_numpy(probs))
    np.testing.assert_allclose(dice, [8 / 12, 0.0, 1.0])  # image 2: both empty scores 1
    assert viz.dice_per_image(masks, probs, empty_score=0.5)[2] == 0.5
    with pytest.raises(ValueError, match="masks: 3, probs: 2"):
        viz.dice_per_image(masks, probs[:2])


# --------------------------------------------------------------------------- overlay sheet
_SOLID = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


@pytest.fixture
def cases():
    """Five solid-colour 32 x 32 images whose predictions score Dice 0.1 ... 0.9 (by design)."""
    images = [np.broadcast_to(np.uint8(c), (32, 32, 3)).copy() for c in _SOLID]
    masks = np.zeros((5, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    probs = np.zeros((5, 32, 32))
    probs[:, 8:24, 8:24] = 0.9
    return images, masks, probs


def _rows_of(sheet: Image.Image, color, x0: int, x1: int) -> list[int]:
    """Top rows of the blocks of ``color`` between columns x0 and x1 (one per row tile)."""
    arr = np.asarray(sheet)[:, x0:x1]
    hit = (arr == color).all(-1).any(1)
    return [int(y) for y in np.flatnonzero(hit & ~np.r_[False, hit[:-1]])]


def test_overlay_sheet_layout_and_tile_size(cases):
    images, masks, probs = cases
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    sheet = viz.overlay_sheet(images, masks, probs, "lesion", scores=scores, n=3)
    assert sheet.mode == "RGB"
    assert sheet.width == 2 * 10 + 3 * 256 + 2 * 6  # three 256 px columns (32 px enlarged x8)
    arr = np.asarray(sheet)
    tops = {}
    for index in (1, 2, 0):  # best, median, worst
        color = _SOLID[index]
        # The image column (x 10 ... 266) holds exactly one 256 x 256 block of the picture.
        block = (arr[:, 10:266] == color).all(-1)
        assert block.sum() == 256 * 256, index
        rows = np.flatnonzero(block.any(1))
        assert rows[-1] - rows[0] + 1 == 256
        tops[index] = int(rows[0])
    assert tops[1] < tops[2] < tops[0]  # rows run best to worst
    for index in (3, 4):  # not selected
        assert not (arr == _SOLID[index]).all(-1).any()
    # Ground truth and prediction columns are tinted with their colours, outlines in full colour.
    gt_col, pred_col = arr[:, 272:528], arr[:, 534:790]
    # The 16 px square becomes 128 px; its outline is drawn 1 px wide at tile resolution.
    assert (gt_col == viz.TP_COLOR).all(-1).sum() == 3 * 4 * 127
    assert (pred_col == viz.FP_COLOR).all(-1).sum() == 3 * 4 * 127
    assert sheet.height > 3 * 256


def test_overlay_sheet_draws_the_row_title_text(cases):
    """The row title is pixel-for-pixel the expected words in Pillow's default font."""
    from PIL import ImageDraw

    from vlsegkit.viz import _text

    images, masks, probs = cases
    sheet = viz.overlay_sheet(images, masks, probs, None, scores=[0.1, 0.9, 0.5, 0.3, 0.7], n=3)
    fnt = _text.font(14)
    step = _text.line_height(fnt)
    for index, words in [
        (1, "best · Dice 0.900 · #1 (rank 1 of 5)"),
        (2, "median · Dice 0.500 · #2 (rank 3 of 5)"),
        (0, "worst · Dice 0.100 · #0 (rank 5 of 5)"),
    ]:
        top = _rows_of(sheet, _SOLID[index], 10, 266)[0]
        band = sheet.crop((0, top - 2 - step, sheet.width, top - 2))
        expected = Image.new("RGB", band.size, "white")
        ImageDraw.Draw(expected).text((10, 0), words, font=fnt, fill=(0, 0, 0))
        np.testing.assert_array_equal(np.asarray(band), np.asarray(expected))


def test_overlay_sheet_titles_are_drawn_in_their_bands(cases):
    images, masks, probs = cases
    plain = np.asarray(
        viz.overlay_sheet(images, masks, probs, "p", n=2, columns=("", "", ""), title="")
    )
    titled = np.asarray(viz.overlay_sheet(images, masks, probs, "p", n=2))
    assert plain.shape == titled.shape  # one-line titles: same layout
    tops = [_rows_of(Image.fromarray(plain), c, 10, 266) for c in _SOLID]
    first_tile = min(t[0] for t in tops if t)
    differs = (plain != titled).any(-1)
    assert not differs[first_tile:].any()  # only text above the first row changed
    for x0 in (10, 272, 534):  # every column has its title
        assert differs[:first_tile, x0 : x0 + 256].any()


def test_overlay_sheet_wraps_long_prompts(cases):
    from vlsegkit.viz import _text

    images, masks, probs = cases
    short = viz.overlay_sheet(images[:1], masks[:1], probs[:1], ["one small round lesion"])
    prompt = "two lesions, one tiny oval lesion at the top of the image " * 5 + "and the end"
    long = viz.overlay_sheet(images[:1], masks[:1], probs[:1], [prompt])
    assert long.width == short.width
    lines = _text.wrap(f"prompt: {prompt}", _text.font(12), short.width - 20)
    assert len(lines) >= 3 and " ".join(lines) == f"prompt: {prompt}"
    assert long.height - short.height == (len(lines) - 1) * _text.line_height(_text.font(12))
    # Every prompt line is drawn: the text band has ink on each of the extra lines.
    top = _rows_of(long, _SOLID[0], 10, 266)[0]
    band = np.asarray(long)[top - 2 - len(lines) * _text.line_height(_text.font(12)) : top - 2]
    per_line = band.reshape(len(lines), -1, long.width, 3)
    assert all((line < 128).any() for line in per_line)


def test_overlay_sheet_default_scores_are_dice(cases):
    images, masks, probs = cases
    probs = probs.copy()
    probs[0, 8:24, 8:16] = 0.0  # half the lesion found: Dice 2·128 / (128 + 256) = 0.667
    probs[2] = 0.0  # nothing found: Dice 0
    probs[3, 8:24, 12:24] = 0.0  # a quarter: Dice 128 / 320 = 0.4
    probs[4, 8:24, 20:24] = 0.0  # three quarters: Dice 384 / 448 = 0.857; image 1: Dice 1
    np.testing.assert_allclose(viz.dice_per_image(masks, probs), [2 / 3, 1.0, 0.0, 0.4, 384 / 448])
    sheet = viz.overlay_sheet(images, masks, probs, "lesion", n=3)
    tops = {i: _rows_of(sheet, _SOLID[i], 10, 266) for i in range(5)}
    shown = sorted((t[0], i) for i, t in tops.items() if t)
    assert [i for _, i in shown] == [1, 0, 2]  # best, median, worst by Dice


def test_overlay_sheet_errors_and_uncertainty_columns(cases):
    images, masks, probs = cases
    probs = probs.copy()
    probs[:, 8:24, 8:16] = 0.0  # left half missed
    probs[:, 0:4, 0:4] = 0.9  # a false positive
    unc = [np.full((32, 32), float(v)) for v in (0.0, 0.1, 0.2, 0.3, 0.4)]
    sheet = viz.overlay_sheet(
        images, masks, probs, "lesion", n=2, select="first", errors=True, uncertainty=unc
    )
    assert sheet.width == 2 * 10 + 4 * 256 + 3 * 6
    arr = np.asarray(sheet)
    pred_col = arr[:, 534:790]
    # Row 0 (image 0): the missed 16 x 8 pixels, enlarged x8, are drawn in the miss colour.
    missed = viz.overlay_prediction(images[0], probs[0], masks[0])[12, 12]
    assert tuple(missed) != tuple(images[0][12, 12])
    assert (pred_col == missed).all(-1).sum() == 16 * 8 * 64
    # The uncertainty column: one scale over the shown rows (0.0 and 0.1): first and last colour.
    unc_col = arr[:, 796:1052]
    low, high = viz.apply_colormap(np.array([[0.0, 1.0]]), cmap="inferno", vmin=0, vmax=1)[0]
    assert (unc_col == low).all(-1).sum() >= 256 * 256
    assert (unc_col == high).all(-1).sum() >= 256 * 256


def test_overlay_sheet_accepts_batches_and_unlabelled_images(cases):
    images, masks, probs = cases
    from_lists = viz.overlay_sheet(images, list(masks), list(probs), ["a"] * 5, n=3)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    from_batch = viz.overlay_sheet(
        batch, torch.from_numpy(masks)[:, None].float(), torch.from_numpy(probs)[:, None], "a", n=3
    )
    np.testing.assert_array_equal(np.asarray(from_lists), np.asarray(from_batch))
    # No ground truth: image | prediction, in the given order.
    unlabelled = viz.overlay_sheet(images, None, probs, "a", n=2)
    assert unlabelled.width == 2 * 10 + 2 * 256 + 6
    tops = [_rows_of(unlabelled, c, 10, 266) for c in _SOLID]
    assert tops[0][0] < tops[1][0] and not tops[2]


def test_overlay_sheet_large_images_are_reduced_to_the_tile():
    image = np.full((600, 300, 3), (90, 160, 40), np.uint8)
    mask = np.zeros((600, 300), bool)
    sheet = viz.overlay_sheet([image], [mask], [mask.astype(float)], "p", tile=256)
    assert sheet.width == 2 * 10 + 3 * 128 + 2 * 6  # 600 x 300 -> 256 x 128
    block = (np.asarray(sheet)[:, 10:138] == (90, 160, 40)).all(-1)
    assert block.sum() == 256 * 128
    # A very narrow sheet: row titles and prompts wrap onto many lines, none drawn over the tiles.
    tiny = viz.overlay_sheet([image], [mask], [mask.astype(float)], "a long prompt " * 5, tile=16)
    assert tiny.width == 2 * 10 + 3 * 8 + 2 * 6 and tiny.height > 200
    assert (np.asarray(tiny) == (90, 160, 40)).all(-1).sum() == 3 * 16 * 8  # empty masks


def test_overlay_sheet_bad_inputs(cases):
    images, masks, probs = cases
    with pytest.raises(ValueError, match="images: 5, masks: 4, probs: 5, prompts: 5"):
        viz.overlay_sheet(images, masks[:4], probs, "a")
    with pytest.raises(ValueError, match=r"probs\[1\] must have the image's shape"):
        viz.overlay_sheet(images, masks, [probs[0], probs[1, :8], *probs[2:]], "a", n=5)
    with pytest.raises(ValueError, match=r"masks\[0\] must be binary"):
        viz.overlay_sheet(images, probs, probs, "a", n=5)
    with pytest.raises(ValueError, match="columns must name the 3 columns drawn"):
        viz.overlay_sheet(images, masks, probs, "a", columns=("a", "b"))
    with pytest.raises(ValueError, match="tile must be an int >= 16"):
        viz.overlay_sheet(images, masks, probs, "a", tile=8)
    with pytest.raises(ValueError, match=r"scores must have one value per image \(5\), got 2"):
        viz.overlay_sheet(images, masks, probs, "a", scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="float images must be in"):
        viz.overlay_sheet([np.full((32, 32, 3), 2.0)], masks[:1], probs[:1], "a")


def test_save_overlay_sheet_writes_atomically(tmp_path, cases, monkeypatch):
    images, masks, probs = cases
    path = viz.save_overlay_sheet(tmp_path / "out" / "sheet.png", images, masks, probs, "a", n=2)
    assert path == tmp_path / "out" / "sheet.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(path)), np.asarray(viz.overlay_sheet(images, masks, probs, "a", n=2))
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["sheet.png"]  # no temporary left
    # A failing write leaves the previous picture in place and no temporary file.
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        viz.save_overlay_sheet(path, images, masks, probs, "a", n=3)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["sheet.png"]
    with pytest.raises(ValueError, match=r"image suffix such as \.png"):
        viz.save_image(images[0], tmp_path / "sheet.txt")


# --------------------------------------------------------------------------- uncertainty sheet
def test_uncertainty_sheet_panels_and_scales():
    image = np.full((32, 32, 3), (20, 120, 220), np.uint8)
    mean = np.tile(np.linspace(0, 1, 32), (32, 1))
    entropy = np.tile(np.linspace(0, 0.6, 32)[:, None], (1, 32))
    aleatoric, epistemic = 0.75 * entropy, 0.25 * entropy
    mask = mean > 0.5
    sheet = viz.uncertainty_sheet(
        image, mean[None], entropy, aleatoric, epistemic, prompt="one lesion", mask=mask
    )
    assert sheet.width == 2 * 10 + 5 * 256 + 4 * 6
    arr = np.asarray(sheet)
    top = _rows_of(sheet, (20, 120, 220), 10, 266)[0]
    xs = [10 + k * 262 for k in range(5)]

    def tile(k):
        return arr[top : top + 256, xs[k] : xs[k] + 256]

    def big(values):
        return np.kron(values, np.ones((8, 8)))

    # Each uncertainty map on its own range: all three look the same, bars say the values.
    for k, values in zip((2, 3, 4), (entropy, aleatoric, epistemic)):
        expected = viz.apply_colormap(big(values), cmap="inferno")
        np.testing.assert_array_equal(tile(k), expected)
    # The mean probability on [0, 1] (viridis), with the p > 0.5 contour in white.
    prob = viz.apply_colormap(big(mean), cmap="viridis", vmin=0, vmax=1)
    same = (tile(1) == prob).all(-1)
    assert same.mean() > 0.98 and (tile(1)[~same] == 255).all()
    # Colour bars under the four maps (the whole colour map, left to right), none under the image.
    below = arr[top + 256 + 4 : top + 256 + 4 + 12]
    for k, cmap in ((1, "viridis"), (2, "inferno"), (3, "inferno"), (4, "inferno")):
        ramp = viz.apply_colormap(np.linspace(0, 1, 256)[None], cmap=cmap, vmin=0, vmax=1)
        np.testing.assert_array_equal(below[:, xs[k] : xs[k] + 256], np.repeat(ramp, 12, 0))
    assert (below[:, xs[0] : xs[0] + 256] == 255).all()
    # One shared scale: epistemic (a quarter of the entropy) stays in the low colours.
    shared = np.asarray(
        viz.uncertainty_sheet(image, mean, entropy, aleatoric, epistemic, shared_scale=True)
    )
    top2 = _rows_of(Image.fromarray(shared), (20, 120, 220), 10, 266)[0]
    np.testing.assert_array_equal(
        shared[top2 : top2 + 256, xs[4] : xs[4] + 256],
        viz.apply_colormap(big(epistemic), cmap="inferno", vmin=0, vmax=0.6),
    )


def test_uncertainty_sheet_prompt_wraps_and_bad_inputs():
    image = np.zeros((16, 16, 3), np.uint8)
    maps = [np.full((16, 16), 0.3)] * 4
    short = viz.uncertainty_sheet(image, *maps, prompt="lesion")
    long = viz.uncertainty_sheet(image, *maps, prompt="a very long prompt " * 40)
    assert long.width == short.width and long.height > short.height
    with pytest.raises(ValueError, match=r"mean must be probabilities in \[0, 1\]"):
        viz.uncertainty_sheet(image, np.full((16, 16), 1.5), *maps[1:])
    with pytest.raises(ValueError, match=r"epistemic must have the image's shape"):
        viz.uncertainty_sheet(image, *maps[:3], np.zeros((8, 8)))
    with pytest.raises(ValueError, match="entropy must be finite"):
        viz.uncertainty_sheet(image, maps[0], np.full((16, 16), math.nan), *maps[2:])


# --------------------------------------------------------------------------- training curves
def _epoch_records(epochs: int = 6) -> list[dict]:
    records = []
    for e in range(epochs):
        records.append({"step": 4 * e + 2, "epoch": e, "loss": 0.9, "lr": 1e-3})  # a step record
        records.append(
            {
                "step": 4 * (e + 1),
                "epoch": e,
                "train_loss": 1.0 / (e + 1),
                "train_dice": 0.6 / (e + 1),
                "train_softcon": 0.2 / (e + 1),
                "val_dice": 0.1 + 0.1 * e,
                "val_loss": None if e == 2 else 0.9 - 0.1 * e,  # fit writes NaN as null
                "val_count": 32,  # evaluate's sample count: not a curve
                "note": "text values are not curves",
            }
        )
    return records


def test_read_epoch_records_from_jsonl_and_lists(tmp_path):
    import json

    records = _epoch_records(3)
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in records] + ['{"step": 13, "epoch": 3, "train_lo']  # cut off
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        read = viz.read_epoch_records(path)
    assert [r["epoch"] for r in read] == [0, 1, 2]
    assert read[0] == records[1]
    assert math.isnan(read[2]["val_loss"])
    from_list = viz.read_epoch_records(records)  # e.g. fit(..., log_fn=records.append)
    assert from_list[:2] == read[:2] and math.isnan(from_list[2]["val_loss"])
    assert from_list[2] is not records[5]  # new dicts: the caller's records are not changed
    assert records[5]["val_loss"] is None
    with pytest.raises(ValueError, match="no epoch records"):
        viz.read_epoch_records([{"step": 1, "epoch": 0, "loss": 0.5}])
    with pytest.raises(FileNotFoundError):
        viz.read_epoch_records(tmp_path / "missing.jsonl")


def test_curve_series_and_ticks():
    from vlsegkit.viz import curves

    x, series = curves._series(viz.read_epoch_records(_epoch_records(3)))
    assert x.tolist() == [1.0, 2.0, 3.0]  # 1-based epochs
    assert list(series) == ["train_loss", "train_dice", "train_softcon", "val_dice", "val_loss"]
    np.testing.assert_allclose(series["val_loss"], [0.9, 0.8, math.nan])
    # Records of several fit(epochs=1) calls all say epoch 0: plotted in order instead.
    repeated = [{"epoch": 0, "train_loss": v} for v in (0.5, 0.4, 0.3)]
    assert curves._series(repeated)[0].tolist() == [1.0, 2.0, 3.0]
    assert curves._panels(["train_loss", "val_dice", "lr", "train_dice"]) == [
        ("training", ["train_loss", "train_dice"]),
        ("validation", ["val_dice"]),
        ("other", ["lr"]),
    ]
    assert curves._nice_range(0.13, 0.62) == pytest.approx((0.1, 0.7, 0.1))
    assert curves._nice_range(0.0, 1.0) == pytest.approx((0.0, 1.0, 0.2))
    assert curves._nice_range(2.0, 2.0) == pytest.approx((1.8, 2.2, 0.1))
    assert curves._tick_label(0.25, 0.25) == "0.25" and curves._tick_label(4.0, 2.0) == "4"


def _color_count(image: Image.Image, color) -> int:
    return int((np.asarray(image) == color).all(-1).sum())


def test_training_curves_image_draws_every_series():
    records = _epoch_records(8)
    image = viz.training_curves_image(records)
    assert image.mode == "RGB"
    assert image.size[0] == 2 * 10 + 2 * 480 + 10  # a training and a validation panel
    # Each curve's colour covers a line across its panel (hundreds of pixels), far more than
    # its 16 x 2 legend swatch; the colours are distinct.
    colors = viz.CURVE_COLORS[:5]
    assert len(set(colors)) == 5
    for color in colors:
        assert _color_count(image, color) > 400, color
    assert _color_count(image, viz.CURVE_COLORS[5]) == 0  # no sixth series
    # A series without a single finite value is listed in the legend but draws no line.
    for r in records:
        if "train_loss" in r:
            r["val_dice"] = None
    blank = viz.training_curves_image(records)
    assert 0 < _color_count(blank, viz.CURVE_COLORS[3]) < 100
    # A third panel for keys that are neither train_ nor val_.
    for r in records:
        r["lr"] = 0.001
    assert viz.training_curves_image(records).size[0] == 2 * 10 + 3 * 480 + 2 * 10
    # One epoch still draws (a dot per series).
    single = viz.training_curves_image(_epoch_records(1))
    assert all(_color_count(single, c) > 32 for c in colors)


def test_plot_training_curves_writes_the_pillow_picture(tmp_path):
    import json

    records = _epoch_records(5)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = viz.plot_training_curves(log, tmp_path / "run" / "curves.png")
    assert path == tmp_path / "run" / "curves.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(path)), np.asarray(viz.training_curves_image(records))
    )
    with pytest.raises(ValueError, match="backend must be"):
        viz.plot_training_curves(records, tmp_path / "x.png", backend="svg")


def test_training_curves_and_reliability_without_matplotlib(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    records = _epoch_records(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = viz.plot_training_curves(records, tmp_path / "auto.png", backend="auto")
        assert not caught  # auto quietly uses Pillow
        asked = viz.plot_training_curves(records, tmp_path / "asked.png", backend="matplotlib")
        skipped = viz.save_reliability_diagram(
            np.array([0.2, 0.8]), np.array([0, 1]), tmp_path / "reliability.png"
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("\n" not in m for m in messages)  # one line each
    assert 'matplotlib is not installed (pip install "vlsegkit[viz]")' in messages[0]
    assert messages[1].startswith("reliability diagram skipped: matplotlib is not installed")
    assert skipped is None and not (tmp_path / "reliability.png").exists()
    pillow = np.asarray(viz.training_curves_image(records))
    np.testing.assert_array_equal(np.asarray(Image.open(auto)), pillow)
    np.testing.assert_array_equal(np.asarray(Image.open(asked)), pillow)


def test_matplotlib_curves_and_reliability_file(tmp_path):
    pytest.importorskip("matplotlib")
    path = viz.plot_training_curves(_epoch_records(4), tmp_path / "c.png", backend="matplotlib")
    assert Image.open(path).format == "PNG" and Image.open(path).width > 300
    probs = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95])
    saved = viz.save_reliability_diagram(probs, np.array([0, 1, 0, 1, 1, 0]), tmp_path / "r.png")
    assert saved == tmp_path / "r.png" and Image.open(saved).format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "r.png"]
