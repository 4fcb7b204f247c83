"""vlsegkit.data.to_image_tensor: every PIL mode, numpy / torch dtype and layout, against values
written out by hand; and the inputs it refuses, with messages that name ``image``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlsegkit.data import to_image_tensor


def grey3(values) -> torch.Tensor:
    """``(3, H, W)`` float32 tensor repeating a 2-D float64 array on three channels."""
    return torch.from_numpy(np.asarray(values, np.float64)).float().expand(3, -1, -1)


def chw(values) -> torch.Tensor:
    """``(3, H, W)`` float32 tensor from an ``(H, W, 3)`` float64 array."""
    return torch.from_numpy(np.asarray(values, np.float64)).float().permute(2, 0, 1)


U8 = np.array([[0, 51, 255], [102, 204, 1]], np.uint8)  # 51 / 255 = 0.2, 102 / 255 = 0.4, ...
U8_UNIT = [[0.0, 0.2, 1.0], [0.4, 0.8, 1 / 255]]
RGB = np.array([[[255, 0, 0], [0, 51, 0]], [[0, 0, 102], [255, 255, 255]]], np.uint8)
RGB_UNIT = [[[1.0, 0.0, 0.0], [0.0, 0.2, 0.0]], [[0.0, 0.0, 0.4], [1.0, 1.0, 1.0]]]


# --------------------------------------------------------------------------- PIL modes
def test_pil_8_bit_modes():
    exact = {"rtol": 0, "atol": 1e-7}
    torch.testing.assert_close(to_image_tensor(Image.fromarray(U8)), grey3(U8_UNIT), **exact)
    torch.testing.assert_close(to_image_tensor(Image.fromarray(RGB)), chw(RGB_UNIT), **exact)
    rgba = np.concatenate([RGB, np.full((2, 2, 1), 9, np.uint8)], axis=-1)
    # Alpha is dropped, not composited: the colours stay as they are.
    torch.testing.assert_close(to_image_tensor(Image.fromarray(rgba)), chw(RGB_UNIT), **exact)
    la = Image.fromarray(np.stack([U8, np.zeros_like(U8)], axis=-1), mode="LA")
    torch.testing.assert_close(to_image_tensor(la), grey3(U8_UNIT), **exact)
    bilevel = Image.fromarray(np.array([[True, False], [False, True]]))
    assert bilevel.mode == "1"
    torch.testing.assert_close(to_image_tensor(bilevel), grey3([[1, 0], [0, 1]]), **exact)


def test_pil_palette_and_other_colour_spaces():
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 51, 255, 0, 0, 0])  # index 0 red, 1 (0, 51, 255), 2 black
    expected = [[[1, 0, 0], [0, 0.2, 1]], [[0, 0, 0], [0, 0.2, 1]]]
    torch.testing.assert_close(to_image_tensor(palette), chw(expected), rtol=0, atol=1e-7)
    # CMYK (0, 0, 0, 0) is white and (255, 0, 0, 0), full cyan, is (0, 255, 255).
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    torch.testing.assert_close(to_image_tensor(cmyk), chw([[[1, 1, 1], [0, 1, 1]]]))


def test_pil_16_bit_and_32_bit_integer_images_use_the_16_bit_scale():
    values = np.array([[0, 257, 65535], [1000, 32768, 1]], np.uint16)
    expected = grey3(values.astype(np.float64) / 65535)
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    torch.testing.assert_close(to_image_tensor(sixteen), expected, rtol=0, atol=1e-7)
    # Mode 'I' (what older Pillow decodes 16-bit PNGs to) is read as 16-bit data too, where the
    # old predict path saturated everything above 255 to white.
    int32 = Image.fromarray(values.astype(np.int32))
    assert int32.mode == "I"
    torch.testing.assert_close(to_image_tensor(int32), expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"image: PIL mode 'I'.*\[0, 65535\].*\[0, 70000\]"):
        to_image_tensor(Image.fromarray(np.array([[0, 70000]], np.int32)))
    with pytest.raises(ValueError, match=r"image: PIL mode 'I'.*\[-5, 3\]"):
        to_image_tensor(Image.fromarray(np.array([[-5, 3]], np.int32)))


def test_pil_float_images_follow_the_float_rule():
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    torch.testing.assert_close(to_image_tensor(Image.fromarray(unit)), grey3(unit), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"image: float images must be in \[0, 1\].*by 255"):
        to_image_tensor(Image.fromarray(unit * 255))


# --------------------------------------------------------------------------- numpy arrays
def test_numpy_dtypes_and_layouts():
    exact = {"rtol": 0, "atol": 1e-7}
    torch.testing.assert_close(to_image_tensor(U8), grey3(U8_UNIT), **exact)
    torch.testing.assert_close(to_image_tensor(U8[..., None]), grey3(U8_UNIT), **exact)
    torch.testing.assert_close(to_image_tensor(RGB), chw(RGB_UNIT), **exact)
    rgba = np.concatenate([RGB, np.zeros((2, 2, 1), np.uint8)], axis=-1)
    torch.testing.assert_close(to_image_tensor(rgba), chw(RGB_UNIT), **exact)
    # Channels first when only that reading fits: (3, 2, 5) cannot be (H, W, C).
    wide = np.random.default_rng(0).integers(0, 256, (2, 5, 3), dtype=np.uint8)
    first = to_image_tensor(np.ascontiguousarray(wide.transpose(2, 0, 1)))
    torch.testing.assert_close(first, chw(wide / 255.0), **exact)
    sixteen = np.array([[0, 65535], [257, 4096]], np.uint16)
    torch.testing.assert_close(to_image_tensor(sixteen), grey3(sixteen / 65535.0), **exact)
    big_endian = sixteen.astype(">u2")
    torch.testing.assert_close(to_image_tensor(big_endian), grey3(sixteen / 65535.0), **exact)
    floats = np.array([[0.0, 0.5], [0.125, 1.0]])
    for dtype in (np.float16, np.float32, np.float64):
        out = to_image_tensor(floats.astype(dtype))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, grey3(floats), rtol=0, atol=0)


def test_output_owns_its_memory_for_numpy_input():
    arr = RGB.copy()
    out = to_image_tensor(arr)
    arr[:] = 0
    torch.testing.assert_close(out, chw(RGB_UNIT), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 2), np.int32), r"image: dtype int32 has no defined value range"),
        (np.zeros((2, 2), np.int64), r"image: dtype int64"),
        (np.full((2, 2), 200.0), r"image: float images must be in \[0, 1\].*\[200, 200\].*255"),
        (np.full((2, 2), -0.5), r"image: float images must be in \[0, 1\].*normalisation"),
        (np.array([[0.5, np.nan]]), r"image: float images must be finite"),
        # The alpha channel is dropped, but it is checked first: 2.0 means malformed data.
        (np.array([[[0.0, 0.5, 1.0, 2.0]]] * 5), r"image: float images must be in \[0, 1\]"),
        (np.array([[0.5, np.inf]]), r"image: float images must be finite"),
        (np.zeros((2, 3, 4, 5), np.uint8), r"image: .*\(2, 3, 4, 5\).*list of images"),
        (np.zeros((5, 6, 2), np.uint8), r"image: .*C in \{1, 3, 4\}, got \(5, 6, 2\)"),
        (np.zeros(5, np.uint8), r"image: .*got \(5,\)"),
        (np.zeros((0, 4, 3), np.uint8), r"image: height and width must be non-zero"),
    ],
)
def test_numpy_refusals_name_the_argument(array, match):
    with pytest.raises(ValueError, match=match):
        to_image_tensor(array)


def test_ambiguous_layouts_warn_and_follow_the_type_convention():
    arr = np.random.default_rng(1).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"image: a numpy array of shape \(3, 5, 4\) reads as"):
        out = to_image_tensor(arr)
    # numpy: channels last, a 3x5 RGBA image whose alpha is dropped.
    torch.testing.assert_close(out, chw(arr[..., :3] / 255.0), rtol=0, atol=1e-7)
    t = torch.from_numpy(arr)
    with pytest.warns(UserWarning, match=r"image: a tensor of shape \(3, 5, 4\) reads as"):
        out = to_image_tensor(t)
    # torch: channels first, a 5x4 RGB image.
    torch.testing.assert_close(out, t.double().div(255).float(), rtol=0, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unambiguous shapes stay silent
        to_image_tensor(np.zeros((5, 6, 3), np.uint8))
        to_image_tensor(torch.zeros(3, 5, 6))


# --------------------------------------------------------------------------- tensors
def test_tensor_dtypes_layouts_device_and_autograd():
    exact = {"rtol": 0, "atol": 1e-7}
    t = torch.from_numpy(RGB).permute(2, 0, 1)
    torch.testing.assert_close(to_image_tensor(t), chw(RGB_UNIT), **exact)
    torch.testing.assert_close(to_image_tensor(torch.from_numpy(U8)), grey3(U8_UNIT), **exact)
    with pytest.warns(UserWarning, match=r"\(1, 2, 3\) reads as \(C, H, W\)"):  # or 1x2 RGB
        one = to_image_tensor(torch.from_numpy(U8)[None])
    torch.testing.assert_close(one, grey3(U8_UNIT), **exact)
    # (H, W, C) tensors are accepted when that is the only reading.
    hwc = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8))
    torch.testing.assert_close(to_image_tensor(hwc), hwc.permute(2, 0, 1).double().div(255).float())
    four = torch.cat([t, torch.zeros(1, 2, 2, dtype=torch.uint8)])
    torch.testing.assert_close(to_image_tensor(four), chw(RGB_UNIT), **exact)
    floats = torch.tensor([[0.0, 0.5], [0.25, 1.0]], dtype=torch.float64, requires_grad=True)
    out = to_image_tensor(floats)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    out.sum().backward()
    assert torch.equal(floats.grad, torch.full((2, 2), 3.0, dtype=torch.float64))
    for dtype in (torch.float16, torch.bfloat16):
        half = to_image_tensor(torch.tensor([[0.0, 0.5]], dtype=dtype))
        torch.testing.assert_close(half, grey3([[0.0, 0.5]]), rtol=0, atol=0)
    if getattr(torch, "uint16", None) is not None:
        sixteen = torch.tensor([[0, 65535]], dtype=torch.int32).to(torch.uint16)
        torch.testing.assert_close(to_image_tensor(sixteen), grey3([[0.0, 1.0]]), **exact)


def test_bool_images_are_bilevel_like_pil_mode_1():
    bits = np.array([[True, False, True], [False, False, True]])
    expected = grey3(bits.astype(np.float64))
    assert torch.equal(to_image_tensor(bits), expected)
    assert torch.equal(to_image_tensor(torch.from_numpy(bits)), expected)
    assert torch.equal(to_image_tensor(Image.fromarray(bits)), expected)


def test_float_rounding_slack_is_clamped():
    out = to_image_tensor(torch.tensor([[1.0005, -0.0004]]))
    assert torch.equal(out, grey3([[1.0, 0.0]]))


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.ones(3, 4, 4, dtype=torch.int64), r"image: dtype torch.int64 has no defined"),
        (torch.ones(3, 4, 4, dtype=torch.int32), r"image: dtype torch.int32"),
        (torch.full((3, 4, 5), 255.0), r"image: float images must be in \[0, 1\]"),
        (torch.full((3, 4, 5), float("nan")), r"image: float images must be finite"),
        (torch.zeros(1, 3, 4, 4), r"image: .*\(1, 3, 4, 4\).*list of images"),
        (torch.zeros(2, 5, 6), r"image: .*got \(2, 5, 6\)"),
        (torch.zeros(3, 0, 5), r"image: height and width must be non-zero"),
    ],
)
def test_tensor_refusals_name_the_argument(tensor, match):
    with pytest.raises(ValueError, match=match):
        to_image_tensor(tensor)


def test_other_types_are_refused():
    with pytest.raises(TypeError, match="image must be a PIL image, a numpy array or a torch"):
        to_image_tensor([[0, 1], [1, 0]])


# --------------------------------------------------------------------------- the old contract
def _old_to_image_tensor(image):
    """``vlsegkit.models.base.to_image_tensor`` before the shared conversion, for its inputs."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3:
            arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
        t = torch.from_numpy(np.array(arr, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    else:
        t = image.unsqueeze(0) if image.dim() == 2 else image
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t


@pytest.mark.parametrize(
    "make",
    [
        lambda g: g.integers(0, 256, (7, 9), dtype=np.uint8),
        lambda g: g.integers(0, 256, (7, 9, 1), dtype=np.uint8),
        lambda g: g.integers(0, 256, (7, 9, 3), dtype=np.uint8),
        lambda g: g.integers(0, 256, (7, 9, 4), dtype=np.uint8),
        lambda g: g.random((7, 9, 3)),
        lambda g: g.random((7, 9)).astype(np.float32),
        lambda g: torch.from_numpy(g.integers(0, 256, (3, 7, 9), dtype=np.uint8)),
        lambda g: torch.from_numpy(g.random((1, 7, 9))).float(),
        lambda g: torch.from_numpy(g.random((7, 9))).float(),
        lambda g: torch.from_numpy(g.random((3, 7, 9))),
    ],
)
def test_every_input_the_old_model_helper_read_correctly_reads_the_same(make):
    image = make(np.random.default_rng(3))
    torch.testing.assert_close(to_image_tensor(image), _old_to_image_tensor(image), rtol=0, atol=0)
