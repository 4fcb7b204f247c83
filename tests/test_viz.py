"""vlsegkit.viz: pixel values of overlays and heat maps, colour-map anchors, calibration numbers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlsegkit import viz
from vlsegkit.demo import overlay as demo_overlay


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
    # The same pixels as the demo's panels.
    np.testing.assert_array_equal(out, demo_overlay(image, square, color=color, alpha=0.25))


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
