"""Adapter hooks on CLIPSeg: VLSM-Adapter's shallow and dense bottleneck adapters, PVL adapters.

Oracles: plain re-statements of VLSM-Adapter's released forward passes (``naamiinepal/vlsm-adapter``,
``src/models/clipseg_adapter.py``) written with the transformers modules directly, a hand-written
lockstep loop for the PVL adapters, and trainable-parameter counts derived from the released module
structure.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from vlsegkit import BottleneckAdapters, CLIPSeg, PVLAdapters, TunedModel, create_model
from vlsegkit.adapters import BottleneckAdapter
from vlsegkit.registry import hook_from_config


def _clipseg(seed: int = 0, text_width: int = 32) -> CLIPSeg:
    torch.manual_seed(seed)
    model = CLIPSeg(
        backbone={
            "text_config": dict(
                vocab_size=49408, hidden_size=text_width, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                pad_token_id=1, bos_token_id=0, eos_token_id=2,
            ),
            "vision_config": dict(
                hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                image_size=32, patch_size=8,
            ),
            "projection_dim": 32,
        },
        extract_layers=(1, 2), reduce_dim=8, decoder_num_heads=2, decoder_mlp_dim=16,
        image_size=32,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _adapt(adapter: BottleneckAdapter, x: torch.Tensor, released: bool = False) -> torch.Tensor:
    """x + fc2(relu(fc1 x)) (released: relu after fc2 too), from the raw weights."""
    h = F.relu(x @ adapter.fc1.weight.T + adapter.fc1.bias) @ adapter.fc2.weight.T
    h = h + adapter.fc2.bias
    return x + (F.relu(h) if released else h)


PROMPTS = ["a polyp", "two large lesions at the top"]


def _inputs(model):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batch = model.tokenizer(PROMPTS)
    return pixels, batch.input_ids, batch.attention_mask


@pytest.mark.parametrize("released", [False, True])
def test_bottleneck_adapter_block(released):
    torch.manual_seed(0)
    adapter = BottleneckAdapter(12, 5, final_activation=released)
    x = torch.randn(3, 7, 12)
    torch.testing.assert_close(adapter(x), _adapt(adapter, x, released), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"adapter input must have shape \(\.\.\., 12\)"):
        adapter(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="activation must be"):
        BottleneckAdapter(4, 2, activation="tanh")


@pytest.mark.parametrize("released", [False, True])
def test_shallow_adapters_match_the_released_forward(released):
    model = _clipseg()
    hook = BottleneckAdapters("shallow", width=16, condition_width=8, released=released)
    tuned = TunedModel(model, hook)
    _perturb(hook, 1)
    pixels, ids, mask = _inputs(model)
    vm, tm = model.vision_tower.vision_model, model.text_tower.text_model
    with torch.no_grad():
        got = tuned(pixels, PROMPTS).logits
        # released CLIPSegShallowAdapter.forward, re-stated on the transformers modules
        vis = vm(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        acts = [
            _adapt(hook.vision_extract_adapters[n], vis.hidden_states[i + 1], released)
            for n, i in enumerate(model.extract_layers)
        ]
        txt = tm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        cond = model.text_tower.text_projection(txt.pooler_output)
        cond = _adapt(hook.cond_adapter, cond, released)
        eos = ids.argmax(-1)
        for n, i in enumerate(model.extract_layers):
            h = txt.hidden_states[i + 1][torch.arange(2), eos]  # EOS state before the final LN
            cond = cond + _adapt(hook.text_extract_adapters[n], h, released)
        ref = model.decoder(acts, cond, grid=(4, 4), content_start=1)
        plain = model(pixels, PROMPTS).logits
    assert (got[:, 0:1] - ref).abs().max() < 1e-5
    assert (plain - got).abs().max() > 1e-3  # the adapters act


def _dense_layer(layer, x, mask, attn_adapter, mlp_adapter, released):
    """CLIPEncoderLayer with VLSM-Adapter's dense adapters before both residual adds."""
    h = layer.self_attn(layer.layer_norm1(x), attention_mask=mask)[0]
    x = x + (h if attn_adapter is None else _adapt(attn_adapter, h, released))
    h = layer.mlp(layer.layer_norm2(x))
    return x + (h if mlp_adapter is None else _adapt(mlp_adapter, h, released))


@pytest.mark.parametrize("released", [False, True])
def test_dense_adapters_match_the_released_forward(released):
    model = _clipseg(seed=2)
    hook = BottleneckAdapters("dense", width=6, condition_width=8, released=released)
    tuned = TunedModel(model, hook)
    _perturb(hook, 3)
    # released: blocks 0 .. max(kept) - 1 get adapters; default: 0 .. max(kept)
    assert hook.tap_blocks == ((0, 1) if released else (0, 1, 2))
    pixels, ids, mask = _inputs(model)
    vm, tm = model.vision_tower.vision_model, model.text_tower.text_model
    with torch.no_grad():
        got = tuned(pixels, PROMPTS).logits
        x = vm.pre_layrnorm(vm.embeddings(pixels, interpolate_pos_encoding=True))
        hidden = []
        for i, layer in enumerate(vm.encoder.layers[: max(model.extract_layers) + 1]):
            n = hook.tap_blocks.index(i) if i in hook.tap_blocks else None
            adapters = (None, None) if n is None else (
                hook.v_attn_adapters[n], hook.v_out_adapters[n])  # fmt: skip
            x = _dense_layer(layer, x, None, *adapters, released)
            hidden.append(x)
        acts = [hidden[i] for i in model.extract_layers]
        t = tm.embeddings(input_ids=ids)
        causal = create_causal_mask(
            config=tm.config, inputs_embeds=t, attention_mask=mask, cache=None
        )
        for i, layer in enumerate(tm.encoder.layers):
            n = hook.tap_blocks.index(i) if i in hook.tap_blocks else None
            adapters = (None, None) if n is None else (
                hook.l_attn_adapters[n], hook.l_out_adapters[n])  # fmt: skip
            t = _dense_layer(layer, t, causal, *adapters, released)
        eos = t[torch.arange(2), ids.argmax(-1)]
        cond = model.text_tower.text_projection(tm.final_layer_norm(eos))
        cond = _adapt(hook.cond_adapter, cond, released)
        ref = model.decoder(acts, cond, grid=(4, 4), content_start=1)
    assert (got[:, 0:1] - ref).abs().max() < 1e-5


def test_released_trainable_parameter_counts_on_full_size_clipseg():
    # counts derived from the released module structure (vision 768, text 512, condition 512,
    # extract layers 3, 6, 9): shallow VLC = 3 x (768-512-768) + 3 x (512-512-512) + (512-256-512)
    # adapters with biases; dense VLC = 9 blocks x 2 x ((768-64-768) + (512-64-512)) + (512-256-512)
    with torch.device("meta"):
        base = create_model("clipseg-rd64-refined")
        shallow = BottleneckAdapters("shallow", released=True).attach(base)
        dense = BottleneckAdapters("dense", released=True).attach(base)
        shallow_v = BottleneckAdapters("shallow", text=False, condition=False).attach(base)
    assert shallow.num_parameters(trainable_only=True) == 4_201_984
    assert dense.num_parameters(trainable_only=True) == 3_237_376
    assert shallow_v.num_parameters(trainable_only=True) == 2_363_136


def test_shallow_text_features_need_matching_widths():
    model = _clipseg(text_width=24)  # text width 24, condition width 32
    with pytest.raises(ValueError, match="text_features='hidden' adds 24-wide"):
        BottleneckAdapters("shallow", text_features="hidden").attach(model)
    tuned = BottleneckAdapters("shallow").attach(model)  # auto: projected features
    pixels, _, _ = _inputs(model)
    assert tuned(pixels, PROMPTS).logits.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="variant must be"):
        BottleneckAdapters("deep")


def test_adapters_as_model_owned_hooks_round_trip(tmp_path):
    hooks = [BottleneckAdapters("dense", width=4), PVLAdapters(dim=8)]
    model = create_model("clipseg-tiny", hooks=hooks, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("hooks.0.") for n in trainable)
    assert any(n.startswith("hooks.1.0.") for n in trainable)  # the PVL adapter of block 1
    config = json.loads(json.dumps(model.config))
    assert [h["name"] for h in config["hooks"]] == ["BottleneckAdapters", "PVLAdapters"]
    assert hook_from_config(config["hooks"][1]).config == hooks[1].config
    model.save_pretrained(tmp_path)
    from vlsegkit import VLSM

    loaded = VLSM.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.eval()(x, PROMPTS).logits
        torch.manual_seed(0)
        b = loaded(x, PROMPTS).logits
    assert torch.equal(a, b)


def test_pvl_adapters_on_clipseg_match_a_hand_written_lockstep_loop():
    model = _clipseg(seed=4)
    hook = PVLAdapters(dim=8, deterministic=True)
    tuned = TunedModel(model, hook)
    assert hook.adapter_layers == (1,)  # 1 .. D - 2 with D = 3 (vision runs blocks 0..2)
    _perturb(hook, 5)
    pixels, ids, mask = _inputs(model)
    vision, text = model.vision_tower, model.text_tower
    with torch.no_grad():
        got = tuned(pixels, PROMPTS).logits  # 2 prompts for 2 images: one per image
        v, t = vision.embed(pixels), text.embed(ids, mask)
        acts = {}
        for i in range(text.num_layers):
            if i == 1:
                nv, nt = hook[0](v.tokens, t.tokens, text_padding_mask=mask.bool(), sample=False)
                v, t = v.with_tokens(nv), t.with_tokens(nt)
            if i < 3:
                v = vision.block(i, v)
                acts[i] = v.tokens
            t = text.block(i, t)
        cond = text.pool(t)
        ref = model.decoder([acts[1], acts[2]], cond, grid=(4, 4), content_start=1)
    assert (got[:, 0:1] - ref).abs().max() < 1e-5
    # three prompts for two images: every (image, prompt) pair gets its own fused pass
    with torch.no_grad():
        many = tuned(pixels, ["a", "b", "c"]).logits
        one = tuned(pixels[1:], "c").logits
    assert many.shape == (2, 3, 32, 32)
    assert (many[1:, 2:3] - one).abs().max() < 1e-5
