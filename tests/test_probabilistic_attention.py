"""``vlsegkit.ops.probabilistic_attention`` against a plain float64 reference of MedCLIPSeg eqs. 7-9."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlsegkit.ops import probabilistic_attention

F64 = torch.float64


def reference(q, k_mu, k_var, v, *, beta=2.35, mask=None, scale=None):
    """Eqs. 7-9 written out in float64 on 4-D inputs; fully masked rows are defined as 0."""
    q, k_mu, k_var, v = (t.to(F64) for t in (q, k_mu, k_var, v))
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    s_mu = torch.einsum("bhnd,bhmd->bhnm", q, k_mu) * s
    s_var = torch.einsum("bhnd,bhmd->bhnm", q * q, k_var) * s * s
    # sqrt with the zero subgradient at 0 (the double-where keeps NaN out of the backward)
    live = s_var > 0
    std = torch.where(live, torch.where(live, s_var, 1.0).sqrt(), 0.0)
    scores = s_mu - beta * std
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    if mask is not None:
        weights = weights * mask[:, None, None, :].to(F64)
    total = weights.sum(dim=-1, keepdim=True)
    attn = torch.where(total > 0, weights / total.clamp_min(1e-300), 0.0)
    return torch.einsum("bhnm,bhme->bhne", attn, v)


def make_inputs(b, h, n, m, d, dv, *, dtype=F64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k_mu = torch.randn(b, h, m, d, generator=gen, dtype=dtype)
    k_var = F.softplus(torch.randn(b, h, m, d, generator=gen, dtype=dtype)) + 1e-6
    v = torch.randn(b, h, m, dv, generator=gen, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k_mu, k_var, v))


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


SHAPES = [(2, 3, 7, 5, 8, 6), (1, 1, 1, 1, 1, 1), (3, 2, 13, 11, 5, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [2.35, 0.7, 5.0])
def test_matches_float64_reference_values_and_grads(shape, beta):
    inputs = make_inputs(*shape)
    out = probabilistic_attention(*inputs, beta=beta)
    ref = reference(*inputs, beta=beta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, inputs, g), grads(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_gradcheck_float64():
    inputs = make_inputs(2, 2, 4, 3, 5, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda *x: probabilistic_attention(*x, key_padding_mask=mask), inputs
    )


def test_penalty_actually_lowers_uncertain_keys():
    # two keys with identical means; the one with larger variance must get less attention
    q = torch.ones(1, 1, 1, 4, dtype=F64)
    k_mu = torch.zeros(1, 1, 2, 4, dtype=F64)
    k_var = torch.tensor([[0.1] * 4, [2.0] * 4], dtype=F64)[None, None]
    v = torch.tensor([[1.0], [0.0]], dtype=F64)[None, None]
    out = probabilistic_attention(q, k_mu, k_var, v, beta=2.35)
    # weight of key 0 = sigmoid(beta * (std_1 - std_0)), std_j = sqrt(sum q^2 var / d) = sqrt(var)
    expected = torch.sigmoid(torch.tensor(2.35 * (math.sqrt(2.0) - math.sqrt(0.1)), dtype=F64))
    torch.testing.assert_close(out.reshape(()), expected, rtol=0, atol=1e-14)


def test_three_dim_inputs_are_one_head():
    q, k_mu, k_var, v = make_inputs(2, 1, 6, 4, 8, 3)
    out3 = probabilistic_attention(q[:, 0], k_mu[:, 0], k_var[:, 0], v[:, 0])
    assert out3.shape == (2, 6, 3)
    torch.testing.assert_close(out3, reference(q, k_mu, k_var, v)[:, 0], rtol=0, atol=1e-12)


def test_beta_zero_is_ordinary_sdpa():
    q, k_mu, k_var, v = make_inputs(2, 3, 9, 7, 16, 16, dtype=torch.float32)
    out = probabilistic_attention(q, k_mu, k_var * 100, v, beta=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k_mu, v))
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    out = probabilistic_attention(q, k_mu, k_var, v, beta=0.0, key_padding_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k_mu, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, sdpa)


def test_custom_scale_scales_mean_and_variance():
    inputs = make_inputs(2, 2, 5, 4, 6, 3)
    out = probabilistic_attention(*inputs, scale=0.3)
    torch.testing.assert_close(out, reference(*inputs, scale=0.3), rtol=0, atol=1e-12)
    # and it is not the default scale
    assert (out - reference(*inputs)).abs().max() > 1e-3


def test_fp32_inputs_close_to_float64_reference():
    inputs = make_inputs(2, 2, 17, 12, 32, 8, dtype=torch.float32)
    out = probabilistic_attention(*inputs)
    assert out.dtype == torch.float32
    ref = reference(*inputs)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, inputs, g), grads(ref, inputs, g.double())):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_tiny():
    inputs = make_inputs(1, 2, 5, 4, 8, 4, dtype=torch.float32)
    mask = torch.tensor([[True, True, False, True]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probabilistic_attention(*inputs, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    ref = reference(*inputs, mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-2)
    g = torch.randn(out.shape)
    got = grads(out.float(), inputs, g)
    want = grads(ref, inputs, g.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 0.1 * b.abs().max() + 2e-2


def test_bf16_inputs_without_autocast():
    inputs = make_inputs(1, 1, 4, 3, 8, 2, dtype=torch.bfloat16)
    out = probabilistic_attention(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(*inputs), rtol=0, atol=5e-2)


def test_padding_mask_matches_reference_and_ignores_padded_keys():
    q, k_mu, k_var, v = make_inputs(2, 2, 6, 5, 4, 3)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    out = probabilistic_attention(q, k_mu, k_var, v, key_padding_mask=mask)
    ref = reference(q, k_mu, k_var, v, mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # padded keys receive exactly zero gradient, and changing them changes nothing
    gk, gvar, gv = torch.autograd.grad(out.sum(), (k_mu, k_var, v))
    pad = ~mask[:, None, :, None].expand_as(gk)
    assert gk[pad].abs().max() == 0 and gvar[pad].abs().max() == 0
    assert gv[~mask[:, None, :, None].expand_as(gv)].abs().max() == 0
    with torch.no_grad():
        noisy = [t.clone() for t in (k_mu, k_var, v)]
        for t in noisy:
            t[~mask[:, None, :, None].expand_as(t)] = 123.0
    out2 = probabilistic_attention(q, *noisy, key_padding_mask=mask)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)
    # and the mask matters
    assert (probabilistic_attention(q, k_mu, k_var, v) - out).abs().max() > 1e-3


def test_integer_mask_equals_bool_mask():
    inputs = make_inputs(2, 1, 3, 4, 5, 2)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    a = probabilistic_attention(*inputs, key_padding_mask=mask)
    b = probabilistic_attention(*inputs, key_padding_mask=mask.bool())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("chunk_size", "beta"), [(None, 2.35), (2, 2.35), (None, 0.0)])
def test_fully_masked_rows_are_zero_without_nan(dtype, chunk_size, beta):
    inputs = make_inputs(2, 2, 5, 3, 4, 3, dtype=dtype)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = probabilistic_attention(*inputs, beta=beta, key_padding_mask=mask, chunk_size=chunk_size)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    ref = reference(*inputs, beta=beta, mask=mask)
    atol = 1e-12 if dtype == F64 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    g = grads(out, inputs, torch.ones_like(out))
    if beta == 0:
        assert g[2] is None  # k_var does not enter ordinary attention
        g = (g[0], g[1], g[3])
    for t in g:
        assert torch.isfinite(t).all()
        assert t[1].abs().max() == 0  # nothing flows through a fully masked sample


def test_zero_variance_has_finite_zero_subgradient():
    q, _, k_var, _ = inputs = make_inputs(1, 1, 4, 3, 5, 2)
    with torch.no_grad():
        q[0, 0, 1] = 0.0  # S_sigma^2 = 0 for every key of query 1
        k_var[0, 0, 2] = 0.0  # and for key 2 for every query
    out = probabilistic_attention(*inputs)
    ref = reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got, want = grads(out, inputs, g), grads(ref, inputs, g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert got[2][0, 0, 2].abs().max() == 0  # d/dk_var at k_var = 0: zero subgradient
    assert got[2][0, 0, 0].abs().max() > 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked(chunk_size, masked):
    inputs = make_inputs(2, 3, 7, 5, 8, 4)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, False, True]])
    kw = {"key_padding_mask": mask} if masked else {}
    full = probabilistic_attention(*inputs, **kw)
    chunked = probabilistic_attention(*inputs, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-14)
    g = torch.randn_like(full)
    for a, b in zip(grads(chunked, inputs, g), grads(full, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(
            probabilistic_attention(*inputs, chunk_size=chunk_size, **kw), full
        )


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward (views of one tensor count once)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_chunking_does_not_keep_score_sized_activations():
    n, m = 256, 64
    inputs = make_inputs(1, 1, n, m, 4, 4, dtype=torch.float32)
    full = _saved_bytes(lambda: probabilistic_attention(*inputs))
    chunked = _saved_bytes(lambda: probabilistic_attention(*inputs, chunk_size=16))
    score_bytes = n * m * 4
    assert full >= 2 * score_bytes  # penalty mask + attention weights (N x M each)
    # only the inputs themselves are kept; chunk activations are recomputed in backward
    assert chunked <= sum(t.numel() * 4 for t in inputs) < score_bytes // 4


def test_deterministic_and_repeatable():
    inputs = make_inputs(2, 2, 5, 4, 8, 3, dtype=torch.float32)
    a = probabilistic_attention(*inputs, chunk_size=2)
    b = probabilistic_attention(*inputs, chunk_size=2)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda q, k, kv, v: (q[0], k, kv, v), "k_mu must have 3 dims"),
        (lambda q, k, kv, v: (q[..., :3], k, kv, v), "k_mu must have shape"),
        (lambda q, k, kv, v: (q[:1], k, kv, v), "k_mu must have shape"),
        (lambda q, k, kv, v: (q, k, kv[..., :2, :], v), "k_var must have the same shape"),
        (lambda q, k, kv, v: (q, k, kv, v[..., :2, :]), "v must have shape"),
        (lambda q, k, kv, v: (q[0, 0], k[0, 0], kv[0, 0], v[0, 0]), "q must have shape"),
        (lambda q, k, kv, v: (q, k.float(), kv, v), "share one dtype"),
        (lambda q, k, kv, v: (q, k, kv, v.long()), "floating-point"),
    ],
)
def test_bad_shapes_raise(change, match):
    inputs = make_inputs(2, 2, 5, 4, 8, 3, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        probabilistic_attention(*change(*inputs))


def test_bad_arguments_raise():
    inputs = make_inputs(2, 2, 5, 4, 8, 3, requires_grad=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(2, 4\)"):
        probabilistic_attention(*inputs, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be bool or integer"):
        probabilistic_attention(*inputs, key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        probabilistic_attention(*inputs, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        probabilistic_attention(*inputs, beta=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        probabilistic_attention(*inputs, scale=float("inf"))
