"""CRIS: every block against a re-statement of CRIS.pytorch's module structure, checkpoints, padding,
text prompt learners, BatchNorm freezing and training through ``fit``.

The reference (``tests/_cris_reference.py``) is written from the structure of
``DerrickWang005/CRIS.pytorch``; its ``state_dict()`` has exactly the released names
(``backbone.visual.attnpool.connect.0.weight``, ``neck.f1_v_proj.0.weight``,
``decoder.layers.0.multihead_attn.in_proj_weight``, ...), which is what the checkpoint tests feed
:meth:`vlsegkit.CRIS.from_released`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

import vlsegkit  # noqa: E402
from _cris_reference import (  # noqa: E402
    RefCRIS,
    RefDecoder,
    RefFPN,
    RefProjector,
    pos1d_loops,
    pos2d_loops,
    pos_tables,
    randomise,
)
from vlsegkit import CRIS, VPT, CoCoOp, CoOp, MaPLe, SharedSeparate  # noqa: E402
from vlsegkit.data import SyntheticLesions, collate_prompts  # noqa: E402
from vlsegkit.decoders import (  # noqa: E402
    DynamicKernelProjector,
    TextConditionedFPN,
    VisionLanguageDecoder,
    sine_position_1d,
    sine_position_2d,
)
from vlsegkit.hub import CheckpointError  # noqa: E402
from vlsegkit.losses import DiceBCELoss  # noqa: E402
from vlsegkit.models.cris_released import convert_cris_state_dict, infer_cris_config  # noqa: E402
from vlsegkit.train import fit  # noqa: E402

ATOL = 1e-5
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = RefCRIS()
    randomise(ref, 1)
    return ref.eval()


@pytest.fixture(scope="module")
def released(reference, tmp_path_factory):
    """What CRIS.pytorch's train.py writes: a DDP state dict inside a training checkpoint."""
    path = tmp_path_factory.mktemp("cris") / "best_model.pth"
    state = {"module." + k: v for k, v in reference.state_dict().items()}
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    torch.save({"epoch": 3, "cur_iou": torch.tensor(0.5), "best_iou": torch.tensor(0.6),
                "prec": {"Pr@50": 0.4}, "state_dict": state, "optimizer": opt.state_dict(),
                "scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [35]).state_dict()},
               path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def model(released):
    return CRIS.from_released(released, num_head=4)


def _ids(lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """SOT w_1 .. EOT, then zero padding (CRIS.pytorch's tokenizer output)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = SOT, EOT
        ids[b, 1 : n - 1] = torch.randint(300, 40000, (n - 2,), generator=g)
    return ids


def _images(b: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ============================================================================ blocks
def test_positional_encodings_match_loop_statements():
    assert (sine_position_1d(8, 6) - pos1d_loops(8, 6)).abs().max() < 1e-6
    assert (sine_position_2d(16, 3, 5) - pos2d_loops(16, 3, 5)).abs().max() < 1e-6
    grid, words = pos_tables(16, 3, 5, 6)  # the benchmark reference's fast tables
    assert (grid - pos2d_loops(16, 3, 5)).abs().max() < 1e-6
    assert (words - pos1d_loops(16, 6)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_2d(6, 2, 2)


def _copy(ours: nn.Module, ref: nn.Module) -> None:
    # identical names: the strict load proves the parameter layout is CRIS.pytorch's
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_neck_matches_reference():
    torch.manual_seed(0)
    ref = RefFPN((8, 12, 16), (6, 10, 14))
    randomise(ref, 2)
    ours = TextConditionedFPN(in_channels=(8, 12, 16), out_channels=(6, 10, 14))
    _copy(ours, ref)
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(3)
    v3, v4, v5 = (torch.randn(2, c, s, s + 2 * (s // 2), generator=g)
                  for c, s in ((8, 8), (12, 4), (16, 2)))  # fmt: skip
    s = torch.randn(2, 16, generator=g)
    with torch.no_grad():
        out = ours(v3, v4, v5, s)
        assert out.shape == (2, 10, 4, 8)  # non-square maps work
        assert (out - ref(v3, v4, v5, s)).abs().max() < ATOL
    with pytest.raises(ValueError, match="strides 8, 16, 32"):
        ours(v3, v4[..., :2, :2], v5, s)
    ours.train()
    with pytest.raises(ValueError, match="at least 2"):
        ours(v3[:1], v4[:1], v5[:1], s[:1])


def test_decoder_matches_reference_with_padding():
    torch.manual_seed(0)
    ref = RefDecoder(2, 16, 4, 24)
    randomise(ref, 4)
    ours = VisionLanguageDecoder(dim=16, num_layers=2, num_heads=4, dim_ffn=24, dropout=0.1)
    _copy(ours, ref)
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(5)
    vis, words = torch.randn(2, 16, 3, 4, generator=g), torch.randn(2, 7, 16, generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():
        out = ours(vis, words, pad)
        assert (out - ref(vis, words, pad)).abs().max() < ATOL
        # padded words do not matter; real ones do
        changed = words.clone()
        changed[0, 5] += 10
        assert (ours(vis, changed, pad) - out).abs().max() < ATOL
        changed[0, 2] += 10
        assert (ours(vis, changed, pad) - out)[0].abs().max() > 1e-3


def test_projector_matches_per_sample_convolutions():
    torch.manual_seed(0)
    ref = RefProjector(12, 8)
    randomise(ref, 6)
    ours = DynamicKernelProjector(word_dim=12, in_dim=8)
    _copy(ours, ref)
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(7)
    x, s = torch.randn(3, 16, 4, 5, generator=g), torch.randn(3, 12, generator=g)
    with torch.no_grad():
        out = ours(x, s)
        assert out.shape == (3, 1, 16, 20)
        assert (out - ref(x, s)).abs().max() < ATOL


# ============================================================================ model vs reference
def test_released_checkpoint_forward_matches_reference(model, reference):
    ids = _ids([5, 9, 3], 12)
    x = _images(3)
    with torch.no_grad():
        ref = reference(x, ids)
        out = model(x, input_ids=ids)  # no mask: id 0 marks padding, as CRIS.pytorch
    assert out.logits.shape == (3, 1, 128, 128) and out.stride4_logits.shape == (3, 1, 32, 32)
    assert (out.logits[:, 0] - ref[:, 0]).abs().max() < ATOL
    assert not model.training  # from_released returns eval mode
    assert model.config["num_head"] == 4 and model.config["fpn_in"] == [128, 256, 48]
    low = model(x, input_ids=ids, upsample=False).logits
    assert torch.equal(low, out.stride4_logits)


def test_padding_rules(model):
    x = _images(2)
    short = _ids([4, 6], 6)
    long = torch.cat([short, torch.zeros(2, 20, dtype=torch.long)], 1)
    mask = (long != 0).long()
    with torch.no_grad():
        a = model(x, input_ids=short).logits
        b = model(x, input_ids=long).logits  # more padding changes nothing
        c = model(x, input_ids=long, attention_mask=mask).logits  # an explicit mask, the same
        masked = mask.clone()
        masked[1, 3] = 0  # masking a real word changes the output
        d = model(x, input_ids=long, attention_mask=masked).logits
    assert (a - b).abs().max() < ATOL and (a - c).abs().max() < ATOL
    assert (d[1] - c[1]).abs().max() > 1e-4 and (d[0] - c[0]).abs().max() < ATOL


def test_tokenizer_pads_with_zero_after_eos_and_pools_there(model):
    batch = model.tokenizer(["a polyp", "two small round polyps in the colon"])
    ids = batch.input_ids
    assert ids[0, 0] == SOT and (ids[0, batch.attention_mask[0].sum() :] == 0).all()
    assert (ids.argmax(-1) == batch.eos_index).all()  # EOT is the largest id: argmax pooling
    assert model.tokenizer.context_length == model.word_len == 77
    x = _images(2)
    with torch.no_grad():
        by_string = model(x, ["a polyp", "two small round polyps in the colon"]).logits
        by_ids = model(x, input_ids=ids).logits
    assert torch.equal(by_string, by_ids)


def test_prompt_pairing_and_empty_prompt(model):
    x = _images(2)
    with torch.no_grad():
        every = model(x, ["", "polyp", "lesion"]).logits
        alone = model(x[1:], [["polyp"]]).logits
    assert every.shape == (2, 3, 128, 128)
    assert (every[1, 1] - alone[0, 0]).abs().max() < ATOL


# ============================================================================ checkpoints
def _released_names(*, layers=(3, 4, 6, 3), width=64, embed=1024, text_width=512, text_layers=12,
                    fpn_out=(256, 512, 1024), dec_layers=3, ffn=2048, side=7):  # fmt: skip
    with torch.device("meta"):
        ref = RefCRIS(layers=layers, width=width, embed=embed, text_width=text_width,
                      text_layers=text_layers, fpn_out=fpn_out, dec_layers=dec_layers, heads=8,
                      ffn=ffn, side=side)  # fmt: skip
    return {k: v.shape for k, v in ref.state_dict().items()}, ref


def test_full_size_released_keys_are_all_consumed():
    names, ref = _released_names()
    assert len(names) == 662  # CRIS-R50 as CRIS.pytorch builds it
    assert sum(p.numel() for p in ref.parameters()) == 146_849_122
    state = {k: torch.empty(s, device="meta") for k, s in names.items()}
    config = infer_cris_config(state)
    assert config["fpn_in"] == [512, 1024, 1024] and config["fpn_out"] == [256, 512, 1024]
    assert config["vis_dim"] == 512 and config["word_dim"] == 1024
    assert config["num_layers"] == 3 and config["dim_ffn"] == 2048
    assert config["backbone"]["vision_cfg"] == {"layers": [3, 4, 6, 3], "width": 64,
                                                "head_width": 64, "image_size": 224}  # fmt: skip
    converted, dropped = convert_cris_state_dict(state)
    assert dropped == ["backbone.logit_scale"]
    with torch.device("meta"):
        model = CRIS(**config)
        registered = vlsegkit.create_model("cris-rn50")
    own = {k: v.shape for k, v in model.state_dict().items()}
    assert own == {k: v.shape for k, v in converted.items()}  # every other key, every shape
    assert {k: v.shape for k, v in registered.state_dict().items()} == own
    assert model.num_parameters() == 146_849_122 - 1  # all but logit_scale


def test_bare_and_safetensors_checkpoints_load_the_same(released, model, tmp_path):
    from safetensors.torch import save_file

    raw = torch.load(released, weights_only=True)["state_dict"]
    bare = {k.removeprefix("module."): v for k, v in raw.items()}
    torch.save(bare, tmp_path / "cris.pt")  # medvlsm's converted file
    save_file({k: v.contiguous() for k, v in bare.items()}, tmp_path / "cris.safetensors")
    expected = model.state_dict()
    for source in (tmp_path / "cris.pt", tmp_path / "cris.safetensors", bare, raw):
        loaded = CRIS.from_released(source, num_head=4).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_from_released_with_model_owned_hooks(released, model):
    owned = CRIS.from_released(released, num_head=4, hooks=[CoOp(num_context=2, init=None)])
    assert owned.config["hooks"][0]["args"]["text_width"] == 64
    ours = owned.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_from_released_errors(released, tmp_path):
    with pytest.raises(ValueError, match="vis_dim=32 contradicts the checkpoint"):
        CRIS.from_released(released, vis_dim=32)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        CRIS.from_released(bad)
    script = torch.jit.script(nn.Linear(2, 2))
    torch.jit.save(script, tmp_path / "RN50.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="TorchScript"):
        CRIS.from_clip(tmp_path / "RN50.pt")
    state = torch.load(released, weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    del state["neck.aggr.0.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: neck\.aggr\.0\.weight"):
        CRIS.from_released(state, num_head=4)
    with pytest.raises(CheckpointError, match="CRIS checkpoint, not a CLIP one"):
        CRIS.from_clip(state)


def test_from_clip_loads_the_towers_only(reference, tmp_path):
    from safetensors.torch import save_file

    clip = open_clip.CLIP(
        embed_dim=48,
        vision_cfg=dict(layers=[1, 1, 1, 1], width=16, head_width=64, image_size=224),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    ).eval()
    randomise(clip, 8)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, tmp_path / "clip.safetensors")
    model = CRIS.from_clip(tmp_path / "clip.safetensors", fpn_out=(32, 64, 40), num_layers=1,
                           num_head=4, dim_ffn=32, image_size=224)  # fmt: skip
    x, ids = _images(2, 224), _ids([4, 7], 77)  # open_clip's encode_text needs all 77 positions
    with torch.no_grad():
        image = model.vision_tower.pool(model.vision_tower.features(x).c5)
        assert (image - clip.encode_image(x)).abs().max() < ATOL
        _, _, sentence = model.encode_text(ids, ids != 0)
        assert (sentence - clip.encode_text(ids)).abs().max() < ATOL
        assert torch.isfinite(model(x, input_ids=ids).logits).all()


# ============================================================================ learners
def _ref_text_with_context(ref: RefCRIS, ids, contexts, schedule, depth):
    """TuneVLSeg's CoOp on CRIS re-stated: context after SOT, deep slots overwritten by schedule."""
    bb = ref.backbone
    n = contexts[0].shape[-2]
    emb = bb.token_embedding(ids)
    ctx0 = contexts[0].expand(len(ids), -1, -1) if contexts[0].dim() == 2 else contexts[0]
    x = torch.cat([emb[:, :1], ctx0, emb[:, 1:]], 1)
    x = x + bb.positional_embedding[: x.shape[1]]
    pad = torch.cat([torch.zeros(len(ids), n, dtype=torch.bool), ids == 0], 1)
    pad[:, 0] = False
    length = x.shape[1]
    causal = torch.full((length, length), float("-inf")).triu_(1)
    bias = causal[None].repeat(len(ids), 1, 1).masked_fill(pad[:, None, :], float("-inf"))
    bias = bias.repeat_interleave(bb.transformer.resblocks[0].attn.num_heads, 0)
    for i, block in enumerate(bb.transformer.resblocks):
        fresh = {"paper": i if 1 <= i < depth else None,
                 "released": i - 1 if 1 <= i <= depth else None}[schedule]  # fmt: skip
        if fresh is not None:
            c = contexts[fresh]
            c = c.expand(len(ids), -1, -1) if c.dim() == 2 else c
            x = torch.cat([x[:, :1], c, x[:, 1 + n :]], 1)
        x = block(x, attn_mask=bias)
    x = bb.ln_final(x)
    state = x[torch.arange(len(ids)), ids.argmax(-1) + n] @ bb.text_projection
    return x, state, pad


def _ref_with_context(ref: RefCRIS, img, ids, contexts, schedule, depth):
    v = ref.backbone.visual
    v3 = v.layer2(v.layer1(v.stem(img)))
    v4 = v.layer3(v3)
    v5 = v.attnpool(v.layer4(v4))
    if callable(contexts):
        contexts = contexts(v5.mean((2, 3)))
    words, state, pad = _ref_text_with_context(ref, ids, contexts, schedule, depth)
    fq = ref.decoder(ref.neck(v3, v4, v5, state), words, pad)
    pred = ref.proj(fq, state)
    return F.interpolate(pred, img.shape[-2:], mode="bicubic", align_corners=True)


@pytest.mark.parametrize("twice", [False, True], ids=["paper", "released"])
def test_coop_matches_tunevlseg_restatement(model, reference, twice):
    learner = CoOp(num_context=3, depth=1 if twice else 2, init=None, first_context_twice=twice)
    tuned = learner.attach(model)
    with torch.no_grad():
        learner.context.normal_(0, 0.5)
    ids = _ids([5, 8], 10)
    x = _images(2)
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = tuned(x, input_ids=ids, attention_mask=mask).logits
        contexts = list(learner.context.unbind(0))
        ref = _ref_with_context(reference, x, ids, contexts, "released" if twice else "paper",
                                learner.depth)  # fmt: skip
        other = _ref_with_context(reference, x, ids, contexts, "paper" if twice else "released",
                                  learner.depth)  # fmt: skip
    assert (ours[:, 0] - ref[:, 0]).abs().max() < ATOL
    assert (ours[:, 0] - other[:, 0]).abs().max() > 1e-3  # the two schedules differ


def test_cocoop_reads_the_mean_of_v5(model, reference):
    learner = CoCoOp(num_context=2, depth=2, init=None, hidden_dim=8)
    tuned = learner.attach(model)
    assert learner.dims["image_dim"] == model.vision_tower.embed_dim == 48
    with torch.no_grad():
        learner.context.normal_(0, 0.5)
    ids, x = _ids([5, 6], 8), _images(2)
    with torch.no_grad():
        ours = tuned(x, input_ids=ids).logits
        ref = _ref_with_context(
            reference, x, ids, lambda f: learner.prompts(f).text, "paper", learner.depth
        )
    assert (ours[:, 0] - ref[:, 0]).abs().max() < ATOL


def test_vision_and_multimodal_learners_are_refused_with_the_reason(model):
    for hook in (VPT(), MaPLe(depth=1), SharedSeparate(depth=1)):
        with pytest.raises(ValueError, match="convolutional CLIP ResNet with no token sequence"):
            hook.attach(model)
    with pytest.raises(ValueError, match="convolutional CLIP ResNet"):
        vlsegkit.create_model("cris-tiny", hooks=[VPT()])
    with pytest.raises(ValueError, match="depth <= 1"):
        CoOp(depth=2, first_context_twice=True).attach(vlsegkit.create_model("cris-tiny"))


def test_tuned_cris_saves_only_the_context(tmp_path):
    base = vlsegkit.create_model("cris-tiny")
    base.save_pretrained(tmp_path / "base")
    base = vlsegkit.VLSM.from_pretrained(tmp_path / "base")
    tuned = CoOp(depth=2, first_context_twice=False).attach(base)
    with torch.no_grad():
        tuned.learner.context.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    again = vlsegkit.VLSM.from_pretrained(tmp_path / "tuned")
    x = _images(2, 64)
    with torch.no_grad():
        assert torch.equal(tuned(x, "polyp").logits, again(x, "polyp").logits)


# ============================================================================ BatchNorm, training
def _data(model, n=8):
    ds = SyntheticLesions(length=n, image_size=model.image_size, seed=0, mean=model.image_mean,
                          std=model.image_std)  # fmt: skip
    return [collate_prompts([ds[i] for i in range(j, j + 4)]) for j in range(0, n, 4)]


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("drift", [False, True])
def test_frozen_backbone_keeps_its_batchnorm_statistics(drift):
    torch.manual_seed(0)
    model = vlsegkit.create_model("cris-tiny", freeze_backbone=True, update_frozen_bn_stats=drift)
    backbone = [model.vision_tower, model.connect]
    before = [s for m in backbone for s in _bn_stats(m)]
    neck_before = _bn_stats(model.neck)
    fit(model, _data(model), max_steps=2, lr=1e-3, progress=False)
    after = [s for m in backbone for s in _bn_stats(m)]
    same = all(torch.equal(a, b) for a, b in zip(before, after))
    assert same is not drift  # frozen statistics, unless the released drift is asked for
    assert not all(torch.equal(a, b) for a, b in zip(neck_before, _bn_stats(model.neck)))
    model.freeze_backbone(False).train()
    assert all(m.training for m in model.vision_tower.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("drift", [False, True])
def test_model_owned_context_with_everything_else_frozen(drift, tmp_path):
    # TuneVLSeg's released prompt tuning: the whole CRIS frozen, only the context trains
    torch.manual_seed(0)
    model = vlsegkit.create_model(
        "cris-tiny", hooks=[CoOp(depth=1, first_context_twice=True)], update_frozen_bn_stats=drift
    )
    model.requires_grad_(False)
    model.hooks.requires_grad_(True)
    context = model.hooks[0].context.clone()
    before = _bn_stats(model)
    fit(model, _data(model), max_steps=1, lr=1e-2, progress=False)
    assert not torch.equal(context, model.hooks[0].context)
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(model))) is not drift
    model.save_pretrained(tmp_path)
    again = vlsegkit.VLSM.from_pretrained(tmp_path)
    assert again.hooks[0].first_context_twice and torch.equal(
        again.hooks[0].context, model.hooks[0].context
    )


def test_trains_through_fit_with_medvlsm_loss():
    torch.manual_seed(0)
    model = vlsegkit.create_model("cris-tiny")
    task = model.default_task()
    assert task.threshold == 0.35
    assert (task.loss.dice_weight, task.loss.bce_weight, task.loss.smooth) == (1.0, 0.2, 1e-5)
    batch = _data(model, 4)[0]
    model.eval()  # the same logits in both passes (no dropout, running BatchNorm statistics)
    out = model(batch["image"], batch["prompt"])
    logits, target = out.logits.float(), batch["mask"]
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + target.sum((2, 3)) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    expected = (dice + 0.2 * bce).mean()
    assert (task.training_step(model, batch)["loss"] - expected).abs() < 1e-5
    model.train()
    data = _data(model, 8)
    history = fit(model, data, epochs=3, lr=3e-3, progress=False)
    losses = [t["loss"] for t in history.train_terms]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    custom = model.default_task(dice_weight=0.5, bce_weight=0.5)
    assert isinstance(custom.loss, DiceBCELoss) and custom.loss.bce_weight == 0.5


def test_param_groups_scale_the_backbone():
    model = vlsegkit.create_model("cris-tiny")
    groups = model.param_groups(1e-5)
    assert [g["lr"] for g in groups] == pytest.approx([1e-6, 1e-5])
    backbone = {id(p) for p in groups[0]["params"]}
    assert id(model.connect[0].weight) in backbone
    assert id(model.neck.aggr[0].weight) not in backbone
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == model.num_parameters(trainable_only=True)
    model.freeze_backbone()
    assert len(model.param_groups(1e-5)) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vis_dim": 48}, "vis_dim must equal fpn_out"),
        ({"fpn_in": (1, 2, 3)}, "fpn_in must be the backbone's"),
        ({"word_dim": 7}, "word_dim must be the joint width"),
        ({"image_size": 50}, "multiples of 32"),
        ({"word_len": 100}, "word_len must be in"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vlsegkit.create_model("cris-tiny", **kwargs)


def test_bad_inputs():
    model = vlsegkit.create_model("cris-tiny").eval()
    x = _images(1, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(_images(1, 48), "polyp")
    with pytest.raises(ValueError, match="exactly one of prompts or input_ids"):
        model(x)
    with pytest.raises(ValueError, match="attention_mask goes with input_ids"):
        model(x, "polyp", attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, input_ids=torch.ones(1, 3))


def test_registry_entries():
    names = vlsegkit.list_models("cris*")
    assert {"cris-rn50", "cris-rn101", "cris-tiny"} <= set(names)
    with torch.device("meta"):
        rn101 = vlsegkit.create_model("cris-rn101")
    assert rn101.config["fpn_in"] == [512, 1024, 512] and rn101.config["word_dim"] == 512


def test_from_released_file_is_assigned_and_a_state_dict_is_copied(released, model, load_calls):
    """One copy of the weights: a checkpoint read from a file is assigned into a model built without
    weights; a state dict the caller holds is copied, so the model shares no memory with it."""
    from_file = CRIS.from_released(released, num_head=4)
    assert load_calls == [True]
    assert not any(p.is_meta for p in from_file.parameters())
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in from_file.state_dict().items())
    load_calls.clear()
    state = torch.load(released, weights_only=True)["state_dict"]
    from_dict = CRIS.from_released(state, num_head=4)
    assert load_calls == [False]
    ptrs = {v.data_ptr() for v in state.values()}
    assert all(p.data_ptr() not in ptrs for p in from_dict.parameters())
