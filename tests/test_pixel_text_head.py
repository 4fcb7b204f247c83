"""PixelTextHead / ScaleBlock against a hand-written float64 reference of MedCLIPSeg eqs. 18-19."""

from __future__ import annotations

import math

import pytest
import torch

from vlsegkit.layers import PixelTextHead, ScaleBlock

F64 = torch.float64


# ----------------------------------------------------------------------------- reference
def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _conv_transpose_2x2(x, weight, bias):
    # out[b, o, 2i + di, 2j + dj] = sum_c x[b, c, i, j] W[c, o, di, dj] + bias[o]
    b, _, h, w = x.shape
    out = torch.zeros(b, weight.shape[1], 2 * h, 2 * w, dtype=x.dtype)
    for di in range(2):
        for dj in range(2):
            out[:, :, di::2, dj::2] = torch.einsum("bcij,co->boij", x, weight[:, :, di, dj])
    return out + bias[None, :, None, None]


def _depthwise_3x3(x, weight):
    # zero padding 1, one 3x3 filter per channel, no bias
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for di in range(3):
        for dj in range(3):
            out += padded[:, :, di : di + h, dj : dj + w] * weight[None, :, 0, di, dj, None, None]
    return out


def _layer_norm_2d(x, weight, bias, eps):
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[
        None, :, None, None
    ]


def _bilinear_matrix(n_in, n_out):
    # align_corners=False: src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0 on the left
    mat = torch.zeros(n_out, n_in, dtype=F64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        mat[o, i0] += 1 - frac
        mat[o, i1] += frac
    return mat


def ref_head(head: PixelTextHead, tokens, grid, text, output_size=None):
    h, w = grid
    x = tokens / tokens.norm(dim=-1, keepdim=True) if head.normalize else tokens
    x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    for blk in head.upscale:
        x = _conv_transpose_2x2(x, blk.conv1.weight, blk.conv1.bias)
        x = _depthwise_3x3(_gelu(x), blk.conv2.weight)
        x = _layer_norm_2d(x, blk.norm.weight, blk.norm.bias, 1e-6)
    t = text if text.dim() == 3 else text[:, None]
    t = t / t.norm(dim=-1, keepdim=True) if head.normalize else t
    lin = [m for m in head.mask_head if isinstance(m, torch.nn.Linear)]
    t = _gelu(t @ lin[0].weight.T + lin[0].bias)
    t = _gelu(t @ lin[1].weight.T + lin[1].bias)
    t = t @ lin[2].weight.T + lin[2].bias
    logits = (x[:, None] * t[:, :, :, None, None]).sum(2)  # (B, C, H', W')
    if output_size is not None:
        rows = _bilinear_matrix(logits.shape[-2], output_size[0])
        cols = _bilinear_matrix(logits.shape[-1], output_size[1])
        logits = torch.einsum("Hh,bchw,Ww->bcHW", rows, logits, cols)
    return logits


def _head(seed=0, **kw):
    torch.manual_seed(seed)
    head = PixelTextHead(**kw).double()
    with torch.no_grad():  # non-trivial norm affine parameters
        for blk in head.upscale:
            blk.norm.weight.add_(0.3 * torch.randn_like(blk.norm.weight))
            blk.norm.bias.add_(0.3 * torch.randn_like(blk.norm.bias))
    return head


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("grid", "output_size"), [((2, 3), (13, 10)), ((3, 3), (12, 12)), ((2, 2), (5, 17))]
)
def test_single_prompt_matches_reference(grid, output_size):
    head = _head(dim=8, text_dim=6)
    tokens = _randn(2, grid[0] * grid[1], 8, seed=1)
    text = _randn(2, 6, seed=2)
    out = head(tokens, grid, text, output_size=output_size)
    assert out.shape == (2, 1, *output_size)
    ref = ref_head(head, tokens, grid, text, output_size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11)


def test_multiple_prompts_per_image():
    head = _head(dim=8)
    tokens, text = _randn(2, 6, 8, seed=1), _randn(2, 3, 8, seed=2)
    out = head(tokens, (3, 2), text, output_size=(7, 9))
    assert out.shape == (2, 3, 7, 9)
    torch.testing.assert_close(
        out, ref_head(head, tokens, (3, 2), text, (7, 9)), rtol=0, atol=1e-11
    )
    # prompt c of a multi-prompt call equals a single-prompt call with that text
    single = head(tokens, (3, 2), text[:, 1], output_size=(7, 9))
    torch.testing.assert_close(out[:, 1:2], single, rtol=0, atol=1e-12)


def test_head_resolution_without_output_size_and_int_size():
    head = _head(dim=8, num_upscale=2)
    tokens, text = _randn(1, 6, 8, seed=1), _randn(1, 8, seed=2)
    out = head(tokens, (2, 3), text)
    assert out.shape == (1, 1, 8, 12)  # x4 = two ScaleBlocks
    torch.testing.assert_close(out, ref_head(head, tokens, (2, 3), text), rtol=0, atol=1e-11)
    assert head(tokens, (2, 3), text, output_size=10).shape == (1, 1, 10, 10)
    one = _head(dim=8, num_upscale=1)
    assert one(tokens, (2, 3), text).shape == (1, 1, 4, 6)


def test_scale_block_is_eomt_layout_and_upsamples():
    blk = ScaleBlock(dim=4).double()
    assert set(blk.state_dict()) == {
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "norm.weight",
        "norm.bias",
    }
    x = _randn(2, 4, 3, 5, seed=3)
    ref = _layer_norm_2d(
        _depthwise_3x3(
            _gelu(_conv_transpose_2x2(x, blk.conv1.weight, blk.conv1.bias)), blk.conv2.weight
        ),
        blk.norm.weight,
        blk.norm.bias,
        1e-6,
    )
    torch.testing.assert_close(blk(x), ref, rtol=0, atol=1e-12)


def test_released_parameter_counts_and_keys():
    head = PixelTextHead(dim=512)
    counts = {
        name: sum(p.numel() for p in mod.parameters())
        for name, mod in (("upscale", head.upscale), ("mask_head", head.mask_head))
    }
    # specs/medclipseg.md 1.4: psi 2 x 1,054,720 and phi 787,968 parameters
    assert counts == {"upscale": 2_109_440, "mask_head": 787_968}
    keys = set(head.state_dict())
    assert {"upscale.1.conv2.weight", "mask_head.4.bias", "mask_head.2.weight"} <= keys


def test_normalisation_makes_logits_scale_invariant():
    head = _head(dim=8)
    tokens, text = _randn(2, 4, 8, seed=1), _randn(2, 8, seed=2)
    scale = torch.tensor([3.0, 0.2], dtype=F64)[:, None, None]
    a = head(tokens, (2, 2), text)
    torch.testing.assert_close(head(tokens * scale, (2, 2), text * 7), a, rtol=0, atol=1e-12)
    raw = _head(dim=8, normalize=False)
    b = raw(tokens, (2, 2), text)
    torch.testing.assert_close(b, ref_head(raw, tokens, (2, 2), text), rtol=0, atol=1e-11)
    assert (raw(tokens * scale, (2, 2), text) - b).abs().max() > 1e-3


def test_gradients_reach_all_parameters_and_match_reference():
    head = _head(dim=8, text_dim=6)
    tokens = _randn(2, 6, 8, seed=1).requires_grad_()
    text = _randn(2, 2, 6, seed=2).requires_grad_()
    params = [tokens, text, *head.parameters()]
    out = head(tokens, (2, 3), text, output_size=(5, 7))
    ref = ref_head(head, tokens, (2, 3), text, (5, 7))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_fp32_and_bf16_autocast():
    torch.manual_seed(0)
    head = PixelTextHead(dim=16, text_dim=8)
    tokens, text = (
        _randn(1, 4, 16, seed=1, dtype=torch.float32),
        _randn(1, 8, seed=2, dtype=torch.float32),
    )
    out = head(tokens, (2, 2), text, output_size=(9, 9))
    ref = ref_head(head.double(), tokens.double(), (2, 2), text.double(), (9, 9))
    head.float()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(tokens, (2, 2), text, output_size=(9, 9))
    assert torch.isfinite(low).all()
    assert (low.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_deterministic():
    head = _head(dim=8)
    tokens, text = _randn(1, 4, 8, seed=1), _randn(1, 8, seed=2)
    assert torch.equal(head(tokens, (2, 2), text), head(tokens, (2, 2), text))


def test_bad_inputs():
    head = PixelTextHead(dim=8, text_dim=6)
    tokens, text = torch.randn(2, 6, 8), torch.randn(2, 6)
    with pytest.raises(
        ValueError, match=r"dense_tokens must have shape \(B, h\*w, dim\) = \(B, 4, 8\)"
    ):
        head(tokens, (2, 2), text)
    with pytest.raises(ValueError, match="dense_tokens must have shape"):
        head(tokens[..., :4], (2, 3), text)
    with pytest.raises(ValueError, match=r"text_embedding must have shape \(B, 6\) or \(B, C, 6\)"):
        head(tokens, (2, 3), torch.randn(2, 8))
    with pytest.raises(ValueError, match="text_embedding batch 1 != dense_tokens batch 2"):
        head(tokens, (2, 3), text[:1])
    with pytest.raises(ValueError, match="grid"):
        head(tokens, (2, 3, 1), text)
    with pytest.raises(ValueError, match="output_size"):
        head(tokens, (2, 3), text, output_size=(0, 4))
