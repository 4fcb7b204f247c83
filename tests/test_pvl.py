"""PVLAttention / PVLAdapter against a slow reference written from MedCLIPSeg eqs. 3-17."""

from __future__ import annotations

import math

import pytest
import torch

from vlsegkit.layers import PVLAdapter, PVLAttention, PVLTwoWayLayer

F64 = torch.float64


# ----------------------------------------------------------------------------- reference
def _linear(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def _layer_norm(x, ln):
    if not isinstance(ln, torch.nn.LayerNorm):
        return x
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _softplus(x):
    return torch.log1p(torch.exp(-x.abs())) + x.clamp_min(0)


def ref_attention(mod: PVLAttention, x, z, *, noise=None, mask=None):
    """Attn_PVL(X, Z) from eqs. 4-13 with explicit loops over heads, queries and keys."""
    da, h = mod.attn_dim, mod.num_heads
    dh = da // h
    q = _linear(x, mod.q_proj)
    kk, vv = _linear(z, mod.k_proj), _linear(z, mod.v_proj)
    k_mu, k_var = _layer_norm(kk[..., :da], mod.norm_k), _softplus(kk[..., da:]) + mod.var_eps
    v_mu, v_var = _layer_norm(vv[..., :da], mod.norm_v), _softplus(vv[..., da:]) + mod.var_eps
    values = v_mu if noise is None else v_mu + torch.sqrt(v_var) * noise
    b, n, m = x.shape[0], x.shape[1], z.shape[1]
    out = torch.zeros(b, n, da, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * dh, (hi + 1) * dh)
            for i in range(n):
                qi = q[bi, i, sl]
                scores = []
                for j in range(m):
                    s_mu = (qi * k_mu[bi, j, sl]).sum() / math.sqrt(dh)
                    s_var = (qi * qi * k_var[bi, j, sl]).sum() / dh
                    scores.append(s_mu - mod.beta * torch.sqrt(s_var))
                scores = torch.stack(scores)
                w = torch.exp(scores - scores.max())
                if mask is not None:
                    w = w * mask[bi].to(w.dtype)
                w = w / w.sum() if w.sum() > 0 else w * 0
                out[bi, i, sl] = (w[:, None] * values[bi, :, sl]).sum(0)
    g = torch.sigmoid(mod.gate)
    return g * _linear(out, mod.out_proj) + (1 - g) * x


def ref_adapter(ad: PVLAdapter, vis, txt, *, noises=(None, None), mask=None):
    v = vis @ ad.proj_vis_down.weight.T
    t = txt @ ad.proj_txt_down.weight.T
    v = ref_attention(ad.two_way.cross_attn_img_to_txt, v, t, noise=noises[0], mask=mask)
    t = ref_attention(ad.two_way.cross_attn_txt_to_img, t, v, noise=noises[1])
    return vis + v @ ad.proj_vis_up.weight.T, txt + t @ ad.proj_txt_up.weight.T


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial LayerNorm affine and gate values so the reference checks them too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("gate"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _tokens(b, n, d, seed, dtype=F64):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- PVLAttention
@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("kv_norm", [False, True])
def test_attention_deterministic_matches_reference(num_heads, kv_norm):
    torch.manual_seed(0)
    mod = _randomise(
        PVLAttention(dim=8, attn_dim=12, num_heads=num_heads, kv_norm=kv_norm)
    ).double()
    x, z = _tokens(2, 5, 8, 1), _tokens(2, 3, 8, 2)
    out = mod(x, z, sample=False)
    torch.testing.assert_close(out, ref_attention(mod, x, z), rtol=0, atol=1e-12)


def test_attention_sampling_matches_reference_with_same_noise():
    torch.manual_seed(0)
    mod = _randomise(PVLAttention(dim=8, num_heads=2, kv_norm=True)).double()
    x, z = _tokens(2, 4, 8, 1), _tokens(2, 6, 8, 2)
    out = mod(x, z, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    torch.testing.assert_close(out, ref_attention(mod, x, z, noise=noise), rtol=0, atol=1e-12)
    # the noise is real: it changes the output
    assert (out - mod(x, z, sample=False)).abs().max() > 1e-3


def test_attention_sampling_is_unbiased():
    # O is linear in the sampled values, so the sample mean converges to the deterministic output
    torch.manual_seed(0)
    mod = PVLAttention(dim=4).double()
    x, z = _tokens(1, 2, 4, 1), _tokens(1, 3, 4, 2)
    gen = torch.Generator().manual_seed(0)
    xs, zs = x.expand(4000, -1, -1), z.expand(4000, -1, -1)
    with torch.no_grad():
        samples = mod(xs, zs, generator=gen)
        mean = mod(x, z, sample=False)
    torch.testing.assert_close(samples.mean(0, keepdim=True), mean, rtol=0, atol=0.03)
    assert samples.std(0).min() > 0.01


def test_sampling_defaults_and_deterministic_mode():
    torch.manual_seed(0)
    mod = PVLAttention(dim=8)
    x, z = _tokens(1, 3, 8, 1, torch.float32), _tokens(1, 4, 8, 2, torch.float32)
    mod.eval()  # eval still samples (MC inference), as in the paper and the release
    assert not torch.equal(mod(x, z), mod(x, z))
    det = mod(x, z, sample=False)
    mod.deterministic = True
    assert torch.equal(mod(x, z), det)
    assert not torch.equal(mod(x, z, sample=True), det)


def test_generator_makes_sampling_reproducible():
    torch.manual_seed(0)
    mod = PVLAttention(dim=8)
    x, z = _tokens(2, 3, 8, 1, torch.float32), _tokens(2, 4, 8, 2, torch.float32)
    a = mod(x, z, generator=torch.Generator().manual_seed(3))
    b = mod(x, z, generator=torch.Generator().manual_seed(3))
    c = mod(x, z, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(11)
    d = mod(x, z)
    torch.manual_seed(11)
    assert torch.equal(mod(x, z), d)


def test_gate_init_and_gating_formula():
    mod = PVLAttention(dim=8).double()
    assert mod.gate.shape == () and mod.gate.item() == 0.0
    assert torch.sigmoid(mod.gate).item() == 0.5
    assert PVLAttention(dim=8, gate_init=-0.02).gate.item() == pytest.approx(-0.02)
    x, z = _tokens(1, 3, 8, 1), _tokens(1, 4, 8, 2)
    with torch.no_grad():
        mod.gate.fill_(-50.0)  # g -> 0: Y = X
        torch.testing.assert_close(mod(x, z, sample=False), x, rtol=0, atol=1e-12)
        mod.gate.fill_(50.0)  # g -> 1: Y = O_proj
        y = mod(x, z, sample=False)
        mod.gate.fill_(0.0)
        half = mod(x, z, sample=False)
    torch.testing.assert_close(half, 0.5 * y + 0.5 * x, rtol=0, atol=1e-12)


def test_attention_gradients_match_reference():
    torch.manual_seed(0)
    mod = _randomise(PVLAttention(dim=6, num_heads=2, kv_norm=True)).double()
    x = _tokens(2, 3, 6, 1).requires_grad_()
    z = _tokens(2, 4, 6, 2).requires_grad_()
    noise = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    params = [x, z, *mod.parameters()]
    out = mod(x, z, generator=torch.Generator().manual_seed(5))
    ref = ref_attention(mod, x, z, noise=noise)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    assert all(a.abs().max() > 0 for a in got)


def test_attention_padding_mask():
    torch.manual_seed(0)
    mod = PVLAttention(dim=8, kv_norm=True).double()
    x, z = _tokens(2, 3, 8, 1), _tokens(2, 5, 8, 2)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    out = mod(x, z, context_padding_mask=mask, sample=False)
    torch.testing.assert_close(out, ref_attention(mod, x, z, mask=mask), rtol=0, atol=1e-12)
    z2 = z.clone()
    z2[~mask] = 9.0  # padded context tokens cannot influence the result
    torch.testing.assert_close(mod(x, z2, context_padding_mask=mask, sample=False), out)
    assert (mod(x, z, sample=False) - out).abs().max() > 1e-3


def test_attention_bad_inputs():
    mod = PVLAttention(dim=8)
    x, z = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 8\)"):
        mod(x[0], z)
    with pytest.raises(ValueError, match=r"context must have shape \(B, N, 8\)"):
        mod(x, z[..., :4])
    with pytest.raises(ValueError, match="context must have batch size 2"):
        mod(x, z[:1])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(2, 4\)"):
        mod(x, z, context_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        PVLAttention(dim=8, num_heads=3)
    with pytest.raises(ValueError, match="var_eps"):
        PVLAttention(dim=8, var_eps=-1.0)


# ----------------------------------------------------------------------------- PVLAdapter
def _adapter(**kw):
    torch.manual_seed(0)
    return _randomise(PVLAdapter(vision_dim=10, text_dim=6, dim=8, **kw)).double()


@pytest.mark.parametrize("kv_norm", [False, True])
def test_adapter_deterministic_matches_reference(kv_norm):
    ad = _adapter(kv_norm=kv_norm)
    vis, txt = _tokens(2, 5, 10, 1), _tokens(2, 4, 6, 2)
    new_vis, new_txt = ad(vis, txt, sample=False)
    ref_vis, ref_txt = ref_adapter(ad, vis, txt)
    torch.testing.assert_close(new_vis, ref_vis, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_txt, ref_txt, rtol=0, atol=1e-12)


def test_adapter_text_update_uses_updated_vision():
    # eq. 15 attends to v' (vision first), not to v: a reference using v must disagree
    ad = _adapter(kv_norm=True)
    vis, txt = _tokens(1, 5, 10, 1), _tokens(1, 4, 6, 2)
    _, new_txt = ad(vis, txt, sample=False)
    v = vis @ ad.proj_vis_down.weight.T
    t = txt @ ad.proj_txt_down.weight.T
    t_stale = ref_attention(ad.two_way.cross_attn_txt_to_img, t, v)
    assert (new_txt - (txt + t_stale @ ad.proj_txt_up.weight.T)).abs().max() > 1e-4


def test_adapter_sampling_matches_reference_with_same_generator():
    ad = _adapter(kv_norm=True, num_heads=2)
    vis, txt = _tokens(2, 5, 10, 1), _tokens(2, 4, 6, 2)
    new_vis, new_txt = ad(vis, txt, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    noises = (  # image update samples text values first, then text update samples image values
        torch.randn(2, 4, 8, generator=gen, dtype=F64),
        torch.randn(2, 5, 8, generator=gen, dtype=F64),
    )
    ref_vis, ref_txt = ref_adapter(ad, vis, txt, noises=noises)
    torch.testing.assert_close(new_vis, ref_vis, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_txt, ref_txt, rtol=0, atol=1e-12)


def test_adapter_gradients_match_reference():
    ad = _adapter(kv_norm=True)
    vis = _tokens(2, 3, 10, 1).requires_grad_()
    txt = _tokens(2, 4, 6, 2).requires_grad_()
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    params = [vis, txt, *ad.parameters()]
    out = ad(vis, txt, text_padding_mask=mask, sample=False)
    ref = ref_adapter(ad, vis, txt, mask=mask)
    gv, gt = torch.randn_like(out[0]), torch.randn_like(out[1])
    got = torch.autograd.grad(out, params, (gv, gt))
    want = torch.autograd.grad(ref, params, (gv, gt))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    assert all(torch.isfinite(a).all() and a.abs().max() > 0 for a in got)


def test_adapter_padding_mask_changes_vision_only_through_text_keys():
    ad = _adapter(kv_norm=True)
    vis, txt = _tokens(2, 5, 10, 1), _tokens(2, 4, 6, 2)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    masked = ad(vis, txt, text_padding_mask=mask, sample=False)
    ref = ref_adapter(ad, vis, txt, mask=mask)
    torch.testing.assert_close(masked[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(masked[1], ref[1], rtol=0, atol=1e-12)
    plain = ad(vis, txt, sample=False)
    assert (plain[0][0] - masked[0][0]).abs().max() > 1e-4  # sample 0 has padding
    torch.testing.assert_close(plain[0][1], masked[0][1], rtol=0, atol=1e-12)  # sample 1 has none


def test_adapter_chunked_equals_unchunked():
    ad = _adapter(kv_norm=True)
    chunked = _adapter(kv_norm=True, chunk_size=2)
    chunked.load_state_dict(ad.state_dict())
    vis, txt = _tokens(2, 7, 10, 1), _tokens(2, 5, 6, 2)
    a = ad(vis, txt, generator=torch.Generator().manual_seed(1))
    b = chunked(vis, txt, generator=torch.Generator().manual_seed(1))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)


def test_adapter_released_layout_and_parameter_count():
    # MedCLIPSeg ViT-B/16 + BiomedBERT adapter: 1,577,986 parameters (specs/medclipseg.md 1.3)
    ad = PVLAdapter(vision_dim=768, text_dim=768, dim=256, kv_norm=True)
    assert sum(p.numel() for p in ad.parameters()) == 1_577_986
    attn = {
        f"two_way.cross_attn_{d}.{k}"
        for d in ("img_to_txt", "txt_to_img")
        for k in (
            "q_proj.weight",
            "q_proj.bias",
            "k_proj.weight",
            "k_proj.bias",
            "v_proj.weight",
            "v_proj.bias",
            "out_proj.weight",
            "out_proj.bias",
            "norm_k.weight",
            "norm_k.bias",
            "norm_v.weight",
            "norm_v.bias",
            "gate",
        )
    }
    proj = {f"proj_{s}_{d}.weight" for s in ("vis", "txt") for d in ("down", "up")}
    assert set(ad.state_dict()) == attn | proj
    assert ad.state_dict()["two_way.cross_attn_img_to_txt.k_proj.weight"].shape == (512, 256)
    paper = PVLAdapter(vision_dim=768, text_dim=768, dim=256)
    assert sum(p.numel() for p in paper.parameters()) == 1_577_986 - 4 * 2 * 256


def test_adapter_bf16_autocast_tiny():
    torch.manual_seed(0)
    ad = PVLAdapter(vision_dim=16, text_dim=12, dim=8, kv_norm=True)
    vis, txt = _tokens(1, 4, 16, 1, torch.float32), _tokens(1, 3, 12, 2, torch.float32)
    vis.requires_grad_()
    ref = ad(vis, txt, sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad(vis, txt, sample=False)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.1)
    (g,) = torch.autograd.grad(out[0].float().sum(), vis)
    (g_ref,) = torch.autograd.grad(ref[0].sum(), vis)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), g_ref, rtol=0, atol=0.1)


def test_adapter_bad_inputs():
    ad = PVLAdapter(vision_dim=10, text_dim=6, dim=8)
    vis, txt = torch.randn(2, 5, 10), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"vision_tokens must have shape \(B, N, 10\)"):
        ad(vis[..., :6], txt)
    with pytest.raises(ValueError, match=r"text_tokens must have shape \(B, N, 6\)"):
        ad(vis, txt[0])
    with pytest.raises(ValueError, match="text_tokens must have batch size 2"):
        ad(vis, txt[:1])
    with pytest.raises(ValueError, match="key_padding_mask"):
        ad(vis, txt, text_padding_mask=torch.ones(2, 5, dtype=torch.bool))


def test_two_way_layer_standalone():
    torch.manual_seed(0)
    layer = PVLTwoWayLayer(dim=8, beta=1.0).double()
    v, t = _tokens(1, 3, 8, 1), _tokens(1, 2, 8, 2)
    new_v, new_t = layer(v, t, sample=False)
    ref_v = ref_attention(layer.cross_attn_img_to_txt, v, t)
    torch.testing.assert_close(new_v, ref_v, rtol=0, atol=1e-12)
    ref_t = ref_attention(layer.cross_attn_txt_to_img, t, ref_v)
    torch.testing.assert_close(new_t, ref_t, rtol=0, atol=1e-12)
    assert layer.cross_attn_txt_to_img.beta == 1.0
