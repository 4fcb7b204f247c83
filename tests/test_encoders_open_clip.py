"""Parity of the open_clip / timm / HF-BERT steppable towers with the upstream modules.

Every tower is stepped block by block and compared with the upstream forward (``encode_image``,
``encode_text``, ``HFTextEncoder``, ``forward_intermediates``, ``output_hidden_states``) on tiny random
models built offline: ``open_clip.CLIP`` from a config, and a BiomedCLIP-shaped ``CustomTextCLIP``
(timm ``test_vit`` + tiny ``BertModel``) created through ``open_clip.create_model('local-dir:...')``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from open_clip.hf_model import HFTextEncoder  # noqa: E402
from open_clip.timm_model import TimmModel  # noqa: E402
from open_clip.transformer import TextTransformer, VisionTransformer  # noqa: E402

from vlsegkit.encoders import run_towers  # noqa: E402
from vlsegkit.encoders.base import Tower  # noqa: E402
from vlsegkit.encoders.open_clip import (  # noqa: E402
    HFBertTextTower,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    TimmViTTower,
    towers_from_open_clip,
)

ATOL = 1e-5
CTX = 16  # open_clip text context length
SOS, EOT = 997, 999  # EOT is the largest id, as in the OpenAI tokenizer (argmax pooling)
CLS, SEP, PAD = 2, 3, 0  # BERT specials


def _steps(tower, state):
    """Every block of ``tower`` through the runner; ``(final state, hidden states)``."""
    name = tower.modality
    run = run_towers({name: tower}, {name: state}, keep={name: range(tower.num_layers)})
    return run.states[name], [state.tokens, *(s.tokens for s in run.kept[name].values())]


def _jitter(module: nn.Module, seed: int) -> None:
    """Randomise every 1-D parameter (LayerNorm affine, biases) so none sits at its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _run(tower: Tower, *args, **kwargs):
    """Step a tower by hand: embed, every block, pool, dense; plus all hidden states."""
    state = tower.embed(*args, **kwargs)
    hidden = [state.tokens]
    for i in range(tower.num_layers):
        state = tower.block(i, state)
        hidden.append(state.tokens)
    return state, hidden, tower.pool(state), tower.dense(state)


def _clip_ids(lengths: list[int], length: int = CTX, seed: int = 0) -> torch.Tensor:
    """SOS w_1 .. w_k EOT followed by zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = SOS
        ids[b, 1 : n - 1] = torch.randint(1, 990, (n - 2,), generator=g)
        ids[b, n - 1] = EOT
    return ids


def _bert_ids(lengths: list[int], length: int = 12, seed: int = 0) -> torch.Tensor:
    """[CLS] w_1 .. w_k [SEP] followed by [PAD]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), length), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = CLS
        ids[b, 1 : n - 1] = torch.randint(5, 100, (n - 2,), generator=g)
        ids[b, n - 1] = SEP
    return ids


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=CTX, vocab_size=1000, width=32, heads=2, layers=2),
    )
    _jitter(model, 0)
    return model.eval()


@pytest.fixture(scope="module")
def biomed_model(tmp_path_factory):
    """BiomedCLIP-shaped CustomTextCLIP: timm test_vit + tiny BERT, via open_clip's local-dir path."""
    root = tmp_path_factory.mktemp("tiny_biomedclip")
    bert_cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
        pad_token_id=PAD,
    )
    bert_cfg.save_pretrained(root)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 160,
            },
            "text_cfg": {
                "hf_model_name": str(root),
                "hf_tokenizer_name": str(root),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 12,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False)
    _jitter(model, 1)
    return model.eval()


# ------------------------------------------------------------------------ open_clip built-in ViT
def test_openclip_vision_matches_upstream_native(clip_model):
    tower = OpenCLIPVisionTower(clip_model.visual)
    assert (tower.num_layers, tower.width, tower.embed_dim, tower.patch_size) == (2, 32, 16, 8)
    x = _images(2, 32, 32)
    seen = []
    hook = clip_model.visual.transformer.resblocks[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    with torch.no_grad():
        state, hidden, pooled, dense = _run(tower, x)
        ref = clip_model.encode_image(x)
        inter = clip_model.visual.forward_intermediates(
            x, output_fmt="NLC", output_extra_tokens=True
        )
        clip_model.visual.output_tokens = True
        try:
            _, ref_tokens = clip_model.visual(x)
        finally:
            clip_model.visual.output_tokens = False
    hook.remove()
    assert state.grid == (4, 4) and state.num_prefix == 1 and state.num_prompts == 0
    assert _max_diff(pooled, ref) < ATOL
    # the tower steps the upstream blocks sequence-first (open_clip's batch_first=False layout)
    assert not clip_model.visual.transformer.batch_first
    assert _max_diff(hidden[0], seen[0].transpose(0, 1)) < ATOL
    for i, (patches, prefix) in enumerate(
        zip(inter["image_intermediates"], inter["image_intermediates_prefix"])
    ):
        assert _max_diff(hidden[i + 1], torch.cat([prefix, patches], dim=1)) < ATOL
    assert _max_diff(dense, ref_tokens @ clip_model.visual.proj) < ATOL
    assert _max_diff(inter["image_features"], ref) < ATOL


def _hand_resampled_visual(visual: nn.Module, grid: tuple[int, int]) -> nn.Module:
    """Copy of ``visual`` whose position table is bicubically resized to ``grid`` (CLS row kept)."""
    ref = copy.deepcopy(visual)
    table = ref.positional_embedding.detach()
    h0, w0 = ref.grid_size
    patches = table[1:].reshape(h0, w0, -1).permute(2, 0, 1)[None]
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1)
    ref.positional_embedding = nn.Parameter(torch.cat([table[:1], patches], dim=0))
    return ref


@pytest.mark.parametrize("size", [(32, 48), (48, 24), (16, 16)])
def test_openclip_vision_non_square_matches_resampled_upstream(clip_model, size):
    tower = OpenCLIPVisionTower(clip_model.visual)
    x = _images(2, *size, seed=3)
    grid = (size[0] // 8, size[1] // 8)
    ref_visual = _hand_resampled_visual(clip_model.visual, grid)
    with torch.no_grad():
        state, hidden, pooled, dense = _run(tower, x)
        inter = ref_visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
    assert state.grid == grid
    assert state.grid_map().shape == (2, 32, *grid)
    assert dense.shape == (2, grid[0] * grid[1], 16)
    assert _max_diff(pooled, inter["image_features"]) < ATOL
    for i, patches in enumerate(inter["image_intermediates"]):
        assert _max_diff(hidden[i + 1][:, 1:], patches) < ATOL


def test_openclip_vision_prompts(clip_model):
    tower = OpenCLIPVisionTower(clip_model.visual)
    x = _images(2, 32, 32, seed=4)
    with torch.no_grad():
        plain = _run(tower, x)
        empty = _run(tower, x, prompts=torch.zeros(0, 32))
    assert _max_diff(plain[2], empty[2]) == 0.0 and empty[0].num_prompts == 0

    prompts = torch.randn(2, 3, 32, requires_grad=True)
    state = tower.embed(x, prompts=prompts)
    assert state.num_prompts == 3 and state.tokens.shape == (2, 1 + 3 + 16, 32)
    # VPT layout: [CLS | prompts | patches], each token through ln_pre on its own
    ln_pre = clip_model.visual.ln_pre
    assert _max_diff(state.prompt_tokens, ln_pre(prompts)) < ATOL
    assert _max_diff(state.content_tokens, plain[1][0][:, 1:]) < ATOL
    state, _ = _steps(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)
    assert dense.shape == (2, 16, 16)
    assert _max_diff(pooled, plain[2]) > 1e-3  # the prompts are attended to
    pooled.square().sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert clip_model.visual.conv1.weight.grad.abs().sum() > 0
    clip_model.zero_grad(set_to_none=True)


def test_openclip_vision_avg_pool_and_final_ln_after_pool():
    torch.manual_seed(5)
    for kwargs in (dict(pool_type="avg"), dict(final_ln_after_pool=True)):
        visual = VisionTransformer(
            image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
            output_dim=8, **kwargs,
        )  # fmt: skip
        _jitter(visual, 5)
        visual.eval()
        tower = OpenCLIPVisionTower(visual)
        x = _images(2, 32, 32, seed=5)
        with torch.no_grad():
            _, _, pooled, _ = _run(tower, x)
            assert _max_diff(pooled, visual(x)) < ATOL
            if kwargs.get("pool_type") == "avg":
                # prompts never enter the average: only the patch tokens are pooled
                state, _ = _steps(tower, tower.embed(x, prompts=torch.randn(2, 32)))
                expected = visual.ln_post(state.content_tokens).mean(1) @ visual.proj
                assert _max_diff(tower.pool(state), expected) < ATOL


def test_openclip_vision_attn_pool_not_supported():
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
        output_dim=16, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="attentional pooling"):
        OpenCLIPVisionTower(visual)
    with pytest.raises(TypeError, match="VisionTransformer"):
        OpenCLIPVisionTower(nn.Linear(2, 2))


# ------------------------------------------------------------------------ open_clip text
def test_openclip_text_matches_encode_text(clip_model):
    tower = OpenCLIPTextTower(clip_model)
    assert (tower.num_layers, tower.width, tower.embed_dim, tower.max_positions) == (2, 32, 16, CTX)
    ids = _clip_ids([4, 9, CTX])
    with torch.no_grad():
        state, hidden, pooled, dense = _run(tower, ids)
        ref = clip_model.encode_text(ids)
        inter = clip_model.forward_intermediates(text=ids, normalize=False)
        last = inter["text_intermediates"][-1]
    assert state.causal and state.attention_mask is None
    assert torch.equal(state.pool_index, torch.tensor([3, 8, CTX - 1]))
    assert _max_diff(pooled, ref) < ATOL
    assert _max_diff(inter["text_features"], ref) < ATOL
    emb = clip_model.token_embedding(ids) + clip_model.positional_embedding
    assert _max_diff(hidden[0], emb) < ATOL
    for i, h in enumerate(inter["text_intermediates"]):
        assert _max_diff(hidden[i + 1], h) < ATOL
    assert _max_diff(dense, clip_model.ln_final(last) @ clip_model.text_projection) < ATOL


def _text_transformer(**kwargs) -> TextTransformer:
    torch.manual_seed(6)
    text = TextTransformer(
        context_length=CTX, vocab_size=1000, width=32, heads=2, layers=2, output_dim=16, **kwargs
    )
    _jitter(text, 6)
    return text.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pool_type="eos", eos_id=EOT),
        dict(pool_type="first", no_causal_mask=True, use_pad_mask=True, pad_id=0),
        dict(pool_type="last", proj_bias=True),
        dict(pool_type="argmax", qk_norm=True),  # open_clip's CustomResidualAttentionBlock
    ],
)
def test_openclip_text_transformer_variants(kwargs):
    text = _text_transformer(**kwargs)
    tower = OpenCLIPTextTower(text)
    ids = _clip_ids([5, 11, CTX], seed=7)
    with torch.no_grad():
        state, _, pooled, dense = _run(tower, ids)
        ref = text(ids)
        inter = text.forward_intermediates(ids, output_fmt="NLC")
        text.output_tokens = True
        try:
            _, ref_tokens = text(ids)
        finally:
            text.output_tokens = False
    assert state.causal == (not kwargs.get("no_causal_mask", False))
    assert (state.attention_mask is not None) == kwargs.get("use_pad_mask", False)
    assert _max_diff(pooled, ref) < ATOL
    assert _max_diff(state.tokens, inter["text_intermediates"][-1]) < ATOL
    assert _max_diff(dense, _apply_proj(ref_tokens, text.text_projection)) < ATOL


def _apply_proj(x, p):
    return p(x) if isinstance(p, nn.Linear) else x @ p


def test_openclip_text_context_matches_coop_reference(clip_model):
    tower = OpenCLIPTextTower(clip_model)
    ids = _clip_ids([4, 9, 12], length=12, seed=8)
    with torch.no_grad():
        plain = _run(tower, ids)
        empty = _run(tower, ids, context=torch.zeros(3, 0, 32))
    assert _max_diff(plain[2], empty[2]) == 0.0

    n = 4
    ctx = torch.randn(n, 32, requires_grad=True)
    state = tower.embed(ids, context=ctx)
    assert state.num_prompts == n and state.tokens.shape == (3, 12 + n, 32)
    assert torch.equal(state.pool_index, torch.tensor([3, 8, 11]) + n)
    state, _ = _steps(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)

    # CoOp (KaiyangZhou/CoOp TextEncoder): [SOS | ctx | words] + positions, causal transformer,
    # ln_final, EOT gather at argmax(ids) + n, projection -- run through the upstream modules.
    with torch.no_grad():
        words = clip_model.token_embedding(ids)
        x = torch.cat([words[:, :1], ctx.expand(3, -1, -1), words[:, 1:]], dim=1)
        x = x + clip_model.positional_embedding[: 12 + n]
        x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[: 12 + n, : 12 + n])
        x = clip_model.ln_final(x)
        ref = x[torch.arange(3), ids.argmax(-1) + n] @ clip_model.text_projection
        ref_dense = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1) @ clip_model.text_projection
    assert _max_diff(pooled, ref) < ATOL
    assert dense.shape == (3, 12, 16) and _max_diff(dense, ref_dense) < ATOL
    assert _max_diff(pooled, plain[2]) > 1e-3
    pooled.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    clip_model.zero_grad(set_to_none=True)


def test_openclip_text_padding_mask_is_used(clip_model):
    """An explicit mask hides the padding from the padding rows (the EOS row is causal anyway)."""
    tower = OpenCLIPTextTower(clip_model)
    ids = _clip_ids([5, 7], seed=9)
    mask = ids != 0
    with torch.no_grad():
        plain = _run(tower, ids)
        masked = _run(tower, ids, mask)
    assert _max_diff(plain[2], masked[2]) < ATOL  # pooled at EOS: causality already hides padding
    # reference for a padding row: its keys are restricted to the real tokens
    assert masked[0].attention_mask is not None and torch.equal(masked[0].attention_mask, mask)
    assert _max_diff(plain[3][0, 5:], masked[3][0, 5:]) > 1e-4


# ------------------------------------------------------------------------ timm ViT (BiomedCLIP)
@pytest.mark.parametrize("size", [(160, 160), (32, 48), (192, 176)])
def test_timm_vit_matches_upstream(biomed_model, size):
    visual = biomed_model.visual
    tower = TimmViTTower(visual)
    assert (tower.width, tower.embed_dim, tower.patch_size, tower.num_prefix) == (64, 16, 16, 1)
    assert tower.pretrained_grid == (10, 10) and visual.trunk.dynamic_img_size
    x = _images(2, *size, seed=10)
    with torch.no_grad():
        state, hidden, pooled, dense = _run(tower, x)
        ref = biomed_model.encode_image(x)
        final, inter = visual.trunk.forward_intermediates(
            x, output_fmt="NLC", return_prefix_tokens=True
        )
        ref_dense = visual.head(visual.trunk.forward_features(x)[:, 1:])
    assert state.grid == (size[0] // 16, size[1] // 16)
    assert _max_diff(pooled, ref) < ATOL
    for i, (patches, prefix) in enumerate(inter):
        assert _max_diff(hidden[i + 1], torch.cat([prefix, patches], dim=1)) < ATOL
    assert _max_diff(visual.trunk.norm(state.tokens), final) < ATOL
    assert _max_diff(dense, ref_dense) < ATOL


def _registers_timm_model(*, dynamic: bool) -> TimmModel:
    """TimmModel with a swapped-in trunk: 2 registers, no_embed_class, avg pool + fc_norm."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(11)
    tm = TimmModel("test_vit", embed_dim=16, pool="", proj="linear")
    tm.trunk = TimmViT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        reg_tokens=2, no_embed_class=True, global_pool="avg", num_classes=0,
        dynamic_img_size=dynamic, qkv_bias=True,
    )  # fmt: skip
    tm.head.proj = nn.Linear(32, 16, bias=False)
    _jitter(tm, 11)
    return tm.eval()


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_timm_vit_registers_avg_pool(size, dynamic):
    tm = _registers_timm_model(dynamic=dynamic)
    tower = TimmViTTower(tm)
    assert tower.num_prefix == 3 and tower.embed_dim == 16
    # a fixed-size trunk cannot run other sizes upstream: its dynamic twin (same weights) is the
    # reference there, i.e. the tower follows timm's dynamic-size semantics
    ref_model = tm
    if not dynamic and size != (32, 32):
        ref_model = _registers_timm_model(dynamic=True)
        ref_model.load_state_dict(tm.state_dict())
    x = _images(2, *size, seed=12)
    with torch.no_grad():
        state, hidden, pooled, dense = _run(tower, x)
        inter = ref_model.trunk.forward_intermediates(
            x, output_fmt="NLC", return_prefix_tokens=True
        )[1]
        ref = ref_model(x)
    num_patches = (size[0] // 8) * (size[1] // 8)
    assert state.num_prefix == 3 and state.content_tokens.shape[1] == num_patches
    assert _max_diff(pooled, ref) < ATOL
    for i, (patches, prefix) in enumerate(inter):
        assert _max_diff(hidden[i + 1], torch.cat([prefix, patches], dim=1)) < ATOL
    expected_dense = tm.head(tm.trunk.fc_norm(tm.trunk.norm(state.content_tokens)))
    assert _max_diff(dense, expected_dense) < ATOL

    # prompts go after the 3 prefix tokens and stay out of the average
    prompts = torch.randn(2, 2, 32)
    with torch.no_grad():
        s = tower.embed(x, prompts=prompts)
        assert _max_diff(s.tokens[:, 3:5], prompts) == 0.0  # norm_pre is Identity here
        s, _ = _steps(tower, s)
        expected = tm.head(tm.trunk.fc_norm(tm.trunk.norm(s.content_tokens).mean(1)))
        assert _max_diff(tower.pool(s), expected) < ATOL


def test_timm_vit_prompts_and_gradients(biomed_model):
    tower = TimmViTTower(biomed_model.visual)
    x = _images(2, 32, 48, seed=13)
    with torch.no_grad():
        plain = _run(tower, x)
        empty = _run(tower, x, prompts=torch.zeros(2, 0, 64))
    assert _max_diff(plain[2], empty[2]) == 0.0
    prompts = torch.randn(5, 64, requires_grad=True)
    state = tower.embed(x, prompts=prompts)
    assert state.num_prompts == 5 and state.tokens.shape == (2, 1 + 5 + 6, 64)
    assert _max_diff(state.content_tokens, plain[1][0][:, 1:]) == 0.0
    state, _ = _steps(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)
    assert dense.shape == (2, 6, 16) and _max_diff(pooled, plain[2]) > 1e-3
    pooled.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert biomed_model.visual.trunk.pos_embed.grad.abs().sum() > 0
    biomed_model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------ HF BERT (BiomedCLIP)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_matches_hf_text_encoder(biomed_model, impl):
    text = biomed_model.text
    bert = text.transformer
    previous = bert.config._attn_implementation
    bert.set_attn_implementation(impl)
    try:
        tower = HFBertTextTower(text)
        assert (tower.width, tower.embed_dim, tower.max_positions) == (32, 16, 24)
        ids = _bert_ids([4, 8, 12], seed=14)
        mask = ids != PAD
        assert not mask.all()  # padding present
        with torch.no_grad():
            state, hidden, pooled, dense = _run(tower, ids)
            ref = text(ids)
            out = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            # the mask, not the ids, decides: other ids at padded positions change nothing
            ids2 = ids.masked_fill(~mask, 7)
            pooled2 = _run(tower, ids2, mask)[2]
            unmasked = _run(tower, ids2)[2]
    finally:
        bert.set_attn_implementation(previous)
    assert torch.equal(state.attention_mask, mask) and not state.causal
    assert torch.equal(state.pool_index, torch.zeros(3, dtype=torch.long))
    assert _max_diff(pooled, ref) < ATOL
    assert len(out.hidden_states) == len(hidden) == 3
    for h, r in zip(hidden, out.hidden_states):
        assert _max_diff(h, r) < ATOL
    assert _max_diff(dense, text.proj(out.last_hidden_state)) < ATOL
    assert _max_diff(pooled2, pooled) < ATOL
    assert _max_diff(unmasked, pooled) > 1e-4  # ...whereas unmasked id-7 tokens are attended to


def test_bert_context_matches_inputs_embeds_reference(biomed_model):
    text = biomed_model.text
    bert = text.transformer
    tower = HFBertTextTower(text)
    ids = _bert_ids([4, 8, 12], seed=15)
    mask = ids != PAD
    with torch.no_grad():
        plain = _run(tower, ids)
        empty = _run(tower, ids, context=torch.zeros(0, 32))
    assert _max_diff(plain[2], empty[2]) == 0.0

    n = 3
    ctx = torch.randn(3, n, 32, requires_grad=True)
    state = tower.embed(ids, context=ctx)
    assert state.num_prompts == n and torch.equal(state.pool_index, torch.zeros(3).long())
    assert torch.equal(state.attention_mask[:, 1 : 1 + n], torch.ones(3, n, dtype=torch.bool))
    state, _ = _steps(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)
    with torch.no_grad():
        words = bert.embeddings.word_embeddings(ids)
        embeds = torch.cat([words[:, :1], ctx, words[:, 1:]], dim=1)
        full_mask = torch.cat([mask[:, :1], torch.ones(3, n, dtype=torch.bool), mask[:, 1:]], 1)
        last = bert(inputs_embeds=embeds, attention_mask=full_mask.long()).last_hidden_state
        ref = text.proj(last[:, 0])
        ref_dense = text.proj(torch.cat([last[:, :1], last[:, 1 + n :]], dim=1))
    assert _max_diff(pooled, ref) < ATOL
    assert dense.shape == (3, 12, 16) and _max_diff(dense, ref_dense) < ATOL
    assert _max_diff(pooled, plain[2]) > 1e-3
    pooled.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    biomed_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("pooler", ["cls_pooler", "mean_pooler"])
def test_bert_other_poolers(pooler):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(16)
    # open_clip only builds BERT's pooling layer for 'cls_pooler' when creating from a name; with an
    # explicit config it always has one, so drop it for mean pooling as the name-based path would.
    text = HFTextEncoder(
        "tiny-bert", output_dim=16, config=config, pooler_type=pooler, proj_type="linear"
    )
    if pooler == "mean_pooler":
        text.transformer.pooler = None
    _jitter(text, 16)
    text.eval()
    tower = HFBertTextTower(text)
    ids = _bert_ids([5, 9], length=10, seed=16)
    with torch.no_grad():
        pooled = _run(tower, ids)[2]
        assert _max_diff(pooled, text(ids)) < ATOL


def test_bert_rejects_unsupported():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
    )  # fmt: skip
    text = HFTextEncoder("tiny-bert", output_dim=16, config=config, pooler_type="max_pooler")
    with pytest.raises(NotImplementedError, match="poolers"):
        HFBertTextTower(text)
    with pytest.raises(TypeError, match="BertModel"):
        HFBertTextTower(nn.Linear(2, 2))


# ------------------------------------------------------------------------ shared behaviour
def test_towers_from_open_clip(clip_model, biomed_model):
    vision, text = towers_from_open_clip(clip_model)
    assert isinstance(vision, OpenCLIPVisionTower) and isinstance(text, OpenCLIPTextTower)
    keys = set(vision.state_dict()) | set(text.state_dict())
    assert {
        "visual.conv1.weight",
        "visual.proj",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
    } <= keys
    assert {
        "text.token_embedding.weight",
        "text.positional_embedding",
        "text.text_projection",
    } <= keys
    assert "text.transformer.resblocks.0.mlp.c_fc.weight" in keys
    assert text.text.token_embedding.weight is clip_model.token_embedding.weight  # shared, no copy
    assert text.text.positional_embedding is clip_model.positional_embedding

    vision, text = towers_from_open_clip(biomed_model)
    assert isinstance(vision, TimmViTTower) and isinstance(text, HFBertTextTower)
    upstream = biomed_model.state_dict()
    for key, value in [*vision.state_dict().items(), *text.state_dict().items()]:
        assert key in upstream, key  # keys are CustomTextCLIP's own
        assert value.data_ptr() == upstream[key].data_ptr()
    assert "text.proj.0.weight" in text.state_dict() and "visual.head.proj.weight" in upstream

    torch.manual_seed(17)
    custom = open_clip.CustomTextCLIP(
        embed_dim=8,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=dict(context_length=8, vocab_size=1000, width=32, heads=2, layers=1),
    ).eval()
    vision, text = towers_from_open_clip(custom)
    ids = _clip_ids([4, 8], length=8)
    with torch.no_grad():
        assert _max_diff(text(ids).pooled, custom.encode_text(ids)) < ATOL
        assert (
            _max_diff(vision(_images(1, 16, 16)).pooled, custom.encode_image(_images(1, 16, 16)))
            < ATOL
        )


def _towers(clip_model, biomed_model):
    return {
        "openclip_vision": (OpenCLIPVisionTower(clip_model.visual), (_images(1, 32, 32),)),
        "openclip_text": (OpenCLIPTextTower(clip_model), (_clip_ids([6], length=8),)),
        "timm_vit": (TimmViTTower(biomed_model.visual), (_images(1, 32, 32),)),
        "hf_bert": (HFBertTextTower(biomed_model.text), (_bert_ids([5], length=8),)),
    }


@pytest.mark.parametrize("name", ["openclip_vision", "openclip_text", "timm_vit", "hf_bert"])
def test_bf16_autocast_and_determinism(clip_model, biomed_model, name):
    tower, args = _towers(clip_model, biomed_model)[name]
    with torch.no_grad():
        ref = tower(*args, output_hidden_states=True)
        again = tower(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tower(*args).pooled
    assert torch.equal(ref.pooled, again.pooled)  # deterministic in eval mode
    assert len(ref.hidden_states) == tower.num_layers + 1
    assert ref.pooled.shape == (1, tower.embed_dim)
    assert torch.isfinite(low).all()
    scale = ref.pooled.abs().max().item()
    assert _max_diff(low.float(), ref.pooled) < 0.02 * scale + 0.01


@pytest.mark.parametrize("name", ["openclip_vision", "timm_vit"])
def test_vision_bad_inputs(clip_model, biomed_model, name):
    tower, _ = _towers(clip_model, biomed_model)[name]
    p, d = tower.patch_size, tower.width
    with pytest.raises(ValueError, match="multiples of patch_size"):
        tower.embed(torch.randn(1, 3, 2 * p, 2 * p + 1))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, H, W\)"):
        tower.embed(torch.randn(3, 2 * p, 2 * p))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, H, W\)"):
        tower.embed(torch.randn(1, 1, 2 * p, 2 * p))
    with pytest.raises(ValueError, match=rf"prompts must have shape \(B, n, {d}\)"):
        tower.embed(torch.randn(1, 3, 2 * p, 2 * p), prompts=torch.randn(2, d + 1))
    with pytest.raises(ValueError, match="prompts must have shape"):
        tower.embed(torch.randn(2, 3, 2 * p, 2 * p), prompts=torch.randn(3, 2, d))
    state = tower.embed(torch.randn(1, 3, 2 * p, 2 * p))
    with pytest.raises(ValueError, match="block index"):
        tower.block(tower.num_layers, state)


@pytest.mark.parametrize("name", ["openclip_text", "hf_bert"])
def test_text_bad_inputs(clip_model, biomed_model, name):
    tower, (ids,) = _towers(clip_model, biomed_model)[name]
    d, limit = tower.width, tower.max_positions
    long_ids = ids.new_ones(1, limit)
    tower.embed(long_ids)  # exactly max_positions is fine
    with pytest.raises(ValueError, match=r"exceed the .* text positions"):
        tower.embed(long_ids, context=torch.randn(1, d))
    with pytest.raises(ValueError, match=r"exceed the .* text positions"):
        tower.embed(ids.new_ones(1, limit + 1))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, L\)"):
        tower.embed(ids[0])
    with pytest.raises(ValueError, match="integer"):
        tower.embed(ids.float())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, L\)"):
        tower.embed(ids, ids[:, :-1] > 0)
    with pytest.raises(ValueError, match=rf"context must have shape \(B, n, {d}\)"):
        tower.embed(ids, context=torch.randn(2, d - 1))
