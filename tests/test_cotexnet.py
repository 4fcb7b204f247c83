"""CoTexNet: every module against a plain re-statement of the paper's equations / the release.

References (never the modules under test): He et al., "Learning Conceptual Text Prompts from Visual
Regions of Interest for Medical Image Segmentation" (eqs. 1, 3, 8-12, 15) and the released code
(github.com/Rango-bit/CoTexNet: ``ImgToText``, ``Img2text_module``, ``CLIPseg_pse.forward``,
``KLDiv``, MONAI ``DiceCELoss`` defaults), as summarised in shared/specs/cotexnet.md.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vlsegkit
from vlsegkit import CoTexNet, CoTexNetTask, create_model
from vlsegkit.adapters import ROIPseudoTokens, ROISlots
from vlsegkit.data import (
    AttributeExtractor,
    CachedDataset,
    ConceptualPrompts,
    ImageMaskPromptDataset,
    MaskAttributeExtractor,
    SyntheticLesions,
    collate_prompts,
    conceptual_prompt,
    write_prompt_cache,
)
from vlsegkit.encoders import RunContext
from vlsegkit.layers import SANKD, CLSEmbeddingPredictor, MappingModule, sankd_kl_divergence
from vlsegkit.losses import CoTexNetLoss
from vlsegkit.metrics import pixel_accuracy, soft_dice_score
from vlsegkit.models.cotexnet_task import (
    COTEXNET_RECIPES,
    DelayedEarlyStopping,
    RandomResizeCrop,
)
from vlsegkit.train import evaluate, fit

EXAMPLE = "1 oval large red polyp area, located in the top left of the image."  # paper, §3.1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("cotexnet-tiny").eval()
    with torch.no_grad():  # away from the default init so that mapping bugs show
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return m


def _batch(m, b=2, seed=0, classes=1):
    ds = SyntheticLesions(length=b, image_size=m.image_size, seed=seed, mean=m.image_mean,
                          std=m.image_std)  # fmt: skip
    items = ConceptualPrompts(ds, keyword="lesion", mean=m.image_mean, std=m.image_std)
    batch = collate_prompts([items[i] for i in range(b)])
    if classes > 1:  # split the lesions into classes: left half / right half of the image
        mask = batch["mask"]
        w = mask.shape[-1]
        left, right = mask.clone(), mask.clone()
        left[..., w // 2 :] = 0
        right[..., : w // 2] = 0
        batch["mask"] = torch.cat([left, right], 1)
    return batch


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


# --------------------------------------------------------------------------- conceptual prompts
def test_conceptual_prompt_is_the_papers_template():
    attrs = {"number": "1", "shape": "oval", "size": "large", "color": "red",
             "location": "top left"}  # fmt: skip
    assert conceptual_prompt(attrs, "polyp") == EXAMPLE
    with pytest.raises(ValueError, match="location"):
        conceptual_prompt({k: v for k, v in attrs.items() if k != "location"}, "polyp")
    with pytest.raises(ValueError, match="keyword"):
        conceptual_prompt(attrs, " ")


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_mask_attribute_extractor_measures_the_five_concepts():
    h = w = 100
    mask = _disk(h, w, 15, 15, 10)  # top-left cell, area ~ 0.031 of the image -> small
    image = np.zeros((3, h, w), np.float32)
    image[0, mask] = 0.8
    image[1, mask] = image[2, mask] = 0.1  # red
    extractor = MaskAttributeExtractor()
    assert isinstance(extractor, AttributeExtractor)
    attrs = extractor(torch.from_numpy(image), torch.from_numpy(mask))
    assert attrs == {"number": "1", "shape": "round", "size": "small", "color": "red",
                     "location": "top left"}  # fmt: skip
    two = mask | _disk(h, w, 68, 50, 31)  # a second component, 0.30 of the image, bottom centre
    attrs = extractor(torch.from_numpy(image), torch.from_numpy(two))
    assert attrs["number"] == "2" and attrs["size"] == "large" and attrs["location"] == "bottom"
    empty = extractor(torch.from_numpy(image), torch.zeros(h, w))
    assert empty["number"] == "0"


def test_a_custom_extractor_plugs_in_and_prompts_are_cached_as_annotation_json(tmp_path):
    calls = []

    def llava_like(image, mask):  # any callable (image, mask) -> concepts
        calls.append(tuple(mask.shape))
        return {"number": "1", "shape": "oval", "size": "large", "color": "red",
                "location": "top left"}  # fmt: skip

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    entries = []
    for i in range(2):
        img = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
        mask = _disk(32, 32, 10, 10, 6).astype(np.uint8) * 255
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
        entries.append({"img_name": f"{i}.png", "mask_name": f"{i}.png",
                        "image": torch.from_numpy(img).permute(2, 0, 1) / 255,
                        "mask": torch.from_numpy(mask > 0)})  # fmt: skip
    path = tmp_path / "anns" / "train.json"
    write_prompt_cache(entries, path, keyword="polyp", extractor=llava_like)
    assert len(calls) == 2
    records = json.loads(path.read_text())
    assert records[0]["prompts"] == {"cotexnet": EXAMPLE}
    ds = ImageMaskPromptDataset.from_json(path, prompt_key="cotexnet", image_size=32)
    assert ds[1]["prompt"] == EXAMPLE  # the dataset reads the cached prompts back
    wrapped = ConceptualPrompts(ds, keyword="polyp", extractor=llava_like)
    assert wrapped[0]["prompt"] == EXAMPLE


# --------------------------------------------------------------------------- modules
def test_mapping_module_is_linear_gelu_linear_layernorm():
    torch.manual_seed(0)
    m = MappingModule(12, 10, 8)
    with torch.no_grad():
        m[3].weight.normal_()
        m[3].bias.normal_()
    x = torch.randn(5, 12)
    h = _gelu(x @ m[0].weight.T + m[0].bias) @ m[2].weight.T + m[2].bias
    ref = _layer_norm(h, m[3].weight, m[3].bias, m[3].eps)
    assert (m(x) - ref).abs().max() < 1e-5
    # the paper's 768 -> 512 -> 512 module has the parameter count of the release's mapping_module
    assert sum(p.numel() for p in MappingModule(768, 512, 512).parameters()) == 657_408


def test_cls_predictor_paper_and_released_variants():
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    paper = CLSEmbeddingPredictor(12, 8)
    m = paper.mlp
    ref = torch.sigmoid(_layer_norm(_gelu(x @ m[0].weight.T + m[0].bias) @ m[2].weight.T + m[2].bias,
                                    m[3].weight, m[3].bias, m[3].eps))  # fmt: skip
    assert (paper(x) - ref).abs().max() < 1e-6
    released = CLSEmbeddingPredictor(12, 8, variant="released", double_sigmoid=True)
    lin = [mod for mod in released.modules() if isinstance(mod, torch.nn.Linear)]
    assert [tuple(li.weight.shape) for li in lin] == [(12, 12), (12, 12), (8, 12)]
    h = torch.relu(x @ lin[0].weight.T + lin[0].bias)
    h = torch.relu(h @ lin[1].weight.T + lin[1].bias)
    ref = torch.sigmoid(torch.sigmoid(h @ lin[2].weight.T + lin[2].bias))
    out = released(x)
    assert (out - ref).abs().max() < 1e-6
    assert out.min() > 0.5 and out.max() < 0.7311  # the double sigmoid's range
    # the release's Img2text_module (768 -> 768 -> 768 -> 512) parameter count
    full = CLSEmbeddingPredictor(768, 512, variant="released")
    assert sum(p.numel() for p in full.parameters()) == 1_574_912


def test_sankd_conditioning_restates_eqs_9_to_12():
    torch.manual_seed(0)
    t_e, t_c = torch.randn(3, 6), torch.rand(3, 6)
    sankd = SANKD(dropout=0.2).eval()
    init = [float(p.detach()) for p in (sankd.alpha, sankd.scale, sankd.shift)]
    assert init == pytest.approx([0.2, 1.0, -0.002])
    with torch.no_grad():
        sankd.alpha.fill_(0.3)
        sankd.scale.fill_(1.5)
        sankd.shift.fill_(-0.1)
    mix = 0.7 * torch.sigmoid(t_e) + 0.3 * t_c
    assert (sankd("mixture", t_c, t_e) - (mix * 1.5 - 0.1)).abs().max() < 1e-6
    assert (sankd("image", t_c) - (t_c * 1.5 - 0.1)).abs().max() < 1e-6
    assert (sankd("text", t_c, t_e) - (torch.sigmoid(t_e) * 1.5 - 0.1)).abs().max() < 1e-6
    literal = SANKD(alpha=0.3, scale=1.5, shift=-0.1, outer_sigmoid=True).eval()
    ref = torch.sigmoid(0.7 * t_e + 0.3 * t_c) * 1.5 - 0.1
    assert (literal("mixture", t_c, t_e) - ref).abs().max() < 1e-6
    # dropout 0.2 on T^ in training: kept entries scaled by 1 / 0.8, the rest zero
    sankd.train()
    out = sankd("mixture", t_c, t_e)
    kept = out != 0
    assert 0 < int((~kept).sum()) < out.numel()
    assert (out[kept] - ((mix * 1.5 - 0.1) / 0.8)[kept]).abs().max() < 1e-5
    assert torch.equal(sankd("image", t_c), t_c * 1.5 - 0.1)  # no dropout at test time
    with pytest.raises(ValueError, match="text embedding"):
        sankd("mixture", t_c)
    with pytest.raises(ValueError, match="dropout"):
        SANKD(dropout=1.0)


def test_kl_divergence_is_the_releases_batchmean_kl_with_a_detached_teacher():
    torch.manual_seed(0)
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    q = torch.exp(teacher) / torch.exp(teacher).sum(1, keepdim=True)
    p = torch.exp(student) / torch.exp(student).sum(1, keepdim=True)
    ref = (q * (torch.log(q) - torch.log(p))).sum(1).mean()
    loss = sankd_kl_divergence(student, teacher)
    assert (loss - ref).abs() < 1e-6
    tau = 2.0
    q2, p2 = torch.softmax(teacher / tau, 1), torch.softmax(student / tau, 1)
    ref2 = (q2 * (q2.log() - p2.log())).sum(1).mean() * tau**2
    assert (sankd_kl_divergence(student, teacher, temperature=tau) - ref2).abs() < 1e-6
    loss.backward()
    assert student.grad is not None and teacher.grad is None  # stopgrad on the teacher
    with pytest.raises(ValueError, match="student and teacher"):
        sankd_kl_divergence(student, teacher[:, :3])


def _dice_ref(p, g, eps=1e-5):
    out = []
    for b in range(p.shape[0]):
        for c in range(p.shape[1]):
            pi, gi = p[b, c].flatten(), g[b, c].flatten()
            out.append(1 - (2 * (pi * gi).sum() + eps) / (pi.sum() + gi.sum() + eps))
    return torch.stack(out).mean()


def _output(logits, k=None):
    te, tc = torch.rand(logits.shape[0], 5), torch.rand(logits.shape[0], 5)
    return vlsegkit.CoTexNetOutput(logits=logits, text_embedding=te, predicted_embedding=tc)


def test_loss_binary_dice_ce_and_kl_terms():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    g = (torch.rand(3, 1, 8, 8) > 0.6).float()
    out = _output(logits)
    terms = CoTexNetLoss(kl_weight=10.0).terms(out, g)
    p = torch.sigmoid(logits)
    dice = _dice_ref(p, g)
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()
    kl = sankd_kl_divergence(out.predicted_embedding, out.text_embedding)
    assert (terms["dice_loss"] - dice).abs() < 1e-5 and (terms["ce_loss"] - bce).abs() < 1e-5
    assert (terms["kl_loss"] - kl).abs() < 1e-7
    assert (terms["loss"] - (dice + bce + 10 * kl)).abs() < 1e-5
    # the release's BCE saw sigmoid probabilities: BCE(sigmoid(p), g)
    released = CoTexNetLoss(released_double_sigmoid=True).terms(out, g)
    q = torch.sigmoid(p)
    assert (released["ce_loss"] - (-(g * q.log() + (1 - g) * (1 - q).log()).mean())).abs() < 1e-5


def test_loss_multiclass_softmax_dice_and_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    labels = torch.randint(0, 3, (2, 6, 6))
    masks = torch.stack([(labels == 1), (labels == 2)], 1).float()  # (B, K=2, H, W)
    terms = CoTexNetLoss().terms(_output(logits), masks)
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    onehot = torch.stack([(labels == c) for c in range(3)], 1).float()
    assert (terms["dice_loss"] - _dice_ref(p, onehot)).abs() < 1e-5
    ce = -(onehot * torch.log(p)).sum(1).mean()
    assert (terms["ce_loss"] - ce).abs() < 1e-5
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        CoTexNetLoss().terms(_output(logits), masks[:, :1])


def test_soft_dice_and_pixel_accuracy_metrics():
    p = torch.tensor([[[[0.9, 0.2], [0.6, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    g = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_score(p, g).tolist() == pytest.approx([2 * 1.5 / (1.7 + 2), 1.0])
    assert pixel_accuracy(p, g).tolist() == pytest.approx([1.0, 1.0])
    assert pixel_accuracy(p, 1 - g).tolist() == pytest.approx([0.0, 0.0])


# --------------------------------------------------------------------------- the ROI hook
def _text_state(m, texts, context=None):
    batch = m.tokenizer(texts)
    return batch.input_ids, m.text_tower.embed(batch.input_ids, batch.attention_mask,
                                               context=context)  # fmt: skip


@pytest.mark.parametrize("mode", ["add", "overwrite"])
@pytest.mark.parametrize("context", [0, 3])
def test_pseudo_token_hook_changes_only_the_placeholder_slots(model, mode, context):
    hook = ROIPseudoTokens(position_embedding=mode).bind(model.hook_slots())
    texts = model.prompt_texts(["one small round lesion", "two lesions"], [1, 2])
    ctx_tokens = torch.randn(context, model.text_tower.width) if context else None
    ids, state = _text_state(model, texts, ctx_tokens)
    feats = torch.randn(3, model.vision_tower.width)
    rows, pos = (
        torch.tensor([0, 1, 1]),
        torch.tensor([5, 5, 6]),
    )  # "segmentation area of" = 4 tokens
    assert (ids[rows, pos] == model.tokenizer.encode("*")[0]).all()
    ctx = RunContext(extras={"roi_slots": ROISlots(feats, rows, pos, ids[rows, pos])})
    new = hook(0, {"text": state}, ctx)["text"].tokens
    changed = (new != state.tokens).any(-1)
    expected = torch.zeros_like(changed)
    expected[rows, pos + context] = True
    assert torch.equal(changed, expected)  # nothing but the slots moved
    emb = model.text_tower.text_model.embeddings
    mapped = hook.mapping(feats)
    ref = mapped + emb.position_embedding.weight[pos + context] if mode == "add" else mapped
    assert (new[rows, pos + context] - ref).abs().max() < 1e-5
    # no ROI slots: the hook leaves the state alone
    assert hook(0, {"text": state}, RunContext())["text"] is state


def test_text_embedding_equals_the_placeholder_word_replaced_by_the_pseudo_token(model):
    """Textual-inversion equivalence: with positions kept ("add"), writing the pseudo-token into the
    slot is the same as giving the placeholder word that embedding in the plain text tower."""
    batch = _batch(model, b=1)
    out = model(batch["image"], batch["prompt"], masks=batch["mask"], condition="image")
    m = batch["mask"]
    mean = torch.tensor(model.image_mean)[:, None, None]
    std = torch.tensor(model.image_std)[:, None, None]
    roi = batch["image"] * m + (-mean / std) * (1 - m)  # eq. 1 with a black background
    vm = model.vision_tower.vision_model
    cls = vm(pixel_values=roi).last_hidden_state[:, 0]  # transformers' own forward
    token = model.roi_tokens.mapping(cls)[0]
    text = "segmentation area of * . " + batch["prompt"][0]
    tok = model.tokenizer([text])
    table = model.text_tower.text_model.embeddings.token_embedding.weight
    star = model.tokenizer.encode("*")[0]
    saved = table[star].clone()
    with torch.no_grad():
        table[star] = token
        try:
            ref = model.text_tower(tok.input_ids, tok.attention_mask).pooled
        finally:
            table[star] = saved
    assert (out.text_embedding - torch.sigmoid(ref)).abs().max() < 1e-5


def test_released_slot_mode_overwrites_index_5_of_the_raw_prompt(model):
    released = CoTexNet(**{**model.config, **vlsegkit.models.cotexnet.RELEASED_OPTIONS})
    assert released.prompt_texts(["1 round large pink polyp areas"], [1]) == [
        "1 round large pink polyp areas"
    ]
    batch = _batch(released, b=2)
    roi, rows, _ = released.roi_images(batch["image"], batch["mask"])
    assert torch.equal(roi, batch["image"][rows] * batch["mask"][rows])  # "mean" background = 0
    _, _, slots = released._text_inputs(batch["image"], batch["prompt"], batch["mask"], [])
    assert slots.positions.tolist() == [5, 5]
    ids = released.tokenizer(batch["prompt"], padding="max_length").input_ids
    assert torch.equal(slots.token_ids, ids[:, 5])  # whatever word sits there


def test_released_options_restate_the_index_5_overwrite_end_to_end():
    """The release: ROI = normalised image with 0 outside the mask; [CLS] -> mapping; the text's
    token + position embedding at index 5 replaced by it; T_c = sigmoid(sigmoid(MLP(C)))."""
    from vlsegkit.encoders import TokenState, run_towers

    torch.manual_seed(0)
    m = create_model("cotexnet-tiny", **vlsegkit.models.cotexnet.RELEASED_OPTIONS).eval()
    batch = _batch(m, b=2, seed=5)
    out = m(batch["image"], batch["prompt"], masks=batch["mask"], condition="image")
    vm = m.vision_tower.vision_model
    cls = vm(pixel_values=batch["image"] * batch["mask"]).last_hidden_state[:, 0]
    tok = m.tokenizer(batch["prompt"], padding="max_length")
    emb = m.text_tower.text_model.embeddings
    hidden = (
        emb.token_embedding(tok.input_ids) + emb.position_embedding.weight[: tok.input_ids.shape[1]]
    )
    hidden[:, 5, :] = m.roi_tokens.mapping(cls)
    state = TokenState(tokens=hidden, attention_mask=tok.attention_mask.bool(),
                       pool_index=tok.input_ids.argmax(-1), causal=True)  # fmt: skip
    final = run_towers({"text": m.text_tower}, {"text": state}).states["text"]
    ref = torch.sigmoid(m.text_tower.pool(final))
    assert (out.text_embedding - ref).abs().max() < 1e-5
    c = vm(pixel_values=batch["image"]).last_hidden_state[:, 0]
    mlp = m.cls_predictor.mlp
    h = torch.relu(mlp.layers[1][0](torch.relu(mlp.layers[0][0](c))))
    assert (
        out.predicted_embedding - torch.sigmoid(torch.sigmoid(mlp.fc_out(h)))
    ).abs().max() < 1e-6
    m.train()
    terms = COTEXNET_RECIPES["released"].task().training_step(m, batch)
    terms["loss"].backward()
    assert m.sankd.alpha.grad is not None and torch.isfinite(terms["loss"])


def test_multiclass_conceptual_prompt_joins_the_classes_present():
    from vlsegkit.data import multiclass_conceptual_prompt

    h = w = 60
    image = torch.full((3, h, w), 0.5)
    masks = torch.zeros(3, h, w)
    masks[0] = torch.from_numpy(_disk(h, w, 10, 10, 6))
    masks[2] = torch.from_numpy(_disk(h, w, 45, 45, 8))  # class 2 is absent
    text = multiclass_conceptual_prompt(image, masks, ["ventricle", "myocardium", "atrium"])
    sentences = text.split(". ")
    assert len(sentences) == 2 and "ventricle area" in sentences[0] and "atrium area" in text
    assert "top left" in sentences[0] and "bottom right" in sentences[1]
    assert "myocardium" not in text


# --------------------------------------------------------------------------- the model
def test_text_free_path_matches_clipseg_conditioned_on_the_predicted_embedding(model):
    x = _batch(model, b=2)["image"]
    with torch.no_grad():
        out = model(x)
        cls = model.vision_tower.vision_model(pixel_values=x).last_hidden_state[:, 0]
        t_c = model.cls_predictor(cls)
        cond = t_c * model.sankd.scale + model.sankd.shift  # eq. 12
        ref = model.clipseg(x, conditional_embeddings=cond).logits  # the plain CLIPSeg decoder
    assert out.condition == "image" and out.text_embedding is None
    assert (out.predicted_embedding - t_c).abs().max() < 1e-6
    assert (out.logits - ref).abs().max() < 1e-5
    assert (model.image_condition(x) - cond).abs().max() < 1e-6


def test_text_free_inference_needs_no_text(model, monkeypatch):
    def no_text(*args, **kwargs):
        raise AssertionError("the text tower or tokenizer was used")

    monkeypatch.setattr(model.text_tower, "forward", no_text)
    monkeypatch.setattr(model.text_tower, "embed", no_text)
    monkeypatch.setattr(model.clipseg, "tokenizer", no_text)
    probs = model.predict([torch.rand(3, 40, 30), np.zeros((20, 20, 3), np.uint8)])
    assert [tuple(p.shape) for p in probs] == [(1, 40, 30), (1, 20, 20)]
    assert model(torch.randn(1, 3, *model.image_size)).logits.shape == (1, 1, *model.image_size)


def test_mixture_conditioning_restates_eq_11(model):
    batch = _batch(model, b=2)
    model.eval()  # dropout off: T^ = T'·s + m exactly
    out = model(batch["image"], batch["prompt"], masks=batch["mask"], condition="mixture")
    a, s, m = model.sankd.alpha, model.sankd.scale, model.sankd.shift
    ref = ((1 - a) * out.text_embedding + a * out.predicted_embedding) * s + m
    assert out.condition == "mixture"
    assert (out.conditional_embeddings[:, 0] - ref).abs().max() < 1e-5
    with torch.no_grad():
        text = model(batch["image"], batch["prompt"], masks=batch["mask"], condition="text")
    assert (text.conditional_embeddings[:, 0] - (text.text_embedding * s + m)).abs().max() < 1e-5


def test_gradients_reach_only_the_trainable_modules():
    torch.manual_seed(0)
    m = create_model("cotexnet-tiny").train()
    batch = _batch(m, b=2)
    task = m.default_task()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if "_tower." in n}
    groups = {
        "decoder": "clipseg.decoder.", "roi": "roi_tokens.mapping.", "cls": "cls_predictor.",
        "alpha": "sankd.alpha", "scale": "sankd.scale",
    }  # fmt: skip

    def reached(term):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        task.training_step(m, batch)[term].backward()
        for n, p in m.named_parameters():
            if n in frozen:
                assert p.grad is None, n
        return {g for g, prefix in groups.items()
                if any(p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in m.named_parameters() if n.startswith(prefix))}  # fmt: skip

    assert reached("loss") == set(groups)
    # the KL trains the [CLS] predictor only (its teacher is detached); the segmentation loss reaches
    # the ROI mapping through the frozen text tower and the predictor through a·T_c
    assert reached("kl_loss") == {"cls"}
    assert reached("dice_loss") == set(groups)


def test_multiclass_head_one_token_per_class_present():
    torch.manual_seed(0)
    m = create_model("cotexnet-tiny", num_classes=2).train()
    batch = _batch(m, b=3, seed=3, classes=2)
    batch["mask"][0, 1] = 0  # image 0 has class 1 only
    present = (batch["mask"].flatten(2).amax(-1) > 0).sum(1).tolist()
    _, rows, classes = m.roi_images(batch["image"], batch["mask"])
    assert rows.tolist() == [b for b, n in enumerate(present) for _ in range(n)]
    assert classes.tolist() == [c for b in range(3) for c in range(2) if batch["mask"][b, c].any()]
    texts = m.prompt_texts(batch["prompt"], present)
    assert [t.split(" . ")[0].count("*") for t in texts] == present
    out = m(batch["image"], batch["prompt"], masks=batch["mask"])
    assert out.logits.shape == (3, 3, *m.image_size)  # K + 1 channels
    head = m.decoder.transposed_convolution
    assert head.out_channels == 3 and torch.equal(head.bias, torch.zeros(3))
    task = m.default_task()
    terms = task.training_step(m, batch)
    assert set(terms) == {"loss", "dice_loss", "ce_loss", "kl_loss"}
    terms["loss"].backward()
    m.eval()
    with torch.no_grad():
        scores = task.evaluation_step(m, batch)
    assert scores["dice"].shape == (6,) and scores["iou_1"].shape == (3,)
    assert scores["accuracy"].shape == (3,)
    probs = m.predict(torch.rand(3, 20, 24))
    assert probs.shape == (3, 20, 24) and torch.allclose(probs.sum(0), torch.ones(20, 24))


def test_initialised_from_a_clipseg_checkpoint(tmp_path):
    torch.manual_seed(3)
    clipseg = create_model("clipseg-tiny", image_size=64)
    clipseg.save_pretrained(tmp_path)
    m = create_model("cotexnet-tiny", clipseg=tmp_path)
    a, b = clipseg.state_dict(), m.clipseg.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = CoTexNet.from_clipseg(clipseg, extract_layers=(1, 2, 3))
    assert all(torch.equal(a[k], again.clipseg.state_dict()[k]) for k in a)
    multi = create_model("cotexnet-tiny", num_classes=3, clipseg=clipseg)  # new head kept
    assert multi.decoder.transposed_convolution.out_channels == 4
    with pytest.raises(vlsegkit.CheckpointError):
        create_model("cotexnet-tiny", clipseg=create_model("clipseg-tiny", reduce_dim=16))


def test_registry_full_size_trainable_parameters_match_the_release():
    # spec §7.2: decoder 1,127,009 + ROI mapping 657,408 + CLS mapping 1,574,912 + 3 scalars
    m = create_model("cotexnet-clipseg-rd64-refined-released")
    assert m.num_parameters(trainable_only=True) == 1_127_009 + 657_408 + 1_574_912 + 3
    assert m.vision_tower.width == 768 and m.text_tower.width == 512


def test_bad_inputs_raise_clear_errors(model):
    batch = _batch(model, b=2)
    x, masks, prompts = batch["image"], batch["mask"], batch["prompt"]
    with pytest.raises(ValueError, match="prompts and masks together"):
        model(x, prompts)
    with pytest.raises(ValueError, match="needs prompts and masks"):
        model(x, condition="mixture")
    with pytest.raises(ValueError, match="condition must be"):
        model(x, condition="oracle")
    with pytest.raises(ValueError, match=r"masks must be a \(B=2, K=1"):
        model(x, prompts, masks=masks[:, :, :8])
    with pytest.raises(ValueError, match="one real-text string per image"):
        model(x, prompts[:1] * 3, masks=masks)
    with pytest.raises(ValueError, match="image alone"):
        model.predict(torch.rand(3, 8, 8), "a polyp")
    with pytest.raises(TypeError, match="part of CoTexNet"):
        ROIPseudoTokens().attach(create_model("clipseg-tiny"))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cotexnet-tiny", num_classes=0)
    with pytest.raises(ValueError, match="slot_mode"):
        create_model("cotexnet-tiny", slot_mode="index5")


def test_training_terms_are_float32_and_finite_under_bf16_autocast(model):
    batch = _batch(model, b=2)
    task = model.default_task()
    ref = task.training_step(model, batch)  # eval mode: dropout off, comparable
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = task.training_step(model, batch)
    assert all(v.dtype == torch.float32 for v in ref.values())
    assert all(torch.isfinite(v) for v in low.values())
    lo, hi = float(low["loss"].detach()), float(ref["loss"].detach())
    assert abs(lo - hi) < 0.05 * hi


def test_seeded_builds_are_identical():
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        m = create_model("cotexnet-tiny").eval()
        with torch.no_grad():
            outs.append(m(torch.ones(1, 3, *m.image_size)).logits)
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- recipes
def test_recipes_hold_the_paper_and_release_settings():
    paper, released = COTEXNET_RECIPES["paper"], COTEXNET_RECIPES["released"]
    cfg = paper.fit_config(epochs=3)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.scheduler) == (3e-4, 0.0, 8, "cosine")
    assert cfg.early_stopping.metric == "loss" and cfg.early_stopping.patience == 50
    assert paper.task().loss.kl_weight == 1.0 and paper.transform() is None
    cfg = released.fit_config()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (3e-4, 1e-4, 16, 500)
    assert (cfg.seed, cfg.autocast_dtype, cfg.min_lr_ratio) == (666, torch.float16, 0.0)
    assert cfg.early_stopping.metric == "dice" and cfg.early_stopping.start_epoch == 100
    loss = released.task().loss
    assert loss.kl_weight == 10.0 and loss.released_double_sigmoid
    assert released.model_options == vlsegkit.models.cotexnet.RELEASED_OPTIONS


def test_delayed_early_stopping_ignores_the_first_epochs():
    stop = DelayedEarlyStopping(metric="dice", patience=2, start_epoch=3)
    values = [0.9, 0.1, 0.1, 0.5, 0.4, 0.4]
    decisions = [stop.update(v) for v in values]
    assert decisions == [False, False, False, False, False, True]
    assert stop.best == 0.5  # the first three epochs were not recorded
    state = stop.state_dict()
    again = DelayedEarlyStopping(metric="dice", patience=2, start_epoch=3)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_random_resize_crop_keeps_the_size_and_the_mask_binary():
    torch.manual_seed(0)
    t = RandomResizeCrop(32, (0.95, 1.2))
    image = torch.rand(3, 32, 40)
    mask = (torch.rand(1, 32, 40) > 0.5).to(torch.uint8)
    for _ in range(5):
        a, b = t(image, mask)
        assert a.shape == (3, 32, 32) and b.shape == (1, 32, 32)
        assert set(b.unique().tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="scale"):
        RandomResizeCrop(32, (1.2, 0.9))


# --------------------------------------------------------------------------- a short run
def test_a_short_run_lowers_the_loss_and_beats_the_untrained_text_free_dice():
    torch.manual_seed(0)
    m = create_model("cotexnet-tiny")
    kw = dict(image_size=m.image_size, mean=m.image_mean, std=m.image_std)
    train = CachedDataset(ConceptualPrompts(SyntheticLesions(length=64, seed=0, **kw),
                                            keyword="lesion", mean=m.image_mean,
                                            std=m.image_std))  # fmt: skip
    val = CachedDataset(SyntheticLesions(length=16, seed=100, **kw))  # no prompts: text-free
    task = CoTexNetTask(hd95=False)
    before = evaluate(m, val, task=task, progress=False)
    history = fit(m, train, task=task, epochs=20, batch_size=8, lr=1e-2, scheduler="cosine", seed=0,
                  progress=False)  # fmt: skip
    after = evaluate(m, val, task=task, progress=False)
    first, last = history.train_terms[0], history.train_terms[-1]
    assert set(first) == {"loss", "dice_loss", "ce_loss", "kl_loss"}  # every term logged
    assert last["loss"] < 0.9 * first["loss"] and last["kl_loss"] < first["kl_loss"]
    assert after["dice"] > before["dice"] + 0.1  # measured: 0.09 -> 0.43
