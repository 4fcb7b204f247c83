"""Property-based tests of the model-level entry points: ``forward``, ``predict``, ``fit`` /
``evaluate``, ``from_pretrained`` and the command line.

``tests/test_bad_input_data.py`` does the same for the data entry points (images, masks, metrics,
losses). Here each test draws arguments -- shapes, dtypes, value ranges with NaN / inf, prompt
structures, options, config fields -- and checks the outcome a plain re-statement of the documented
rules predicts:

* a result, checked against the rule (output shapes, value ranges, finite losses); or
* an exception of the documented type (``ValueError``, ``CheckpointError``, exit status 2) whose
  message names the argument at fault.

The re-statements are written from the docstrings and ``docs/``, not from the validators.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlsegkit import VLSM, cli, create_model
from vlsegkit.hub import CheckpointError
from vlsegkit.train import evaluate, fit

MODELS = ["clipseg-tiny", "medclipseg-tiny"]
SIZE = 32  # every tiny model here has 8-pixel patches
PATCH = 8
# derandomize: CI runs the same examples every time; the budgets keep the module near a minute
CHEAP = settings(max_examples=40, deadline=None, derandomize=True)
MODEL_RUNS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRAINING = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@functools.cache
def _model(name: str):
    torch.manual_seed(0)
    return create_model(name, image_size=SIZE).eval()


class Refused(Exception):
    """The re-statement predicts an error naming one of ``names``."""

    def __init__(self, *names: str) -> None:
        super().__init__(names)
        self.names = names


def _expect_refusal(call, refused: Refused, kind: type[BaseException] = ValueError) -> None:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert any(name in message for name in refused.names), (refused.names, message)


# --------------------------------------------------------------------------- prompts
WORDS = st.sampled_from(["lesion", "a small polyp", "", "two round nodules", "tumour"])


def _nested(c: int, batch: int):
    return st.lists(st.lists(WORDS, min_size=c, max_size=c), min_size=batch, max_size=batch)


def prompt_values(batch: int):
    """Prompt arguments of every documented structure and of several undocumented ones."""
    return st.one_of(
        WORDS,
        st.lists(WORDS, min_size=0, max_size=4),
        st.integers(1, 3).flatmap(lambda c: _nested(c, batch)),
        st.lists(st.lists(WORDS, min_size=0, max_size=3), min_size=1, max_size=3),
        st.sampled_from([None, 5, b"lesion", ("lesion", 3), torch.zeros(2)]),
    )


def prompt_channels(prompts, batch: int, *, every_image: bool) -> int:
    """C of the documented pairing rule (``parse_text_prompts`` / ``prompts_per_image``).

    forward: a string -> 1; B strings -> 1 (one per image); T != B strings -> T; B lists of C -> C.
    predict: a string -> 1; C strings -> C for every image; B lists of C -> C.
    """
    if isinstance(prompts, str):
        return 1
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise Refused("prompts")
    if all(isinstance(p, str) for p in prompts):
        return len(prompts) if every_image or len(prompts) != batch else 1
    if all(isinstance(p, (list, tuple)) for p in prompts):
        lengths = {len(p) for p in prompts}
        if len(prompts) != batch or len(lengths) != 1 or 0 in lengths:
            raise Refused("prompts")
        if not all(isinstance(s, str) for p in prompts for s in p):
            raise Refused("prompts")
        return lengths.pop()
    raise Refused("prompts")


# --------------------------------------------------------------------------- forward
@st.composite
def pixel_values(draw):
    """A (B, C, H, W) float tensor most of the time; wrong ranks, channels, sizes, dtypes, types."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "shape", "dtype", "type"]))
    b = draw(st.integers(1, 2))
    h, w = (draw(st.sampled_from([PATCH, 2 * PATCH, 4 * PATCH])) for _ in range(2))
    if kind == "shape":
        shape = draw(st.sampled_from([
            (b, 1, h, w), (b, 4, h, w), (0, 3, h, w), (3, h, w), (b, 3, h, w, 1),
            (b, 3, h - 2, w), (b, 3, 4, 4), (b, 3, 0, w),
        ]))  # fmt: skip
        return torch.rand(shape)
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.uint8, torch.int64, torch.bool]))
        return torch.zeros(b, 3, h, w, dtype=dtype)
    if kind == "type":
        return draw(st.sampled_from([np.zeros((b, 3, h, w), np.float32), [[0.0]], "image"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b * h + w)).to(dtype)


def pixels_ok(x) -> None:
    """The documented ``forward`` input: a float (B >= 1, 3, H, W) tensor, H and W positive
    multiples of the patch size."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 1 or x.shape[1] != 3:
        raise Refused("pixel_values")
    if not x.is_floating_point():
        raise Refused("pixel_values")
    h, w = x.shape[-2:]
    if h < 1 or w < 1 or h % PATCH or w % PATCH:
        raise Refused("pixel_values")


@pytest.mark.parametrize("name", MODELS)
@MODEL_RUNS
@given(x=pixel_values(), data=st.data())
def test_forward(name, x, data):
    model = _model(name)
    batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else 2
    prompts = data.draw(prompt_values(batch))
    try:
        pixels_ok(x)
        c = prompt_channels(prompts, batch, every_image=False)
    except Refused as refused:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] >= 1:
            pass  # either argument may be reported first when both are wrong
        _expect_refusal(lambda: model(x, prompts), _both_named(refused, x, prompts, batch))
        return
    with torch.no_grad():
        logits = model(x, prompts).logits
    assert logits.shape == (batch, c, *x.shape[-2:])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def _both_named(refused: Refused, x, prompts, batch: int) -> Refused:
    """When several arguments are wrong, naming any of them is right."""
    names = set(refused.names)
    for check in (lambda: pixels_ok(x), lambda: prompt_channels(prompts, batch, every_image=False)):
        try:
            check()
        except Refused as other:
            names.update(other.names)
    return Refused(*names)


# --------------------------------------------------------------------------- predict
@st.composite
def image_lists(draw):
    """Lists of images of any size; sometimes one entry of an undefined type, dtype or layout."""
    n = draw(st.integers(1, 3))
    images = []
    for i in range(n):
        h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        kind = draw(st.sampled_from(["uint8", "uint8", "float", "grey", "bad"]))
        rng = np.random.default_rng(i + 7 * h + 13 * w)
        if kind == "uint8":
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        elif kind == "float":
            images.append(torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)))
        elif kind == "grey":
            images.append(rng.random((h, w)).astype(np.float32))
        else:
            images.append(draw(st.sampled_from([
                np.zeros((h, w), np.int64),  # an integer dtype without a defined range
                np.zeros((1, 3, h, w), np.uint8),  # a batch inside the list
                np.full((h, w, 3), 255.0, np.float32),  # float on a 0-255 scale
                np.full((h, w), np.nan, np.float32),
                "image.png",  # a path is not an image
            ])))  # fmt: skip
    return images


def images_ok(images) -> None:
    """The documented ``predict`` images: uint8 / uint16 / bool, or float in [0, 1] (finite), as
    (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; PIL images; not paths or batches."""
    for im in images:
        if isinstance(im, str):
            raise Refused("image")
        arr = im.numpy() if isinstance(im, torch.Tensor) else im
        if arr.ndim not in (2, 3):
            raise Refused("image")
        if arr.dtype.kind == "f" and not (
            np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
        ):
            raise Refused("image")
        if arr.dtype.kind in "iu" and arr.dtype not in (np.uint8, np.uint16):
            raise Refused("image")


@pytest.mark.parametrize("name", MODELS)
@MODEL_RUNS
@given(images=image_lists(), data=st.data())
def test_predict(name, images, data):
    model = _model(name)
    prompts = data.draw(prompt_values(len(images)))
    batch_size = data.draw(st.sampled_from([1, 2, 8, 0, -1, True, 1.5]))
    kwargs = {"seed": 0, "samples": 2} if name.startswith("medclipseg") else {}
    call = lambda: model.predict(images, prompts, batch_size=batch_size, **kwargs)  # noqa: E731
    try:
        images_ok(images)
        c = prompt_channels(prompts, len(images), every_image=True)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise Refused("batch_size")
    except Refused as refused:
        names = set(refused.names)
        for check in (lambda: images_ok(images),
                      lambda: prompt_channels(prompts, len(images), every_image=True)):  # fmt: skip
            try:
                check()
            except Refused as other:
                names.update(other.names)
        _expect_refusal(call, Refused(*names, "batch_size"), kind=(ValueError, TypeError))
        return
    mode = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layouts that read both ways warn
        out = call()
    assert model.training == mode
    assert isinstance(out, list) and len(out) == len(images)
    for probs, im in zip(out, images):
        h, w = im.shape[-2:] if isinstance(im, torch.Tensor) else im.shape[:2]
        assert probs.shape == (c, h, w)
        assert probs.min() >= 0 and probs.max() <= 1 and not probs.isnan().any()


# --------------------------------------------------------------------------- fit / evaluate
MASK_KINDS = ["binary", "soft", "bool", "0-255", "negative", "nan", "no channel", "wrong batch"]


def _batch(mask_kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g)
    masks = (torch.rand(2, 1, SIZE, SIZE, generator=g) > 0.7).float()
    masks = {
        "binary": masks,
        "soft": masks * 0.8 + 0.1,
        "bool": masks.bool(),
        "0-255": masks * 255,
        "negative": masks * 2 - 1,
        "nan": masks.index_fill(0, torch.tensor([1]), float("nan")),
        "no channel": masks[:, 0],
        "wrong batch": masks[:1],
    }[mask_kind]
    return {"image": images, "mask": masks, "prompt": ["a lesion", "a polyp"]}


def masks_ok(kind: str) -> None:
    """Masks must be (B, C, H, W) like the logits, with values in [0, 1] (bool allowed)."""
    if kind in ("0-255", "negative", "nan", "no channel", "wrong batch"):
        raise Refused("mask")


BAD_NUMBERS = [0.0, -1e-3, math.nan, math.inf, "0.1", True]


def mostly(good: list, bad: list):
    """Valid values three times out of four, so that examples reach the training loop."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good),
                     st.sampled_from(bad))  # fmt: skip


@settings(MODEL_RUNS, max_examples=40)
@given(
    mask_kind=mostly(["binary", "soft", "bool"], MASK_KINDS[3:]),
    lr=mostly([1e-3, 0.5], BAD_NUMBERS),
    max_grad_norm=mostly([None, 1e-3, 0.5], BAD_NUMBERS),
    epochs=mostly([1, 2, 0], [-1, 1.5, True]),
)
def test_fit(mask_kind, lr, max_grad_norm, epochs):
    torch.manual_seed(0)
    model = create_model("clipseg-tiny", image_size=SIZE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [_batch(mask_kind, 0), _batch(mask_kind, 1)]
    call = lambda: fit(model, loader, lr=lr, max_grad_norm=max_grad_norm, epochs=epochs)  # noqa: E731
    names = []
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        names.append("epochs")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        names.append("lr")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not 0 < max_grad_norm < math.inf
    ):
        names.append("max_grad_norm")
    if names:  # options are checked before any batch is read
        _expect_refusal(call, Refused(*names))
        _assert_unchanged(model, before)
        return
    if epochs == 0:  # nothing to train: no batch is read, nothing changes
        history = call()
        assert history.train_loss == []
        _assert_unchanged(model, before)
        return
    try:
        masks_ok(mask_kind)
    except Refused as refused:
        _expect_refusal(call, refused)
        _assert_unchanged(model, before)
        return
    history = call()
    assert len(history.train_loss) == epochs and all(math.isfinite(v) for v in history.train_loss)
    assert model.training  # fit leaves the model in the mode it found (train, as built)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed


def _assert_unchanged(model, before) -> None:
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@MODEL_RUNS
@given(
    mask_kind=mostly(["binary", "soft", "bool"], MASK_KINDS[3:]),
    threshold=st.sampled_from([0.5, 0.3, 0.0, 1.0, 2.0, -0.1, math.nan, "0.5", None]),
)
def test_evaluate(mask_kind, threshold):
    model = _model("clipseg-tiny")
    loader = [_batch(mask_kind, 3)]
    call = lambda: evaluate(model, loader, threshold=threshold)  # noqa: E731
    ok_threshold = threshold is None or (
        isinstance(threshold, float) and 0 < threshold < 1
    )  # documented: a probability in (0, 1), default 0.5
    if not ok_threshold:
        _expect_refusal(call, Refused("threshold"))
        return
    try:
        masks_ok(mask_kind)
    except Refused as refused:
        _expect_refusal(call, refused)
        return
    scores = call()
    assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= scores["dice"] + 1e-6
    assert math.isfinite(scores["loss"])
    assert not model.training


# --------------------------------------------------------------------------- from_pretrained
@functools.cache
def _saved() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vlsegkit-props-"))
    _model("clipseg-tiny").save_pretrained(root)
    return root


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0.0, -1.5, 1e9]),
    st.sampled_from(["", "clipseg", "banana", "1"]), st.just([]), st.just({}),
    st.just([0.5, 0.5, 0.5]), st.just({"kind": "open_clip"}),
)  # fmt: skip


@CHEAP
@given(data=st.data(), value=JSON_VALUES, action=st.sampled_from(["set", "delete", "add"]))
def test_from_pretrained_with_changed_config_fields(data, value, action):
    """Change one field of a saved config: the model loads (and runs), or a CheckpointError names
    config.json and the field (a missing field may be named by the constructor's default)."""
    saved = _saved()
    config = json.loads((saved / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)))
    changed = dict(config)
    if action == "set":
        changed[key] = value
    elif action == "delete":
        del changed[key]
    else:
        key = "unexpected_field"
        changed[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(saved / "model.safetensors", folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(changed))
        try:
            model = VLSM.from_pretrained(folder)
        except CheckpointError as e:
            message = str(e)
            assert "config.json" in message or "model.safetensors" in message, message
            named = key in message or (action == "delete" and "missing" in message)
            assert named or "model.safetensors" in message, (key, message)
            return
    # it loaded: then the field's change was harmless and the model works
    assert changed.get("model_type", "clipseg") in ("clipseg",) or action == "delete"
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, SIZE, SIZE), "lesion").logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- command line
class _Built(Exception):
    """Raised instead of building the model: every option had been accepted by then."""


#: option -> the documented rule (docs/api/cli.md), as a predicate on the parsed number
CLI_RULES = {
    "--lr": lambda v: 0 < v < math.inf,
    "--weight-decay": lambda v: 0 <= v < math.inf,
    "--max-grad-norm": lambda v: 0 < v < math.inf,
    "--min-lr-ratio": lambda v: 0 <= v <= 1,
    "--negative-fraction": lambda v: 0 <= v <= 1,
    "--val-fraction": lambda v: 0 <= v < 1,
    "--epochs": lambda v: v == int(v) and v >= 0,
    "--batch-size": lambda v: v == int(v) and v >= 1,
    "--grad-accum-steps": lambda v: v == int(v) and v >= 1,
    "--warmup-steps": lambda v: v == int(v) and v >= 0,
}
INTS = {"--epochs", "--batch-size", "--grad-accum-steps", "--warmup-steps"}
CLI_TEXT = st.sampled_from(["0", "1", "2", "0.5", "-1", "1e-3", "nan", "inf", "banana", "", "1.5"])


def _cli_ok(option: str, text: str) -> bool:
    try:
        value = int(text) if option in INTS else float(text)
    except ValueError:
        return False
    return bool(CLI_RULES[option](value))


@settings(CHEAP, suppress_health_check=[HealthCheck.function_scoped_fixture])  # read per example
@given(option=st.sampled_from(sorted(CLI_RULES)), text=CLI_TEXT, device=st.sampled_from(
    ["cpu", "cpu", "banana", "cuda:99"]))  # fmt: skip
def test_cli_train_options(option, text, device, capsys, monkeypatch):
    def built(*args, **kwargs):
        raise _Built

    monkeypatch.setattr(cli, "_load_model", built)
    argv = ["train", "clipseg-tiny", "--data", "synthetic", "--device", device, option, text]
    device_ok = device == "cpu" or (device.startswith("cuda") and torch.cuda.device_count() > 99)
    if _cli_ok(option, text) and device_ok:
        with pytest.raises(_Built):
            cli.main(argv)
        return
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's own type errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    named = option in err if not _cli_ok(option, text) else "--device" in err
    assert named, (option, text, device, err)
