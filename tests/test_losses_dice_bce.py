"""DiceBCELoss against a float64 numpy reference of MedCLIPSeg's 0.5·Dice + 0.5·BCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlsegkit.losses import DiceBCELoss, dice_bce_loss


def reference(logits, target, *, dice_weight=0.5, bce_weight=0.5, smooth=1.0):
    """Per (sample, channel) loss, written out in float64 numpy, one image at a time."""
    x = logits.detach().double().numpy()
    g = target.detach().double().numpy()
    out = np.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            xi, gi = x[b, c].ravel(), g[b, c].ravel()
            p = 1.0 / (1.0 + np.exp(-xi))
            dice = 1.0 - (2.0 * np.sum(p * gi) + smooth) / (np.sum(p) + np.sum(gi) + smooth)
            # -[g log p + (1-g) log(1-p)] with log p = -log(1+e^-x), log(1-p) = -log(1+e^x)
            bce = np.mean(gi * np.logaddexp(0, -xi) + (1 - gi) * np.logaddexp(0, xi))
            out[b, c] = dice_weight * dice + bce_weight * bce
    return torch.from_numpy(out)


def make_inputs(shape=(3, 2, 9, 11), seed=0, soft=False):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=gen)
    target = torch.rand(shape, generator=gen)
    return logits, target if soft else (target > 0.6).float()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dice_weight": 1.0, "bce_weight": 0.0},
        {"dice_weight": 0.0, "bce_weight": 1.0},
        {"dice_weight": 0.3, "bce_weight": 2.0, "smooth": 1e-5},
    ],
)
@pytest.mark.parametrize("soft", [False, True])
def test_matches_float64_reference(options, soft):
    logits, target = make_inputs(soft=soft)
    ref = reference(logits, target, **options)
    none = DiceBCELoss(reduction="none", **options)(logits, target)
    assert none.shape == (3, 2) and none.dtype == torch.float32
    torch.testing.assert_close(none.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        DiceBCELoss(**options)(logits, target).double(), ref.mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        dice_bce_loss(logits, target, reduction="sum", **options).double(),
        ref.sum(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bce_part_equals_torch_bce_with_logits():
    logits, target = make_inputs(shape=(4, 1, 16, 16), seed=1, soft=True)
    ours = DiceBCELoss(dice_weight=0.0, bce_weight=1.0)(logits, target)
    torch.testing.assert_close(
        ours, F.binary_cross_entropy_with_logits(logits, target), rtol=1e-6, atol=1e-7
    )


def test_dice_is_per_sample_not_per_batch():
    # A perfect sample next to a completely missed one: per-sample Dice averages 0 and 1, whereas a
    # batch-pooled Dice would be dominated by the big sample.
    logits = torch.full((2, 1, 8, 8), -30.0)
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, :7, :7] = 1
    logits[0, 0, :7, :7] = 30.0  # sample 0: perfect
    target[1, 0, 0, 0] = 1  # sample 1: one pixel, missed
    loss = DiceBCELoss(dice_weight=1.0, bce_weight=0.0, smooth=1e-6)(logits, target)
    assert loss.item() == pytest.approx(0.5, abs=1e-4)


def test_perfect_prediction_is_near_zero():
    target = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    target[1] = 0  # an empty mask predicted empty
    logits = torch.where(target > 0, 20.0, -20.0)
    loss = DiceBCELoss()(logits, target)
    assert 0 <= loss.item() < 1e-6  # sigmoid(±20) leaves ~2e-9 per pixel
    wrong = DiceBCELoss()(-logits, target)
    assert wrong.item() > 5


def test_gradients_match_reference_and_gradcheck():
    logits, target = make_inputs(shape=(2, 1, 5, 6), seed=4, soft=True)
    x = logits.clone().requires_grad_(True)
    DiceBCELoss()(x, target).backward()
    # Reference gradient: autograd through an independent float64 torch transcription.
    x64 = logits.double().requires_grad_(True)
    p = torch.sigmoid(x64)
    t = target.double()
    dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
    bce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p)).mean((2, 3))
    (0.5 * dice + 0.5 * bce).mean().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda z: dice_bce_loss(z, target.double(), smooth=0.5),
        (logits.double().requires_grad_(True),),
    )


def test_half_precision_and_autocast_are_stable():
    logits, target = make_inputs(shape=(2, 1, 8, 8), seed=5)
    big = logits * 30  # |logits| up to ~300: exp overflows fp16 / naive formulas
    expected = reference(big, target).mean()
    for dtype in (torch.float16, torch.bfloat16):
        x = big.to(dtype).requires_grad_(True)
        loss = DiceBCELoss()(x, target)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        ref_rounded = reference(big.to(dtype).float(), target).mean()
        torch.testing.assert_close(loss.double(), ref_rounded, rtol=1e-5, atol=1e-5)
        loss.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    # Under autocast the convolution output is bf16; the loss still runs in fp32.
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(big)
        assert out.dtype == torch.bfloat16
        loss = DiceBCELoss()(out, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(
        loss.double(), reference(out.float(), target).mean(), rtol=1e-5, atol=1e-5
    )
    assert abs(loss.item() - expected.item()) < 0.05


def test_deterministic_and_bool_targets():
    logits, target = make_inputs(seed=6)
    a = DiceBCELoss()(logits, target)
    b = DiceBCELoss()(logits.clone(), target.bool())
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("logits_shape", "target_shape", "match"),
    [
        ((2, 1, 8, 8), (2, 8, 8), r"target must have the same shape as logits \(2, 1, 8, 8\)"),
        ((2, 1, 8, 8), (2, 1, 8, 9), r"\(B, C, H, W\)"),
        ((8, 8), (8, 8), r"logits must have shape \(B, C, H, W\)"),
    ],
)
def test_shape_errors(logits_shape, target_shape, match):
    with pytest.raises(ValueError, match=match):
        DiceBCELoss()(torch.zeros(logits_shape), torch.zeros(target_shape))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smooth": 0.0}, "smooth"),
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"reduction": "batchmean"}, "reduction"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceBCELoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        dice_bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), **kwargs)


# --------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("target", "found"),
    [
        # 0/255 masks used to give a negative BCE (and a Dice far above 1 in the overlap term).
        (torch.tensor([[[[0.0, 255.0], [255.0, 0.0]]]]), r"values in \[0, 255\]"),
        (torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8), r"values in \[0, 255\]"),
        (torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]), r"values in \[-1, 1\]"),
        (torch.tensor([[[[0.0, float("nan")], [1.0, 0.0]]]]), r"got NaN"),
        (torch.tensor([[[[0.0, float("inf")], [1.0, 0.0]]]]), r"values in \[0, inf\]"),
    ],
)
def test_targets_outside_0_1_raise(target, found):
    logits = torch.zeros(1, 1, 2, 2)
    match = r"target must hold values in \[0, 1\].*" + found
    with pytest.raises(ValueError, match=match):
        DiceBCELoss()(logits, target)
    with pytest.raises(ValueError, match=match):
        dice_bce_loss(logits, target, reduction="none")


def test_integer_0_1_targets_give_the_float_loss():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1, 0], [1, 0]]]], dtype=torch.uint8)
    # p = sigmoid(logits); Dice = 1 - (2 * (p00 + p10) + 1) / (sum p + 2 + 1); BCE = mean -log.
    p = torch.sigmoid(logits.double())[0, 0]
    dice = 1 - (2 * (p[0, 0] + p[1, 0]) + 1) / (p.sum() + 2 + 1)
    bce = -(p[0, 0].log() + (1 - p[0, 1]).log() + p[1, 0].log() + (1 - p[1, 1]).log()) / 4
    expected = (0.5 * dice + 0.5 * bce).float()
    torch.testing.assert_close(DiceBCELoss()(logits, target), expected)


def test_empty_batches_raise_instead_of_nan():
    for shape in ((0, 1, 4, 4), (2, 0, 4, 4), (2, 1, 0, 4)):
        with pytest.raises(ValueError, match=r"logits must not be empty.*" + str(shape[0])):
            DiceBCELoss()(torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dice_weight": float("nan")}, r"dice_weight must be a finite number.*got nan"),
        ({"bce_weight": float("inf")}, r"bce_weight must be a finite number.*got inf"),
        ({"bce_weight": -0.5}, r"bce_weight must be >= 0"),
        ({"dice_weight": True}, r"dice_weight must be a finite number"),
        ({"dice_weight": "0.5"}, r"dice_weight must be a finite number"),
        ({"dice_weight": 0.0, "bce_weight": 0.0}, r"both 0"),
        ({"smooth": float("inf")}, r"smooth must be a finite number"),
        ({"smooth": float("nan")}, r"smooth must be a finite number"),
        # Finite in float64 but inf in the float32 computation: the loss was NaN.
        ({"smooth": 1e300}, r"smooth must be a finite number \(in float32 range\)"),
        ({"dice_weight": 1e300}, r"dice_weight must be a finite number \(in float32 range\)"),
    ],
)
def test_non_finite_and_negative_weights_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceBCELoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        dice_bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), **kwargs)


def test_medclipseg_loss_inherits_the_target_check():
    from vlsegkit.losses import MedCLIPSegLoss
    from vlsegkit.models import MedCLIPSegOutput

    out = MedCLIPSegOutput(
        logits=torch.zeros(2, 1, 4, 4),
        patch_tokens=torch.randn(2, 1, 3, 8),
        text_embeddings=torch.randn(2, 1, 8),
    )
    loss = MedCLIPSegLoss()
    assert torch.isfinite(loss(out, torch.ones(2, 4, 4)))
    with pytest.raises(ValueError, match=r"target must hold values in \[0, 1\]"):
        loss(out, torch.full((2, 4, 4), 255, dtype=torch.uint8))
