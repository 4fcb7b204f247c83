"""The CLIP ResNet tower: parity with open_clip's ModifiedResNet and with CRIS's modified pool.

The feature maps and the pooled embedding are compared with open_clip's forward on a tiny random
``ModifiedResNet`` (BatchNorm statistics randomised, eval mode); the resampled position table with a
pool whose table was resized by hand; the dense pool with a plain re-statement of CRIS.pytorch's
``AttentionPool2d.forward`` (queries = every position, CLS row dropped, ``F.multi_head_attention_forward``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from open_clip.modified_resnet import ModifiedResNet  # noqa: E402

from vlsegkit.encoders import (  # noqa: E402
    OpenCLIPResNet,
    OpenCLIPResNetTower,
    OpenCLIPSpec,
    create_towers,
    tower_spec_from_dict,
)

ATOL = 1e-5


def _randomise(module: nn.Module, seed: int) -> None:
    """Perturb biases / norms and give every BatchNorm non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in module.named_parameters():
            if name.endswith("bias") and "bn" not in name and "downsample.1" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=[1, 2, 1, 1], output_dim=24, heads=4, image_size=64, width=8)
    _randomise(visual, 1)
    return visual.eval()


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _upstream_stages(visual: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """open_clip's own forward, with the stage outputs captured by forward hooks."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        getattr(visual, f"layer{n}").register_forward_hook(
            lambda _m, _i, o, n=n: out.__setitem__(f"c{n + 1}", o)
        )
        for n in (1, 2, 3, 4)
    ]
    try:
        out["pooled"] = visual(x)
    finally:
        for h in handles:
            h.remove()
    return out


def test_features_and_pooled_match_open_clip_at_the_pretraining_size(resnet):
    tower = OpenCLIPResNetTower(resnet).eval()
    x = _images(2, 64, 64)
    with torch.no_grad():
        ref = _upstream_stages(resnet, x)
        feats = tower.features(x)
        pooled = tower.pool(feats.c5)
    for name in ("c2", "c3", "c4", "c5"):
        assert torch.equal(getattr(feats, name), ref[name]), name
    assert feats.c3.shape == (2, 64, 8, 8) and feats.c5.shape == (2, 256, 2, 2)
    assert (pooled - ref["pooled"]).abs().max() < ATOL
    assert tower.channels == {"c2": 32, "c3": 64, "c4": 128, "c5": 256}
    assert tower.embed_dim == 24 and tower.pretrained_grid == (2, 2)


def test_pooled_at_other_sizes_matches_a_hand_resized_position_table(resnet):
    tower = OpenCLIPResNetTower(resnet).eval()
    for h, w in ((128, 128), (96, 160)):  # 4x4 and a non-square 3x5 C5 grid
        x = _images(2, h, w, seed=h + w)
        grid = (h // 32, w // 32)
        table = resnet.attnpool.positional_embedding.detach()
        patches = table[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        resized = torch.cat([table[:1], patches.flatten(2).transpose(1, 2)[0]])
        pool = copy.deepcopy(resnet.attnpool)
        pool.positional_embedding = nn.Parameter(resized)
        with torch.no_grad():
            c5 = tower.features(x).c5
            expected = pool(c5)
            assert (tower.pool(c5) - expected).abs().max() < ATOL


def _cris_dense_pool(pool: nn.Module, c5: torch.Tensor, side: int) -> torch.Tensor:
    """CRIS.pytorch's modified pool without its residual branch, re-stated sequence-first."""
    b, c, h, w = c5.shape
    table = pool.positional_embedding[None]
    grid = table[:, -side * side :].reshape(1, side, side, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), align_corners=False, mode="bicubic")
    pos = grid.flatten(2)  # (1, C, HW)
    x = (c5.reshape(b, c, -1) + pos).permute(2, 0, 1)  # (HW, B, C)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=c, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False,
    )  # fmt: skip
    return out.permute(1, 2, 0).reshape(b, -1, h, w)


@pytest.mark.parametrize("size", [(64, 64), (128, 96)])
def test_dense_pool_matches_cris_modified_attention_pool(resnet, size):
    tower = OpenCLIPResNetTower(resnet).eval()
    with torch.no_grad():
        c5 = tower.features(_images(2, *size)).c5
        dense = tower.dense(c5)
        ref = _cris_dense_pool(resnet.attnpool, c5, side=2)
    assert dense.shape == (2, 24, size[0] // 32, size[1] // 32)
    assert (dense - ref).abs().max() < ATOL


def test_factory_builds_the_resnet_tower_and_round_trips_its_spec():
    spec = OpenCLIPSpec(
        embed_dim=16,
        vision=OpenCLIPResNet({"layers": [1, 1, 1, 1], "width": 8, "head_width": 32,
                               "image_size": 64}),
        text=tower_spec_from_dict({"kind": "open_clip", "embed_dim": 16, "vision_cfg": {},
                                   "text_cfg": {"width": 16, "heads": 2, "layers": 1}}).text,
        quick_gelu=True,
    )  # fmt: skip
    as_dict = spec.to_dict()
    assert tower_spec_from_dict(as_dict) == spec  # layers as a list select the ResNet part
    towers = create_towers(as_dict)
    assert isinstance(towers.vision, OpenCLIPResNetTower)
    assert (
        towers.upstream_keys["visual.attnpool.q_proj.weight"]
        == "vision.visual.attnpool.q_proj.weight"
    )
    with pytest.raises(ValueError, match="four positive ints"):
        OpenCLIPResNet({"layers": [1, 1, 1]})
    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenCLIPResNetTower(nn.Linear(2, 2))


def test_frozen_batchnorm_stays_in_eval_mode(resnet):
    tower = OpenCLIPResNetTower(copy.deepcopy(resnet))
    bns = [m for m in tower.modules() if isinstance(m, nn.BatchNorm2d)]
    tower.train()
    assert all(m.training for m in bns)  # trainable: ordinary train mode
    tower.requires_grad_(False).train()
    assert not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    tower.features(_images(4, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    tower.update_frozen_bn_stats = True  # released behaviour: frozen statistics drift
    tower.train()
    assert all(m.training for m in bns)
    tower.features(_images(4, 64, 64))
    assert not all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_frozen_tower_records_no_graph_and_checkpointing_matches(resnet):
    tower = OpenCLIPResNetTower(copy.deepcopy(resnet)).eval()
    x = _images(2, 64, 64)
    tower.requires_grad_(False)
    assert not tower.features(x).c5.requires_grad  # frozen: no activations kept for backward
    tower.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        tower.zero_grad()
        feats = tower.features(x, gradient_checkpointing=ckpt)
        (tower.dense(feats.c5).square().mean() + feats.c3.mean()).backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in tower.parameters() if p.grad is not None])
        )
    assert grads[0].abs().sum() > 0
    assert (grads[0] - grads[1]).abs().max() < 1e-6


def test_bf16_autocast_is_finite_and_close(resnet):
    tower = OpenCLIPResNetTower(resnet).eval()
    x = _images(1, 64, 64)
    with torch.no_grad():
        ref = tower.dense(tower.features(x).c5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tower.dense(tower.features(x).c5)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 3, 48, 64), "multiples of 32"),
        (torch.randn(1, 1, 64, 64), r"\(B, 3, H, W\)"),
        (torch.randn(3, 64, 64), r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.long), "floating point"),
    ],
)
def test_bad_pixels_are_rejected(resnet, x, match):
    with pytest.raises(ValueError, match=match):
        OpenCLIPResNetTower(resnet).features(x)


def test_bad_c5_is_rejected(resnet):
    tower = OpenCLIPResNetTower(resnet)
    with pytest.raises(ValueError, match=r"c5 must have shape \(B, 256, h, w\)"):
        tower.pool(torch.randn(1, 128, 2, 2))
