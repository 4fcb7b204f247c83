"""Prompt learners attached to CLIPSeg: frozen base, gradients, training, multi-class, save / load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vlsegkit import VLSM
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.encoders import embed_tower, run_towers
from vlsegkit.hub import CheckpointError
from vlsegkit.losses import DiceBCELoss
from vlsegkit.models.clipseg import CLIPSeg
from vlsegkit.prompts import (
    VPT,
    CoCoOp,
    CoOp,
    LearnableUpsampler,
    MaPLe,
    SharedAttention,
    SharedSeparate,
    TunedModel,
    load_tuned,
)
from vlsegkit.train import fit

ALL = ["CoOp", "CoCoOp", "VPT", "MaPLe", "SharedSeparate", "SharedAttention"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _clipseg(seed: int = 0, **kw) -> CLIPSeg:
    torch.manual_seed(seed)
    model = CLIPSeg(
        backbone={
            "text_config": dict(
                vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=1,
                bos_token_id=0, eos_token_id=2,
            ),
            "vision_config": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, image_size=64, patch_size=8,
            ),
            "projection_dim": 16,
        },
        **{
            "extract_layers": (0, 1, 2), "reduce_dim": 8, "decoder_num_heads": 2,
            "decoder_mlp_dim": 16, "image_size": 64, **kw,
        },
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move LayerNorm / bias parameters off their trivial init
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base_clipseg")
    _clipseg().save_pretrained(path)
    return path


@pytest.fixture
def base(base_dir):
    """A fresh copy of the base, loaded the way users load one (records name_or_path)."""
    return VLSM.from_pretrained(base_dir)


def _learner(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("depth", 2)
    if name == "SharedAttention":
        kw.setdefault("num_heads", 4)
        kw.setdefault("mlp_dim", 32)
    return {
        "CoOp": CoOp,
        "CoCoOp": CoCoOp,
        "VPT": VPT,
        "MaPLe": MaPLe,
        "SharedSeparate": SharedSeparate,
        "SharedAttention": SharedAttention,
    }[name](**kw)


def _pixels(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ALL)
def test_only_learner_and_upsampler_train(base, name):
    frozen = _snapshot(base)
    tuned = _learner(name).attach(base)
    trainable = dict(tuned.named_parameters())
    trainable = {n: p for n, p in trainable.items() if p.requires_grad}
    assert trainable and all(n.startswith(("hooks.0.", "upsampler.")) for n in trainable)
    assert {id(p) for p in tuned.trainable_parameters()} == {id(p) for p in trainable.values()}
    tuned.train()
    assert tuned.learner.training and not tuned.base.training  # frozen base stays in eval
    masks = (_pixels(2, seed=1) > 0.5).float()[:, :1]
    out = tuned(_pixels(), ["polyp", "tumor"])
    loss = DiceBCELoss()(out.logits, masks)
    loss.backward()
    for n, p in tuned.base.named_parameters():
        assert not p.requires_grad and p.grad is None, n
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    prompts = next(
        p for n, p in trainable.items() if n.split(".")[2] in ("context", "tokens", "unified")
    )
    assert prompts.grad.abs().sum() > 0  # gradients flow back through the frozen towers
    before = _snapshot(tuned.learner)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    after_base = _snapshot(tuned.base)
    assert all(torch.equal(frozen[k], after_base[k]) for k in frozen)
    assert any(not torch.equal(before[k], v) for k, v in _snapshot(tuned.learner).items())


@pytest.fixture(scope="module")
def lesion_batches():
    ds = SyntheticLesions(length=16, image_size=64, seed=0, mean=MEAN, std=STD)
    return list(DataLoader(ds, batch_size=8, collate_fn=collate_prompts))


def _mean_loss(model, batches) -> float:
    loss_fn = DiceBCELoss()
    with torch.no_grad():
        return sum(
            loss_fn(model(b["image"], b["prompt"]).logits, b["mask"]).item() for b in batches
        )


@pytest.mark.parametrize("name", ALL)
def test_short_training_on_synthetic_lesions_lowers_loss(base_dir, lesion_batches, name):
    for upsampler, min_drop in ((None, 1e-3), (True, 0.05)):
        tuned = _learner(name).attach(VLSM.from_pretrained(base_dir), upsampler=upsampler)
        start = _mean_loss(tuned, lesion_batches)
        fit(tuned, lesion_batches, epochs=5, lr=3e-2, weight_decay=0.0, progress=False)
        end = _mean_loss(tuned, lesion_batches)
        assert end < start - min_drop * len(lesion_batches), (upsampler, start, end)


def test_training_is_deterministic_with_a_seed(base_dir, lesion_batches):
    results = []
    for _ in range(2):
        tuned = _learner("SharedAttention", seed=3, dropout=0.2).attach(
            VLSM.from_pretrained(base_dir)
        )
        torch.manual_seed(7)  # dropout inside the prompt mixer
        fit(tuned, lesion_batches[:1], epochs=2, lr=1e-2, progress=False)
        results.append(_snapshot(tuned))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


# ----------------------------------------------------------------------- forward semantics
@pytest.mark.parametrize(
    "learner",
    [
        lambda: CoOp(num_context=0, init=None),
        lambda: VPT(num_context=0, depth=3),
        lambda: MaPLe(num_context=0, init=None),
    ],
    ids=["CoOp", "VPT", "MaPLe"],
)
def test_zero_length_prompts_reproduce_the_base(base, learner):
    pixels = _pixels(2)
    prompts = ["polyp", "a large irregular tumor at the top"]
    expected = base(pixels, prompts).logits
    got = learner().attach(base, upsampler=None)(pixels, prompts).logits
    assert torch.equal(got, expected)


def test_text_context_equals_prompted_text_tower(base):
    tuned = CoOp(depth=2, init_std=0.3).attach(base, upsampler=None)
    pixels, prompts = _pixels(2), ["polyp", "tumor", "cyst"]
    batch = base.tokenizer(prompts, reserve=4)
    text = embed_tower(
        "text", base.text_tower, batch.input_ids, batch.attention_mask, hooks=[tuned.learner]
    )
    final = run_towers({"text": base.text_tower}, {"text": text}, hooks=[tuned.learner])
    emb = base.text_tower.pool(final.states["text"])
    expected = base(pixels, conditional_embeddings=emb[None].expand(2, -1, -1)).logits
    got = tuned(pixels, prompts).logits
    assert got.shape == (2, 3, 64, 64)
    assert _diff(got, expected) < 1e-5
    assert _diff(got, base(pixels, prompts).logits) > 1e-3


def _released_vpt_loop(vision, pixels, deep, extract_layers):
    """TuneVLSeg's released CLIPSeg vision loop, re-stated: prompts appended after the patches before
    the pre-LayerNorm; after block ``idx`` (1-indexed) < J the prompt slots are overwritten with
    ``P_idx`` *before* the hidden state is stored; the decoder reads the stored states."""
    model = vision.vision_model
    emb = model.embeddings
    x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.expand(len(x), 1, -1), x], 1) + emb.position_embedding.weight
    n = deep[0].shape[0]
    x = torch.cat([x, deep[0].expand(len(x), -1, -1)], 1)
    x = model.pre_layrnorm(x)
    hidden = [x]
    for idx, layer in enumerate(model.encoder.layers, start=1):
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
        if idx < len(deep):
            x = torch.cat([x[:, :-n], deep[idx].expand(len(x), -1, -1)], 1)
        hidden.append(x)
    # the decoder reads [CLS, patches, prompts]; move the prompts after CLS (vlsegkit's layout,
    # which attention does not see: no position embedding, no mask)
    return [torch.cat([h[:, :1], h[:, -n:], h[:, 1:-n]], 1) for h in
            (hidden[i + 1] for i in extract_layers)]  # fmt: skip


@pytest.mark.parametrize("decoder_sees_prompts", [False, True, "released"])
def test_vision_prompts_reference(base, decoder_sees_prompts):
    tuned = VPT(depth=2, init_std=0.5, decoder_sees_prompts=decoder_sees_prompts).attach(
        base, upsampler=None
    )
    pixels = _pixels(2)
    vision = base.vision_tower
    state = embed_tower("vision", vision, pixels, hooks=[tuned.learner])
    deep = tuned.learner.prompts().vision
    n = tuned.learner.num_context
    x = state  # the deep-prompt loop written out
    outs = []
    for i in range(vision.num_layers):
        if 1 <= i < len(deep):
            x = x.set_prompts(deep[i])
        x = vision.block(i, x)
        outs.append(x.tokens)
    acts = [outs[i] for i in base.extract_layers]
    start = 1 + n
    if decoder_sees_prompts is False:  # the decoder reads [CLS, patches], as without prompts
        acts, start = [torch.cat([a[:, :1], a[:, 1 + n :]], 1) for a in acts], 1
    elif decoder_sees_prompts == "released":
        acts = _released_vpt_loop(vision, pixels, deep, base.extract_layers)
    cond = base.encode_text(["polyp"])
    with torch.no_grad():
        expected = base.decoder(acts, cond.expand(2, -1), grid=state.grid, content_start=start)
        got = tuned(pixels, "polyp").logits
    assert _diff(got, expected) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_multi_class_prompts_share_the_context(base, name):
    tuned = _learner(name, dropout=0.0) if name == "SharedAttention" else _learner(name)
    tuned = tuned.attach(base).eval()
    pixels, classes = _pixels(2), ["polyp", "tumor", "cyst"]
    many = tuned(pixels, classes).logits
    assert many.shape == (2, 3, 64, 64)
    for k, cls in enumerate(classes):
        one = tuned(pixels, [[cls], [cls]]).logits
        assert _diff(many[:, k : k + 1], one) < 1e-5
        if name == "CoCoOp":  # the context is per image: image 1 alone gives the same row
            assert _diff(tuned(pixels[1:], cls).logits, one[1:]) < 1e-5


def test_decoder_features_are_the_upsampler_input(base):
    out = base(_pixels(2), ["polyp", "tumor", "cyst"], output_decoder_features=True)
    feats = out.decoder_features
    assert feats.shape == (2, 3, base.decoder_feature_dim, 8, 8)
    rebuilt = base.decoder.transposed_convolution(feats.flatten(0, 1)).view_as(out.logits)
    assert _diff(rebuilt, out.logits) < 1e-6


def test_upsampler_joins_the_decoder_output(base):
    tuned = VPT(depth=2).attach(base, upsampler=LearnableUpsampler(8, init_factor=0.25))
    pixels = _pixels(2)
    plain = base(pixels, "polyp", hooks=[tuned.learner], output_decoder_features=True)
    extra = tuned.upsampler.branch(plain.decoder_features.flatten(0, 1), (64, 64))
    expected = plain.logits + 0.25 * extra.view_as(plain.logits)
    assert _diff(tuned(pixels, "polyp").logits, expected) < 1e-5


def test_gradient_checkpointing_same_loss_and_gradients(base):
    tuned = MaPLe(depth=2).attach(base, upsampler=None)
    grads, losses = [], []
    for ckpt in (False, True):
        tuned.gradient_checkpointing = ckpt
        tuned.zero_grad()
        loss = tuned(_pixels(2), ["polyp", "cyst"]).logits.sigmoid().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in tuned.trainable_parameters()]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    assert _diff(grads[0], grads[1]) < 1e-7 and grads[0].abs().sum() > 0
    assert base.gradient_checkpointing


def test_bf16_autocast_close_to_fp32(base):
    tuned = MaPLe(depth=2).attach(base)
    pixels = _pixels(1, size=16)
    ref = tuned(pixels, "polyp").logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tuned(pixels, "polyp").logits
    assert torch.isfinite(low).all()
    assert _diff(low.float(), ref) < 0.05 * ref.abs().max().item() + 0.05
    low.float().mean().backward()
    assert torch.isfinite(tuned.learner.context.grad).all()


def test_predict_returns_original_sizes(base):
    tuned = CoOp().attach(base)
    images = [torch.rand(3, 40, 50), torch.rand(3, 70, 30)]
    probs = tuned.predict(images, ["polyp", "tumor"])
    assert [tuple(p.shape) for p in probs] == [(2, 40, 50), (2, 70, 30)]
    assert all(((p >= 0) & (p <= 1)).all() for p in probs)
    pixels, _ = base.preprocess(images[:1])
    direct = tuned(pixels, [["polyp", "tumor"]]).logits.sigmoid()
    resized = torch.nn.functional.interpolate(direct, size=(40, 50), mode="bilinear")
    assert _diff(probs[0], resized[0]) < 1e-5


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", ALL)
def test_save_stores_only_learner_and_load_restores(base, base_dir, tmp_path, name):
    tuned = _learner(name).attach(base)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained" values, unlike any initialisation
    tuned.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored and all(k.startswith(("hooks.0.", "upsampler.")) for k in stored)
    assert sum(v.numel() for v in stored.values()) == tuned.num_parameters(trainable_only=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "tuned"
    assert config["base"]["name_or_path"] == str(base_dir.resolve())
    assert [h["name"] for h in config["hooks"]] == [name]
    pixels, prompts = _pixels(2), ["polyp", "tumor"]
    tuned.eval()
    expected = tuned(pixels, prompts).logits
    for loaded in (
        TunedModel.from_pretrained(tmp_path),  # base resolved from its recorded folder
        VLSM.from_pretrained(tmp_path),
        load_tuned(tmp_path, base=VLSM.from_pretrained(base_dir)),
    ):
        assert isinstance(loaded, TunedModel) and not loaded.training
        assert loaded.base is not tuned.base
        assert torch.equal(loaded(pixels, prompts).logits, expected)


def test_loading_onto_a_different_base_fails(base, base_dir, tmp_path):
    CoOp(depth=2).attach(base).save_pretrained(tmp_path / "tuned")
    other_weights = _clipseg(seed=1)
    with pytest.raises(CheckpointError, match="different base model: weights_sha256"):
        TunedModel.from_pretrained(tmp_path / "tuned", base=other_weights)
    touched = VLSM.from_pretrained(base_dir)
    with torch.no_grad():
        next(iter(touched.decoder.parameters())).add_(1e-3)
    with pytest.raises(CheckpointError, match="weights_sha256"):
        TunedModel.from_pretrained(tmp_path / "tuned", base=touched)
    other_config = _clipseg(seed=0, extract_layers=(0, 1))
    with pytest.raises(CheckpointError, match="config_sha256"):
        TunedModel.from_pretrained(tmp_path / "tuned", base=other_config)
    # the recorded base changed on disk: same failure without base=
    other_weights.save_pretrained(base_dir.parent / "moved")
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    config["base"]["name_or_path"] = str(base_dir.parent / "moved")
    (tmp_path / "tuned" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="different base model"):
        TunedModel.from_pretrained(tmp_path / "tuned")


def test_unrecorded_base_needs_explicit_base(tmp_path):
    model = _clipseg()  # built, not loaded: no name_or_path
    with pytest.warns(UserWarning, match="base="):
        VPT().attach(model).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"TunedModel.from_pretrained\(.*, base="):
        TunedModel.from_pretrained(tmp_path)
    loaded = TunedModel.from_pretrained(tmp_path, base=_clipseg())
    assert isinstance(loaded.learner, VPT)


def test_corrupt_learner_weights_fail(base, tmp_path):
    tuned = VPT(depth=2).attach(base)
    tuned.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    stored = load_file(tmp_path / "model.safetensors")
    stored["hooks.0.tokens"] = stored["hooks.0.tokens"][:1]
    save_file(stored, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"hooks.0.tokens: checkpoint \(1, 4, 32\)"):
        TunedModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ bad inputs
def test_bad_uses_raise_clear_errors(base):
    cocoop = CoCoOp().attach(base)
    with pytest.raises(ValueError, match="need text conditions"):
        cocoop(_pixels(2), conditional_embeddings=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="built for text_width=48"):
        CoOp(init=None, text_width=48, text_layers=2).attach(base)
    with pytest.raises(ValueError, match="depth=3 exceeds the 2 blocks of the text tower"):
        MaPLe(depth=3).attach(base)
    with pytest.raises(TypeError, match="hooks must be TowerHook instances"):
        TunedModel(base, torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="is not a tuned model"):
        TunedModel.from_pretrained(base.name_or_path)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, H, W\)"):
        CoOp().attach(base)(torch.zeros(3, 64, 64), "polyp")
