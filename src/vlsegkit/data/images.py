"""The one conversion from user images (PIL, numpy, torch) to vlsegkit's float ``(3, H, W)`` input.

``to_image_tensor`` is shared by ``predict`` and by the datasets' file reader, so a training image and
the same image given to ``predict`` become the same tensor (16-bit files included). The rules:

**Value range.** The result is float32 in ``[0, 1]``. The scale comes from the *type* of the data,
never from its values (a dark 16-bit scan must not be mistaken for an 8-bit one):

=====================================  ===================================================
input                                  scale
=====================================  ===================================================
uint8 (numpy, tensor, 8-bit PIL)       ``/ 255``
uint16 (numpy, ``torch.uint16``,       ``/ 65535``
PIL ``I;16*``)
PIL ``I`` (32-bit int, what older      read as 16-bit data: ``/ 65535``; values outside
Pillow decodes 16-bit PNGs to)         ``[0, 65535]`` raise
float (numpy, tensor, PIL ``F``)       kept; every channel (alpha too) must lie in
                                       ``[0, 1]`` (a rounding slack of ``1e-3`` is
                                       clamped); NaN, inf, or float data on a 0-255
                                       scale raise ``ValueError``
bool (numpy, tensor, PIL ``1``)        bilevel: False → 0 (black), True → 1 (white)
other integer dtypes (int8 ... int64,  ``ValueError``: their range is undefined (convert
uint32, uint64)                        to uint8, uint16 or float in [0, 1])
=====================================  ===================================================

**PIL modes.** ``1`` (black/white), ``L``, ``LA``/``La`` (alpha dropped), ``P``/``PA`` (palette
colours), ``RGB``, ``RGBA``/``RGBX`` (alpha dropped, not composited), ``I;16*``, ``I``, ``F``; any
other mode Pillow can convert (``CMYK``, ``YCbCr``, ``HSV``, ``RGBa``, ...) goes through
``image.convert("RGB")``.

**Layouts** of arrays and tensors: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in
``{1, 3, 4}``: one channel is repeated to three, a fourth (alpha) channel is dropped. A 3-D shape
that reads both ways, such as ``(3, H, 4)``, follows the convention of its type (numpy: channels
last, as PIL / OpenCV / imageio; torch: channels first) and warns (``UserWarning``); transpose it
to the unambiguous form to silence the warning. 4-D batches raise (pass a list of images instead).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_image_tensor"]

ImageInput = Any  # PIL.Image.Image | np.ndarray | Tensor

_CHANNELS = (1, 3, 4)
# Float images may exceed [0, 1] by this much (rounding in x / 255, resampling); it is clamped away.
_FLOAT_SLACK = 1e-3
_UINT16_MAX = 65535


def to_image_tensor(image: ImageInput) -> Tensor:
    """One image as a float32 ``(3, H, W)`` tensor in ``[0, 1]``.

    See the module docstring for every accepted type, PIL mode, dtype and layout. In short: uint8
    is divided by 255, uint16 (and 16-bit PIL images) by 65535, float must already be in
    ``[0, 1]``; grey images are repeated to three channels and alpha is dropped.

    Args:
        image: a ``PIL.Image.Image`` of any mode; a numpy array or a tensor ``(H, W)``,
            ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in ``{1, 3, 4}``, dtype uint8, uint16 or
            float. Tensors keep their device (and autograd graph when float).

    Returns:
        float32 ``(3, H, W)`` tensor in ``[0, 1]``.

    Raises:
        TypeError: ``image`` is not a PIL image, numpy array or tensor.
        ValueError: a shape, dtype or value range outside the rules above (the message names
            ``image`` and what was found).
    """
    return _unit_float(decode_image(image))


def decode_image(image: ImageInput) -> Tensor:
    """``to_image_tensor`` without the final uint8 → float step (for the dataset reader).

    Returns:
        ``(3, H, W)``: uint8 when the source has 8 bits per channel (so joint augmentations can run
        on uint8, as torchvision's fast paths expect), else float32 in ``[0, 1]``.
        ``_unit_float`` of it is exactly ``to_image_tensor(image)``.
    """
    if isinstance(image, Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, layout="auto")
    from PIL import Image

    if isinstance(image, Image.Image):
        return _from_array(_pil_array(image), layout="hwc")
    raise TypeError(
        f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
    )


def _unit_float(t: Tensor) -> Tensor:
    return t.float() / 255 if t.dtype == torch.uint8 else t


# --------------------------------------------------------------------------- PIL
def _pil_array(img: Any) -> np.ndarray:
    """The pixel array of a PIL image: ``(H, W)`` or ``(H, W, 3)``, dtype uint8, uint16 or float32."""
    mode = img.mode
    if mode in ("L", "RGB", "F"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))  # 0 / 255, Pillow's own reading of bilevel images
    if mode in ("LA", "La"):
        return np.asarray(img.convert("LA"))[..., 0]  # La: un-premultiplied first
    if mode in ("RGBA", "RGBX"):
        return np.asarray(img)[..., :3]
    if mode.startswith("I;16"):
        return _sixteen_bit(np.asarray(img), f"PIL mode {mode!r}")
    if mode == "I":
        return _sixteen_bit(np.asarray(img), "PIL mode 'I' (read as 16-bit data)")
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(
            f"image: cannot convert a PIL image of mode {mode!r} to RGB: {err}"
        ) from err


def _sixteen_bit(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _UINT16_MAX:
            raise ValueError(
                f"image: {what} must hold values in [0, {_UINT16_MAX}], got values in [{lo}, {hi}]; "
                "convert it to a float image in [0, 1] first"
            )
    return arr.astype(np.uint16)


# --------------------------------------------------------------------------- arrays and tensors
def _from_array(arr: np.ndarray, *, layout: str) -> Tensor:
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # uint16, either byte order
        # torch has no general uint16 support (before 2.3 none at all): scale in numpy.
        hwc = _to_hwc(arr, layout, "numpy array")
        t = torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32)) / _UINT16_MAX
        chw = t.permute(2, 0, 1)
        _check_size(chw)
        return _to_three_channels(chw)
    kind = arr.dtype.kind
    _check_dtype(str(arr.dtype), kind == "f" or kind == "b" or arr.dtype == np.uint8)
    hwc = _to_hwc(arr, layout, "numpy array")
    t = torch.from_numpy(np.array(hwc, copy=True)).permute(2, 0, 1)  # own memory, writable
    return _finish(t)


def _from_tensor(t: Tensor) -> Tensor:
    if getattr(torch, "uint16", None) is not None and t.dtype == torch.uint16:
        chw = _to_chw(t, "tensor")
        _check_size(chw)
        return _to_three_channels(chw.to(torch.float32) / _UINT16_MAX)
    _check_dtype(str(t.dtype), t.is_floating_point() or t.dtype in (torch.uint8, torch.bool))
    return _finish(_to_chw(t, "tensor"))


def _check_dtype(name: str, supported: bool) -> None:
    if supported:
        return
    raise ValueError(
        f"image: dtype {name} has no defined value range; pass uint8 (0-255), uint16 (0-65535) or "
        "float in [0, 1] (e.g. image.astype(np.uint8), or image / 255 for 8-bit data)"
    )


def _layout(shape: tuple[int, ...], prefer: str, what: str) -> str:
    """``"hw"``, ``"hwc"`` or ``"chw"`` for a 2-D / 3-D shape; warns when both 3-D readings fit."""
    if len(shape) == 2:
        return "hw"
    if len(shape) != 3:
        batch = " (one image; pass a list of images for a batch)" if len(shape) == 4 else ""
        raise ValueError(
            f"image: a {what} must have shape (H, W), (H, W, C) or (C, H, W) with C in "
            f"{{1, 3, 4}}, got {tuple(shape)}{batch}"
        )
    hwc, chw = shape[2] in _CHANNELS, shape[0] in _CHANNELS
    if hwc and chw:
        other = "chw" if prefer == "hwc" else "hwc"
        warnings.warn(
            f"image: a {what} of shape {tuple(shape)} reads as {_describe(shape, prefer)}, or as "
            f"{_describe(shape, other)}; using {prefer.upper()} (the {what} convention). "
            "To silence this warning pass a PIL image, or an array whose layout reads one way only.",
            UserWarning,
            stacklevel=6,  # the caller of to_image_tensor
        )
        return prefer
    if hwc or chw:
        return "hwc" if hwc else "chw"
    raise ValueError(
        f"image: a {what} must have shape (H, W), (H, W, C) or (C, H, W) with C in {{1, 3, 4}}, "
        f"got {tuple(shape)}"
    )


def _describe(shape: tuple[int, ...], layout: str) -> str:
    if layout == "hwc":
        h, w, c = shape
        return f"(H, W, C), a {h}x{w} image with {c} channel(s)"
    c, h, w = shape
    return f"(C, H, W), a {h}x{w} image with {c} channel(s)"


def _to_hwc(arr: np.ndarray, layout: str, what: str) -> np.ndarray:
    found = _layout(arr.shape, "hwc", what) if layout == "auto" else layout
    if arr.ndim == 2:
        return arr[..., None]
    if found == "chw" and layout == "auto":
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] not in _CHANNELS:  # PIL arrays are (H, W, 3) by construction
        raise ValueError(f"image: expected 1, 3 or 4 channels, got shape {arr.shape}")
    return arr


def _to_chw(t: Tensor, what: str) -> Tensor:
    found = _layout(tuple(t.shape), "chw", what)
    if found == "hw":
        return t.unsqueeze(0)
    return t.permute(2, 0, 1) if found == "hwc" else t


def _check_size(t: Tensor) -> None:
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(
            f"image: height and width must be non-zero, got (H, W) = {tuple(t.shape[-2:])}"
        )


def _to_three_channels(t: Tensor) -> Tensor:
    """``(C, H, W)`` with C in {1, 3, 4} → ``(3, H, W)``: grey repeated, alpha dropped."""
    if t.shape[0] == 4:
        return t[:3]
    if t.shape[0] == 1:
        return t.expand(3, -1, -1)
    return t


def _finish(t: Tensor) -> Tensor:
    """uint8 stays uint8; bool and float become float32, float after a range check."""
    _check_size(t)
    if t.dtype == torch.uint8:
        return _to_three_channels(t)
    if t.dtype == torch.bool:  # bilevel, as PIL's mode '1': nothing to check
        return _to_three_channels(t).float()
    # One reduction and one device sync, whatever the image size, over every channel given (alpha
    # too: a malformed alpha means malformed data). In the input's own precision, so a float64 value
    # that fits the range is not pushed out of it (or to inf) by rounding.
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()
    t = _to_three_channels(t.float())
    if not (lo >= -_FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK):  # also catches NaN
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("image: float images must be finite, got NaN or infinite values")
        hint = "undo the model's mean/std normalisation first"
        if lo >= 0 and hi <= 255:
            hint = f"divide 0-255 data by 255 (or pass uint8), or {hint}"
        raise ValueError(
            f"image: float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}"
        )
    if lo < 0 or hi > 1:
        t = t.clamp(0, 1)
    return t
