"""SoftPatchContrastiveLoss against a hand-written loop reference of MedCLIPSeg eqs. 20-22."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlsegkit.losses.contrastive import SoftPatchContrastiveLoss, soft_patch_contrastive_loss

F64 = torch.float64


def _norm(x):
    return x / math.sqrt(sum(float(v) ** 2 for v in x))


def ref_loss(patches, text, tau=0.2, variant="paper"):
    """Eqs. 20-22 with Python loops; targets from detached values, logits differentiable."""
    b, p, _ = patches.shape
    pooled = []
    for i in range(b):
        acc = sum(patches[i, k] / patches[i, k].norm() for k in range(p)) / p
        pooled.append(acc / acc.norm() if variant == "paper" else acc)
    txt = [text[i] / text[i].norm() if variant == "paper" else text[i] for i in range(b)]
    # soft targets G (eq. 20), as plain floats: no gradient flows through them
    t_det = [[float(v) for v in t.detach()] for t in txt]
    sim = [
        [sum(a * c for a, c in zip(t_det[i], t_det[j])) / tau for j in range(b)] for i in range(b)
    ]
    if variant == "released":
        sim = [[s / math.sqrt(sum(v * v for v in row)) for s in row] for row in sim]
    g = []
    for row in sim:
        exps = [math.exp(s - max(row)) for s in row]
        g.append([e / sum(exps) for e in exps])
    logits = [[(pooled[i] * txt[j]).sum() / tau for j in range(b)] for i in range(b)]

    def soft_ce(rows, targets):  # eq. 21
        total = 0
        for i in range(b):
            lse = torch.logsumexp(torch.stack(rows[i]), dim=0)
            total = total - sum(targets[i][j] * (rows[i][j] - lse) for j in range(b))
        return total / b

    logits_t = [[logits[j][i] for j in range(b)] for i in range(b)]
    g_t = [[g[j][i] for j in range(b)] for i in range(b)]
    return 0.5 * (soft_ce(logits, g) + soft_ce(logits_t, g_t))  # eq. 22


def _inputs(b=4, p=5, d=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, d, generator=gen, dtype=dtype), torch.randn(
        b, d, generator=gen, dtype=dtype
    )


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("tau", [0.2, 0.07, 1.0])
def test_matches_loop_reference(variant, tau):
    patches, text = _inputs()
    loss = soft_patch_contrastive_loss(patches, text, temperature=tau, variant=variant)
    assert loss.shape == ()
    torch.testing.assert_close(loss, ref_loss(patches, text, tau, variant), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_identical_prompts_share_soft_targets(variant):
    patches, text = _inputs(b=5)
    text[3] = text[1]  # two images described by the same prompt
    text[4] = text[1]
    loss = SoftPatchContrastiveLoss(variant=variant)(patches, text)
    torch.testing.assert_close(loss, ref_loss(patches, text, 0.2, variant), rtol=0, atol=1e-12)
    # hard one-hot targets would give a different value
    t = F.normalize(text, dim=-1) if variant == "paper" else text
    v = (
        F.normalize(F.normalize(patches, dim=-1).mean(1), dim=-1)
        if variant == "paper"
        else (F.normalize(patches, dim=-1).mean(1))
    )
    logits = v @ t.T / 0.2
    hard = 0.5 * (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    )
    assert (loss - hard).abs() > 1e-3
    # images whose prompts are identical are interchangeable: swapping them changes nothing...
    loss_fn = SoftPatchContrastiveLoss(variant=variant)
    swapped = loss_fn(patches[torch.tensor([0, 3, 2, 1, 4])], text)
    torch.testing.assert_close(swapped, loss, rtol=0, atol=1e-12)
    # ...while swapping images with different prompts does
    other = loss_fn(patches[torch.tensor([2, 1, 0, 3, 4])], text)
    assert (other - loss).abs() > 1e-3


def test_hard_target_limit_equals_open_clip_clip_loss():
    # orthogonal prompts and a small temperature make G the identity: the loss is CLIP's InfoNCE
    patches, _ = _inputs(b=4, d=6)
    text = torch.eye(4, 6, dtype=F64) * 3.0
    tau = 0.01
    loss = soft_patch_contrastive_loss(patches, text, temperature=tau)
    image = F.normalize(F.normalize(patches, dim=-1).mean(1), dim=-1)
    clip = ClipLoss()(image, F.normalize(text, dim=-1), logit_scale=1 / tau)
    torch.testing.assert_close(loss, clip, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_gradients_match_reference_and_targets_are_detached(variant):
    patches, text = _inputs()
    patches.requires_grad_()
    text.requires_grad_()
    loss = soft_patch_contrastive_loss(patches, text, variant=variant)
    ref = ref_loss(patches, text, 0.2, variant)
    got = torch.autograd.grad(loss, (patches, text))
    want = torch.autograd.grad(ref, (patches, text))
    for a, b in zip(got, want):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_released_variant_targets_ignore_temperature():
    patches, text = _inputs()
    # logits still use tau, so compare against the reference at two temperatures
    for tau in (0.1, 0.5):
        loss = soft_patch_contrastive_loss(patches, text, temperature=tau, variant="released")
        torch.testing.assert_close(
            loss, ref_loss(patches, text, tau, "released"), rtol=0, atol=1e-12
        )
    paper = soft_patch_contrastive_loss(patches, text)
    released = soft_patch_contrastive_loss(patches, text, variant="released")
    assert (paper - released).abs() > 1e-3


def test_batch_of_one_is_zero_and_fp32_matches():
    patches, text = _inputs(b=1)
    assert soft_patch_contrastive_loss(patches, text).item() == pytest.approx(0.0, abs=1e-12)
    patches, text = _inputs(b=6, p=9, d=16, dtype=torch.float32)
    loss = soft_patch_contrastive_loss(patches, text)
    ref = ref_loss(patches.double(), text.double())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_tiny():
    patches, text = _inputs(b=3, p=2, d=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soft_patch_contrastive_loss(patches, text)
    assert torch.isfinite(loss)
    torch.testing.assert_close(
        loss.double(), ref_loss(patches.double(), text.double()), rtol=0.05, atol=0.05
    )


def test_bad_inputs():
    patches, text = _inputs()
    with pytest.raises(ValueError, match=r"patch_tokens must have shape \(B, P, D\)"):
        soft_patch_contrastive_loss(patches[0], text)
    with pytest.raises(ValueError, match=r"text_embeddings must have shape \(B, D\) = \(4, 6\)"):
        soft_patch_contrastive_loss(patches, text[:3])
    with pytest.raises(ValueError, match=r"text_embeddings must have shape \(B, D\) = \(4, 6\)"):
        soft_patch_contrastive_loss(patches, text[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        SoftPatchContrastiveLoss(temperature=0.0)
    for bad in (float("nan"), float("inf"), -1.0, 1e-129, True, "0.2"):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.0001"):
            SoftPatchContrastiveLoss(temperature=bad)
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.0001"):
            soft_patch_contrastive_loss(patches, text, temperature=bad)
    # A batch of size 0 used to return NaN.
    with pytest.raises(ValueError, match=r"patch_tokens must have shape \(B, P, D\) with B, P, D"):
        soft_patch_contrastive_loss(patches[:0], text[:0])
    with pytest.raises(ValueError, match=r"patch_tokens .*got \(4, 5, 0\)"):
        soft_patch_contrastive_loss(patches[..., :0], text[:, :0])
    with pytest.raises(ValueError, match="variant"):
        SoftPatchContrastiveLoss(variant="code")
