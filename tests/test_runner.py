"""run_towers: the one layer loop -- towers stepped together, hooks between and inside blocks.

Checked against hand-written loops over the towers' own ``block`` methods (open_clip and
transformers backends): lockstep hooks, split runs, kept states, per-tower stops, in-block taps
(against a re-statement of the upstream block with the tap in place), gradient checkpointing, the
no-graph rule for frozen blocks, and every error path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from vlsegkit.encoders import RunContext, TowerHook, check_layers, run_towers  # noqa: E402
from vlsegkit.encoders.base import TokenState  # noqa: E402
from vlsegkit.encoders.hf_clip import from_clip_model  # noqa: E402
from vlsegkit.encoders.open_clip import towers_from_open_clip  # noqa: E402

DEPTH = 3


def _jitter(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _open_clip_pair(depth: int = DEPTH, text_depth: int | None = None):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=depth, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=12, vocab_size=500, width=24, heads=2,
                      layers=text_depth or depth),
    )  # fmt: skip
    _jitter(model, 0)
    return towers_from_open_clip(model.eval())


def _hf_pair():
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=DEPTH,
                         num_attention_heads=2, vocab_size=500, max_position_embeddings=12,
                         eos_token_id=2, bos_token_id=498, pad_token_id=499),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    model = transformers.CLIPModel(config)
    _jitter(model, 1)
    return from_clip_model(model.eval())


PAIRS = {"open_clip": _open_clip_pair, "transformers": _hf_pair}


def _inputs(vision, text, b: int = 2):
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(3, 400, (b, 8), generator=g)
    ids[:, 0] = 498  # BOS
    ids[:, 5] = 499  # EOS: the largest id (argmax pooling)
    ids[:, 6:] = 0  # padding
    return vision.embed(pixels), text.embed(ids)


class _Coupler(TowerHook):
    """A toy interaction: each stream receives a projection of the other stream's mean token."""

    towers = ("vision", "text")
    lockstep = True

    def __init__(self, dv: int, dt: int, seed: int = 3, layers=None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.t2v = nn.Parameter(0.3 * torch.randn(dt, dv, generator=g))
        self.v2t = nn.Parameter(0.3 * torch.randn(dv, dt, generator=g))
        self.at = tuple(range(DEPTH)) if layers is None else tuple(layers)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def layers(self, tower):
        return self.at

    def forward(self, i, states, ctx):
        v, t = states["vision"], states["text"]
        self.calls.append((i, v.tokens.detach().clone(), t.tokens.detach().clone()))
        dv = (t.tokens.mean(1, keepdim=True) @ self.t2v) * (i + 1)
        dt = v.tokens.mean(1, keepdim=True) @ self.v2t
        return {"vision": v.with_tokens(v.tokens + dv), "text": t.with_tokens(t.tokens + dt)}


def _both(vision, text, v, t, **kwargs):
    run = run_towers({"vision": vision, "text": text}, {"vision": v, "text": t}, **kwargs)
    return run.states["vision"], run.states["text"]


def _by_hand(vision, text, v, t, coupler, layers, start=0, stop=DEPTH):
    """The loop written out: hook before the listed blocks, then one block of each tower."""
    before = []
    for i in range(start, stop):
        if i in layers:
            before.append((i, v.tokens.clone(), t.tokens.clone()))
            dv = (t.tokens.mean(1, keepdim=True) @ coupler.t2v) * (i + 1)
            dt = v.tokens.mean(1, keepdim=True) @ coupler.v2t
            v, t = v.with_tokens(v.tokens + dv), t.with_tokens(t.tokens + dt)
        v, t = vision.block(i, v), text.block(i, t)
    return v, t, before


@pytest.mark.parametrize("backend", sorted(PAIRS))
@pytest.mark.parametrize("layers", [(1, 2), (0,), (2, 0)])
def test_lockstep_matches_hand_loop(backend, layers):
    vision, text = PAIRS[backend]()
    v0, t0 = _inputs(vision, text)
    coupler = _Coupler(vision.width, text.width, layers=layers)
    with torch.no_grad():
        v, t = _both(vision, text, v0, t0, hooks=[coupler])
        v_ref, t_ref, before = _by_hand(vision, text, v0, t0, coupler, set(layers))
    assert torch.equal(v.tokens, v_ref.tokens) and torch.equal(t.tokens, t_ref.tokens)
    # the hook ran in block order, exactly before the listed blocks, on the states of that moment
    assert [c[0] for c in coupler.calls] == sorted(layers)
    for (i, hv, ht), (j, rv, rt) in zip(coupler.calls, before):
        assert i == j and torch.equal(hv, rv) and torch.equal(ht, rt)
    # the hook changes the result (so the comparison above is not vacuous)
    plain_v, plain_t = _both(vision, text, v0, t0)
    assert (plain_v.tokens - v.tokens).abs().max() > 1e-3
    assert (plain_t.tokens - t.tokens).abs().max() > 1e-3


def test_no_hook_equals_independent_runs_and_kept_states():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    with torch.no_grad():
        run = run_towers(
            {"vision": vision, "text": text},
            {"vision": v0, "text": t0},
            keep={"vision": (0, 2)},
        )
        v = v0
        by_hand = []
        for i in range(DEPTH):
            v = vision.block(i, v)
            by_hand.append(v.tokens)
        t_ref = run_towers({"text": text}, {"text": t0}).states["text"]
    assert torch.equal(run.states["vision"].tokens, v.tokens)
    assert torch.equal(run.states["text"].tokens, t_ref.tokens)
    assert list(run.kept["vision"]) == [0, 2]
    assert torch.equal(run.kept["vision"][0].tokens, by_hand[0])
    assert torch.equal(run.kept["vision"][2].tokens, by_hand[2])


@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_split_runs_compose(split):
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    coupler = _Coupler(vision.width, text.width, layers=(0, 2))
    with torch.no_grad():
        full = _both(vision, text, v0, t0, hooks=[coupler])
        mid = _both(vision, text, v0, t0, hooks=[coupler], stop=split)
        end = _both(vision, text, *mid, hooks=[coupler], start=split)
    assert torch.equal(full[0].tokens, end[0].tokens)
    assert torch.equal(full[1].tokens, end[1].tokens)


def test_gradients_and_checkpointing():
    vision, text = _open_clip_pair()
    vision.requires_grad_(False)
    text.requires_grad_(False)
    v0, t0 = _inputs(vision, text)
    grads, outs = [], []
    for ckpt in (False, True):
        coupler = _Coupler(vision.width, text.width, layers=(0, 1))
        v, t = _both(vision, text, v0, t0, hooks=[coupler], gradient_checkpointing=ckpt)
        loss = vision.pool(v).square().sum() + text.pool(t).square().sum()
        loss.backward()
        outs.append(loss.detach())
        grads.append((coupler.t2v.grad.clone(), coupler.v2t.grad.clone()))
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0], grads[1]):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # frozen towers: the graph flows through them but stores no parameter gradients
    assert all(p.grad is None for p in (*vision.parameters(), *text.parameters()))


def test_frozen_blocks_before_a_hook_record_no_graph():
    vision, text = _open_clip_pair()
    vision.requires_grad_(False)
    v0, _ = _inputs(vision, text)
    seen = {}

    class Shift(TowerHook):
        towers = ("vision",)

        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(vision.width))

        def layers(self, tower):
            return (2,)

        def forward(self, i, states, ctx):
            seen["before"] = states["vision"].tokens.requires_grad
            s = states["vision"]
            return {"vision": s.with_tokens(s.tokens + self.shift)}

    hook = Shift()
    run = run_towers({"vision": vision}, {"vision": v0}, hooks=[hook])
    assert seen["before"] is False  # blocks 0 and 1 ran without a graph
    out = run.states["vision"].tokens
    assert out.requires_grad
    out.square().sum().backward()
    assert hook.shift.grad.abs().sum() > 0


def test_different_depths_and_per_tower_stops():
    vision, text = _open_clip_pair(depth=3, text_depth=2)
    v0, t0 = _inputs(vision, text)
    with torch.no_grad():
        v, t = _both(vision, text, v0, t0)  # each tower runs its own depth
        v2, _ = _both(vision, text, v0, t0, stop={"vision": 2})
        v_ref = v0
        for i in range(2):
            v_ref = vision.block(i, v_ref)
        t_ref = t0
        for i in range(2):
            t_ref = text.block(i, t_ref)
        v3 = vision.block(2, v_ref)
    assert torch.equal(v2.tokens, v_ref.tokens)
    assert torch.equal(t.tokens, t_ref.tokens)
    assert torch.equal(v.tokens, v3.tokens)


def test_lockstep_hook_needs_both_towers_running():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    coupler = _Coupler(vision.width, text.width, layers=(2,))
    with pytest.raises(ValueError, match="must step them in lockstep"):
        _both(vision, text, v0, t0, hooks=[coupler], stop={"vision": 2})


class _Taps(TowerHook):
    """Adds a constant to the attention branch and doubles the MLP branch of chosen blocks."""

    towers = ("vision", "text")

    def __init__(self, blocks, value=0.25):
        super().__init__()
        self.blocks, self.value = tuple(blocks), value

    def tap_layers(self, tower):
        return self.blocks

    def taps(self, tower, i, ctx):
        return {"attn": lambda x: x + self.value, "mlp": lambda x: 2 * x}


def _open_clip_block_by_hand(block, x, mask, add, scale):
    """open_clip ResidualAttentionBlock with the taps written into its equations."""
    q = block.ln_1(x)
    attn = block.attn(q, q, q, need_weights=False, attn_mask=mask)[0]
    x = x + (block.ls_1(attn) + add)
    return x + scale * block.ls_2(block.mlp(block.ln_2(x)))


def _hf_block_by_hand(layer, x, add, scale):
    """transformers CLIPEncoderLayer with the taps written into its equations."""
    h = layer.self_attn(layer.layer_norm1(x), attention_mask=None)[0]
    x = x + (h + add)
    return x + scale * layer.mlp(layer.layer_norm2(x))


def test_taps_match_a_restated_block():
    vision, _ = _open_clip_pair()
    v0 = vision.embed(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        run = run_towers({"vision": vision}, {"vision": v0}, hooks=[_Taps([1])])
        x = v0.tokens
        blocks = vision.visual.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == 1:
                xt = x if vision.visual.transformer.batch_first else x.transpose(0, 1)
                xt = _open_clip_block_by_hand(block, xt, None, 0.25, 2.0)
                x = xt if vision.visual.transformer.batch_first else xt.transpose(0, 1)
            else:
                x = vision.block(i, v0.with_tokens(x)).tokens
        plain = run_towers({"vision": vision}, {"vision": v0}).states["vision"]
    assert (run.states["vision"].tokens - x).abs().max() < 1e-5
    assert (plain.tokens - x).abs().max() > 1e-2  # the taps really act
    # after the run, no forward hook is left on the block
    assert not blocks[1].ls_1._forward_hooks and not blocks[1].ls_2._forward_hooks


def test_taps_on_transformers_clip_and_identity_taps():
    vision, _ = _hf_pair()
    v0 = vision.embed(torch.randn(2, 3, 32, 32))
    layers = vision.vision_model.encoder.layers
    with torch.no_grad():
        run = run_towers({"vision": vision}, {"vision": v0}, hooks=[_Taps([0, 2], value=0.5)])
        x = v0.tokens
        for i, layer in enumerate(layers):
            x = _hf_block_by_hand(layer, x, 0.5, 2.0) if i in (0, 2) else layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        same = run_towers({"vision": vision}, {"vision": v0}, hooks=[_Taps([0], value=0.0)])
        twice = run_towers({"vision": vision}, {"vision": v0}, hooks=[_Taps([0]), _Taps([0])])
        ref_twice = _hf_block_by_hand(layers[0], v0.tokens, 0.5, 4.0)
    assert (run.states["vision"].tokens - x).abs().max() < 1e-5
    # taps compose in hook order: (x + .25) + .25 on attention, 2 * 2 on the MLP
    ref = ref_twice
    for i in (1, 2):
        ref = layers[i](ref, None)
        ref = ref[0] if isinstance(ref, tuple) else ref
    assert (twice.states["vision"].tokens - ref).abs().max() < 1e-5
    assert same.states["vision"].tokens.shape == v0.tokens.shape


def test_bad_arguments():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    towers = {"vision": vision, "text": text}
    states = {"vision": v0, "text": t0}
    with pytest.raises(ValueError, match="start <= stop"):
        run_towers(towers, states, start=2, stop=1)
    with pytest.raises(ValueError, match="start <= stop"):
        run_towers(towers, states, stop=4)
    with pytest.raises(ValueError, match="not in towers"):
        run_towers({"vision": vision}, states)
    with pytest.raises(ValueError, match=r"keep\['vision'\] must be block indices"):
        run_towers(towers, states, keep={"vision": (5,)})
    with pytest.raises(ValueError, match="outside the run"):
        run_towers(towers, states, keep={"vision": (2,)}, stop=2)
    with pytest.raises(TypeError, match="TowerHook"):
        run_towers(towers, states, hooks=[lambda i, s: s])

    class Bad(TowerHook):
        towers = ("vision",)

        def __init__(self, out):
            super().__init__()
            self.out = out

        def layers(self, tower):
            return (0,)

        def forward(self, i, states, ctx):
            return self.out(states)

    with pytest.raises(ValueError, match="must return the states it was given"):
        run_towers(towers, states, hooks=[Bad(lambda s: s["vision"].tokens)])
    with pytest.raises(ValueError, match="changed the vision batch size before block 0"):
        run_towers(towers, states, hooks=[Bad(lambda s: {"vision": _first(s["vision"])})])
    with pytest.raises(ValueError, match="not a TokenState"):
        run_towers(towers, states, hooks=[Bad(lambda s: {"vision": 1})])


def test_context_receives_kept_states():
    vision, text = _open_clip_pair()
    v0, _ = _inputs(vision, text)
    ctx = RunContext()
    run_towers({"vision": vision}, {"vision": v0}, ctx=ctx, keep={"vision": [1]})
    assert list(ctx.kept["vision"]) == [1]


def _first(state: TokenState) -> TokenState:
    return state.replace(tokens=state.tokens[:1], pool_index=state.pool_index[:1])


def test_check_layers_sorts():
    assert check_layers([3, 1, 2], 4) == (1, 2, 3)
    assert check_layers((), 4) == ()
    with pytest.raises(ValueError, match="block indices"):
        check_layers([-1], 4)
    with pytest.raises(ValueError, match="must not repeat"):
        check_layers([1, 1], 4)
    with pytest.raises(ValueError, match="ints"):
        check_layers([True], 4)
