"""Context learners on bare towers: depth semantics, references, initialisation, BERT / timm towers.

Towers: transformers CLIPSeg text (causal, EOS argmax pooling) and vision towers of a tiny CLIPSeg,
and a BiomedCLIP-shaped open_clip ``CustomTextCLIP`` (tiny ``BertModel`` text tower, CLS pooling;
timm ``test_vit`` image tower) built offline through ``open_clip.create_model('local-dir:...')``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlsegkit.encoders import RunContext, TowerHook, TowerOutput, embed_tower, run_towers
from vlsegkit.encoders.open_clip import HFBertTextTower, TimmViTTower
from vlsegkit.models.clipseg import CLIPSeg
from vlsegkit.prompts import (
    VPT,
    CoCoOp,
    CoOp,
    LearnableUpsampler,
    MaPLe,
    PromptProjector,
    PromptTransformerLayer,
    SharedAttention,
    SharedSeparate,
)
from vlsegkit.registry import hook_from_config
from vlsegkit.testing import write_bert_tokenizer_files
from vlsegkit.tokenizers import BertTokenizer

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PHRASE = "a photo of a"


def _jitter(module: nn.Module, seed: int) -> None:
    """Move every 1-D parameter off its trivial init (LayerNorm affine, biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _prompted(tower, learner, *inputs, features=None, checkpointing=False) -> TowerOutput:
    """One tower run through the runner with ``learner`` as its only hook."""
    ctx = RunContext(image_features=features)
    if features is not None:
        ctx.text_image_index = torch.arange(features.shape[0])
    name = tower.modality
    state = embed_tower(name, tower, *inputs, hooks=[learner], ctx=ctx)
    run = run_towers(
        {name: tower},
        {name: state},
        hooks=[learner],
        ctx=ctx,
        gradient_checkpointing=checkpointing,
    )
    return TowerOutput(pooled=tower.pool(run.states[name]), state=run.states[name])


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clipseg():
    torch.manual_seed(0)
    model = CLIPSeg(
        backbone={
            "text_config": dict(
                vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=1,
                bos_token_id=0, eos_token_id=2,
            ),
            "vision_config": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, image_size=32, patch_size=8,
            ),
            "projection_dim": 16,
        },
        extract_layers=(0, 1, 2), reduce_dim=8, decoder_num_heads=2, decoder_mlp_dim=16,
        image_size=32,
    )  # fmt: skip
    _jitter(model, 0)
    return model.eval()


@pytest.fixture(scope="module")
def biomed(tmp_path_factory):
    """(text tower, vision tower, tokenizer) of a tiny BiomedCLIP-shaped open_clip model."""
    root = tmp_path_factory.mktemp("tiny_biomed")
    write_bert_tokenizer_files(root, model_max_length=24)
    tokenizer = BertTokenizer.from_pretrained(root)
    transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=24, pad_token_id=0,
    ).save_pretrained(root)  # fmt: skip
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {
                "timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                "timm_proj": "linear", "image_size": 32,
            },
            "text_cfg": {
                "hf_model_name": str(root), "hf_tokenizer_name": str(root), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 24,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }  # fmt: skip
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False)
    _jitter(model, 1)
    model.eval().requires_grad_(False)
    return HFBertTextTower(model.text), TimmViTTower(model.visual), tokenizer


def _clip_ids(clipseg, texts):
    batch = clipseg.tokenizer(texts, reserve=8)
    return batch.input_ids, batch.attention_mask


TEXTS = ["polyp", "a small round polyp on the left", ""]


def _text_inputs(name, clipseg, biomed):
    if name == "clip":
        ids, mask = _clip_ids(clipseg, TEXTS)
        return clipseg.text_tower, clipseg.tokenizer, (ids, mask)
    text, _, tok = biomed
    batch = tok(TEXTS)
    return text, tok, (batch.input_ids, batch.attention_mask)


def _vision_inputs(name, clipseg, biomed):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return (clipseg.vision_tower if name == "clip" else biomed[1]), (pixels,)


def _learner(name: str, **kw):
    kw.setdefault("depth", 2)
    if name in ("CoOp", "CoCoOp", "MaPLe"):
        kw.setdefault("init", None)
    if name == "SharedAttention":
        kw.setdefault("num_heads", 4)
        kw.setdefault("mlp_dim", 32)
        kw.setdefault("dropout", 0.0)
    return {
        "CoOp": CoOp,
        "CoCoOp": CoCoOp,
        "VPT": VPT,
        "MaPLe": MaPLe,
        "SharedSeparate": SharedSeparate,
        "SharedAttention": SharedAttention,
    }[name](**kw)


def _bound(name, clipseg, biomed, backend, seed=0, **kw):
    torch.manual_seed(seed)
    learner = _learner(name, **kw)
    text, tok, _ = _text_inputs(backend, clipseg, biomed)
    vision, _ = _vision_inputs(backend, clipseg, biomed)
    return learner.bind(text_tower=text, vision_tower=vision, tokenizer=tok)


ALL = ["CoOp", "CoCoOp", "VPT", "MaPLe", "SharedSeparate", "SharedAttention"]


def _features(learner, b=3):
    if not learner.needs_image_features:
        return None
    return torch.randn(b, learner.dims["image_dim"], generator=torch.Generator().manual_seed(9))


# ----------------------------------------------------------------------- insertion bookkeeping
@pytest.mark.parametrize("backend", ["clip", "bert"])
def test_zero_length_text_context_equals_plain_tower(clipseg, biomed, backend):
    tower, _, (ids, mask) = _text_inputs(backend, clipseg, biomed)
    learner = CoOp(num_context=0, depth=2, init=None).bind(text_tower=tower)
    plain = tower(ids, mask)
    prompted = _prompted(tower, learner, ids, mask)
    assert torch.equal(prompted.pooled, plain.pooled)
    assert prompted.state.pool_index.tolist() == plain.state.pool_index.tolist()


@pytest.mark.parametrize("backend", ["clip", "timm"])
def test_zero_length_vision_prompts_equal_plain_tower(clipseg, biomed, backend):
    tower, (pixels,) = _vision_inputs(backend, clipseg, biomed)
    learner = VPT(num_context=0, depth=2).bind(vision_tower=tower)
    plain = tower(pixels)
    prompted = _prompted(tower, learner, pixels)
    assert torch.equal(prompted.pooled, plain.pooled)
    assert torch.equal(tower.dense(prompted.state), tower.dense(plain.state))


def _clip_text_reference(tower, ids, mask, prompts):
    """float64 CoOp-deep text encoding from the transformers modules, by hand (TuneVLSeg eq. 5-6)."""
    model = tower.text_model
    n, depth = prompts[0].shape[0], len(prompts)
    words = model.embeddings.token_embedding(ids).double()
    x = torch.cat([words[:, :1], prompts[0].double().expand(len(ids), -1, -1), words[:, 1:]], 1)
    x = model.embeddings(inputs_embeds=x)
    length = x.shape[1]
    keep = torch.cat([mask[:, :1], torch.ones(len(ids), n, dtype=mask.dtype), mask[:, 1:]], 1)
    allowed = torch.ones(length, length).tril().bool()[None] & keep.bool()[:, None, :]
    bias = torch.zeros(len(ids), 1, length, length, dtype=torch.float64)
    bias = bias.masked_fill(~allowed[:, None], torch.finfo(torch.float64).min)
    for i, layer in enumerate(model.encoder.layers):
        if 1 <= i < depth:
            x = torch.cat(
                [x[:, :1], prompts[i].double().expand(len(ids), -1, -1), x[:, 1 + n :]], 1
            )
        out = layer(x, bias)
        x = out[0] if isinstance(out, tuple) else out
    x = model.final_layer_norm(x)
    eos = ids.argmax(-1) + n
    return tower.text_projection(x[torch.arange(len(ids)), eos])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_coop_clip_text_matches_float64_reference(clipseg, depth):
    tower = clipseg.text_tower
    ids, mask = _clip_ids(clipseg, TEXTS)
    torch.manual_seed(depth)
    learner = CoOp(num_context=3, depth=depth, init=None, init_std=0.5).bind(text_tower=tower)
    got = _prompted(tower, learner, ids, mask).pooled
    ref_tower = tower.double()
    try:
        ref = _clip_text_reference(ref_tower, ids, mask, learner.prompts().text)
    finally:
        tower.float()
    assert _diff(got, ref) < 1e-5
    # the context must change the result (EOS pooling sees it through causal attention)
    assert _diff(got, tower(ids, mask).pooled) > 1e-3


def test_coop_bert_matches_upstream_inputs_embeds(biomed):
    text, _, tok = biomed
    batch = tok(TEXTS)
    ids, mask = batch.input_ids, batch.attention_mask
    torch.manual_seed(0)
    learner = CoOp(num_context=2, depth=1, init=None, init_std=0.5).bind(text_tower=text)
    ctx = learner.prompts().text[0]
    got = _prompted(text, learner, ids, mask).pooled
    bert = text.text.transformer
    words = bert.embeddings.word_embeddings(ids)
    embeds = torch.cat([words[:, :1], ctx.expand(len(ids), -1, -1), words[:, 1:]], 1)
    full_mask = torch.cat([mask[:, :1], torch.ones(len(ids), 2, dtype=mask.dtype), mask[:, 1:]], 1)
    last = bert(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    ref = text.text.proj(last[:, 0])  # open_clip's cls_last_hidden_state_pooler + MLP projection
    assert _diff(got, ref) < 1e-5


# ----------------------------------------------------------------------------- depth semantics
class _Recorder(TowerHook):
    """Records the prompt slots of every state it sees before each block."""

    towers = ("vision", "text")

    def __init__(self, num_layers):
        super().__init__()
        self.num_layers, self.seen = num_layers, []

    def layers(self, tower):
        return range(self.num_layers)

    def forward(self, i, states, ctx):
        self.seen.extend(s.prompt_tokens.clone() for s in states.values())
        return states


def _record_slots_with(tower, learner, inputs, features):
    """Prompt slots entering each block, and the slots each block outputs."""
    name = tower.modality
    pre, post = _Recorder(tower.num_layers), _Recorder(tower.num_layers)
    hooks = [pre, learner, post]
    ctx = RunContext(image_features=features)
    if features is not None:
        ctx.text_image_index = torch.arange(features.shape[0])
    state = embed_tower(name, tower, *inputs, hooks=hooks, ctx=ctx)
    final = run_towers({name: tower}, {name: state}, hooks=hooks, ctx=ctx).states[name]
    # pre sees block i - 1's output before the learner acts; post what block i reads
    leaving = [*pre.seen[1:], final.prompt_tokens]
    return post.seen, leaving


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["clip", "bert"])
def test_deep_prompts_replaced_below_depth_and_carried_after(clipseg, biomed, name, backend):
    learner = _bound(name, clipseg, biomed, backend, depth=2)
    text, _, text_inputs = _text_inputs(backend, clipseg, biomed)
    vision, vision_inputs = _vision_inputs(backend, clipseg, biomed)
    features = _features(learner, b=3)
    prompts = learner.prompts(features)
    checks = []
    if prompts.text is not None:
        deep = prompts.text if features is None else [p[:3] for p in prompts.text]
        checks.append((text, text_inputs, deep))
    if prompts.vision is not None:
        checks.append((vision, vision_inputs, prompts.vision))
    assert checks and len(checks) == len(learner.towers)
    for tower, inputs, deep in checks:
        with torch.no_grad():
            ctx_features = features if tower.modality == "text" else None
            entering, leaving = _record_slots_with(tower, learner, inputs, ctx_features)
        assert len(deep) == 2 < tower.num_layers
        # block 0 reads the embedded P_0 (positions / pre-LN applied: see the reference tests)
        for i in range(1, tower.num_layers):
            if i < 2:  # replaced: exactly this depth's prompt, whatever block i - 1 produced
                expected = deep[i].expand_as(entering[i]).to(entering[i].dtype)
                assert torch.equal(entering[i], expected), (tower.modality, i)
                assert _diff(entering[i], leaving[i - 1]) > 1e-4
            else:  # carried: block i - 1's outputs at the slots
                assert torch.equal(entering[i], leaving[i - 1]), (tower.modality, i)


def test_depth_larger_than_tower_is_rejected(clipseg):
    with pytest.raises(ValueError, match="depth=4 exceeds the 3 blocks"):
        CoOp(depth=4, init=None).bind(text_tower=clipseg.text_tower)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        VPT(depth=0)


# ---------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("name", ["CoOp", "CoCoOp", "MaPLe"])
@pytest.mark.parametrize("backend", ["clip", "bert"])
def test_phrase_init_equals_token_embeddings(clipseg, biomed, name, backend):
    text, tok, _ = _text_inputs(backend, clipseg, biomed)
    vision, _ = _vision_inputs(backend, clipseg, biomed)
    learner = _learner(name, init=PHRASE, depth=3)
    assert not learner.built  # the prompt length is the phrase's token count, known at bind
    learner.bind(text_tower=text, vision_tower=vision, tokenizer=tok)
    ids = tok.encode(PHRASE)
    assert learner.num_context == len(ids) == 4
    table = (
        text.text_model.embeddings.token_embedding
        if backend == "clip"
        else text.text.transformer.embeddings.word_embeddings
    )
    assert torch.equal(learner.context[0], table.weight[torch.tensor(ids)])
    assert not torch.allclose(learner.context[1], learner.context[0])  # deeper: Gaussian
    if name == "MaPLe":
        vision_p0 = learner.prompts().vision[0]
        assert torch.equal(vision_p0, learner.couplings[0](table.weight[torch.tensor(ids)]))
    # bind again (e.g. after training) never re-initialises
    with torch.no_grad():
        learner.context.add_(1.0)
    before = learner.context.clone()
    learner.bind(text_tower=text, vision_tower=vision, tokenizer=tok)
    assert torch.equal(learner.context, before)


def test_phrase_init_errors(clipseg):
    tower, tok = clipseg.text_tower, clipseg.tokenizer
    with pytest.raises(ValueError, match="has 4 tokens but num_context=3"):
        CoOp(num_context=3, init=PHRASE).bind(text_tower=tower, tokenizer=tok)
    # a longer context starts with the phrase, the rest stays Gaussian
    long = CoOp(num_context=6, init=PHRASE).bind(text_tower=tower, tokenizer=tok)
    ids = tok.encode(PHRASE)
    table = tower.text_model.embeddings.token_embedding.weight
    assert torch.equal(long.context[0, :4], table[torch.tensor(ids)])
    assert long.context[0, 4:].abs().max() < 0.2
    with pytest.raises(ValueError, match="needs tokenizer="):
        CoOp(init=PHRASE).bind(text_tower=tower)
    eager = CoOp(num_context=4, init=PHRASE, text_width=32, text_layers=3)
    with pytest.raises(RuntimeError, match="not initialised from its phrase"):
        eager.prompts()


@pytest.mark.parametrize("name", ALL)
def test_seeded_construction_is_deterministic(clipseg, biomed, name):
    a = _bound(name, clipseg, biomed, "clip", seed=5)
    b = _bound(name, clipseg, biomed, "clip", seed=5)
    c = _bound(name, clipseg, biomed, "clip", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    pa, pb = a.prompts(_features(a)), b.prompts(_features(b))
    for x, y in zip(pa.tensors(), pb.tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ALL)
def test_config_roundtrip_rebuilds_same_shapes(clipseg, biomed, name):
    learner = _bound(name, clipseg, biomed, "bert")
    clone = hook_from_config(json.loads(json.dumps(learner.config)))
    assert clone.built  # every size is in the config: built eagerly
    clone.load_state_dict(learner.state_dict())
    pairs = zip(
        learner.prompts(_features(learner)).tensors(), clone.prompts(_features(clone)).tensors()
    )
    for x, y in pairs:
        assert torch.equal(x, y)


# ------------------------------------------------------------------------ learner internals
def test_cocoop_meta_net_matches_float64_reference(clipseg):
    torch.manual_seed(0)
    learner = CoCoOp(num_context=3, depth=2, init=None, hidden_dim=8).bind(
        text_tower=clipseg.text_tower, vision_tower=clipseg.vision_tower
    )
    f = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    got = learner.prompts(f).text
    for i, net in enumerate(learner.meta_nets):
        w1, b1 = net.net[0].weight.double(), net.net[0].bias.double()
        w2, g = net.net[2].weight.double(), net.net[3].weight.double()
        h = F.relu(f.double() @ w1.T + b1) @ w2.T
        h = F.layer_norm(h, (h.shape[-1],), weight=g, eps=1e-5)
        ref = learner.context[i].double()[None] + h[:, None]
        assert got[i].shape == (4, 3, 32)
        assert _diff(got[i], ref) < 1e-5
    # one context per image
    assert _diff(got[0][0], got[0][1]) > 1e-3
    with pytest.raises(ValueError, match=r"image_features must have shape \(B, 16\)"):
        learner.prompts(torch.zeros(4, 15))
    with pytest.raises(ValueError, match="needs image_features"):
        learner.prompts()


def test_cocoop_bert_rows_use_their_own_image_context(biomed):
    text, vision, tok = biomed
    torch.manual_seed(0)
    learner = CoCoOp(depth=2, init=PHRASE, hidden_dim=8).bind(
        text_tower=text, vision_tower=vision, tokenizer=tok
    )
    batch = tok(["polyp", "tumor"])
    f = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    both = _prompted(text, learner, batch.input_ids, batch.attention_mask, features=f)
    for b in range(2):
        one = _prompted(
            text,
            learner,
            batch.input_ids[b : b + 1],
            batch.attention_mask[b : b + 1],
            features=f[b : b + 1],
        )
        assert _diff(both.pooled[b : b + 1], one.pooled) < 1e-5


@pytest.mark.parametrize("low_rank", [False, True])
def test_prompt_projector_shapes_and_reference(low_rank):
    torch.manual_seed(0)
    proj = PromptProjector(6, 10, hidden_dim=4, low_rank=low_rank)
    x = torch.randn(3, 6)
    layers = list(proj.net)
    if low_rank:
        assert [type(m) for m in layers] == [nn.Linear, nn.Linear, nn.LayerNorm]
        assert layers[0].weight.shape == (4, 6) and layers[0].bias is None
        h = x.double() @ layers[0].weight.double().T @ layers[1].weight.double().T
    else:
        h = F.relu(x.double() @ layers[0].weight.double().T + layers[0].bias.double())
        h = h @ layers[2].weight.double().T
    ref = F.layer_norm(h, (10,), weight=layers[-1].weight.double(), eps=1e-5)
    assert _diff(proj(x), ref) < 1e-6
    plain = PromptProjector(6, 10)
    assert isinstance(plain.net, nn.Linear)
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        proj(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="low_rank=True needs hidden_dim"):
        PromptProjector(6, 10, low_rank=True)


def test_maple_coupling_is_linear_map_of_text_prompts(clipseg):
    torch.manual_seed(0)
    learner = MaPLe(depth=3, init=None).bind(
        text_tower=clipseg.text_tower, vision_tower=clipseg.vision_tower
    )
    out = learner.prompts()
    for i, g in enumerate(learner.couplings):
        ref = out.text[i].double() @ g.net.weight.double().T + g.net.bias.double()
        assert out.vision[i].shape == (4, 32)
        assert _diff(out.vision[i], ref) < 1e-6


@pytest.mark.parametrize("layernorm", [True, False])
def test_shared_separate_linear_layernorm_reference(clipseg, biomed, layernorm):
    torch.manual_seed(0)
    learner = SharedSeparate(depth=2, shared_dim=8, layernorm=layernorm).bind(
        text_tower=biomed[0], vision_tower=biomed[1]
    )
    out = learner.prompts()
    for i in range(2):
        p = learner.unified[i].double()
        for proj, got in ((learner.to_text[i], out.text[i]), (learner.to_vision[i], out.vision[i])):
            lin = proj[0] if layernorm else proj
            ref = p @ lin.weight.double().T + lin.bias.double()
            if layernorm:
                ln = proj[1]
                ref = F.layer_norm(ref, ref.shape[-1:], ln.weight.double(), ln.bias.double())
            assert _diff(got, ref) < 1e-6
    assert out.text[0].shape == (4, 32) and out.vision[0].shape == (4, 64)


def _copy_to_torch_layer(ours: PromptTransformerLayer, theirs: nn.TransformerEncoderLayer):
    with torch.no_grad():
        theirs.self_attn.in_proj_weight.copy_(ours.qkv.weight)
        theirs.self_attn.in_proj_bias.copy_(ours.qkv.bias)
        theirs.self_attn.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.self_attn.out_proj.bias.copy_(ours.out_proj.bias)
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_prompt_transformer_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = PromptTransformerLayer(24, num_heads=4, mlp_dim=40, dropout=0.3, norm_first=norm_first)
    _jitter(ours, 1)
    theirs = nn.TransformerEncoderLayer(
        24, 4, 40, dropout=0.3, norm_first=norm_first, batch_first=True
    )
    _copy_to_torch_layer(ours, theirs)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 24)
    mixed = ours(x)
    assert _diff(mixed, theirs(x[None])[0]) < 1e-5
    # released TuneVLSeg: the B prompts as a batch of length-1 sequences (batch_first=False)
    ours.mix_tokens = False
    theirs_seq1 = nn.TransformerEncoderLayer(24, 4, 40, dropout=0.3, norm_first=norm_first)
    _copy_to_torch_layer(ours, theirs_seq1)
    theirs_seq1.eval()
    alone = ours(x)
    assert _diff(alone, theirs_seq1(x[None])[0]) < 1e-5
    # tokens attend to each other only when mixing
    y = x.clone()
    y[0] += torch.randn(24)
    assert _diff(ours(y)[1:], alone[1:]) == 0.0
    ours.mix_tokens = True
    assert _diff(ours(y)[1:], mixed[1:]) > 1e-4


def test_shared_attention_splits_modalities_and_rejects_bad_heads(clipseg, biomed):
    torch.manual_seed(0)
    learner = SharedAttention(depth=2, num_heads=4, mlp_dim=32, dropout=0.0).bind(
        text_tower=biomed[0], vision_tower=biomed[1]
    )
    out = learner.prompts()
    for i in range(2):
        full = learner.mixers[i](learner.unified[i])
        assert torch.equal(out.text[i], full[:, :32]) and torch.equal(out.vision[i], full[:, 32:])
    with pytest.raises(ValueError, match="num_heads=5 must divide the prompt width dim=96"):
        SharedAttention(num_heads=5).bind(text_tower=biomed[0], vision_tower=biomed[1])


def test_shared_attention_dropout_sample_is_shared_by_both_modalities(biomed):
    torch.manual_seed(0)
    learner = (
        SharedAttention(depth=1, num_heads=4, mlp_dim=32, dropout=0.5)
        .bind(text_tower=biomed[0], vision_tower=biomed[1])
        .train()
    )
    torch.manual_seed(3)
    first = learner.prompts()
    torch.manual_seed(3)
    again = learner.prompts()
    assert torch.equal(first.text[0], again.text[0]) and torch.equal(
        first.vision[0], again.vision[0]
    )
    torch.manual_seed(3)
    mixed = learner.mixers[0](learner.unified[0])
    assert torch.equal(torch.cat([first.text[0], first.vision[0]], -1), mixed)


# ---------------------------------------------------------------------- gradients and dtypes
@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_prompts_through_frozen_bert_and_timm(biomed, name):
    text, vision, tok = biomed
    learner = _bound(name, None, biomed, "bert")
    batch = tok(["polyp", "tumor", "cyst"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    features = _features(learner)
    loss = 0.0
    if "text" in learner.towers:
        out = _prompted(text, learner, batch.input_ids, batch.attention_mask, features=features)
        loss = loss + out.pooled.square().sum()
    if "vision" in learner.towers:
        loss = loss + _prompted(vision, learner, pixels).pooled.square().sum()
    loss.backward()
    assert all(p.grad is None for p in (*text.parameters(), *vision.parameters()))
    for pname, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    first = next(p for n, p in learner.named_parameters() if n in ("context", "tokens", "unified"))
    assert first.grad[0].abs().sum() > 0  # the depth-0 prompts matter


def test_gradient_checkpointing_gives_same_gradients(clipseg):
    tower = clipseg.text_tower
    ids, mask = _clip_ids(clipseg, TEXTS)
    torch.manual_seed(0)
    learner = CoOp(depth=2, init=None).bind(text_tower=tower)
    grads = []
    for ckpt in (False, True):
        learner.zero_grad()
        out = _prompted(tower, learner, ids, mask, checkpointing=ckpt)
        out.pooled.square().sum().backward()
        grads.append(learner.context.grad.clone())
    assert _diff(grads[0], grads[1]) < 1e-7 and grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["CoOp", "VPT", "SharedAttention"])
def test_bf16_autocast_close_to_fp32(clipseg, biomed, name):
    learner = _bound(name, clipseg, biomed, "clip")
    ids, mask = _clip_ids(clipseg, ["polyp"])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def run():
        outs = []
        if "text" in learner.towers:
            outs.append(_prompted(clipseg.text_tower, learner, ids, mask).pooled)
        if "vision" in learner.towers:
            outs.append(_prompted(clipseg.vision_tower, learner, pixels).pooled)
        return torch.cat(outs, -1)

    ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    assert torch.isfinite(low).all()
    assert _diff(low.float(), ref) < 0.05 * ref.abs().max().item() + 0.05


# ------------------------------------------------------------------------ binding errors
def test_bind_errors_name_the_size(clipseg, biomed):
    with pytest.raises(
        ValueError, match="built for text_width=48, but the tower has text_width=32"
    ):
        CoOp(init=None, text_width=48, text_layers=3).bind(text_tower=clipseg.text_tower)
    with pytest.raises(ValueError, match=r"needs \['vision_width', 'vision_layers'\]"):
        MaPLe(init=None).bind(text_tower=clipseg.text_tower)
    with pytest.raises(RuntimeError, match="call bind"):
        VPT().prompts()
    with pytest.raises(ValueError, match="num_context must be an int >= 0"):
        CoOp(num_context=-1)
    with pytest.raises(ValueError, match=r"context must have shape \(B, n, 32\)"):
        biomed[0].embed(torch.tensor([[2, 5, 3]]), context=torch.zeros(2, 31))


# ------------------------------------------------------------------------------ upsampler
def _upsampler_reference(up: LearnableUpsampler, logits, features):
    b, c = logits.shape[:2]
    x = features.flatten(0, 1).double()
    x = F.interpolate(x, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    k = up.kernel_size // 2
    x = F.pad(x, (k, k, k, k), mode="replicate")
    a = F.conv2d(x, up.conv.weight.double(), up.conv.bias.double()).view(b, c, *logits.shape[-2:])
    r = up.factor.double()
    t = logits.double()
    return {"residual": t + r * a, "interpolate": (1 - r) * t + r * a, "add": t + a}[up.mode]


@pytest.mark.parametrize("mode", ["residual", "interpolate", "add"])
def test_learnable_upsampler_matches_float64_reference(mode):
    torch.manual_seed(0)
    up = LearnableUpsampler(6, mode=mode, init_factor=0.3)
    logits = torch.randn(2, 3, 20, 24)
    features = torch.randn(2, 3, 6, 5, 6)
    out = up(logits, features)
    assert _diff(out, _upsampler_reference(up, logits, features)) < 1e-5
    out.square().sum().backward()
    assert up.conv.weight.grad.abs().sum() > 0
    assert (up.factor.grad is not None) == (mode != "add")


def test_learnable_upsampler_bad_inputs_and_bf16():
    up = LearnableUpsampler(4)
    with pytest.raises(ValueError, match=r"features must have shape \(B=2, C=3, 4, h, w\)"):
        up(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 5, 2, 2))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, C, H, W\)"):
        up(torch.zeros(3, 8, 8), torch.zeros(3, 4, 2, 2))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        LearnableUpsampler(4, kernel_size=4)
    with pytest.raises(ValueError, match="mode must be"):
        LearnableUpsampler(4, mode="mul")
    logits, features = torch.randn(1, 1, 8, 8), torch.randn(1, 4, 2, 2)  # C = 1: 4-D accepted
    ref = up(logits, features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = up(logits, features)
    assert torch.isfinite(low).all() and _diff(low.float(), ref) < 0.05
