"""Parity of the steppable transformers CLIP / CLIPSeg towers with the upstream modules."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPSegConfig, CLIPSegForImageSegmentation
from transformers.masking_utils import create_causal_mask

from vlsegkit.encoders import TowerHook, run_towers
from vlsegkit.encoders.hf_clip import HFCLIPTextTower, HFCLIPVisionTower, from_clip_model

ATOL = 1e-5
VOCAB = 100
MAX_POS = 16
# legacy configs (eos_token_id == 2) pool at argmax(input_ids); the real EOS is the largest id
LEGACY = {"eos_token_id": 2, "bos": 98, "eos": 99, "pad": 99}
# fixed configs pool at the first eos_token_id; ids above it occur in the text
MODERN = {"eos_token_id": 97, "bos": 95, "eos": 97, "pad": 0}
KINDS = ("clip", "clipseg")
IMPLS = ("sdpa", "eager")


def _run(tower, state):
    """Every block of ``tower`` through the runner; ``(final state, hidden states)``."""
    name = tower.modality
    run = run_towers({name: tower}, {name: state}, keep={name: range(tower.num_layers)})
    return run.states[name], [state.tokens, *(s.tokens for s in run.kept[name].values())]


def _text_cfg(conv: dict) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        eos_token_id=conv["eos_token_id"],
        bos_token_id=conv["bos"],
        pad_token_id=conv["pad"],
    )


def _build(kind: str, conv: dict, impl: str, seed: int = 0) -> nn.Module:
    """A tiny random CLIPModel / CLIPSegModel (the ``.clip`` of CLIPSegForImageSegmentation)."""
    torch.manual_seed(seed)
    if kind == "clip":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        )
        model = CLIPModel(
            CLIPConfig(text_config=_text_cfg(conv), vision_config=vision, projection_dim=24)
        )
    else:
        vision = dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        config = CLIPSegConfig(
            text_config=_text_cfg(conv),
            vision_config=vision,
            projection_dim=24,
            extract_layers=(0, 1),
            reduce_dim=16,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        )
        model = CLIPSegForImageSegmentation(config)
    model.set_attn_implementation(impl)
    return model.eval()


@functools.cache
def _model(kind: str, legacy: bool, impl: str) -> nn.Module:
    return _build(kind, LEGACY if legacy else MODERN, impl)


def _clip(model: nn.Module) -> nn.Module:
    return getattr(model, "clip", model)


def _text_batch(conv: dict, lengths=(6, 2, 4), total: int = 7):
    """Right-padded ``[BOS, words, EOS, pad...]`` ids whose EOS is not where the other rule looks."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), total), conv["pad"], dtype=torch.long)
    for b, n in enumerate(lengths):
        words = torch.randint(3, 90, (n - 2,), generator=g)
        ids[b, 0], ids[b, 1 : n - 1], ids[b, n - 1] = conv["bos"], words, conv["eos"]
    if lengths[0] >= 4:
        # legacy: a word with id 2 (== eos_token_id) would fool a first-eos rule;
        # modern: a word with id above EOS would fool an argmax rule
        ids[0, 2] = 2 if conv is LEGACY else VOCAB - 1
    mask = (torch.arange(total)[None] < torch.tensor(lengths)[:, None]).long()
    eos = torch.tensor(lengths) - 1
    return ids, mask, eos


def _pixels(grid: tuple[int, int], patch: int, batch: int = 2, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, grid[0] * patch, grid[1] * patch, generator=g)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- vision parity
# grids in patch units; native is 4x4 for both tiny models. (2, 8) keeps the patch count but is
# non-square, which transformers still resamples.
GRIDS = [(4, 4), (6, 6), (2, 8), (3, 5)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_vision_matches_upstream(kind, impl, grid):
    clip = _clip(_model(kind, True, impl))
    tower = HFCLIPVisionTower.from_clip_model(clip)
    x = _pixels(grid, tower.patch_size)
    with torch.no_grad():
        ref = clip.vision_model(x, interpolate_pos_encoding=True, output_hidden_states=True)
        feats = clip.get_image_features(x, interpolate_pos_encoding=True).pooler_output
        state = tower.embed(x)
        state, hidden = _run(tower, state)
        pooled, dense = tower.pool(state), tower.dense(state)
    assert state.grid == grid and state.num_prefix == 1 and state.attention_mask is None
    assert len(hidden) == len(ref.hidden_states) == tower.num_layers + 1
    for mine, theirs in zip(hidden, ref.hidden_states):
        assert _maxdiff(mine, theirs) < ATOL
    assert _maxdiff(pooled, feats) < ATOL
    ref_dense = clip.visual_projection(
        clip.vision_model.post_layernorm(ref.last_hidden_state[:, 1:])
    )
    assert _maxdiff(dense, ref_dense) < ATOL


def test_nonsquare_grid_with_native_patch_count_is_resampled():
    # 2x8 has the 16 patches of the native 4x4 grid: reusing the table unresampled would be wrong
    clip = _clip(_model("clip", True, "sdpa"))
    tower = HFCLIPVisionTower.from_clip_model(clip)
    x = _pixels((2, 8), tower.patch_size)
    emb = clip.vision_model.embeddings
    with torch.no_grad():
        mine = tower.embed(x).tokens
        patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        raw = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], 1)
        raw = clip.vision_model.pre_layrnorm(raw + emb.position_embedding.weight)
    assert _maxdiff(mine[:, 0], raw[:, 0]) < ATOL  # the CLS row is kept as is
    assert _maxdiff(mine, raw) > 1e-2


def test_vision_native_size_matches_without_interpolation():
    clip = _clip(_model("clip", True, "sdpa"))
    tower = HFCLIPVisionTower.from_clip_model(clip)
    x = _pixels((4, 4), tower.patch_size)
    with torch.no_grad():
        ref = clip.get_image_features(x, interpolate_pos_encoding=False).pooler_output
        assert _maxdiff(tower(x).pooled, ref) < ATOL


def test_vision_prompts_match_hand_built_upstream_sequence():
    clip = _clip(_model("clipseg", True, "eager"))
    tower = HFCLIPVisionTower.from_clip_model(clip)
    x = _pixels((3, 5), tower.patch_size)
    prompts = torch.randn(2, 3, tower.width, generator=torch.Generator().manual_seed(3))
    prompts.requires_grad_(True)
    state = tower.embed(x, prompts=prompts)
    assert (state.num_prefix, state.num_prompts) == (1, 3)
    assert state.pool_index.tolist() == [0, 0]
    state, _ = _run(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)

    prompts_ref = prompts.detach().clone().requires_grad_(True)
    vm = clip.vision_model
    emb = vm.embeddings(x, interpolate_pos_encoding=True)
    seq = vm.pre_layrnorm(torch.cat([emb[:, :1], prompts_ref, emb[:, 1:]], dim=1))
    out = vm.encoder(inputs_embeds=seq).last_hidden_state
    ref_pooled = clip.visual_projection(vm.post_layernorm(out[:, 0]))
    ref_dense = clip.visual_projection(vm.post_layernorm(out[:, 4:]))
    assert _maxdiff(pooled, ref_pooled) < ATOL
    assert _maxdiff(dense, ref_dense) < ATOL
    assert dense.shape == (2, 15, tower.embed_dim)

    (pooled.square().sum() + dense.sum()).backward()
    (ref_pooled.square().sum() + ref_dense.sum()).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert _maxdiff(prompts.grad, prompts_ref.grad) < ATOL * prompts_ref.grad.abs().max()
    clip.zero_grad(set_to_none=True)


def test_vision_zero_prompts_equal_plain():
    tower = HFCLIPVisionTower.from_clip_model(_model("clip", True, "sdpa"))
    x = _pixels((2, 8), tower.patch_size)
    with torch.no_grad():
        plain = tower(x, output_hidden_states=True)
        empty_b = tower(x, prompts=torch.empty(2, 0, tower.width), output_hidden_states=True)
        empty_s = tower(x, prompts=torch.empty(0, tower.width))
    assert empty_b.state.num_prompts == 0
    for a, b in zip(plain.hidden_states, empty_b.hidden_states):
        assert torch.equal(a, b)
    assert torch.equal(plain.pooled, empty_b.pooled) and torch.equal(plain.pooled, empty_s.pooled)


# ----------------------------------------------------------------------------- text parity
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("legacy", [True, False], ids=["eos2-argmax", "first-eos"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "nomask"])
def test_text_matches_upstream(kind, impl, legacy, padded):
    conv = LEGACY if legacy else MODERN
    clip = _clip(_model(kind, legacy, impl))
    tower = HFCLIPTextTower.from_clip_model(clip)
    assert tower.eos_pooling == ("argmax" if legacy else "first_eos")
    ids, mask, eos = _text_batch(conv)
    mask = mask if padded else None
    with torch.no_grad():
        ref = clip.text_model(ids, attention_mask=mask, output_hidden_states=True)
        feats = clip.get_text_features(ids, attention_mask=mask).pooler_output
        state = tower.embed(ids, mask)
        assert state.causal and state.pool_index.tolist() == eos.tolist()
        state, hidden = _run(tower, state)
        pooled, dense = tower.pool(state), tower.dense(state)
    assert len(hidden) == len(ref.hidden_states) == tower.num_layers + 1
    for mine, theirs in zip(hidden, ref.hidden_states):
        assert _maxdiff(mine, theirs) < ATOL
    assert _maxdiff(pooled, feats) < ATOL
    assert _maxdiff(dense, clip.text_projection(ref.last_hidden_state)) < ATOL


@pytest.mark.parametrize("legacy", [True, False], ids=["eos2-argmax", "first-eos"])
def test_text_wrong_pooling_rule_is_detected(legacy):
    # the batch is built so that the other convention pools elsewhere: guards the test above
    clip = _clip(_model("clip", legacy, "sdpa"))
    other = "first_eos" if legacy else "argmax"
    tower = HFCLIPTextTower.from_clip_model(clip, eos_pooling=other)
    ids, mask, eos = _text_batch(LEGACY if legacy else MODERN)
    assert tower.embed(ids, mask).pool_index[0] != eos[0]
    with torch.no_grad():
        feats = clip.get_text_features(ids, attention_mask=mask).pooler_output
        assert _maxdiff(tower(ids, mask).pooled, feats) > 1e-3


@pytest.mark.parametrize("legacy", [True, False], ids=["eos2-argmax", "first-eos"])
def test_text_empty_prompt(legacy):
    conv = LEGACY if legacy else MODERN
    clip = _clip(_model("clipseg", legacy, "sdpa"))
    tower = HFCLIPTextTower.from_clip_model(clip)
    ids = torch.tensor([[conv["bos"], conv["eos"]]])
    ctx = torch.randn(4, tower.width)
    with torch.no_grad():
        feats = clip.get_text_features(ids).pooler_output
        assert _maxdiff(tower(ids).pooled, feats) < ATOL
        state = tower.embed(ids, context=ctx)
    assert state.pool_index.tolist() == [5] and state.tokens.shape[1] == 6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("legacy", [True, False], ids=["eos2-argmax", "first-eos"])
@pytest.mark.parametrize("shared", [True, False], ids=["ctx(n,D)", "ctx(B,n,D)"])
def test_text_context_matches_hand_built_upstream_sequence(impl, legacy, shared):
    conv = LEGACY if legacy else MODERN
    clip = _clip(_model("clip", legacy, impl))
    tower = HFCLIPTextTower.from_clip_model(clip)
    ids, mask, eos = _text_batch(conv)
    n = 3
    g = torch.Generator().manual_seed(4)
    shape = (n, tower.width) if shared else (ids.shape[0], n, tower.width)
    ctx = (0.1 * torch.randn(*shape, generator=g)).requires_grad_(True)

    state = tower.embed(ids, mask, context=ctx)
    assert (state.num_prefix, state.num_prompts) == (1, n)
    assert state.pool_index.tolist() == (eos + n).tolist()
    assert state.attention_mask[:, 1 : 1 + n].all()
    state, hidden = _run(tower, state)
    pooled, dense = tower.pool(state), tower.dense(state)

    # reference: words shifted right by n, positions added by the upstream embeddings module
    ctx_ref = ctx.detach().clone().requires_grad_(True)
    tm = clip.text_model
    words = tm.embeddings.token_embedding(ids)
    ctx_b = ctx_ref.expand(ids.shape[0], n, -1)
    seq = tm.embeddings(inputs_embeds=torch.cat([words[:, :1], ctx_b, words[:, 1:]], dim=1))
    ext_mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :n]), mask[:, 1:]], dim=1)
    bias = create_causal_mask(
        config=tm.config, inputs_embeds=seq, attention_mask=ext_mask, cache=None
    )
    h = seq
    ref_hidden = [h]
    for layer in tm.encoder.layers:
        h = layer(h, bias, is_causal=True)
        ref_hidden.append(h)
    last = tm.final_layer_norm(h)
    ref_pooled = clip.text_projection(last[torch.arange(ids.shape[0]), eos + n])
    ref_dense = clip.text_projection(torch.cat([last[:, :1], last[:, 1 + n :]], dim=1))

    for mine, theirs in zip(hidden, ref_hidden):
        assert _maxdiff(mine, theirs) < ATOL
    assert _maxdiff(pooled, ref_pooled) < ATOL
    assert _maxdiff(dense, ref_dense) < ATOL
    assert dense.shape == (*ids.shape, tower.embed_dim)

    (pooled.square().sum() + dense.mean()).backward()
    (ref_pooled.square().sum() + ref_dense.mean()).backward()
    assert torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    assert _maxdiff(ctx.grad, ctx_ref.grad) < ATOL * ctx_ref.grad.abs().max()
    clip.zero_grad(set_to_none=True)


def test_text_zero_context_equals_plain():
    tower = HFCLIPTextTower.from_clip_model(_model("clipseg", False, "sdpa"))
    ids, mask, _ = _text_batch(MODERN)
    with torch.no_grad():
        plain = tower(ids, mask, output_hidden_states=True)
        for ctx in (torch.empty(0, tower.width), torch.empty(ids.shape[0], 0, tower.width)):
            empty = tower(ids, mask, context=ctx, output_hidden_states=True)
            assert empty.state.num_prompts == 0
            assert torch.equal(plain.pooled, empty.pooled)
            for a, b in zip(plain.hidden_states, empty.hidden_states):
                assert torch.equal(a, b)


def test_text_context_up_to_max_positions():
    tower = HFCLIPTextTower.from_clip_model(_model("clip", False, "sdpa"))
    ids, mask, _ = _text_batch(MODERN)  # L = 7
    fits = torch.randn(MAX_POS - ids.shape[1], tower.width)
    assert tower.embed(ids, mask, context=fits).tokens.shape[1] == MAX_POS
    too_long = torch.randn(MAX_POS - ids.shape[1] + 2, tower.width)
    with pytest.raises(ValueError, match="exceed the 16 text positions"):
        tower.embed(ids, mask, context=too_long)


def test_text_overflow_truncate_and_released():
    tower = HFCLIPTextTower.from_clip_model(_model("clip", False, "sdpa"))
    ids, mask, _ = _text_batch(MODERN)  # (B, L = 7), right padded
    n = MAX_POS - ids.shape[1] + 2  # two positions too many
    ctx = torch.randn(n, tower.width, generator=torch.Generator().manual_seed(0))
    words = tower.text_model.embeddings.token_embedding(ids)
    pos = tower.text_model.embeddings.position_embedding.weight[:MAX_POS]
    full = torch.cat([words[:, :1], ctx.expand(len(ids), -1, -1), words[:, 1:]], 1)
    full_mask = torch.cat([mask[:, :1], torch.ones(len(ids), n, dtype=mask.dtype), mask[:, 1:]], 1)
    eos = tower.eos_index(ids) + n
    with torch.no_grad():
        # released (TuneVLSeg): keep the first 15 positions and the sequence's last one; the mask is
        # cropped at its end; the pooling index is clamped to 15
        released = tower.embed(ids, mask, context=ctx, overflow="released")
        assert torch.equal(released.tokens, torch.cat([full[:, :15], full[:, -1:]], 1) + pos)
        assert torch.equal(released.attention_mask, full_mask[:, :16].bool())
        assert released.pool_index.tolist() == eos.clamp(max=15).tolist()
        # truncate: a row whose end token is cut keeps it at the last position, with a warning
        with pytest.warns(UserWarning, match="exceed the 16 text positions"):
            cut = tower.embed(ids, mask, context=ctx, overflow="truncate")
    last = (full_mask * torch.arange(full.shape[1])).argmax(1)
    for b in range(len(ids)):
        expected = full[b, :16].clone()
        if last[b] >= 16:
            expected[15] = full[b, last[b]]
            assert cut.pool_index[b] == 15 and cut.attention_mask[b, 15]
        else:
            assert cut.pool_index[b] == eos[b]
        assert torch.equal(cut.tokens[b], expected + pos)
    assert (last >= 16).any()  # the test really cuts a row


# ----------------------------------------------------------------------------- dtypes
def test_float64_parity_is_tight():
    clip = _clip(_build("clipseg", MODERN, "sdpa")).double()
    vt, tt = from_clip_model(clip)
    ids, mask, _ = _text_batch(MODERN)
    with torch.no_grad():
        t_ref = clip.get_text_features(ids, attention_mask=mask).pooler_output
        t = tt(ids, mask).pooled
        assert t.dtype == torch.float64 and _maxdiff(t, t_ref) < 1e-12
        # native grid: tight; resampled grid: _pos_embed interpolates in float32 (see report)
        for grid, tol in (((4, 4), 1e-12), ((3, 5), 1e-6)):
            x = _pixels(grid, vt.patch_size).double()
            v_ref = clip.get_image_features(x, interpolate_pos_encoding=True).pooler_output
            v = vt(x).pooled
            assert v.dtype == torch.float64 and _maxdiff(v, v_ref) < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_close_to_fp32(impl):
    clip = _clip(_model("clip", True, impl))
    vt, tt = from_clip_model(clip)
    x = _pixels((2, 3), vt.patch_size, batch=1)
    ids, mask, _ = _text_batch(LEGACY, lengths=(5, 3), total=5)
    ctx = torch.randn(2, tt.width) * 0.1
    with torch.no_grad():
        v32, t32 = vt(x).pooled, tt(ids, mask, context=ctx).pooled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v16, t16 = vt(x).pooled, tt(ids, mask, context=ctx).pooled
    for low, high in ((v16, v32), (t16, t32)):
        assert low.dtype == torch.bfloat16
        assert torch.isfinite(low).all()
        scale = high.abs().max().item()
        assert _maxdiff(low, high) < 0.05 * scale + 1e-2


def test_deterministic_given_seed():
    a, b = _build("clip", MODERN, "sdpa", seed=7), _build("clip", MODERN, "sdpa", seed=7)
    c = _build("clip", MODERN, "sdpa", seed=8)
    x = _pixels((4, 4), 16)
    ids, mask, _ = _text_batch(MODERN)
    outs = []
    with torch.no_grad():
        for m in (a, b, c):
            vt, tt = from_clip_model(m)
            outs.append((vt(x).pooled, tt(ids, mask).pooled))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.allclose(outs[0][0], outs[2][0])


# ----------------------------------------------------------------------------- structure
def test_attributes_and_ownership():
    model = _model("clipseg", True, "sdpa")
    clip = model.clip
    vt, tt = from_clip_model(model)  # unwraps CLIPSegForImageSegmentation
    assert (vt.modality, tt.modality) == ("vision", "text")
    assert (vt.num_layers, vt.width, vt.embed_dim, vt.patch_size) == (2, 48, 24, 8)
    assert (tt.num_layers, tt.width, tt.embed_dim, tt.max_positions) == (2, 32, 24, MAX_POS)
    assert vt.vision_model is clip.vision_model and tt.text_projection is clip.text_projection

    holder = nn.ModuleDict({"vision": vt, "text": tt})
    keys = set(holder.state_dict())
    expected = {
        k.replace("vision_model.", "vision.vision_model.", 1)
        .replace("visual_projection.", "vision.visual_projection.", 1)
        .replace("text_model.", "text.text_model.", 1)
        .replace("text_projection.", "text.text_projection.", 1)
        for k in clip.state_dict()
        if k != "logit_scale"
    }
    assert keys == expected
    n_params = sum(p.numel() for p in holder.parameters())
    assert n_params == sum(p.numel() for p in clip.parameters()) - 1  # all but logit_scale


def test_runner_hooks_and_stop():
    clip = _clip(_model("clip", False, "eager"))
    tower = HFCLIPTextTower.from_clip_model(clip)
    ids, mask, _ = _text_batch(MODERN)
    seen = []

    class Halve(TowerHook):
        towers = ("text",)

        def layers(self, tower):
            return (0, 1)

        def forward(self, i, states, ctx):
            seen.append(i)
            return {n: s.with_tokens(s.tokens * 0.5) for n, s in states.items()}

    with torch.no_grad():
        embedded = tower.embed(ids, mask)
        state = run_towers({"text": tower}, {"text": embedded}, hooks=[Halve()], stop=1)
        ref = clip.text_model.encoder.layers[0](
            0.5 * embedded.tokens,
            create_causal_mask(
                config=clip.text_model.config,
                inputs_embeds=embedded.tokens,
                attention_mask=mask,
                cache=None,
            ),
        )
    assert seen == [0]  # block 1 never runs: stop=1
    assert _maxdiff(state.states["text"].tokens, ref) < ATOL


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise():
    model = _model("clip", False, "sdpa")
    vt, tt = from_clip_model(model)
    with pytest.raises(ValueError, match=r"multiples of patch_size=16, got 64x40"):
        vt.embed(torch.randn(1, 3, 64, 40))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, H, W\)"):
        vt.embed(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        vt.embed(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"prompts must have shape \(B, n, 32\)"):
        vt.embed(torch.randn(2, 3, 64, 64), prompts=torch.randn(2, 1, 31))
    with pytest.raises(ValueError, match="prompts batch 3 != token batch 2"):
        vt.embed(torch.randn(2, 3, 64, 64), prompts=torch.randn(3, 1, 32))
    with pytest.raises(ValueError, match=r"block index i must be in \[0, 3\)"):
        vt.block(3, vt.embed(torch.randn(1, 3, 64, 64)))

    ids, mask, _ = _text_batch(MODERN)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, L\)"):
        tt.embed(ids[0])
    with pytest.raises(ValueError, match="integer"):
        tt.embed(ids.float())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, L\)=\(3, 7\)"):
        tt.embed(ids, mask[:, :5])
    with pytest.raises(ValueError, match=r"prompts must have shape \(B, n, 32\)"):
        tt.embed(ids, mask, context=torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"exceed the .* text positions"):
        tt.embed(torch.ones(1, MAX_POS + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="eos_pooling must be"):
        HFCLIPTextTower(model.text_model, model.text_projection, eos_pooling="last")
    with pytest.raises(ValueError, match="text_projection expects in_features=31"):
        HFCLIPTextTower(model.text_model, nn.Linear(31, 8, bias=False))
    with pytest.raises(TypeError, match="CLIPVisionModel"):
        HFCLIPVisionTower(model.text_model, model.visual_projection)
