"""Hooks composed with models through ``TunedModel``: refusals at attach time, re-binding, dtypes,
the base's own API (text-free, retrieval) kept by the tuned model."""

from __future__ import annotations

import pytest
import torch

from vlsegkit import TunedModel, create_model
from vlsegkit.adapters import BottleneckAdapters, PVLAdapters
from vlsegkit.prompts import VPT, CoCoOp, CoOp, MaPLe


def _model(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def _pixels(model, b: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    h, w = model.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g).to(dtype)


def _error(make) -> str:
    with pytest.raises(ValueError) as info:
        make()
    return str(info.value)


# ------------------------------------------------------------------ CoTexNet's text-free path
@pytest.mark.parametrize(
    "hook",
    [
        lambda: CoOp(init=None),
        lambda: CoCoOp(init=None),
        # switched to its text adapters alone, a dense bottleneck acts on the text tower only
        lambda: BottleneckAdapters("dense", width=8, vision=False, condition=False),
    ],
    ids=["CoOp", "CoCoOp", "dense-text-only"],
)
def test_text_only_hooks_are_refused_on_a_frozen_cotexnet(hook):
    base = _model("cotexnet-tiny")
    message = _error(lambda: hook().attach(base))
    assert "acts only on the text tower" in message and "text-free inference" in message
    name = type(hook()).__name__
    assert f"create_model('cotexnet-...', hooks=[{name}(...)])" in message  # the alternative
    assert base.num_parameters(trainable_only=True) > 0  # the refused attach froze nothing


def test_text_only_hooks_stay_allowed_as_cotexnets_own():
    # owned, the hook trains with the [CLS] predictor, which carries it to inference
    model = _model("cotexnet-tiny", hooks=[CoOp(init=None, depth=2)])
    assert [type(h).__name__ for h in model.hooks] == ["CoOp"]
    assert model.hooks[0].context.shape == (2, 4, model.text_tower.width)


@pytest.mark.parametrize(
    "hook",
    [
        lambda: VPT(depth=2),
        lambda: MaPLe(depth=2, init=None),
        lambda: BottleneckAdapters("dense", width=8),
        lambda: BottleneckAdapters("shallow", width=8, text=False),
    ],
    ids=["VPT", "MaPLe", "dense", "shallow-no-text"],
)
def test_vision_and_condition_hooks_change_cotexnets_text_free_prediction(hook):
    base = _model("cotexnet-tiny").eval()
    x = _pixels(base)
    with torch.no_grad():
        plain = base(x).logits
    tuned = hook().attach(base).eval()
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))  # "trained" values
        got = tuned(x).logits
    assert got.shape == plain.shape and torch.isfinite(got).all()
    assert (got - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        (lambda: PVLAdapters(dim=16), "steps the vision and text towers together"),
        (
            lambda: BottleneckAdapters("shallow", width=8),
            r"reads the text states of blocks [1, 2, 3]",
        ),
    ],
    ids=["PVL", "shallow"],
)
def test_hooks_needing_text_states_are_refused_by_cotexnet_owned_or_attached(hook, reason):
    attached = _error(lambda: hook().attach(_model("cotexnet-tiny")))
    owned = _error(lambda: _model("cotexnet-tiny", hooks=[hook()]))
    assert attached == owned  # one check, one message, both paths
    assert reason in attached and "runs no text tower" in attached
    assert "BottleneckAdapters('dense')" in attached  # what to use instead


# ------------------------------------------------------------------ DualEncoder
@pytest.mark.parametrize("hook", [lambda: CoCoOp(init=None), lambda: PVLAdapters(dim=16)])
def test_dual_encoder_refuses_paired_hooks_at_attach_as_at_construction(hook):
    attached = _error(lambda: TunedModel(_model("dual-encoder-tiny"), [hook()]))
    owned = _error(lambda: _model("dual-encoder-tiny", hooks=[hook()]))
    assert attached == owned
    assert "embeds images and texts independently" in attached


# ------------------------------------------------------------------ re-binding a bound hook
def test_a_bound_bottleneck_hook_refuses_a_model_with_another_layout():
    hook = BottleneckAdapters("shallow", width=8)
    hook.attach(_model("clipseg-tiny"))
    assert hook.kept_layers == (1, 2, 3)
    message = _error(lambda: hook.attach(_model("medclipseg-tiny")))
    assert "bound to a model with a different layout" in message
    assert "kept_layers (1, 2, 3) (this model: (3,))" in message
    assert "create a new BottleneckAdapters" in message
    assert hook.kept_layers == (1, 2, 3) and len(hook.vision_extract_adapters) == 3
    # a fresh hook binds to MedCLIPSeg's own layout
    assert BottleneckAdapters("shallow", width=8).attach(_model("medclipseg-tiny")).hooks[
        0
    ].kept_layers == (3,)


def test_a_bound_dense_hook_refuses_other_widths_before_any_forward():
    hook = BottleneckAdapters("dense", width=8)
    hook.attach(_model("clipseg-tiny"))
    message = _error(lambda: hook.attach(_model("biomedclipseg-tiny")))
    assert "text_width 64 (this model: 32)" in message
    assert "tap_blocks (0, 1, 2, 3) (this model: (0, 1, 2, 3, 4))" in message


def test_rebinding_to_the_same_layout_keeps_the_trained_adapters():
    hook = BottleneckAdapters("shallow", width=8)
    first = hook.attach(_model("clipseg-tiny"))
    with torch.no_grad():
        for p in hook.parameters():
            p.add_(0.5)  # "trained"
    trained = {k: v.clone() for k, v in hook.state_dict().items()}
    second = hook.attach(_model("clipseg-tiny"))  # the same architecture and weights (seed 0)
    assert all(torch.equal(trained[k], v) for k, v in hook.state_dict().items())
    assert second.num_parameters(trainable_only=True) == first.num_parameters(trainable_only=True)
    x = _pixels(first.base)
    with torch.no_grad():
        assert torch.equal(first(x, "a").logits, second(x, "a").logits)


def test_a_bound_pvl_hook_refuses_towers_of_other_widths():
    hook = PVLAdapters(dim=16, layers=[1, 2])
    hook.attach(_model("clipseg-tiny"))
    message = _error(lambda: hook.attach(_model("biomedclipseg-tiny")))
    assert "bound to towers of widths (vision, text) (64, 64), not (64, 32)" in message


def test_a_bound_roi_hook_refuses_towers_of_other_widths():
    from vlsegkit.adapters import ROIPseudoTokens

    hook = ROIPseudoTokens().bind(_model("clipseg-tiny").hook_slots())
    assert hook.mapping[0].in_features == 64 and hook.mapping[2].out_features == 64
    message = _error(lambda: hook.bind(_model("biomedclipseg-tiny").hook_slots()))
    assert "bound to towers of widths (vision, text) (64, 64), not (64, 32)" in message


# ------------------------------------------------------------------ dtypes
def _tuned(make_hook, dtype, *, name: str = "clipseg-tiny", **kwargs) -> TunedModel:
    torch.manual_seed(0)  # the same base, hook and upsampler initialisation for every dtype
    base = create_model(name).to(dtype)
    return make_hook().attach(base, **kwargs)


@pytest.mark.parametrize(
    ("hook", "kwargs"),
    [
        (lambda: VPT(depth=2, init_std=0.5), {"upsampler": True}),
        (lambda: PVLAdapters(dim=16), {}),
    ],
    ids=["VPT+upsampler", "PVL"],
)
def test_hooks_take_the_float64_dtype_of_their_base(hook, kwargs):
    import copy

    tuned = _tuned(hook, torch.float64, **kwargs)
    params = dict(tuned.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float64}
    assert {n.split(".")[0] for n, p in params.items() if p.requires_grad} == (
        {"hooks", "upsampler"} if kwargs else {"hooks"}
    )
    # the true float64 run: the float32 tuned model, everything cast after construction
    reference = copy.deepcopy(_tuned(hook, torch.float32, **kwargs)).to(torch.float64)
    x = _pixels(tuned.base, dtype=torch.float64)
    torch.manual_seed(1)  # PVL samples its values
    got = tuned(x, "a").logits
    torch.manual_seed(1)
    expected = reference(x, "a").logits
    assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_loading_onto_the_base_in_another_dtype_says_the_dtype_differs(tmp_path):
    import json

    from vlsegkit import VLSM
    from vlsegkit.hub import CheckpointError

    _model("clipseg-tiny").save_pretrained(tmp_path / "base")
    tuned = VPT(depth=2, init_std=0.5).attach(VLSM.from_pretrained(tmp_path / "base"))
    tuned.save_pretrained(tmp_path / "tuned")
    config_path = tmp_path / "tuned" / "config.json"
    assert json.loads(config_path.read_text())["base"]["fingerprint"]["dtype"] == "float32"
    double = VLSM.from_pretrained(tmp_path / "base").double()
    with pytest.raises(CheckpointError) as info:
        TunedModel.from_pretrained(tmp_path / "tuned", base=double)
    message = str(info.value)
    assert "weights in float32, but the base given is float64" in message
    assert "the difference is (or may be only) the dtype" in message
    assert "weights_sha256 differ" not in message
    # folders written before the fingerprint recorded the dtype: the usual dtypes are tried
    config = json.loads(config_path.read_text())
    del config["base"]["fingerprint"]["dtype"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weights in float32, but the base given is float64"):
        TunedModel.from_pretrained(tmp_path / "tuned", base=double)
    # the way the message gives: load onto the float32 base, then cast
    loaded = TunedModel.from_pretrained(
        tmp_path / "tuned", base=VLSM.from_pretrained(tmp_path / "base")
    ).to(torch.float64)
    x = _pixels(double, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x, "a").logits, tuned.eval().to(torch.float64)(x, "a").logits)
    # other weights are still "a different base model"
    other = _model("clipseg-tiny", seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="weights_sha256 differ"):
        TunedModel.from_pretrained(
            tmp_path / "tuned", base=VLSM.from_pretrained(tmp_path / "other")
        )


# ------------------------------------------------------------------ the base's API, tuned
def _namespace(model: str):
    import argparse

    return argparse.Namespace(model=model)


def test_a_tuned_text_free_model_predicts_from_images_alone():
    from vlsegkit.cli import CLIError, _predict_targets
    from vlsegkit.models.capabilities import SupportsTextFree

    base = _model("cotexnet-tiny")
    tuned = VPT(depth=2, init_std=0.5).attach(base)
    assert isinstance(tuned, SupportsTextFree) and tuned.upsampler is None
    assert _predict_targets(tuned, [], _namespace("tuned")) == [None]  # the CLI's text-free route
    with pytest.raises(CLIError, match="drop --prompt"):
        _predict_targets(tuned, ["lesion"], _namespace("tuned"))
    images = [torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2)),
              torch.rand(3, 30, 52, generator=torch.Generator().manual_seed(3))]  # fmt: skip
    tuned.train()
    probs = tuned.predict(images)
    assert tuned.training and tuned.hooks[0].training  # the mode is restored
    assert [tuple(p.shape) for p in probs] == [(1, 40, 40), (1, 30, 52)]
    # re-stated: the tuned forward, text-free, resized back
    pixels, _ = base.preprocess(images)
    with torch.no_grad():
        maps = tuned.eval()(pixels).logits.sigmoid()
    for p, m, im in zip(probs, maps, images):
        expected = torch.nn.functional.interpolate(
            m[None], size=im.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        assert (p - expected).abs().max() < 1e-6
    assert (probs[0] - base.predict(images[0])).abs().max() > 1e-4  # the hooks acted
    assert tuned.predict(images[0]).shape == (1, 40, 40)
    with pytest.raises(ValueError, match="image alone"):
        tuned.predict(images, "lesion")
    with torch.no_grad():
        cond = tuned.image_condition(pixels)
        expected = tuned(pixels, condition="image").conditional_embeddings[:, 0]
    assert cond.shape == (2, base.text_tower.embed_dim) and torch.equal(cond, expected)
    assert (cond - base.image_condition(pixels)).abs().max() > 1e-4


def test_a_tuned_dual_encoder_keeps_the_retrieval_api():
    from vlsegkit.cli import CLIError, _predict_targets
    from vlsegkit.models.capabilities import SupportsRetrieval

    base = _model("dual-encoder-tiny")
    hook = VPT(depth=2, init_std=0.5)
    tuned = TunedModel(base, [hook])
    assert isinstance(tuned, SupportsRetrieval) and tuned.embed_dim == base.embed_dim
    with pytest.raises(CLIError, match="dual encoder"):
        _predict_targets(tuned, ["lesion"], _namespace("tuned"))
    texts = ["lesion", "polyp"]
    x = _pixels(base)
    with torch.no_grad():
        image_embeds = tuned.encode_image(x)
        text_embeds = tuned.encode_text(texts)
        out = tuned(x, texts)
        # re-stated with the base's own hooks= API
        assert torch.equal(image_embeds, base.encode_image(x, hooks=[hook]))
        assert torch.equal(text_embeds, base.encode_text(texts, hooks=[hook]))
        assert (image_embeds - base.encode_image(x)).abs().max() > 1e-4  # VPT acted
    assert torch.equal(out.image_embeds, image_embeds) and torch.equal(out.text_embeds, text_embeds)
    torch.testing.assert_close(tuned.similarity(image_embeds, text_embeds), out.logits)
    ids, mask = tuned.tokenize(texts)
    with torch.no_grad():
        torch.testing.assert_close(
            tuned.encode_text(input_ids=ids, attention_mask=mask), text_embeds
        )
    images = [torch.rand(3, 40, 40), torch.rand(3, 50, 30)]
    probs = tuned.predict(images, texts)
    assert probs.shape == (2, 2)
    pixels, _ = base.preprocess(images)
    with torch.no_grad():
        expected = tuned.similarity(tuned.encode_image(pixels), text_embeds).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert tuned.predict(images[0], texts).shape == (2,)


# ------------------------------------------------------------------ a base built in code
def test_a_base_built_in_code_warns_at_save_and_names_the_loader(tmp_path):
    import warnings

    from vlsegkit import VLSM
    from vlsegkit.hub import CheckpointError

    tuned = VPT(depth=2, init_std=0.5).attach(_model("clipseg-tiny")).eval()
    folder = tmp_path / "tuned"
    with pytest.warns(UserWarning, match="will load only with vlsegkit.TunedModel.from_pretrained"):
        tuned.save_pretrained(folder)
    with pytest.raises(CheckpointError) as info:
        VLSM.from_pretrained(folder)
    message = str(info.value)
    assert f"vlsegkit.TunedModel.from_pretrained({str(folder)!r}, base=<the base model>)" in message
    assert "VLSM.from_pretrained cannot take base=" in message
    loaded = TunedModel.from_pretrained(folder, base=_model("clipseg-tiny"))
    x = _pixels(tuned.base)
    with torch.no_grad():
        assert torch.equal(loaded(x, "a").logits, tuned(x, "a").logits)
    # a base loaded from a folder is recorded: no warning
    _model("clipseg-tiny").save_pretrained(tmp_path / "base")
    recorded = VPT(depth=2).attach(VLSM.from_pretrained(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded.save_pretrained(tmp_path / "recorded")


# ------------------------------------------------------------------ lockstep + image features
class _GivenFeaturesCoCoOp(CoCoOp):
    """CoCoOp fed fixed image features instead of the model's (a re-statement for the test)."""

    needs_image_features = False

    def _prompts(self, image_features):
        return super()._prompts(self.given)


@pytest.mark.parametrize("name", ["clipseg-tiny", "biomedclipseg-tiny", "medclipseg-tiny"])
def test_pvl_and_cocoop_together_condition_the_text_on_the_plain_vision_tower(name):
    base = _model(name).eval()
    pvl = PVLAdapters(dim=16, layers=[1, 2], deterministic=True, gate_init=1.0)
    cocoop = CoCoOp(init=None, init_std=0.5)
    tuned = TunedModel(base, [pvl, cocoop])
    x, prompts = _pixels(base), ["a", "b"]
    torch.manual_seed(0)  # MedCLIPSeg's own adapters sample
    got = tuned(x, prompts).logits
    # re-stated: CoCoOp's contexts from the image features of the vision tower run alone
    given = _GivenFeaturesCoCoOp(init=None).bind(base.hook_slots())
    given.load_state_dict(cocoop.state_dict())
    with torch.no_grad():
        given.given = base.vision_tower(x).pooled
        torch.manual_seed(0)
        expected = base(x, prompts, hooks=[pvl, given]).logits
        torch.manual_seed(0)
        without = base(x, prompts, hooks=[pvl]).logits
    assert got.shape == (2, 1, *base.image_size)
    assert (got - expected).abs().max() < 1e-5
    assert (got - without).abs().max() > 1e-4  # CoCoOp acted
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cocoop.meta_nets.parameters())


# ------------------------------------------------------------------ prompt depth vs blocks run
def test_prompts_beyond_the_blocks_a_model_runs_warn_and_get_no_gradient():
    import warnings

    base = _model("biomedclipseg-tiny")
    assert base.hook_slots().depth("vision") == 5 < base.vision_tower.num_layers == 6
    with pytest.warns(UserWarning, match=r"the prompts for blocks \[5\] are never used"):
        tuned = VPT(depth=6).attach(base, upsampler=None)
    tuned(_pixels(base), "a").logits.square().mean().backward()
    grad = tuned.learner.tokens.grad
    assert grad[5].abs().max() == 0 and (grad[:5].flatten(1).abs().amax(1) > 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VPT(depth=5).attach(_model("biomedclipseg-tiny"), upsampler=None)
