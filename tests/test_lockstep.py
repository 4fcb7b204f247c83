"""run_lockstep: two towers stepped block by block with a hook between them.

Checked against hand-written loops over the towers' own ``block`` methods (open_clip and
transformers backends), plus split runs, gradient checkpointing and every error path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from vlsegkit.encoders.base import TokenState  # noqa: E402
from vlsegkit.encoders.hf_clip import from_clip_model  # noqa: E402
from vlsegkit.encoders.lockstep import check_lockstep_layers, run_lockstep  # noqa: E402
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


class _Coupler(nn.Module):
    """A toy interaction: each stream receives a projection of the other stream's mean token."""

    def __init__(self, dv: int, dt: int, seed: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.t2v = nn.Parameter(0.3 * torch.randn(dt, dv, generator=g))
        self.v2t = nn.Parameter(0.3 * torch.randn(dv, dt, generator=g))
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, i: int, v: TokenState, t: TokenState) -> tuple[TokenState, TokenState]:
        self.calls.append((i, v.tokens.detach().clone(), t.tokens.detach().clone()))
        dv = (t.tokens.mean(1, keepdim=True) @ self.t2v) * (i + 1)
        dt = v.tokens.mean(1, keepdim=True) @ self.v2t
        return v.with_tokens(v.tokens + dv), t.with_tokens(t.tokens + dt)


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
    coupler = _Coupler(vision.width, text.width)
    with torch.no_grad():
        v, t = run_lockstep(vision, text, v0, t0, coupler, layers=layers)
        v_ref, t_ref, before = _by_hand(vision, text, v0, t0, coupler, set(layers))
    assert torch.equal(v.tokens, v_ref.tokens) and torch.equal(t.tokens, t_ref.tokens)
    # the hook ran in block order, exactly before the listed blocks, on the states of that moment
    assert [c[0] for c in coupler.calls] == sorted(layers)
    for (i, hv, ht), (j, rv, rt) in zip(coupler.calls, before):
        assert i == j and torch.equal(hv, rv) and torch.equal(ht, rt)
    # the hook changes the result (so the comparison above is not vacuous)
    plain_v, plain_t = run_lockstep(vision, text, v0, t0)
    assert (plain_v.tokens - v.tokens).abs().max() > 1e-3
    assert (plain_t.tokens - t.tokens).abs().max() > 1e-3


def test_no_hook_equals_independent_runs():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    with torch.no_grad():
        v, t = run_lockstep(vision, text, v0, t0)
        v_ref, _ = vision.run(v0)
        t_ref, _ = text.run(t0)
    assert torch.equal(v.tokens, v_ref.tokens) and torch.equal(t.tokens, t_ref.tokens)
    assert torch.equal(vision.pool(v), vision.pool(v_ref))


def test_hook_before_every_block_when_layers_is_none():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    coupler = _Coupler(vision.width, text.width)
    with torch.no_grad():
        v, _ = run_lockstep(vision, text, v0, t0, coupler)
        v_ref, _, _ = _by_hand(vision, text, v0, t0, coupler, set(range(DEPTH)))
    assert [c[0] for c in coupler.calls] == list(range(DEPTH))
    assert torch.equal(v.tokens, v_ref.tokens)


@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_split_runs_compose(split):
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    coupler = _Coupler(vision.width, text.width)
    with torch.no_grad():
        full = run_lockstep(vision, text, v0, t0, coupler, layers=(0, 2))
        mid = run_lockstep(vision, text, v0, t0, coupler, layers=(0, 2), stop=split)
        end = run_lockstep(vision, text, *mid, coupler, layers=(0, 2), start=split)
    assert torch.equal(full[0].tokens, end[0].tokens)
    assert torch.equal(full[1].tokens, end[1].tokens)


def test_gradients_and_checkpointing():
    vision, text = _open_clip_pair()
    vision.requires_grad_(False)
    text.requires_grad_(False)
    v0, t0 = _inputs(vision, text)
    grads, outs = [], []
    for ckpt in (False, True):
        coupler = _Coupler(vision.width, text.width)
        v, t = run_lockstep(
            vision, text, v0, t0, coupler, layers=(0, 1), gradient_checkpointing=ckpt
        )
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


def test_different_depths_need_stop():
    vision, text = _open_clip_pair(depth=3, text_depth=2)
    v0, t0 = _inputs(vision, text)
    with pytest.raises(ValueError, match="different depths"):
        run_lockstep(vision, text, v0, t0)
    v, _ = run_lockstep(vision, text, v0, t0, stop=2)
    v_ref, _ = vision.run(v0, stop_at=2)
    assert torch.equal(v.tokens, v_ref.tokens)


def test_bad_arguments():
    vision, text = _open_clip_pair()
    v0, t0 = _inputs(vision, text)
    with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 3\)"):
        run_lockstep(vision, text, v0, t0, lambda i, v, t: (v, t), layers=(1, 3))
    with pytest.raises(ValueError, match="must not repeat"):
        run_lockstep(vision, text, v0, t0, lambda i, v, t: (v, t), layers=(1, 1))
    with pytest.raises(ValueError, match="ints"):
        run_lockstep(vision, text, v0, t0, lambda i, v, t: (v, t), layers=(True,))
    with pytest.raises(ValueError, match="start <= stop"):
        run_lockstep(vision, text, v0, t0, start=2, stop=1)
    with pytest.raises(ValueError, match="start <= stop"):
        run_lockstep(vision, text, v0, t0, stop=4)
    with pytest.raises(ValueError, match="batch size"):
        run_lockstep(vision, text, v0, _first(t0))
    with pytest.raises(ValueError, match=r"hook must return \(vision_state, text_state\)"):
        run_lockstep(vision, text, v0, t0, lambda i, v, t: v.tokens)
    with pytest.raises(ValueError, match="hook changed the batch size before block 0"):
        run_lockstep(vision, text, v0, t0, lambda i, v, t: (_first(v), _first(t)))


def _first(state: TokenState) -> TokenState:
    return state.replace(tokens=state.tokens[:1], pool_index=state.pool_index[:1])


def test_check_lockstep_layers_sorts():
    assert check_lockstep_layers([3, 1, 2], 4) == (1, 2, 3)
    assert check_lockstep_layers((), 4) == ()
    with pytest.raises(ValueError):
        check_lockstep_layers([-1], 4)
