"""DHN-NCE and its family against plain float64 loops of MedCLIP-SAMv2's equations.

The references below are written from the paper (eqs. 2-3 and 9-13) and from the public
``loss/hnl.py`` as described in ``specs/medclipsamv2.md`` §1.4, one scalar at a time, independently
of ``vlsegkit.losses.dhn_nce``; gradients come from autograd through those loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlsegkit.losses import (
    DCLLoss,
    DHNNCELoss,
    HNNCELoss,
    InfoNCELoss,
    dhn_nce_directions,
    dhn_nce_loss,
)


# --------------------------------------------------------------------------- references
def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def paper_loop(image, text, *, tau=0.6, alpha=0.0, beta1=0.15, beta2=0.15, detach_w=False):
    """Eqs. 9-13 entry by entry: per-anchor ``(v2t, t2v)``, each ``(B,)``."""
    img, txt = _unit(image), _unit(text)
    b = img.shape[0]
    s = [[(img[i] * txt[j]).sum() / tau for j in range(b)] for i in range(b)]

    def weight(beta, row, j):  # row(k) = the anchor's similarity with item k
        den = sum(torch.exp(beta * row(k)) for k in range(b) if k != i)
        w = (b - 1) * torch.exp(beta * row(j)) / den
        return w.detach() if detach_w else w

    v2t, t2v = [], []
    for i in range(b):
        acc_v, acc_t = alpha * torch.exp(s[i][i]), alpha * torch.exp(s[i][i])
        for j in range(b):
            if j == i:
                continue
            acc_v = acc_v + weight(beta1, lambda k: s[i][k], j) * torch.exp(s[i][j])  # noqa: B023
            acc_t = acc_t + weight(beta2, lambda k: s[k][i], j) * torch.exp(s[j][i])  # noqa: B023
        v2t.append(-s[i][i] + torch.log(acc_v))
        t2v.append(-s[i][i] + torch.log(acc_t))
    return torch.stack(v2t), torch.stack(t2v)


def released_loop(image, text, *, tau=0.6, alpha=0.0, beta1=0.15, beta2=0.15):
    """The released ``HardNegativeLoss.forward`` restated one entry at a time (spec §1.4 steps 1-6)."""
    img, txt = _unit(image), _unit(text)
    b = img.shape[0]
    n = b - 1
    s = [[(img[i] * txt[j]).sum() / tau for j in range(b)] for i in range(b)]
    st = [[s[j][i] for j in range(b)] for i in range(b)]
    zero = torch.zeros((), dtype=image.dtype)

    def masked(m, i, j):  # logits * neg_mask: the diagonal is zeroed before exp
        return m[i][j] if i != j else zero

    def norm(m, r):  # sum over the last axis of exp(logits * neg_mask), row r
        return sum(torch.exp(masked(m, r, k)) for k in range(b))

    total = zero
    for i in range(b):
        for j in range(b):
            pos = torch.exp(s[i][i]) if i == j else torch.exp(zero)
            # (B, B) / (B,) broadcasts over the last axis: entry (i, j) divided by row j's norm
            neg_img = (
                n * torch.exp(beta1 * masked(s, i, j)) / norm(s, j) * torch.exp(masked(s, i, j))
            )
            neg_txt = (
                n * torch.exp(beta2 * masked(st, i, j)) / norm(st, j) * torch.exp(masked(st, i, j))
            )
            total = total - torch.log(pos / (pos * alpha + neg_img))
            total = total - torch.log(pos / (pos * alpha + neg_txt))
    return total / b**2


def embeddings(b=5, d=7, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g, dtype=dtype) * scale
    text = (0.6 * image + 0.8 * torch.randn(b, d, generator=g, dtype=dtype)) * 2.0
    return image, text


PAPER_CASES = [
    dict(alpha=0.0, beta1=0.15, beta2=0.15),  # DHN-NCE (the paper)
    dict(alpha=0.0, beta1=0.0, beta2=0.0),  # DCL
    dict(alpha=1.0, beta1=0.15, beta2=0.15),  # HN-NCE
    dict(alpha=1.0, beta1=0.0, beta2=0.0),  # InfoNCE
    dict(alpha=0.5, beta1=0.7, beta2=0.05),  # asymmetric hardness
]


# --------------------------------------------------------------------------- the paper's loss
@pytest.mark.parametrize("options", PAPER_CASES)
@pytest.mark.parametrize("tau", [0.6, 0.07])
def test_paper_loss_terms_and_gradients_match_the_equations(options, tau):
    image, text = embeddings()
    ref_i, ref_t = image.clone().requires_grad_(), text.clone().requires_grad_()
    ref_v2t, ref_t2v = paper_loop(ref_i, ref_t, tau=tau, **options)
    (ref_v2t.sum() + ref_t2v.sum()).backward()

    ours_i, ours_t = image.clone().requires_grad_(), text.clone().requires_grad_()
    v2t, t2v = dhn_nce_directions(ours_i, ours_t, temperature=tau, **options)
    assert v2t.dtype == torch.float64
    torch.testing.assert_close(v2t, ref_v2t.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t2v, ref_t2v.detach(), rtol=1e-10, atol=1e-10)

    loss = DHNNCELoss(temperature=tau, **options)(ours_i, ours_t)
    torch.testing.assert_close(loss, (ref_v2t + ref_t2v).sum().detach(), rtol=1e-10, atol=1e-10)
    loss.backward()
    torch.testing.assert_close(ours_i.grad, ref_i.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours_t.grad, ref_t.grad, rtol=1e-9, atol=1e-10)
    assert ours_i.grad.abs().max() > 1e-3  # the comparison is not between zeros


def test_named_terms_and_reductions():
    image, text = embeddings(b=6)
    ref_v2t, ref_t2v = (x.detach() for x in paper_loop(image, text))
    loss = DHNNCELoss()
    terms = loss.terms(image, text)
    assert terms.keys() == {"loss", "v2t_loss", "t2v_loss"}
    torch.testing.assert_close(terms["v2t_loss"], ref_v2t.sum(), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["t2v_loss"], ref_t2v.sum(), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms["loss"], loss(image, text), rtol=1e-12, atol=0)
    mean = DHNNCELoss(reduction="mean")
    torch.testing.assert_close(mean(image, text), (ref_v2t + ref_t2v).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        mean.terms(image, text)["t2v_loss"], ref_t2v.mean(), rtol=1e-10, atol=0
    )
    per_pair = DHNNCELoss(reduction="none")(image, text)
    assert per_pair.shape == (6,)
    torch.testing.assert_close(per_pair, ref_v2t + ref_t2v, rtol=1e-10, atol=0)
    # the functional form is the module
    torch.testing.assert_close(
        dhn_nce_loss(image, text, beta1=0.3, alpha=0.2),
        DHNNCELoss(beta1=0.3, alpha=0.2)(image, text),
        rtol=0,
        atol=0,
    )


def test_swapping_modalities_swaps_the_directions():
    image, text = embeddings(b=4, seed=3)
    v2t, t2v = dhn_nce_directions(image, text, beta1=0.4, beta2=0.1)
    t2v_swapped, v2t_swapped = dhn_nce_directions(text, image, beta1=0.1, beta2=0.4)
    torch.testing.assert_close(v2t, v2t_swapped, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t2v, t2v_swapped, rtol=1e-12, atol=1e-12)


def test_infonce_is_two_cross_entropies():
    image, text = embeddings(b=8, d=16, dtype=torch.float32)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07
    target = torch.arange(8)
    for reduction in ("sum", "mean"):
        expected = F.cross_entropy(logits, target, reduction=reduction) + F.cross_entropy(
            logits.T, target, reduction=reduction
        )
        ours = InfoNCELoss(temperature=0.07, reduction=reduction)(image, text)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # gradients too
    a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
    a2, b2 = image.clone().requires_grad_(), text.clone().requires_grad_()
    InfoNCELoss(temperature=0.07)(a, b).backward()
    logits = F.normalize(a2, dim=-1) @ F.normalize(b2, dim=-1).T / 0.07
    (F.cross_entropy(logits, target, reduction="sum")
     + F.cross_entropy(logits.T, target, reduction="sum")).backward()  # fmt: skip
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_aliases_are_the_family_presets():
    image, text = embeddings(b=5, seed=2)
    cases = {
        DCLLoss: dict(alpha=0.0, beta1=0.0, beta2=0.0),
        HNNCELoss: dict(alpha=1.0, beta1=0.15, beta2=0.15),
        InfoNCELoss: dict(alpha=1.0, beta1=0.0, beta2=0.0),
        DHNNCELoss: dict(alpha=0.0, beta1=0.15, beta2=0.15),
    }
    for cls, preset in cases.items():
        loss = cls()
        assert (loss.alpha, loss.beta1, loss.beta2, loss.temperature) == (
            preset["alpha"], preset["beta1"], preset["beta2"], 0.6,
        )  # fmt: skip
        v2t, t2v = paper_loop(image, text, **preset)
        torch.testing.assert_close(loss(image, text), (v2t + t2v).sum(), rtol=1e-10, atol=0)
    # the same keyword arguments, other presets
    assert DCLLoss(beta1=0.2, reduction="mean").beta1 == 0.2
    assert InfoNCELoss(released=True).released


def test_equal_negatives_make_the_hardness_weights_uniform():
    # rows of a centred identity: every pair of distinct rows has the same cosine -1/(B-1), so
    # the (B-1)-scaled weights are all 1 and DHN-NCE equals DCL for any beta
    b = 6
    simplex = torch.eye(b, dtype=torch.float64) - 1.0 / b
    image, text = simplex, simplex * 3.0
    dcl = DCLLoss()(image, text)
    for beta in (0.15, 1.0, 5.0):
        torch.testing.assert_close(DHNNCELoss(beta1=beta, beta2=beta)(image, text), dcl)
    # and every anchor's term is -s_ii + log((B-1) exp(s_ij)), written out
    s_pos, s_neg = 1.0 / 0.6, -1.0 / (b - 1) / 0.6
    expected = 2 * b * (-s_pos + math.log(b - 1) + s_neg)
    assert dcl.item() == pytest.approx(expected, rel=1e-12)


def test_hardness_weights_emphasise_hard_negatives():
    # anchor 0 has one hard negative (text 1 close to image 0): beta > 0 raises its loss
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    dcl_v2t, _ = dhn_nce_directions(image, text, beta1=0.0, beta2=0.0)
    hard_v2t, _ = dhn_nce_directions(image, text, beta1=1.0, beta2=0.0)
    assert hard_v2t[0] > dcl_v2t[0] + 0.05


def test_gradients_flow_through_the_weights_unless_detached():
    image, text = embeddings(b=5, seed=4)
    grads = {}
    for detach in (False, True):
        a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
        ra, rb = image.clone().requires_grad_(), text.clone().requires_grad_()
        DHNNCELoss(beta1=0.8, beta2=0.5, detach_weights=detach)(a, b).backward()
        v2t, t2v = paper_loop(ra, rb, beta1=0.8, beta2=0.5, detach_w=detach)
        (v2t.sum() + t2v.sum()).backward()
        torch.testing.assert_close(a.grad, ra.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(b.grad, rb.grad, rtol=1e-9, atol=1e-10)
        grads[detach] = a.grad
    assert (grads[False] - grads[True]).abs().max() > 1e-3
    # with beta = 0 the weights are constants: detaching them changes nothing
    a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
    c, d = image.clone().requires_grad_(), text.clone().requires_grad_()
    DCLLoss()(a, b).backward()
    DCLLoss(detach_weights=True)(c, d).backward()
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    image, text = embeddings(b=4, d=3, seed=5)
    for kwargs in ({}, {"alpha": 1.0}, {"released": True}, {"released": True, "alpha": 1.0}):
        assert torch.autograd.gradcheck(
            lambda a, b, kw=kwargs: dhn_nce_loss(a, b, **kw),
            (image.clone().requires_grad_(), text.clone().requires_grad_()),
        )


# --------------------------------------------------------------------------- released loss/hnl.py
@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=0.0, beta1=0.15, beta2=0.15),
        dict(alpha=1.0, beta1=0.15, beta2=0.15),
        dict(alpha=0.0, beta1=0.9, beta2=0.0),
    ],
)
def test_released_matches_the_public_code_value_and_gradients(options):
    image, text = embeddings(b=5, seed=6)
    ra, rb = image.clone().requires_grad_(), text.clone().requires_grad_()
    ref = released_loop(ra, rb, **options)
    ref.backward()
    a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
    loss = DHNNCELoss(released=True, **options)
    ours = loss(a, b)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-11, atol=1e-12)
    ours.backward()
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-9, atol=1e-11)
    # the released value is a mean over B^2 entries whatever the reduction says
    for reduction in ("sum", "mean", "none"):
        again = DHNNCELoss(released=True, reduction=reduction, **options)(image, text)
        assert again.shape == () and torch.equal(again, ours.detach())
    assert loss.terms(image, text).keys() == {"loss"}


def test_released_closed_form_and_difference_from_the_paper():
    # spec §1.4, alpha = 0: L = 2 log(B-1) - (2/B^2) sum_i s_ii + ((2+b1+b2)/B^2) sum_{i!=j} s_ij
    #                         - (1/B) sum_j [LSE+_row(j) + LSE+_col(j)],  LSE+ = log(1 + sum_{k!=j} e^s)
    image, text = embeddings(b=7, seed=7)
    b, tau, b1, b2 = 7, 0.6, 0.15, 0.3
    s = (_unit(image) @ _unit(text).T / tau).tolist()
    diag = sum(s[i][i] for i in range(b))
    off = sum(s[i][j] for i in range(b) for j in range(b) if i != j)
    lse_row = [math.log(1 + sum(math.exp(s[j][k]) for k in range(b) if k != j)) for j in range(b)]
    lse_col = [math.log(1 + sum(math.exp(s[k][j]) for k in range(b) if k != j)) for j in range(b)]
    closed = (
        2 * math.log(b - 1) - 2 / b**2 * diag + (2 + b1 + b2) / b**2 * off
        - (sum(lse_row) + sum(lse_col)) / b
    )  # fmt: skip
    ours = DHNNCELoss(released=True, beta1=b1, beta2=b2)(image, text)
    assert ours.item() == pytest.approx(closed, rel=1e-12)
    paper = DHNNCELoss(beta1=b1, beta2=b2, reduction="mean")(image, text)
    assert abs(paper.item() - ours.item()) > 0.1  # not the paper's loss under any scaling below
    assert abs(paper.item() / 2 - ours.item()) > 0.1


# --------------------------------------------------------------------------- numerics
def test_small_temperature_is_stable_in_float32():
    # s up to 1/0.005 = 200: exp(s) overflows float32, not the log-space computation
    image, text = embeddings(b=6, seed=8)
    for options in ({}, {"alpha": 1.0}, {"released": True}):
        kw = dict(temperature=0.005, **options)
        if options.get("released"):
            ref = released_loop(image, text, tau=0.005)
        else:
            v2t, t2v = paper_loop(image, text, tau=0.005, alpha=options.get("alpha", 0.0))
            ref = (v2t + t2v).sum()
        a = image.float().requires_grad_()
        ours = DHNNCELoss(**kw)(a, text.float())
        assert ours.dtype == torch.float32 and torch.isfinite(ours)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-3)
        ours.backward()
        assert torch.isfinite(a.grad).all()


def test_large_batch_keeps_only_batch_by_batch_intermediates():
    b, d = 256, 8
    image, text = embeddings(b=b, d=d, seed=9, dtype=torch.float32)
    image.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = DHNNCELoss(temperature=0.05)(image, text)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all()
    assert max(sizes) <= b * b  # nothing like (B, B, D) or (B, B, B) is built


def test_bf16_autocast_embeddings():
    image, text = embeddings(b=6, d=16, dtype=torch.float32)
    proj = torch.nn.Linear(16, 16)
    ref = DHNNCELoss()(proj(image), proj(text))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = proj(image), proj(text)
        assert a.dtype == torch.bfloat16
        low = DHNNCELoss()(a, b)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=0.02)
    low.backward()
    assert torch.isfinite(proj.weight.grad).all()


def test_deterministic():
    image, text = embeddings(b=9, dtype=torch.float32, seed=10)
    first = DHNNCELoss()(image, text)
    assert torch.equal(first, DHNNCELoss()(image, text))
    # a permutation of the pairs is the same batch
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(DHNNCELoss()(image[perm], text[perm]), first)


# --------------------------------------------------------------------------- bad input
def test_bad_options_are_refused():
    for kwargs, match in [
        ({"temperature": 0.0}, "temperature must be a finite number >= 0.0001"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
        ({"beta1": -1.0}, "beta1 must be"),
        ({"beta2": float("inf")}, "beta2 must be"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"released": True, "detach_weights": True}, "detach_weights applies to the paper"),
    ]:
        with pytest.raises(ValueError, match=match):
            DHNNCELoss(**kwargs)
    with pytest.raises(TypeError):
        DHNNCELoss(0.6)  # keyword-only


def test_bad_inputs_are_refused():
    loss = DHNNCELoss()
    good = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"same shape \(B, D\)"):
        loss(good, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"same shape \(B, D\)"):
        loss(good, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"image_embeds must be a floating-point \(B, D\)"):
        loss(torch.randn(4, 8, 2), good)
    with pytest.raises(ValueError, match=r"text_embeds must be a floating-point \(B, D\)"):
        loss(good, torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(TypeError, match="image_embeds must be a"):
        loss(good.numpy(), good)
