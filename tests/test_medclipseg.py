"""MedCLIPSeg: lockstep forward, loss, training, Hub I/O, registry sizes, Monte Carlo uncertainty,
released-checkpoint loading and bad inputs.

References used as oracles:

* a hand-written loop over the towers' blocks and the PVL adapters (the model's lockstep forward);
* the upstream open_clip modules (adapter-free towers, and the released model's own layout);
* a plain re-statement of the released forward from the raw state-dict tensors (key map values);
* plain float64 Monte Carlo statistics over single forward passes (uncertainty maps).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from open_clip.hf_model import HFTextEncoder  # noqa: E402
from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402

from vlsegkit import VLSM, create_model  # noqa: E402
from vlsegkit.data import SyntheticLesions, collate_prompts  # noqa: E402
from vlsegkit.encoders import create_towers  # noqa: E402
from vlsegkit.hub import CheckpointError  # noqa: E402
from vlsegkit.losses import DiceBCELoss, MedCLIPSegLoss, SoftPatchContrastiveLoss  # noqa: E402
from vlsegkit.models import MedCLIPSeg  # noqa: E402
from vlsegkit.models.medclipseg_released import (  # noqa: E402
    convert_released_state_dict,
    load_released_state_dict,
    released_checkpoint_name,
)
from vlsegkit.testing import write_bert_tokenizer_files  # noqa: E402

DEPTH, WIDTH, EMBED, DS = 4, 32, 16, 8
CTX = 24
PROMPTS = ["a small round lesion", "two irregular polyps on the left", "no lesion"]


def _jitter(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Perturb 1-D parameters (LayerNorm affine, biases, gates) away from their trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() <= 1:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _bert_backbone(vocab: int) -> dict:
    return {
        "kind": "open_clip",
        "embed_dim": EMBED,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": WIDTH, "layers": DEPTH,
                       "head_width": 16},
        "bert_config": {"vocab_size": vocab, "hidden_size": WIDTH, "num_hidden_layers": DEPTH,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 32},
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_bert_tokenizer_files(tmp_path_factory.mktemp("bert_tok"))


@pytest.fixture(scope="module")
def vocab(tok_dir):
    from vlsegkit.tokenizers import load_tokenizer

    return load_tokenizer(str(tok_dir)).vocab_size


def _bert_model(tok_dir, vocab, seed: int = 0, **kwargs) -> MedCLIPSeg:
    torch.manual_seed(seed)
    # the released text rule (max-length padding attended to by the adapters) unless overridden
    defaults = dict(
        backbone=_bert_backbone(vocab), adapter_dim=DS, context_length=CTX,
        tokenizer=str(tok_dir), image_size=32, kv_norm=True, text_padding="max_length",
    )  # fmt: skip
    model = MedCLIPSeg(**{**defaults, **kwargs})
    _jitter(model, seed)
    with torch.no_grad():
        # realistic magnitudes: logits ~ 10 (a random head gives ~ 0.5) and value variances of
        # order 1 (softplus(2) ~ 2), so sampling visibly spreads the predictions
        model.head.mask_head[4].weight.mul_(20)
        model.head.mask_head[4].bias.mul_(20)
        for adapter in model.pvl_adapters:
            for attn in (
                adapter.two_way.cross_attn_img_to_txt,
                adapter.two_way.cross_attn_txt_to_img,
            ):
                attn.v_proj.bias[attn.attn_dim :] += 2.0
    return model.eval()


@pytest.fixture(scope="module")
def bert_model(tok_dir, vocab):
    return _bert_model(tok_dir, vocab)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    model = create_model("medclipseg-tiny")
    _jitter(model, 1)
    return model.eval()


def _pixels(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- lockstep reference
def _reference_forward(model, pixels, ids, mask, *, generator=None, sample=False, key_mask=None):
    """Hand-written MedCLIPSeg pass for one prompt per image: blocks and adapters by hand."""
    vision, text = model.vision_tower, model.text_tower
    v = vision.embed(pixels)
    t = text.embed(ids, mask)
    if t.causal:
        t = t.replace(attention_mask=None)
    adapters = iter(model.pvl_adapters)
    for i in range(vision.num_layers):
        if i in model.layers:
            nv, nt = next(adapters)(
                v.tokens, t.tokens, text_padding_mask=key_mask, generator=generator, sample=sample
            )
            v, t = v.with_tokens(nv), t.with_tokens(nt)
        v, t = vision.block(i, v), text.block(i, t)
    dense, pooled = vision.dense(v), text.pool(t)
    logits = model.head(dense, v.grid, pooled, output_size=pixels.shape[-2:])
    return logits, dense, pooled


@pytest.mark.parametrize("sample", [False, True])
def test_forward_matches_hand_written_lockstep(bert_model, sample):
    model = bert_model
    x = _pixels(2)
    ids, mask = model.tokenize(PROMPTS[:2])
    assert ids.shape == (2, CTX)  # max_length padding, as released
    with torch.no_grad():
        out = model(x, PROMPTS[:2], sample=sample, generator=_gen(5))
        ref, dense, pooled = _reference_forward(
            model, x, ids, mask, generator=_gen(5), sample=sample
        )
    assert out.logits.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.patch_tokens[:, 0], dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.text_embeddings[:, 0], pooled, rtol=0, atol=1e-5)
    assert torch.equal(out.conditional_embeddings, out.text_embeddings)
    # the adapters matter: without them the result differs
    with torch.no_grad():
        saved = model.pvl_adapters.slot
        model.pvl_adapters.slot = {}  # the hook then acts nowhere
        try:
            plain = model(x, PROMPTS[:2], sample=sample).logits
        finally:
            model.pvl_adapters.slot = saved
    assert (plain - out.logits).abs().max() > 1e-3


def test_adapter_free_towers_match_upstream_open_clip(tok_dir, vocab):
    model = _bert_model(tok_dir, vocab, layers=())
    x = _pixels(2)
    ids, mask = model.tokenize(PROMPTS[:2])
    visual, text = model.vision_tower.visual, model.text_tower.text
    with torch.no_grad():
        out = model(x, input_ids=ids, attention_mask=mask)
        visual.output_tokens = True
        try:
            _, tokens = visual(x)  # ln_post(patches) @ proj
        finally:
            visual.output_tokens = False
        text_emb = text(ids)  # HFTextEncoder: [CLS] of the last layer through the MLP projection
    torch.testing.assert_close(out.patch_tokens[:, 0], tokens @ visual.proj, atol=1e-5,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(out.text_embeddings[:, 0], text_emb, atol=1e-5, rtol=0)


def test_prompt_pairing(bert_model):
    model = bert_model
    x = _pixels(2, seed=1)
    with torch.no_grad():
        broadcast = model(x, PROMPTS, sample=False).logits  # T=3 != B=2: every image x every prompt
        nested = model(x, [PROMPTS[:2], PROMPTS[1:]], sample=False).logits
        single = model(x, PROMPTS[2], sample=False).logits
        one = {
            (b, c): model(x[b : b + 1], PROMPTS[c], sample=False).logits[0, 0]
            for b in range(2)
            for c in range(3)
        }
    assert broadcast.shape == (2, 3, 32, 32) and nested.shape == (2, 2, 32, 32)
    for (b, c), ref in one.items():
        torch.testing.assert_close(broadcast[b, c], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(nested[1, 0], one[(1, 1)], atol=1e-5, rtol=0)
    torch.testing.assert_close(single[:, 0], torch.stack([one[(0, 2)], one[(1, 2)]]), atol=1e-5,
                               rtol=0)  # fmt: skip


def test_longest_padding_is_batch_independent(tiny):
    # "longest" padding masks padded text keys in the adapters: a prompt's output must not depend
    # on the longer prompts it is batched with
    x = _pixels(1, size=64)
    with torch.no_grad():
        alone = tiny(x, "lesion", sample=False).logits[0, 0]
        batched = tiny(x, ["lesion", "two large irregular lesions at the top left"], sample=False)
    torch.testing.assert_close(batched.logits[0, 0], alone, atol=1e-5, rtol=0)
    ids, mask = tiny.tokenize(["lesion", "two large irregular lesions at the top left"])
    assert ids.shape[1] < tiny.context_length and not bool(mask[0].all())


def test_clip_text_and_transformers_backbones_match_reference(tiny):
    spec = {
        "kind": "transformers_clip",
        "text_config": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=20),
        "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=32, patch_size=8),
        "projection_dim": 16,
    }  # fmt: skip
    torch.manual_seed(3)
    hf = MedCLIPSeg(backbone=spec, adapter_dim=8, image_size=32).eval()
    _jitter(hf, 3)
    assert hf.layers == (1,) and hf.context_length == 20
    for model, size in ((hf, 32), (tiny, 64)):
        x = _pixels(2, size=size, seed=4)
        ids, mask = model.tokenize(PROMPTS[:2])
        key_mask = mask.bool() if model.text_padding == "longest" else None
        with torch.no_grad():
            out = model(x, PROMPTS[:2], generator=_gen(2))
            ref, _, _ = _reference_forward(
                model, x, ids, mask, generator=_gen(2), sample=True, key_mask=key_mask
            )
        torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- sampling, gradients
def test_sampling_and_determinism(tok_dir, vocab, bert_model):
    x = _pixels(2, seed=2)
    with torch.no_grad():
        a = bert_model(x, PROMPTS[:2], generator=_gen(1)).logits
        b = bert_model(x, PROMPTS[:2], generator=_gen(1)).logits
        c = bert_model(x, PROMPTS[:2], generator=_gen(2)).logits
        m1 = bert_model(x, PROMPTS[:2], sample=False).logits
        m2 = bert_model(x, PROMPTS[:2], sample=False).logits
    assert torch.equal(a, b) and torch.equal(m1, m2)
    assert (a - c).abs().max() > 1e-4 and (a - m1).abs().max() > 1e-4
    # deterministic=True: value means by default, same weights -> same output as sample=False
    det = _bert_model(tok_dir, vocab, deterministic=True)
    det.load_state_dict(bert_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(det(x, PROMPTS[:2]).logits, m1, atol=0, rtol=0)
        assert (det(x, PROMPTS[:2], sample=True, generator=_gen(1)).logits - a).abs().max() < 1e-6


def test_gradients_reach_only_adapters_and_head(tok_dir, vocab):
    model = _bert_model(tok_dir, vocab, seed=4).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("pvl_adapters.", "head.")) for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith(("pvl_adapters.", "head."))} == (
        trainable
    )
    out = model(_pixels(2, seed=3), PROMPTS[:2], generator=_gen(0))
    masks = (torch.rand(2, 1, 32, 32, generator=_gen(1)) > 0.5).float()
    MedCLIPSegLoss()(out, masks).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the first adapter's vision update reaches the loss only through frozen blocks 1..L-1
    assert model.pvl_adapters[0].proj_vis_up.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_gradients(tok_dir, vocab):
    grads = []
    for ckpt in (False, True):
        model = _bert_model(tok_dir, vocab, seed=5).train()
        model.gradient_checkpointing = ckpt
        out = model(_pixels(2, seed=5), PROMPTS[:2], generator=_gen(3))
        out.logits.square().mean().backward()
        grads.append(model.pvl_adapters[0].proj_txt_down.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- loss and training
def test_loss_is_weighted_sum_of_parts(bert_model):
    out = bert_model(_pixels(3, seed=6), PROMPTS, generator=_gen(4))
    masks = (torch.rand(3, 1, 32, 32, generator=_gen(2)) > 0.6).float()
    patches, text = out.patch_tokens[:, 0], out.text_embeddings[:, 0]
    # plain float64 restatement of eq. 23 with per-image Dice (smooth 1) and eqs. 20-22
    x, g = out.logits.double(), masks.double()
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * g).sum((2, 3)) + 1) / (p.sum((2, 3)) + g.sum((2, 3)) + 1)
    bce = -(g * torch.log(p) + (1 - g) * torch.log1p(-p)).mean((2, 3))
    pv = F.normalize(F.normalize(patches.double(), dim=-1).mean(1), dim=-1)
    pt = F.normalize(text.double(), dim=-1)
    logits = pv @ pt.T / 0.2
    targets = torch.softmax(pt @ pt.T / 0.2, dim=-1)
    con = 0.5 * (
        -(targets * logits.log_softmax(-1)).sum(-1).mean()
        - (targets.T * logits.T.log_softmax(-1)).sum(-1).mean()
    )
    for weights in ((0.5, 0.5, 0.1), (1.0, 0.0, 0.5)):
        loss = MedCLIPSegLoss(dice_weight=weights[0], bce_weight=weights[1],
                              softcon_weight=weights[2])  # fmt: skip
        expected = (weights[0] * dice + weights[1] * bce).mean() + weights[2] * con
        assert abs(loss(out, masks).item() - expected.item()) < 1e-5
    terms = MedCLIPSegLoss().terms(out, masks[:, 0])  # (B, H, W) masks for C = 1
    assert set(terms) == {"loss", "dice_loss", "bce_loss", "softcon_loss"}
    assert abs(terms["softcon_loss"].item() - con.item()) < 1e-5
    assert abs(terms["dice_loss"].item() - dice.mean().item()) < 1e-5
    assert abs(terms["bce_loss"].item() - bce.mean().item()) < 1e-5
    ref = DiceBCELoss()(out.logits, masks) + 0.1 * SoftPatchContrastiveLoss()(patches, text)
    assert abs(terms["loss"].item() - ref.item()) < 1e-6
    with pytest.raises(ValueError, match=r"masks must have the shape of output.logits"):
        MedCLIPSegLoss()(out, masks[:, :, :16])
    with pytest.raises(ValueError, match="patch_tokens"):
        MedCLIPSegLoss()(type(out)(logits=out.logits), masks)


def test_short_training_lowers_the_loss(tiny):
    torch.manual_seed(0)
    model = create_model("medclipseg-tiny").train()
    data = SyntheticLesions(length=8, image_size=64, seed=3, mean=model.image_mean,
                            std=model.image_std)  # fmt: skip
    batch = collate_prompts([data[i] for i in range(len(data))])
    criterion = MedCLIPSegLoss()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return criterion(
                model(batch["image"], batch["prompt"], sample=False), batch["mask"]
            ).item()

    before = loss_now()
    for step in range(25):
        out = model(batch["image"], batch["prompt"], generator=_gen(step))
        loss = criterion(out, batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


def test_bf16_autocast_is_finite(bert_model):
    x = _pixels(1, seed=7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = bert_model(x, PROMPTS[0], generator=_gen(0))
        loss = MedCLIPSegLoss()(out, torch.ones(1, 1, 32, 32))
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(loss)
    with torch.no_grad():
        ref = bert_model(x, PROMPTS[0], generator=_gen(0)).logits
    # bf16 keeps ~3 significant digits; the map must still be the same map
    assert (out.logits.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


# ---------------------------------------------------------------------- config, Hub I/O, registry
def test_save_pretrained_round_trip(bert_model, tmp_path):
    bert_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "medclipseg" and config["backbone"]["kind"] == "open_clip"
    loaded = VLSM.from_pretrained(tmp_path)
    assert isinstance(loaded, MedCLIPSeg) and loaded.config == bert_model.config
    for (k, a), (k2, b) in zip(bert_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = _pixels(2, seed=8)
    with torch.no_grad():
        a = bert_model(x, PROMPTS[:2], generator=_gen(9)).logits
        b = loaded(x, PROMPTS[:2], generator=_gen(9)).logits
    assert torch.equal(a, b)
    # strict loading: a tampered checkpoint fails
    from vlsegkit.hub import save_safetensors

    state = dict(bert_model.state_dict())
    state.pop("pvl_adapters.0.two_way.cross_attn_img_to_txt.gate")
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cross_attn_img_to_txt\.gate"):
        VLSM.from_pretrained(tmp_path)


def test_bert_tokenizer_is_lazy_and_optional(tok_dir, vocab, bert_model):
    model = _bert_model(tok_dir, vocab, tokenizer=None)
    model.load_state_dict(bert_model.state_dict())
    ids, mask = bert_model.tokenize(PROMPTS[:2])
    x = _pixels(2, seed=9)
    with pytest.raises(ValueError, match="no tokenizer"):
        model(x, PROMPTS[:2])
    with torch.no_grad():
        a = model(x, input_ids=ids, attention_mask=mask, sample=False).logits
        b = bert_model(x, PROMPTS[:2], sample=False).logits
    assert torch.equal(a, b)
    assert ids[0, 0] == 2 and ids[0, -1] == 0  # [CLS] ... [PAD], BiomedBERT layout


def test_registry_backbones_and_trainable_counts():
    per_attention = 256 * 256 + 256 + 2 * (256 * 512 + 512) + 256 * 256 + 256 + 1
    head = 3 * (512 * 512 + 512) + 2 * (512 * 512 * 4 + 512 + 512 * 9 + 2 * 512)
    with torch.device("meta"):
        paper = create_model("medclipseg-unimedclip-vit-b16")
        released = MedCLIPSeg(**MedCLIPSeg.released_config())
        biomed = create_model("medclipseg-biomedclip-vit-b16")
        clip = create_model("medclipseg-clip-vit-b16")
    expected_paper = 10 * (4 * 768 * 256 + 2 * per_attention) + head
    assert paper.layers == tuple(range(1, 11)) and len(paper.pvl_adapters) == 10
    assert paper.num_parameters(trainable_only=True) == expected_paper
    # the official code adds LayerNorm(256) on K_mu and V_mu: the 18,677,268 of spec section 3
    assert released.num_parameters(trainable_only=True) == 18_677_268
    assert released.num_parameters(trainable_only=True) - expected_paper == 10 * 2 * 2 * 512
    for model in (paper, released):
        assert round(model.num_parameters(trainable_only=True) / 1e6, 1) == 18.7  # Table S2
    assert biomed.num_parameters(trainable_only=True) == expected_paper
    expected_clip = 10 * (2 * 256 * (768 + 512) + 2 * per_attention) + head
    assert clip.num_parameters(trainable_only=True) == expected_clip
    for model in (paper, biomed, clip):
        frozen = model.num_parameters() - model.num_parameters(trainable_only=True)
        assert frozen > 80e6  # ViT-B/16 (+ text encoder) is there, frozen
    assert (paper.context_length, clip.context_length) == (256, 77)
    tiny = create_model("medclipseg-tiny")
    assert tiny.layers == (1, 2) and tiny.text_padding == "longest"


# ---------------------------------------------------------------------- Monte Carlo uncertainty
def _mc_reference(model, images, prompts, samples: int, seed: int):
    """One forward pass per (sample, image, prompt), alone, with the documented generators;
    float64 statistics."""
    pixels, sizes = model.preprocess(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    gens = model.noise_generators(samples, len(sizes), len(prompts), seed=seed)
    probs, ents = [[] for _ in sizes], [[] for _ in sizes]
    with torch.no_grad():
        for s in range(samples):
            for j, size in enumerate(sizes):
                logits = torch.cat([
                    model(pixels[j : j + 1], prompt, generator=gens[s][j][k]).logits.double()
                    for k, prompt in enumerate(prompts)
                ], dim=1)  # fmt: skip
                lj = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
                p = torch.sigmoid(lj)
                probs[j].append(p)
                ents[j].append(-(p * torch.log(p) + (1 - p) * torch.log1p(-p)))
    out = []
    for ps, hs in zip(probs, ents):
        p = torch.stack(ps)
        mean = p.mean(0)
        total = -(mean * torch.log(mean) + (1 - mean) * torch.log1p(-mean))
        aleatoric = torch.stack(hs).mean(0)
        out.append(dict(mean=mean, entropy=total, aleatoric=aleatoric,
                        epistemic=total - aleatoric, variance=p.var(0, unbiased=False)))  # fmt: skip
    return out


def _images():
    g = torch.Generator().manual_seed(11)
    return [torch.rand(3, 40, 56, generator=g), torch.rand(3, 32, 32, generator=g)]


@pytest.mark.parametrize("batch_samples", [1, 3, 5])
def test_mc_equals_loop_of_single_passes(bert_model, batch_samples):
    images = _images()
    got = bert_model.predict_with_uncertainty(
        images, PROMPTS, 5, batch_samples=batch_samples, seed=123
    )
    ref = _mc_reference(bert_model, images, PROMPTS, 5, seed=123)
    assert got.samples == 5 and len(got.mean) == 2
    for j, size in enumerate(((40, 56), (32, 32))):
        for key, value in ref[j].items():
            mine = getattr(got, key)[j]
            assert mine.shape == (3, *size), key
            torch.testing.assert_close(mine.double(), value, atol=2e-5, rtol=0, msg=key)
    assert got.epistemic[0].max() > 1e-4  # sampling really spreads the predictions
    assert not got.mean[0].is_inference()  # ordinary tensors: callers may edit them in place
    got.mean[0][got.mean[0] < 0.5] = 0.0


def test_mc_reproducible_and_seeded(bert_model):
    image = _images()[0]
    a = bert_model.predict_with_uncertainty(image, PROMPTS[0], 4, seed=1)
    b = bert_model.predict_with_uncertainty(image, PROMPTS[0], 4, seed=1, batch_samples=2)
    c = bert_model.predict_with_uncertainty(image, PROMPTS[0], 4, seed=2)
    torch.manual_seed(0)
    d = bert_model.predict_with_uncertainty(image, PROMPTS[0], 4, generator=_gen(1))
    assert a.mean.shape == (1, 40, 56)
    torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=0)
    assert torch.equal(a.entropy, bert_model.predict_with_uncertainty(image, PROMPTS[0], 4,
                                                                      seed=1).entropy)  # fmt: skip
    assert (a.mean - c.mean).abs().max() > 1e-5
    assert torch.equal(a.mean, d.mean)  # seed=s is generator=Generator().manual_seed(s)


def test_mc_result_of_an_image_and_prompt_ignores_the_rest_of_the_call(bert_model):
    """A seeded map depends on the image's position and the prompt's, not on batch_size, nor on the
    images and prompts after them (the noise of all rows used to come from one stream)."""
    a, b = _images()
    run = lambda *args, **kw: bert_model.predict_with_uncertainty(*args, 4, seed=3, **kw)  # noqa: E731
    alone = run(a, PROMPTS[0])
    with_more = run([a, b], PROMPTS[:2])
    small_batches = run([a, b], PROMPTS[:2], batch_size=1)
    torch.testing.assert_close(with_more.mean[0][:1], alone.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_more.entropy[0][:1], alone.entropy, atol=1e-6, rtol=0)
    for j in range(2):
        torch.testing.assert_close(small_batches.mean[j], with_more.mean[j], atol=1e-6, rtol=0)
    # prompts and positions still get their own noise: not the same map copied around
    assert (with_more.mean[0][0] - with_more.mean[0][1]).abs().max() > 1e-4
    swapped = run([b, a], PROMPTS[:2])
    assert (swapped.mean[1] - with_more.mean[0]).abs().max() > 1e-5


def test_forward_takes_one_generator_per_row(bert_model):
    pixels, _ = bert_model.preprocess(_images())
    gens = lambda: [_gen(7), _gen(8)]  # noqa: E731
    with torch.no_grad():
        both = bert_model(pixels, PROMPTS[0], generator=gens()).logits
        alone = [bert_model(pixels[i : i + 1], PROMPTS[0], generator=g).logits
                 for i, g in enumerate(gens())]  # fmt: skip
        torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"copies \* B \* C = 1 \* 2 \* 1 generators"):
            bert_model(pixels, PROMPTS[0], generator=[_gen(7)])


def test_entropy_decomposition(bert_model):
    got = bert_model.predict_with_uncertainty(_images(), PROMPTS[:2], 6, seed=5)
    for j in range(2):
        total, ale, epi = got.entropy[j], got.aleatoric[j], got.epistemic[j]
        assert (ale >= 0).all() and (epi >= 0).all() and (total <= math.log(2) + 1e-6).all()
        torch.testing.assert_close(total, ale + epi, atol=1e-6, rtol=0)
        assert ((got.mean[j] >= 0) & (got.mean[j] <= 1)).all() and (got.variance[j] >= 0).all()
    paired = [[PROMPTS[0]], [PROMPTS[1]]]  # one prompt per image
    off = bert_model.predict_with_uncertainty(_images(), paired, 6, seed=5, sample=False)
    assert off.samples == 1
    for j in range(2):
        assert torch.equal(off.epistemic[j], torch.zeros_like(off.epistemic[j]))
        assert torch.equal(off.variance[j], torch.zeros_like(off.variance[j]))
        torch.testing.assert_close(off.entropy[j], off.aleatoric[j], atol=1e-6, rtol=0)
    # the deterministic pass is the value-mean forward at the original size
    pixels, _ = bert_model.preprocess(_images()[1:])
    with torch.no_grad():
        det = torch.sigmoid(bert_model(pixels, PROMPTS[1], sample=False).logits[0])
    torch.testing.assert_close(off.mean[1], det, atol=1e-6, rtol=0)


def test_mc_shares_the_prefix_and_batches_samples(bert_model, monkeypatch):
    calls = {"embed": 0, "copies": []}
    embed = bert_model.vision_tower.embed
    forward = bert_model.forward_from_prefix

    def counting_embed(*args, **kwargs):
        calls["embed"] += 1
        return embed(*args, **kwargs)

    def counting_forward(prefix, **kwargs):
        out = forward(prefix, **kwargs)
        calls["copies"].append(out.logits.shape[0] // prefix.index.shape[0])
        return out

    monkeypatch.setattr(bert_model.vision_tower, "embed", counting_embed)
    monkeypatch.setattr(bert_model, "forward_from_prefix", counting_forward)
    bert_model.predict_with_uncertainty(_images(), PROMPTS[0], 7, batch_samples=3, seed=0)
    assert calls == {"embed": 1, "copies": [3, 3, 1]}


def test_mc_bad_arguments(bert_model):
    image = _images()[0]
    for kwargs, match in (
        (dict(samples=0), "samples must be a positive int"),
        (dict(samples=2, batch_samples=0), "batch_samples must be a positive int"),
        (dict(samples=2, seed=1, generator=_gen(1)), "seed or generator"),
    ):
        with pytest.raises(ValueError, match=match):
            bert_model.predict_with_uncertainty(image, PROMPTS[0], **kwargs)
    with pytest.raises(ValueError, match="prompts must not be an empty list"):
        bert_model.predict_with_uncertainty(image, [], 2)
    with pytest.raises(ValueError, match="images must hold at least one image"):
        bert_model.predict_with_uncertainty([], PROMPTS[0], 2)


# ---------------------------------------------------------------------- released checkpoints
def _released_keys(num_adapters: int, dv: int, dt: int, ds: int, e: int) -> dict[str, tuple]:
    """Names and shapes of the trainable part of the released ``CustomCLIP``, written from the
    official module structure (``HealthX-Lab/MedCLIPSeg``, ``trainers/layers.py``): ``PVL_Adapter``
    keeps its vision down-projection in ``nn.Sequential(nn.Linear(..., bias=False))`` -- hence
    ``proj_vis_down.0.weight`` -- and the other three projections as plain bias-free ``nn.Linear``."""
    keys: dict[str, tuple] = {}
    for n in range(num_adapters):
        p = f"pvl_adapters.{n}."
        keys.update({p + "proj_vis_down.0.weight": (ds, dv), p + "proj_txt_down.weight": (ds, dt),
                     p + "proj_vis_up.weight": (dv, ds), p + "proj_txt_up.weight": (dt, ds)})  # fmt: skip
        for direction in ("img_to_txt", "txt_to_img"):
            q = f"{p}two_way.cross_attn_{direction}."
            keys.update({
                q + "q_proj.weight": (ds, ds), q + "q_proj.bias": (ds,),
                q + "k_proj.weight": (2 * ds, ds), q + "k_proj.bias": (2 * ds,),
                q + "v_proj.weight": (2 * ds, ds), q + "v_proj.bias": (2 * ds,),
                q + "out_proj.weight": (ds, ds), q + "out_proj.bias": (ds,),
                q + "norm_k.weight": (ds,), q + "norm_k.bias": (ds,),
                q + "norm_v.weight": (ds,), q + "norm_v.bias": (ds,), q + "gate": (),
            })  # fmt: skip
    for i in (0, 2, 4):
        keys.update({f"mask_head.{i}.weight": (e, e), f"mask_head.{i}.bias": (e,)})
    for i in (0, 1):
        keys.update({f"upscale.{i}.conv1.weight": (e, e, 2, 2), f"upscale.{i}.conv1.bias": (e,),
                     f"upscale.{i}.conv2.weight": (e, 1, 3, 3), f"upscale.{i}.norm.weight": (e,),
                     f"upscale.{i}.norm.bias": (e,)})  # fmt: skip
    return keys


class _ReleasedLike(nn.Module):
    """The backbone part of the official ``CustomCLIP`` (UniMedCLIP open_clip ViT + HF BERT)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(
            image_size=32, patch_size=8, width=WIDTH, layers=DEPTH, heads=2, mlp_ratio=4.0,
            output_dim=EMBED, act_layer=QuickGELU,
        )  # fmt: skip
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32,
        )  # fmt: skip
        # built from a config, so BERT keeps its (unused) pooler, as a released file may
        self.text_model = HFTextEncoder(
            "bert", output_dim=EMBED, config=config, proj_type="mlp",
            pooler_type="cls_last_hidden_state_pooler",
        )  # fmt: skip
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


@pytest.fixture(scope="module")
def released(vocab, tmp_path_factory):
    torch.manual_seed(7)
    upstream = _ReleasedLike(vocab).eval()
    _jitter(upstream, 7)
    g = _gen(7)
    state = dict(upstream.state_dict())
    for key, shape in _released_keys(2, WIDTH, WIDTH, DS, EMBED).items():
        scale = 0.3 if len(shape) > 1 else 0.2
        value = scale * torch.randn(shape, generator=g)
        if key.endswith(("norm_k.weight", "norm_v.weight", "norm.weight")):
            value += 1.0
        state[key] = value
    path = tmp_path_factory.mktemp("released") / "MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
    torch.save(
        {
            "model": state,
            "epoch": 99,
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
            "scheduler": {"T_max": 100, "eta_min": 1e-4, "base_lrs": [3e-4], "last_epoch": 100},
            "best_loss": float("inf"),
        },
        path,
    )  # fmt: skip
    return upstream, state, path


def _released_config(vocab: int, **overrides) -> dict:
    return MedCLIPSeg.released_config(
        backbone=_bert_backbone(vocab), layers=[1, 2], adapter_dim=DS, context_length=CTX,
        image_size=[32, 32], tokenizer=None, **overrides,
    )  # fmt: skip


def _released_forward(upstream, state, pixels, ids, *, layers=(1, 2), beta=2.35):
    """The official forward (``encode_text_image`` + ``compute_seg_logits``) with deterministic
    values, from the upstream backbone modules and the raw adapter / head tensors."""
    vis, txt = upstream.vision_model, upstream.text_model
    mask = (ids != 0).long()
    x_txt = txt.transformer.embeddings(
        inputs_embeds=txt.transformer.embeddings.word_embeddings(ids)
    )
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    x = vis.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(x.shape[0], 1, -1), x], 1) + vis.positional_embedding
    x_img = vis.ln_pre(x)

    def lin(name, z):
        w, b = state[name + ".weight"], state.get(name + ".bias")
        return z @ w.T + (0 if b is None else b)

    def attn(prefix, q_in, ctx):
        d = q_in.shape[-1]
        q = lin(prefix + "q_proj", q_in)
        k_mu, k_raw = lin(prefix + "k_proj", ctx).chunk(2, -1)
        v_mu, _ = lin(prefix + "v_proj", ctx).chunk(2, -1)
        k_mu = F.layer_norm(
            k_mu, (d,), state[prefix + "norm_k.weight"], state[prefix + "norm_k.bias"]
        )
        v_mu = F.layer_norm(
            v_mu, (d,), state[prefix + "norm_v.weight"], state[prefix + "norm_v.bias"]
        )
        k_var = F.softplus(k_raw) + 1e-6
        s = q @ k_mu.transpose(1, 2) / math.sqrt(d)
        s = s - beta * torch.sqrt((q * q) @ k_var.transpose(1, 2) / d)
        o = lin(prefix + "out_proj", torch.softmax(s, -1) @ v_mu)
        g = torch.sigmoid(state[prefix + "gate"])
        return g * o + (1 - g) * q_in

    for i, (block, layer) in enumerate(
        zip(vis.transformer.resblocks, txt.transformer.encoder.layer)
    ):
        if i in layers:
            p = f"pvl_adapters.{layers.index(i)}."
            v = x_img @ state[p + "proj_vis_down.0.weight"].T
            t = x_txt @ state[p + "proj_txt_down.weight"].T
            v = attn(p + "two_way.cross_attn_img_to_txt.", v, t)
            t = attn(p + "two_way.cross_attn_txt_to_img.", t, v)
            x_img = x_img + v @ state[p + "proj_vis_up.weight"].T
            x_txt = x_txt + t @ state[p + "proj_txt_up.weight"].T
        x_img = (
            block(x_img.transpose(0, 1)).transpose(0, 1)
            if not vis.transformer.batch_first
            else block(x_img)
        )
        out = layer(x_txt, attention_mask=ext)
        x_txt = out[0] if isinstance(out, tuple) else out
    feats = vis.ln_post(x_img) @ vis.proj
    text = txt.proj(x_txt[:, 0])
    text = text / text.norm(dim=-1, keepdim=True)
    seg = feats[:, 1:] / feats[:, 1:].norm(dim=-1, keepdim=True)
    h = pixels.shape[-1] // 8
    y = seg.reshape(seg.shape[0], h, h, -1).permute(0, 3, 1, 2)
    for i in (0, 1):
        p = f"upscale.{i}."
        y = F.conv_transpose2d(y, state[p + "conv1.weight"], state[p + "conv1.bias"], stride=2)
        y = F.conv2d(F.gelu(y), state[p + "conv2.weight"], padding=1, groups=y.shape[1])
        y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), state[p + "norm.weight"],
                         state[p + "norm.bias"], eps=1e-6).permute(0, 3, 1, 2)  # fmt: skip
    phi = lin("mask_head.4", F.gelu(lin("mask_head.2", F.gelu(lin("mask_head.0", text)))))
    logits = torch.einsum("bqc,bchw->bqhw", phi[:, None], y)
    return F.interpolate(logits, pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def test_from_released_matches_the_official_forward(released, vocab):
    upstream, state, path = released
    model = MedCLIPSeg.from_released(path, config=_released_config(vocab))
    assert not model.training and model.channel_order == "BGR"
    ours = model.state_dict()
    assert len(ours) == len(state) - 3  # logit_scale and BERT's pooler (weight, bias) dropped
    for key in ("vision_model.transformer.resblocks.1.attn.in_proj_weight",
                "text_model.proj.2.weight", "pvl_adapters.1.two_way.cross_attn_txt_to_img.gate",
                "mask_head.4.bias", "upscale.1.norm.weight"):  # fmt: skip
        new = key
        for old, prefix in (("vision_model.", "vision_tower.visual."), ("text_model.",
                            "text_tower.text."), ("mask_head.", "head.mask_head."),
                            ("upscale.", "head.upscale.")):  # fmt: skip
            new = new.replace(old, prefix, 1) if new.startswith(old) else new
        assert torch.equal(ours[new], state[key]), key
    ids = torch.randint(5, vocab, (2, CTX), generator=_gen(3))
    ids[:, 0], ids[0, 9], ids[1, 14] = 2, 3, 3  # [CLS] ... [SEP]
    ids[0, 10:], ids[1, 15:] = 0, 0  # [PAD]
    pixels = _pixels(2, seed=12)
    with torch.no_grad():
        ours = model(pixels, input_ids=ids, attention_mask=(ids != 0).long(), sample=False)
        ref = _released_forward(upstream, state, pixels, ids)
    torch.testing.assert_close(ours.logits[:, 0], ref, atol=1e-4, rtol=0)
    assert ref.abs().max() > 0.05  # a real map, not zeros


def test_from_released_bad_files(released, vocab, tmp_path):
    _, state, path = released
    config = _released_config(vocab)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="weights_only"):
        MedCLIPSeg.from_released(corrupt, config=config)
    missing = dict(state)
    missing.pop("pvl_adapters.1.proj_txt_up.weight")
    unknown = {**state, "prompt_learner.ctx": torch.zeros(3)}
    reshaped = {**state, "mask_head.0.bias": torch.zeros(EMBED + 1)}
    for bad, match in ((missing, "missing keys: pvl_adapters.1.proj_txt_up.weight"),
                       (unknown, "unexpected keys: prompt_learner.ctx"),
                       (reshaped, "head.mask_head.0.bias")):  # fmt: skip
        file = tmp_path / "bad.pth"
        torch.save({"model": bad}, file)
        with pytest.raises(CheckpointError, match=match):
            MedCLIPSeg.from_released(file, config=config)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no MedCLIPSeg state dict"):
        load_released_state_dict(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_released_state_dict(tmp_path / "nope.pth")
    # a flat state dict (e.g. extracted with torch.save(ckpt["model"])) loads too
    torch.save(state, tmp_path / "flat.pth")
    MedCLIPSeg.from_released(tmp_path / "flat.pth", config=config)
    with pytest.raises(ValueError, match="pass filename"):
        MedCLIPSeg.from_released(tmp_path, config=config)
    with pytest.raises(ValueError, match="released key map covers the UniMedCLIP model"):
        MedCLIPSeg.from_released(path, config={**config, "backbone": create_model(
            "medclipseg-tiny").config["backbone"]})  # fmt: skip
    assert released_checkpoint_name("BUSI") == (
        "BUSI/trained_models/seed666/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
    )
    assert released_checkpoint_name("Kvasir", percentage=10).startswith("Kvasir_10/")


def _full_size_released_backbone_keys() -> dict[str, tuple]:
    """The frozen part of the released UniMedCLIP ViT-B/16 + BiomedBERT ``CustomCLIP`` state dict,
    from the official module structure: open_clip's ``VisualTransformer`` (QuickGELU, width 768,
    12 blocks, patch 16, 224 px, ``proj`` 768 x 512; 8 + 12 x 12 = 152 keys) and open_clip's
    ``HFTextEncoder`` over BiomedBERT-base built with ``add_pooling_layer=False`` (no pooler; the
    pinned transformers 4.56 keeps ``position_ids`` / ``token_type_ids`` non-persistent): 5
    embedding keys, 16 per layer x 12, and the bias-free MLP projection 768 -> 640 -> 512 (199 keys),
    plus ``logit_scale``."""
    keys: dict[str, tuple] = {
        "logit_scale": (),
        "vision_model.conv1.weight": (768, 3, 16, 16),
        "vision_model.class_embedding": (768,),
        "vision_model.positional_embedding": (197, 768),
        "vision_model.ln_pre.weight": (768,), "vision_model.ln_pre.bias": (768,),
        "vision_model.ln_post.weight": (768,), "vision_model.ln_post.bias": (768,),
        "vision_model.proj": (768, 512),
    }  # fmt: skip
    for i in range(12):
        p = f"vision_model.transformer.resblocks.{i}."
        keys.update({
            p + "attn.in_proj_weight": (2304, 768), p + "attn.in_proj_bias": (2304,),
            p + "attn.out_proj.weight": (768, 768), p + "attn.out_proj.bias": (768,),
            p + "ln_1.weight": (768,), p + "ln_1.bias": (768,),
            p + "mlp.c_fc.weight": (3072, 768), p + "mlp.c_fc.bias": (3072,),
            p + "mlp.c_proj.weight": (768, 3072), p + "mlp.c_proj.bias": (768,),
            p + "ln_2.weight": (768,), p + "ln_2.bias": (768,),
        })  # fmt: skip
    e = "text_model.transformer.embeddings."
    keys.update({e + "word_embeddings.weight": (30522, 768),
                 e + "position_embeddings.weight": (512, 768),
                 e + "token_type_embeddings.weight": (2, 768),
                 e + "LayerNorm.weight": (768,), e + "LayerNorm.bias": (768,)})  # fmt: skip
    for i in range(12):
        p = f"text_model.transformer.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            keys.update({f"{p}attention.self.{name}.weight": (768, 768),
                         f"{p}attention.self.{name}.bias": (768,)})  # fmt: skip
        keys.update({
            p + "attention.output.dense.weight": (768, 768), p + "attention.output.dense.bias": (768,),
            p + "attention.output.LayerNorm.weight": (768,),
            p + "attention.output.LayerNorm.bias": (768,),
            p + "intermediate.dense.weight": (3072, 768), p + "intermediate.dense.bias": (3072,),
            p + "output.dense.weight": (768, 3072), p + "output.dense.bias": (768,),
            p + "output.LayerNorm.weight": (768,), p + "output.LayerNorm.bias": (768,),
        })  # fmt: skip
    keys.update({"text_model.proj.0.weight": (640, 768), "text_model.proj.2.weight": (512, 640)})
    return keys


def test_full_size_released_checkpoint_keys_are_all_consumed():
    released = {**_full_size_released_backbone_keys(), **_released_keys(10, 768, 768, 256, 512)}
    assert len(released) == 668  # the full-size released state dict
    with torch.device("meta"):  # no weights allocated: names and shapes only
        model = MedCLIPSeg(**MedCLIPSeg.released_config(tokenizer=None))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = convert_released_state_dict(
        {k: torch.empty(shape, device="meta") for k, shape in released.items()}
    )
    # logit_scale is the only key legitimately dropped; every other one lands on a model tensor
    assert len(converted) == 667 and set(converted) == set(ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs(bert_model, vocab):
    x = _pixels(2)
    cases = (
        (lambda: bert_model(x[0], PROMPTS[0]), r"pixel_values must have shape \(B, 3, H, W\)"),
        (lambda: bert_model(_pixels(2, size=36), PROMPTS[0]), "multiples of patch_size=8"),
        (lambda: bert_model(x, []), "prompts must not be an empty list"),
        (lambda: bert_model(x, [["a"], ["b", "c"]]), "nested prompts must be B=2 lists"),
        (lambda: bert_model(x, [1, 2]), "prompts must be a string"),
        (lambda: bert_model(x), "exactly one of prompts or input_ids"),
        (lambda: bert_model(x, "a", input_ids=torch.ones(1, 4, dtype=torch.long)),
         "exactly one of prompts or input_ids"),
        (lambda: bert_model(x, input_ids=torch.ones(4, dtype=torch.long)),
         r"input_ids must be a \(T, L\) tensor"),
        (lambda: bert_model(x, input_ids=torch.ones(2, 4, dtype=torch.long),
                            attention_mask=torch.ones(2, 5)), r"attention_mask must have the shape"),
        (lambda: bert_model.forward_from_prefix(bert_model.encode_prefix(x, "a"), copies=0),
         "copies must be a positive int"),
    )  # fmt: skip
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    backbone = _bert_backbone(vocab)
    bad_configs = (
        (dict(backbone={**backbone, "kind": "timm"}), "backbone\\['kind'\\]"),
        (dict(backbone={**backbone, "text_cfg": {}}), "exactly one of 'text_cfg' and 'bert_config'"),
        (dict(backbone={**backbone, "extra": 1}), "unknown keys \\['extra'\\]"),
        (dict(backbone={**backbone, "vision_cfg": {**backbone["vision_cfg"], "layers": 3}}),
         "same depth"),
        (dict(backbone=backbone, layers=[1, 4]), r"layers must be block indices in \[0, 4\)"),
        (dict(backbone=backbone, text_padding="none"), "text_padding must be"),
        (dict(backbone=backbone, channel_order="RBG"), "channel_order must be"),
        (dict(backbone=backbone, context_length=64), r"context_length must be in \[2, 32\]"),
        (dict(backbone=backbone, adapter_dim=0), "adapter_dim must be a positive int"),
        (dict(backbone={**backbone, "vision_cfg": {"timm_model_name": "test_vit",
                                                   "timm_model_pretrained": True}}),
         "timm_model_pretrained must be false"),
        (dict(backbone={"kind": "open_clip", "embed_dim": 16, "vision_cfg": {}, "bert_config": {},
                        "oops": object()}), r"unknown keys \['oops'\]"),
    )  # fmt: skip
    for kwargs, match in bad_configs:
        with pytest.raises(ValueError, match=match):
            MedCLIPSeg(**kwargs)
    with pytest.raises(ValueError, match="must be a dict spec"):
        create_towers("open_clip")


def test_bgr_channel_order(tok_dir, vocab):
    model = _bert_model(tok_dir, vocab, channel_order="BGR", image_mean=(0.1, 0.2, 0.3),
                        image_std=(0.5, 0.25, 0.2))  # fmt: skip
    x = torch.rand(1, 3, 4, 4, generator=_gen(0))
    mean = torch.tensor([0.1, 0.2, 0.3])[:, None, None]
    std = torch.tensor([0.5, 0.25, 0.2])[:, None, None]
    torch.testing.assert_close(model.normalize(x), (x.flip(1) - mean) / std, atol=0, rtol=0)


def test_mc_pairing_across_image_chunks(bert_model):
    g = torch.Generator().manual_seed(13)
    images = [torch.rand(3, 32, 32, generator=g) for _ in range(3)]
    # 2 prompts for 3 images: every image gets both prompts, even in a chunk of 2 images
    out = bert_model.predict_with_uncertainty(images, PROMPTS[:2], 2, batch_size=2, sample=False)
    assert [m.shape[0] for m in out.mean] == [2, 2, 2]
    per_image = [[p] for p in PROMPTS]  # one list of prompts per image
    paired = bert_model.predict_with_uncertainty(images, per_image, 2, batch_size=2, sample=False)
    assert [m.shape[0] for m in paired.mean] == [1, 1, 1]
    pixels, _ = bert_model.preprocess(images)
    with torch.no_grad():
        ref = torch.sigmoid(bert_model(pixels, PROMPTS[:2], sample=False).logits)
        ref_paired = torch.sigmoid(bert_model(pixels, PROMPTS, sample=False).logits)
    for j in range(3):
        torch.testing.assert_close(out.mean[j], ref[j], atol=1e-6, rtol=0)
        torch.testing.assert_close(paired.mean[j], ref_paired[j], atol=1e-6, rtol=0)


def test_uncertainty_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "medclipseg_uncertainty.py"
    spec = importlib.util.spec_from_file_location("medclipseg_uncertainty", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__.strip()
    args = ["--steps", "2", "--train-size", "8", "--samples", "3", "--images", "2"]
    result = module.main([*args, "--out", str(tmp_path)])
    assert 0.0 <= result["dice"] <= 1.0 and math.isfinite(result["loss"])
    from PIL import Image

    for p in result["paths"]:
        with Image.open(p) as im:
            assert im.size[0] > 6 * 64 and im.size[1] == 64 + 18  # six tiles and a caption


@pytest.mark.parametrize("key_mask", [False, True])
def test_batched_noise_streams_equal_single_module_calls(bert_model, tiny, key_mask):
    # several generators: one batched adapter call whose chunk s draws generator s's noise; it must
    # equal running the unchanged PVLAdapter module once per chunk with that generator
    model, size = (tiny, 64) if key_mask else (bert_model, 32)
    x = _pixels(2, size=size, seed=14)
    gens = [_gen(s) for s in (3, 4, 5)]
    with torch.no_grad():
        prefix = model.encode_prefix(x, PROMPTS[:2])
        assert (prefix.text_key_mask is not None) == key_mask
        batched = model.forward_from_prefix(prefix, generators=gens).logits
        singles = [model(x, PROMPTS[:2], generator=_gen(s)).logits for s in (3, 4, 5)]
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=0)
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the copies really differ
