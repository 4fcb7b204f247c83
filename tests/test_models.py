"""Registry-driven tests: every registered tiny model gets these by being registered.

In the spirit of timm's ``tests/test_models.py``: forward shapes, gradients reaching exactly the
trainable parameters, bit-identical save / load, freezing, bf16 autocast, gradient checkpointing,
``predict`` at the original size, and every hook family (prompt learners, adapters) attaching,
training one step through ``fit`` and changing only its own weights. Family files keep the parity
tests against the upstream references.

Text-free models (:class:`~vlsegkit.models.capabilities.SupportsTextFree`, e.g. CoTexNet) take no
prompt at inference: for them the prompt-pairing checks become "one row per image, independent of the
batch", training-mode calls give one prompt per image plus the masks text conditioning needs, and
``predict`` takes images only.

Models that embed instead of segmenting (:class:`~vlsegkit.models.capabilities.SupportsRetrieval`,
the dual encoder contrastive fine-tuning trains) output ``(B, T)`` image-text logits: the shape,
pairing, freezing and ``predict`` tests check that form for them, and hooks that pair texts with
images are skipped on models whose hook slots say they cannot (``HookSlots.lockstep``).
"""

from __future__ import annotations

import json

import pytest
import torch

import vlsegkit
from vlsegkit import TunedModel, create_model, list_hooks, list_models
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.models.capabilities import (
    SupportsHooks,
    SupportsRetrieval,
    SupportsTextFree,
    SupportsUncertainty,
)
from vlsegkit.registry import hook_class
from vlsegkit.train import fit

TINY = list_models("*-tiny")
PROMPTS = ["a small round lesion", "two polyps", "nothing here"]


def test_tiny_models_are_registered():
    # the suite below must not silently test nothing
    assert {"clipseg-tiny", "medclipseg-tiny", "cris-tiny", "biomedclipseg-tiny",
            "biomedclipseg-d-tiny"} <= set(TINY)  # fmt: skip


def _model(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def _pixels(model, b: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = model.image_size
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _masks(model, pixels) -> torch.Tensor:
    """Random class masks (B, K, H, W) for text-free models' training-time text conditioning."""
    g = torch.Generator().manual_seed(1)
    b, _, h, w = pixels.shape
    return (torch.rand(b, model.num_classes, h, w, generator=g) > 0.7).float()


def _logits(model, pixels, prompts, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # stochastic models draw their noise from the global RNG here
    if isinstance(model, SupportsTextFree):
        if not model.training:
            return model(pixels).logits
        # text conditions training only: one real-text prompt per image, with the ROI masks
        b = pixels.shape[0]
        texts = [prompts] * b if isinstance(prompts, str) else (list(prompts) * b)[:b]
        return model(pixels, texts, masks=_masks(model, pixels)).logits
    return model(pixels, prompts).logits


def _retrieval_shapes_and_pairing(model, x):
    # every image with every text, each embedded independently of the others
    with torch.no_grad():
        assert _logits(model, x, PROMPTS).shape == (2, 3)
        assert _logits(model, x, PROMPTS[:2]).shape == (2, 2)
        assert _logits(model, x, PROMPTS[0]).shape == (2, 1)
        full = _logits(model, x, PROMPTS)
        alone = _logits(model, x[1:], PROMPTS[2:])
    assert (full[1:, 2:] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_pairing(name):
    model = _model(name).eval()
    if isinstance(model, SupportsTextFree):
        _check_text_free_forward(model)
        return
    x = _pixels(model)
    h, w = model.image_size
    if isinstance(model, SupportsRetrieval):
        return _retrieval_shapes_and_pairing(model, x)
    with torch.no_grad():
        assert _logits(model, x, PROMPTS).shape == (2, 3, h, w)  # every image, every prompt
        assert _logits(model, x, PROMPTS[:2]).shape == (2, 1, h, w)  # B prompts: one per image
        assert _logits(model, x, PROMPTS[0]).shape == (2, 1, h, w)
        nested = _logits(model, x, [PROMPTS[:2], PROMPTS[1:]])
        assert nested.shape == (2, 2, h, w)
        # a per-image prompt set equals that image with those prompts alone
        alone = _logits(model, x[1:], [PROMPTS[1:]])
    if not isinstance(model, SupportsUncertainty):
        assert (nested[1:] - alone).abs().max() < 1e-5


def _check_text_free_forward(model):
    x = _pixels(model, b=3)
    h, w = model.image_size
    with torch.no_grad():
        out = model(x).logits
        assert out.shape == (3, model.num_outputs, h, w)
        assert (model(x[1:]).logits - out[1:]).abs().max() < 1e-5  # rows are independent
        # text and masks do not change the text-free prediction
        texts = [PROMPTS[0]] * 3
        with_text = model(x, texts, masks=_masks(model, x), condition="image").logits
    assert (with_text - out).abs().max() < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_exactly_the_trainable_parameters(name):
    model = _model(name).train()
    out = _logits(model, _pixels(model), PROMPTS)
    out.float().square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname
    assert model.num_parameters(trainable_only=True) > 0


@pytest.mark.parametrize("name", TINY)
def test_freeze_backbone(name):
    model = _model(name)
    towers = [*model.vision_tower.parameters(), *model.text_tower.parameters()]
    # each paper's recipe: frozen towers (CLIPSeg, MedCLIPSeg, BiomedCLIPSeg), fine-tuned (CRIS)
    frozen = model.config["freeze_backbone"]
    assert all(p.requires_grad is not frozen for p in towers)
    model.freeze_backbone()
    assert all(not p.requires_grad for p in towers)
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in towers)
    assert model.config["freeze_backbone"] is False  # a rebuild repeats it
    model.freeze_backbone()
    assert all(not p.requires_grad for p in towers) and model.config["freeze_backbone"] is True


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip_is_bit_identical(name, tmp_path):
    model = _model(name, seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seeded initialisation
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.model_type and config == json.loads(
        json.dumps({**model.config, "model_type": model.model_type, "vlsegkit_format_version": 1})
    )
    loaded = vlsegkit.VLSM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _pixels(model)
    with torch.no_grad():
        assert torch.equal(_logits(model, x, PROMPTS), _logits(loaded, x, PROMPTS))
    rebuilt = type(model).from_config(model.config)  # the recorded config rebuilds it
    assert rebuilt.state_dict().keys() == a.keys()


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_is_finite_and_close(name):
    model = _model(name).eval()
    x = _pixels(model, b=1)
    with torch.no_grad():
        ref = _logits(model, x, PROMPTS[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = _logits(model, x, PROMPTS[0])
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


@pytest.mark.parametrize("name", TINY)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name):
    model = _model(name).train()
    model.freeze_backbone(False)  # a graph through every block
    x = _pixels(model)
    results = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        out = _logits(model, x, PROMPTS[:2], seed=3)
        out.square().mean().backward()
        # (unused parts -- e.g. the vision projection without support images -- get no gradient)
        grads = torch.cat(
            [
                torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                for p in model.trainable_parameters()
            ]
        )
        results.append((out.detach(), grads))
    assert (results[0][0] - results[1][0]).abs().max() < 1e-5
    assert (results[0][1] - results[1][1]).abs().max() < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_predict_returns_probabilities_at_the_original_size(name):
    model = _model(name).train()
    images = [torch.rand(3, 37, 50), torch.rand(3, 64, 29)]
    if isinstance(model, SupportsTextFree):
        probs = model.predict(images)
        c = model.num_outputs
        assert [tuple(p.shape) for p in probs] == [(c, 37, 50), (c, 64, 29)]
        assert all(((p >= 0) & (p <= 1)).all() for p in probs) and model.training
        with pytest.raises(ValueError, match="image alone"):
            model.predict(images, PROMPTS[:2])
        return
    if isinstance(model, SupportsRetrieval):  # zero-shot classification over the texts
        probs = model.predict(images, PROMPTS)
        assert probs.shape == (2, 3) and model.training
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
        assert model.predict(images[0], PROMPTS).shape == (3,)
        return
    probs = model.predict(images, PROMPTS[:2])
    assert [tuple(p.shape) for p in probs] == [(2, 37, 50), (2, 64, 29)]
    assert all(((p >= 0) & (p <= 1)).all() for p in probs)
    assert model.training  # the mode is restored
    single = model.predict(images[0], PROMPTS[0])
    assert single.shape == (1, 37, 50)


@pytest.mark.parametrize("name", TINY)
def test_predict_restores_every_submodule_mode(name):
    """A part put in eval mode on purpose (frozen BatchNorm statistics, a tower without dropout)
    stays there after ``predict``; ``model.train(True)`` on exit used to switch it back."""
    model = _model(name).train()
    model.vision_tower.eval()
    before = {n: m.training for n, m in model.named_modules()}
    assert not all(before.values())
    images = [torch.rand(3, 37, 50)]
    if isinstance(model, SupportsTextFree):
        model.predict(images)
    else:
        model.predict(images, PROMPTS[:2])
    assert {n: m.training for n, m in model.named_modules()} == before


def _hook(name: str):
    kwargs = {"PVLAdapters": {"dim": 16}, "SharedAttention": {"mlp_dim": 32}}.get(name, {})
    if name == "BottleneckAdapters-dense":
        return hook_class("BottleneckAdapters")(variant="dense")
    return hook_class(name)(depth=2, **kwargs) if name not in (
        "PVLAdapters", "BottleneckAdapters") else hook_class(name)(**kwargs)  # fmt: skip


# Hooks fed by their own model (CoTexNet's ROI tokens) are part of it, not attachable to others.
HOOKS = [h for h in list_hooks() if not hook_class(h).model_inputs] + ["BottleneckAdapters-dense"]

# Hooks a model refuses at attach time (its check_hooks), with the reason the error must give.
REFUSED = {
    # a dual encoder embeds texts independently of images
    ("dual-encoder-tiny", "CoCoOp"): "embeds images and texts independently",
    ("dual-encoder-tiny", "PVLAdapters"): "embeds images and texts independently",
    # CoTexNet's text-free inference runs no text tower, and the frozen [CLS] predictor cannot
    # carry a text-only hook's training to it
    ("cotexnet-tiny", "CoOp"): "acts only on the text tower",
    ("cotexnet-tiny", "CoCoOp"): "acts only on the text tower",
    ("cotexnet-tiny", "PVLAdapters"): "steps the vision and text towers together.*runs no text",
    ("cotexnet-tiny", "BottleneckAdapters"): r"reads the text states of blocks \[1, 2, 3\]",
}


def test_every_hook_family_is_covered():
    assert {"CoOp", "CoCoOp", "VPT", "MaPLe", "SharedSeparate", "SharedAttention",
            "PVLAdapters", "BottleneckAdapters"} <= set(list_hooks())  # fmt: skip


@pytest.fixture(scope="module")
def lesions():
    data = {}
    for name in TINY:
        model = create_model(name)
        ds = SyntheticLesions(length=4, image_size=model.image_size, seed=0,
                              mean=model.image_mean, std=model.image_std)  # fmt: skip
        data[name] = [collate_prompts([ds[i] for i in range(4)])]
    return data


@pytest.mark.parametrize("hook_name", HOOKS)
@pytest.mark.parametrize("name", TINY)
def test_every_hook_attaches_trains_and_changes_only_its_weights(name, hook_name, lesions):
    base = _model(name)
    assert isinstance(base, SupportsHooks)
    hook = _hook(hook_name)
    slots = base.hook_slots()
    missing = [t for t in hook.towers if t not in slots.towers]
    if missing:
        # e.g. a vision hook on CRIS's ResNet: refused with the model's reason, the base untouched
        with pytest.raises(ValueError, match=f"acts on the {missing[0]} tower.*no hook slots"):
            hook.attach(base)
        assert slots.unavailable[missing[0]]  # the model says why
        assert all(p.requires_grad for p in base.trainable_parameters())
        return
    if (name, hook_name) in REFUSED:
        trainable = base.num_parameters(trainable_only=True)
        with pytest.raises(ValueError, match=REFUSED[name, hook_name]):
            hook.attach(base)
        assert base.num_parameters(trainable_only=True) == trainable > 0  # the base not frozen
        return
    if (hook.lockstep or hook.pairs_text_with_images) and not slots.lockstep:
        pytest.skip(f"{name} embeds texts independently of images; {hook_name} pairs them")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = hook.attach(base)
    assert isinstance(tuned, TunedModel)
    own = {k: v.clone() for k, v in tuned.state_dict().items()}
    assert own and all(k.startswith(("hooks.", "upsampler.")) for k in own)
    history = fit(tuned, lesions[name], max_steps=1, lr=1e-2, weight_decay=0.0, progress=False)
    assert history.steps == 1 and all(v == v for v in history.train_terms[0].values())
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base did not move
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(own[k], v)]
    assert changed  # the hook's own weights did


def test_predict_progress_bar_counts_images(capsys):
    model = _model("clipseg-tiny")
    images = [torch.rand(3, 20 + 4 * i, 24) for i in range(5)]
    out = model.predict(images, "lesion", batch_size=2)
    assert capsys.readouterr().err == ""  # off by default: library calls stay quiet
    again = model.predict(images, "lesion", batch_size=2, progress=True)
    err = capsys.readouterr().err  # tqdm redraws at most every 0.1 s: the total is what is stable
    assert "/5 [" in err and "image" in err
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert [p.shape[-2:] for p in out] == [im.shape[-2:] for im in images]
