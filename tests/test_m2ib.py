"""M2IB attribution: parity with a re-statement of the released loop, batching, noise, controls.

The references below restate the released ``IBAInterpreter`` (``YingWANGG/M2IB`` ``scripts/iba.py``,
vendored by ``HealthX-Lab/MedCLIP-SAMv2``) on the *upstream* modules: the encoder block is wrapped by
a bottleneck module (the release's ``replace_layer`` + ``mySequential``), the image and prompt are
repeated ``samples`` times, a fresh ``(1, N, D)`` alpha and Adam are made per image, the model's own
``get_text_features`` / ``get_image_features`` (or open_clip's towers) run every step, and the map is
the capacity buffer of the last forward. They share no code with ``vlsegkit.attribution``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from vlsegkit.attribution import M2IBAttributor, M2IBBottleneck, m2ib_capacity
from vlsegkit.data import SyntheticLesions
from vlsegkit.encoders import (
    BertText,
    OpenCLIPSpec,
    RunContext,
    TimmViT,
    create_towers,
    embed_tower,
    from_clip_model,
    run_towers,
)
from vlsegkit.tokenizers import CLIPTokenizer

IDS = torch.tensor([[98, 10, 11, 12, 99]])  # BOS ... EOS (legacy config: pooled at the argmax)


def _clip(seed: int = 0, *, layers: int = 3, vocab: int = 100, positions: int = 16) -> CLIPModel:
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, vocab_size=vocab, max_position_embeddings=positions,
                eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=vocab - 1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()


def _features(out):
    # transformers 5 returns an output object from get_*_features, 4.x a tensor
    return getattr(out, "pooler_output", out)


# ------------------------------------------------------------------------------ the references
class _ReleasedBottleneck(nn.Module):
    """``InformationBottleneck.forward`` of the release, with the noise replayed."""

    def __init__(self, shape, init, noise):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1, *shape), init, dtype=noise.dtype))
        self.noise, self.calls, self.buffer_capacity = noise, 0, None

    def forward(self, x):
        lamb = torch.sigmoid(self.alpha).expand(x.shape[0], x.shape[1], -1)
        masked_mu = x * lamb
        masked_var = (1 - lamb) ** 2
        self.buffer_capacity = -0.5 * (1 + torch.log(masked_var) - masked_mu**2 - masked_var)
        eps = self.noise[self.calls]
        self.calls += 1
        return masked_mu + masked_var.sqrt() * eps


class _Sequential(nn.Module):
    """The release's ``mySequential(original_layer, bottleneck)`` for layers returning tuples."""

    def __init__(self, layer, bottleneck):
        super().__init__()
        self.layer, self.bottleneck = layer, bottleneck

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        y = self.bottleneck(first)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def _train_released(bottleneck, text_fn, image_fn, *, beta, steps, lr):
    optimizer = torch.optim.Adam(bottleneck.parameters(), lr=lr)
    cos = nn.CosineSimilarity(eps=1e-6)
    for _ in range(steps):
        optimizer.zero_grad()
        t, i = text_fn(), image_fn()
        loss = beta * bottleneck.buffer_capacity.mean() - cos(t, i).mean()
        loss.backward()
        optimizer.step()
    return bottleneck.buffer_capacity.mean(0)


def _released_vision_map(model, layer, ids, image, noise, *, beta, steps, lr, init=5.0):
    """``vision_heatmap_iba`` on a transformers CLIPModel (one image)."""
    samples, n, d = noise.shape[1:]
    layers = model.vision_model.encoder.layers
    original = layers[layer]
    bottleneck = _ReleasedBottleneck((n, d), init, noise)
    layers[layer] = _Sequential(original, bottleneck)
    try:
        capacity = _train_released(
            bottleneck,
            lambda: _features(model.get_text_features(input_ids=ids.expand(samples, -1))),
            lambda: _features(model.get_image_features(image.expand(samples, -1, -1, -1))),
            beta=beta, steps=steps, lr=lr,
        )  # fmt: skip
    finally:
        layers[layer] = original
    saliency = torch.nansum(capacity, -1)[1:]
    side = int(saliency.numel() ** 0.5)
    up = F.interpolate(saliency.reshape(1, 1, side, side), size=image.shape[-2:], mode="bilinear")
    up = up[0, 0]
    return (up - up.min()) / (up.max() - up.min())


def _released_text_scores(model, layer, ids, image, noise, *, beta, steps, lr, init=5.0):
    """``text_heatmap_iba`` on a transformers CLIPModel (one prompt, one image)."""
    samples, n, d = noise.shape[1:]
    layers = model.text_model.encoder.layers
    original = layers[layer]
    bottleneck = _ReleasedBottleneck((n, d), init, noise)
    layers[layer] = _Sequential(original, bottleneck)
    try:
        capacity = _train_released(
            bottleneck,
            lambda: _features(model.get_text_features(input_ids=ids.expand(samples, -1))),
            lambda: _features(model.get_image_features(image.expand(samples, -1, -1, -1))),
            beta=beta, steps=steps, lr=lr,
        )  # fmt: skip
    finally:
        layers[layer] = original
    scores = torch.nansum(capacity, -1)
    return (scores - scores.min()) / (scores.max() - scores.min())


# ------------------------------------------------------------------------------ parity
def test_vision_map_matches_the_released_loop_on_transformers_clip():
    model = _clip().double()
    vision, text = from_clip_model(model)
    settings = dict(beta=1.0, steps=4, lr=1.0)
    attributor = M2IBAttributor(vision, text, layer=1, samples=3, **settings)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    noise = torch.randn(3, 4, 3, 17, 32, generator=torch.Generator().manual_seed(2)).double()
    ours = attributor(images, IDS, noise=noise)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float64
    for b in range(3):
        ref = _released_vision_map(model, 1, IDS, images[b : b + 1], noise[b], **settings)
        assert (ours[b] - ref).abs().max() < 1e-10
        assert ref.std() > 0.1  # a map with structure, not a constant


def test_vision_map_matches_the_released_loop_on_biomedclip_like_open_clip_towers():
    torch.manual_seed(0)
    spec = OpenCLIPSpec(
        embed_dim=16,
        vision=TimmViT({"timm_model_name": "test_vit", "timm_model_pretrained": False,
                        "timm_pool": "", "timm_proj": "linear", "image_size": 48}),
        text=BertText(dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=24, pad_token_id=0)),
    )  # fmt: skip
    towers = create_towers(spec)
    vision, text = towers.vision.double().eval(), towers.text.double().eval()
    visual, encoder = vision.visual, text.text  # the upstream open_clip modules
    ids = torch.tensor([[2, 17, 23, 41, 3]])  # [CLS] ... [SEP]
    image = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3)).double()
    noise = torch.randn(1, 3, 2, 10, 64, generator=torch.Generator().manual_seed(4)).double()
    layer, steps = 3, 3

    bottleneck = _ReleasedBottleneck((10, 64), 5.0, noise[0])
    handle = visual.trunk.blocks[layer].register_forward_hook(lambda m, i, o: bottleneck(o))
    try:
        capacity = _train_released(
            bottleneck,
            lambda: encoder(ids.expand(2, -1)),
            lambda: visual(image.expand(2, -1, -1, -1)),
            beta=0.5, steps=steps, lr=1.0,
        )  # fmt: skip
    finally:
        handle.remove()
    sal = torch.nansum(capacity, -1)[1:].reshape(1, 1, 3, 3)
    ref = F.interpolate(sal, size=(48, 48), mode="bilinear")[0, 0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())

    attributor = M2IBAttributor(vision, text, layer=layer, beta=0.5, steps=steps, samples=2)
    ours = attributor(image, ids, noise=noise)[0]
    assert (ours - ref).abs().max() < 1e-8  # float64; timm's fused and our stepped paths differ


def test_text_attribution_matches_the_released_text_loop():
    model = _clip(layers=3).double()
    vision, text = from_clip_model(model)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    noise = torch.randn(1, 4, 3, 5, 32, generator=torch.Generator().manual_seed(6)).double()
    ref = _released_text_scores(model, 1, IDS, image, noise[0], beta=0.3, steps=4, lr=1.0)
    attributor = M2IBAttributor(vision, text, layer=0, text_layer=1, text_beta=0.3, steps=4,
                                samples=3)  # fmt: skip
    out = attributor.text_attribution(image, IDS, noise=noise)
    assert (out.scores[0] - ref).abs().max() < 1e-10
    assert out.input_ids.tolist() == IDS.tolist() and out.attention_mask.tolist() == [[1] * 5]


def test_text_attribution_ignores_padding():
    model = _clip(layers=3)
    vision, text = from_clip_model(model)
    att = M2IBAttributor(vision, text, layer=1, steps=3, samples=2)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[98, 10, 11, 12, 99], [98, 30, 99, 99, 99]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = type("Batch", (), {"input_ids": ids, "attention_mask": mask})()
    noise = torch.randn(2, 3, 2, 5, 32)
    both = att.text_attribution(images, batch, noise=noise)
    alone = att.text_attribution(images[1:], ids[1:, :3], noise=noise[1:, :, :, :3])
    assert both.scores[1, 3:].tolist() == [0.0, 0.0]
    assert (both.scores[1, :3] - alone.scores[0]).abs().max() < 1e-4  # padded vs unpadded
    assert both.scores[0].max() == 1.0 and both.scores[0].min() == 0.0


def test_capacity_is_the_released_kl_and_stays_finite():
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    alpha = torch.randn(2, 5, 7, dtype=torch.float64) * 4
    lam = torch.sigmoid(alpha)
    released = -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * x) ** 2 - (1 - lam) ** 2)
    assert torch.allclose(m2ib_capacity(x, alpha), released, rtol=1e-12, atol=1e-12)
    # where 1 - sigmoid(alpha) rounds to 0 in float32 the released form is infinite
    big = torch.full((1, 1, 1), 20.0)
    assert torch.isfinite(m2ib_capacity(torch.ones(1, 1, 1), big)).all()


def test_the_bottleneck_is_a_hook_of_the_runner():
    vision, _ = from_clip_model(_clip())
    pixels = torch.randn(2, 3, 32, 32)
    state = embed_tower("vision", vision, pixels)
    prefix = run_towers({"vision": vision}, {"vision": state}, stop=2).states["vision"]
    hook = M2IBBottleneck(layer=1)
    assert hook.layers("vision") == (2,) and hook.layers("text") == ()
    noise = torch.randn(2, 17, 32)

    def run(alpha_value):
        alpha = torch.full((2, 17, 32), alpha_value)
        ctx = RunContext(extras={"m2ib": {"alpha": alpha, "samples": 1, "noise": noise}})
        return hook(2, {"vision": prefix}, ctx)["vision"].tokens

    # lambda -> 1 passes the features; lambda -> 0 replaces them with the noise
    assert torch.allclose(run(40.0), prefix.tokens, atol=1e-6)
    assert torch.allclose(run(-40.0), noise, atol=1e-6)
    lam = torch.sigmoid(torch.tensor(0.3))
    assert torch.allclose(run(0.3), lam * prefix.tokens + (1 - lam) * noise, atol=1e-6)
    with pytest.raises(ValueError, match=r"ctx\.extras"):
        hook(2, {"vision": prefix}, RunContext())


# ------------------------------------------------------------------------------ batching and noise
@pytest.fixture(scope="module")
def towers():
    return from_clip_model(_clip(seed=3))


def test_batched_maps_equal_one_image_at_a_time(towers):
    att = M2IBAttributor(*towers, layer=1, beta=1.0, steps=5, samples=4)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([[98, 10, 11, 99], [98, 12, 13, 99], [98, 14, 15, 99], [98, 16, 17, 99]])
    noise = torch.randn(4, 5, 4, 17, 32, generator=torch.Generator().manual_seed(8))
    batched = att(images, ids, noise=noise)
    alone = torch.cat([att(images[b : b + 1], ids[b], noise=noise[b : b + 1]) for b in range(4)])
    assert (batched - alone).abs().max() < 1e-5
    # and with one generator per image instead of replayed noise
    gens = [torch.Generator().manual_seed(20 + b) for b in range(4)]
    batched = att(images, ids, generator=gens)
    alone = torch.cat(
        [att(images[b : b + 1], ids[b], generator=[torch.Generator().manual_seed(20 + b)])
         for b in range(4)]
    )  # fmt: skip
    assert (batched - alone).abs().max() < 1e-5


def test_seeded_runs_repeat_and_the_noise_matters(towers):
    att = M2IBAttributor(*towers, layer=1, steps=4, samples=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    a = att(images, IDS, generator=torch.Generator().manual_seed(0))
    b = att(images, IDS, generator=torch.Generator().manual_seed(0))
    c = att(images, IDS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = att(images, IDS)
    torch.manual_seed(5)
    assert torch.equal(d, att(images, IDS))
    # one step means no update: the map is the capacity of the initial mask, whatever the noise
    one = M2IBAttributor(*towers, layer=1, steps=1, samples=3)
    assert torch.equal(one(images, IDS), one(images, IDS, generator=torch.Generator()))


def test_map_shape_range_and_size(towers):
    att = M2IBAttributor(*towers, layer=0, steps=3, samples=2)
    images = torch.randn(2, 3, 32, 48)  # a non-square 4x6 patch grid
    maps = att(images, IDS)
    assert maps.shape == (2, 32, 48) and maps.dtype == torch.float32
    for m in maps:
        assert m.min() == 0.0 and m.max() == 1.0
    assert att(images, IDS, size=(20, 30)).shape == (2, 20, 30)
    assert att(images, IDS, size=7).shape == (2, 7, 7)


def test_prompts_strings_ids_and_embeddings_agree(towers):
    tok = CLIPTokenizer.from_open_clip(context_length=16)
    model = _clip(seed=4, vocab=49408)
    vision, text = from_clip_model(model)
    att = M2IBAttributor(vision, text, layer=1, steps=3, samples=2, tokenizer=tok)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.randn(2, 3, 2, 17, 32)
    by_text = att(images, "a small lesion", noise=noise)
    ids = tok(["a small lesion"]).input_ids
    assert torch.equal(by_text, att(images, ids[0], noise=noise))
    emb = att.encode_text(["a small lesion"])
    assert torch.allclose(by_text, att(images, emb[0], noise=noise), atol=1e-6)
    # one prompt per image
    per_image = att(images, ["a small lesion", "two polyps"], noise=noise)
    assert torch.allclose(per_image[0], by_text[0], atol=1e-6)
    assert not torch.allclose(per_image[1], by_text[1], atol=1e-3)


def test_towers_receive_no_gradients_and_keep_their_mode(towers):
    vision, text = towers
    vision.train()
    text.eval()
    for p in (*vision.parameters(), *text.parameters()):
        p.requires_grad_(True)
        p.grad = None
    att = M2IBAttributor(vision, text, layer=1, steps=3, samples=2)
    with torch.no_grad():  # attribution optimises alpha even inside no_grad
        maps = att(torch.randn(1, 3, 32, 32), IDS)
    assert maps.max() == 1.0
    assert all(p.grad is None for p in (*vision.parameters(), *text.parameters()))
    assert vision.training and not text.training


def test_bf16_autocast_on_tiny_towers(towers):
    att = M2IBAttributor(*towers, layer=1, steps=3, samples=2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(2, 3, 2, 17, 32, generator=torch.Generator().manual_seed(12))
    full = att(images, IDS, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = att(images, IDS, noise=noise)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert half.min() >= 0.0 and half.max() <= 1.0
    corr = torch.corrcoef(torch.stack([half.flatten(), full.flatten()]))[0, 1]
    assert corr > 0.95


def test_bad_arguments(towers):
    vision, text = towers
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\]"):
        M2IBAttributor(vision, text, layer=2)  # the last block: nothing after it
    with pytest.raises(ValueError, match="layer"):
        M2IBAttributor(vision, text, layer=-1)
    for kwargs, name in (({"steps": 0}, "steps"), ({"samples": 0}, "samples"),
                         ({"beta": -1.0}, "beta"), ({"lr": 0.0}, "lr"),
                         ({"alpha_init": float("nan")}, "alpha_init")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            M2IBAttributor(vision, text, layer=0, **kwargs)
    with pytest.raises(TypeError, match="vision"):
        M2IBAttributor(text, vision, layer=0)
    att = M2IBAttributor(vision, text, layer=1, steps=2, samples=2)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="pixel_values"):
        att(torch.randn(3, 32, 32), IDS)
    with pytest.raises(ValueError, match=r"noise must have shape \(B, steps, samples, N, D\)"):
        att(images, IDS, noise=torch.randn(2, 2, 2, 16, 32))
    with pytest.raises(ValueError, match="not both"):
        att(images, IDS, noise=torch.randn(2, 2, 2, 17, 32), generator=torch.Generator())
    with pytest.raises(ValueError, match="list of 2"):
        att(images, IDS, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="one prompt for all 2 images or one per image"):
        att(images, IDS.expand(3, -1))
    with pytest.raises(ValueError, match="tokenizer"):
        att(images, "a lesion")
    with pytest.raises(ValueError, match="text embeddings"):
        att(images, torch.randn(5))
    with pytest.raises(ValueError, match="size"):
        att(images, IDS, size=(0, 4))
    with pytest.raises(ValueError, match="text_layer"):
        M2IBAttributor(vision, text, layer=0, text_layer=2)


# ------------------------------------------------------------------------------ prompt control
CLASSES = ["a lesion", "no lesion in the image"]


@pytest.fixture(scope="module")
def trained_clip():
    """A tiny CLIP whose vision tower was trained briefly on SyntheticLesions image-prompt pairs.

    Half the images are lesion-free; the image-to-text InfoNCE over the two prompts of
    ``CLASSES`` aligns lesion images with "a lesion". The text tower is locked (LiT, Zhai et al.
    2022), so unseen prompts keep their own embeddings.
    """
    tok = CLIPTokenizer.from_open_clip(context_length=16)
    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=16, eos_token_id=49407,
                bos_token_id=49406, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    vision, text = from_clip_model(model)
    data = SyntheticLesions(length=128, image_size=32, seed=0, negative_fraction=0.5,
                            mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.tensor([int(data.is_negative(i)) for i in range(len(data))])
    prompts = tok(CLASSES)
    optimizer = torch.optim.AdamW(vision.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randperm(len(data), generator=gen)[:32]
        img = F.normalize(vision(images[idx]).pooled, dim=-1)
        txt = F.normalize(text(prompts.input_ids, prompts.attention_mask).pooled, dim=-1)
        loss = F.cross_entropy(10 * img @ txt.T, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.65  # it learned something (chance is log 2 = 0.69)
    return vision.eval(), text.eval(), tok, data


def test_maps_change_with_the_prompt_beyond_the_noise(trained_clip):
    """The MedCLIP-SAM v1 tracker reported maps that ignored the prompt (HealthX-Lab/MedCLIP-SAM
    #3). Here nonsense prompts must move the expected map (the mean over 8 noise draws per image)
    further than a second, independent set of 8 draws moves it with the true prompt."""
    vision, text, tok, data = trained_clip
    att = M2IBAttributor(vision, text, layer=0, beta=0.1, tokenizer=tok)
    lesions = [i for i in range(len(data)) if not data.is_negative(i)][:4]
    draws = 8
    images = torch.stack([data[i]["image"] for i in lesions]).repeat_interleave(draws, 0)

    def expected_maps(prompt, seed):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(len(images))]
        return att(images, prompt, generator=gens).view(len(lesions), draws, 32, 32).mean(1)

    true = expected_maps("a lesion", 0)
    floor = (true - expected_maps("a lesion", 1000)).abs().mean()
    for nonsense in ("sitting on a chair", "qx zzv blorp"):
        change = (true - expected_maps(nonsense, 0)).abs().mean()  # the same draws
        assert change > 0.02 and change > 1.5 * floor, (nonsense, float(change), float(floor))
