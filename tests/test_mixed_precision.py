"""Half precision and memory formats (issue 15, section 4): what a GPU run under AMP exercises.

On tiny tensors on CPU (this machine has no bf16 units, so the numbers, not the speed, are tested):

* attention masks: every text-tower backend under fp16 / bf16 autocast, with padded rows and a
  query row whose keys are all masked, stays finite and matches fp32 on the real tokens; the
  additive bias uses the dtype's most negative finite value, never an overflowing constant;
* every tiny model's forward pass and training step (its default task) under fp16 and bf16 autocast:
  finite logits close to fp32, finite fp32 losses and gradients;
* losses computed in logits space in fp32 under autocast: the same value as on fp32 inputs;
* Monte Carlo statistics accumulated in float64 from half-precision logits;
* channels-last images give the outputs and gradients of contiguous ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlsegkit import create_model, list_models
from vlsegkit.encoders import TokenState, attention_bias, create_towers
from vlsegkit.losses import (
    CoTexNetLoss,
    DiceBCELoss,
    MedCLIPSegLoss,
    SoftPatchContrastiveLoss,
)
from vlsegkit.models.capabilities import SupportsTextFree, SupportsUncertainty
from vlsegkit.models.cotexnet import CoTexNetOutput
from vlsegkit.models.outputs import MedCLIPSegOutput
from vlsegkit.uncertainty import MonteCarloMoments, binary_entropy

TINY = list_models("*-tiny")
HALF = [torch.float16, torch.bfloat16]
# max |half - fp32| relative to the fp32 scale (bf16 keeps 8 significant bits, fp16 11)
REL = {torch.float16: 0.02, torch.bfloat16: 0.1}
PROMPTS = ["a lesion", "two small round polyps on the left side of the image", ""]

_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TEXT_SPECS = {
    "open_clip": {
        "kind": "open_clip",
        "embed_dim": 16,
        "vision_cfg": _VISION,
        "text_cfg": {"context_length": 12, "vocab_size": 500, "width": 32, "heads": 2, "layers": 2},
    },
    "bert": {
        "kind": "open_clip",
        "embed_dim": 16,
        "vision_cfg": _VISION,
        "bert_config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 24},
    },
    "transformers": {
        "kind": "transformers_clip",
        "projection_dim": 16,
        "text_config": {"vocab_size": 49408, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 20},
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    },
}  # fmt: skip


def _close(low: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(low).all(), f"{what}: non-finite values under {dtype}"
    err = (low.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= REL[dtype] * scale + 1e-3, f"{what}: {dtype} differs by {err:.3g} (scale {scale})"


# ---------------------------------------------------------------------------- attention masks
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_attention_bias_uses_the_dtypes_finite_minimum(dtype):
    state = TokenState(
        tokens=torch.zeros(2, 4, 8), attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    )
    bias = attention_bias(state.replace(causal=True), dtype)
    assert bias.dtype == dtype and torch.isfinite(bias).all()
    masked = torch.ones(2, 1, 4, 4, dtype=torch.bool).triu(1)
    masked[0, :, :, 2:] = True
    assert (bias[masked] == torch.finfo(dtype).min).all() and (bias[~masked] == 0).all()
    # SDPA with it: masked keys get no weight even where a score would add to the bias
    q, k, v = (torch.randn(2, 1, 4, 8).to(dtype) * 4 for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=~masked)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", sorted(TEXT_SPECS))
def test_text_towers_with_padding_are_finite_under_autocast(backend, dtype):
    """Padded rows and a query row with every key masked, through every text backend."""
    torch.manual_seed(0)
    tower = create_towers(TEXT_SPECS[backend]).text.eval()
    # start / end ids of each vocabulary (CLIP BPE, a 500-token open_clip table, BERT's CLS / SEP)
    bos, eos = {"transformers": (49406, 49407), "open_clip": (498, 499)}.get(backend, (2, 3))
    ids = torch.tensor([[bos, 5, 7, 9, eos, 0], [bos, 6, eos, 0, 0, 0], [bos, 8, 4, 11, 12, eos]])
    mask = (ids != 0).long()
    real = mask.bool()
    causal = tower.embed(ids, mask).causal
    if causal:
        mask[2, 0] = 0  # row 2's first query sees only key 0: a fully masked attention row
    with torch.no_grad():
        ref = tower(ids, mask)
        with torch.autocast("cpu", dtype=dtype):
            low = tower(ids, mask)
    assert low.pooled.dtype == dtype
    _close(low.pooled, ref.pooled, dtype, f"{backend} pooled")
    tokens_low, tokens_ref = low.state.tokens, ref.state.tokens
    assert torch.isfinite(tokens_low).all()  # padding and the masked row included
    if causal:
        real[2, 0] = False  # its output is defined (finite) but not compared
    _close(tokens_low[real], tokens_ref[real], dtype, f"{backend} tokens")


@pytest.mark.parametrize("autocast", [False, True], ids=["half-weights", "autocast"])
def test_open_clip_padding_mask_reaches_attention_finite_in_half_precision(autocast):
    """open_clip casts the mask to the query dtype: it must be built in the compute dtype, or
    fp32's minimum becomes -inf in fp16 (NaN for a fully masked row on some kernels)."""
    tower = create_towers(TEXT_SPECS["open_clip"]).text.eval()
    if not autocast:
        tower = tower.half()
    seen = []
    hooks = [
        block.attn.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(kwargs["attn_mask"]), with_kwargs=True
        )
        for block in tower.text.transformer.resblocks
    ]
    ids = torch.tensor([[498, 5, 499, 0], [498, 6, 7, 499]])
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            tower(ids, (ids != 0).long())
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == tower.num_layers
    for mask in seen:
        assert torch.isfinite(mask).all() and mask.min() == torch.finfo(torch.float16).min


# ---------------------------------------------------------------------------- whole models
def _model(name: str, train: bool):
    torch.manual_seed(0)
    model = create_model(name)
    return model.train(train)


def _inputs(model, b: int = 2):
    g = torch.Generator().manual_seed(0)
    h, w = model.image_size
    return torch.randn(b, 3, h, w, generator=g)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", TINY)
def test_forward_with_padded_prompts_under_autocast(name, dtype):
    model = _model(name, train=False)
    x = _inputs(model)
    kwargs = {"sample": False} if isinstance(model, SupportsUncertainty) else {}
    args = () if isinstance(model, SupportsTextFree) else (PROMPTS,)
    with torch.no_grad():
        ref = model(x, *args, **kwargs).logits
        with torch.autocast("cpu", dtype=dtype):
            low = model(x, *args, **kwargs).logits
    assert low.dtype == dtype
    _close(low, ref, dtype, name)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", TINY)
def test_training_step_under_autocast_has_fp32_finite_loss_and_gradients(name, dtype):
    model = _model(name, train=True)
    x = _inputs(model)
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(2, 1, *x.shape[-2:], generator=g) > 0.6).float()
    batch = {"image": x, "mask": masks, "prompt": PROMPTS[:2]}
    task = model.default_task()
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        # Batch statistics of 2 images in half precision are coarse: upstream open_clip's
        # ModifiedResNet alone differs from fp32 by ~5% (bf16) in train mode, 0.3% in eval mode.
        # Train-mode BatchNorm must stay finite with fp32 losses; the comparison with fp32 then
        # runs on running statistics, so it measures the rest of the model.
        with torch.autocast("cpu", dtype=dtype):
            out = task.training_step(model, batch)
        out["loss"].backward()
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
        for m in batch_norms:
            m.eval()
    terms = {}
    for key in ("ref", "low"):
        model.zero_grad()
        torch.manual_seed(2)  # the same value noise / dropout in both runs
        with torch.autocast("cpu", dtype=dtype, enabled=key == "low"):
            out = task.training_step(model, batch)
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
        terms[key] = (out, grads)
    (ref, ref_grads), (low, low_grads) = terms["ref"], terms["low"]
    for k, v in low.items():
        assert v.dtype == torch.float32, f"{k} is {v.dtype}: losses are computed in fp32"
        _close(v, ref[k], dtype, k)
    _close(low_grads, ref_grads, dtype, "gradients")


# ---------------------------------------------------------------------------- losses
def _half_logits(dtype: torch.dtype) -> torch.Tensor:
    """Logits as an AMP forward pass returns them: half precision, with saturated pixels."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, generator=g) * 4
    logits[0, 0, :4] = 60.0  # sigmoid rounds to exactly 1 in half precision
    logits[1, 0, :4] = -60.0
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_losses_are_fp32_in_logits_space_under_autocast(dtype):
    g = torch.Generator().manual_seed(1)
    logits = _half_logits(dtype)
    masks = (torch.rand(logits.shape, generator=g) > 0.5).float()
    patches = torch.randn(2, 1, 9, 8, generator=g).to(dtype)
    text = torch.randn(2, 1, 8, generator=g).to(dtype)
    med = MedCLIPSegOutput(
        logits=logits, patch_tokens=patches, text_embeddings=text, conditional_embeddings=text
    )
    cotex = CoTexNetOutput(
        logits=logits,
        conditional_embeddings=text,
        text_embedding=torch.sigmoid(text[:, 0].float()).to(dtype),
        predicted_embedding=text[:, 0],
    )
    cases = {
        "dice_bce": (DiceBCELoss(), lambda f, o: f(o.logits, masks)),
        "medclipseg": (MedCLIPSegLoss(), lambda f, o: f(o, masks)),
        "cotexnet": (CoTexNetLoss(), lambda f, o: f(o, masks)),
        "softcon": (
            SoftPatchContrastiveLoss(temperature=1e-3),  # logits up to 1e3: rounded in half
            lambda f, o: f(o.patch_tokens[:, 0], o.text_embeddings[:, 0]),
        ),
    }
    for name, (loss, call) in cases.items():
        output = cotex if name == "cotexnet" else med
        with torch.autocast("cpu", dtype=dtype):
            low = call(loss, output)
        # the reference: the same (half-rounded) inputs in fp32, no autocast
        upcast = {
            "logits": output.logits.float(),
            "conditional_embeddings": output.conditional_embeddings.float(),
        }
        if name == "cotexnet":
            upcast |= {
                "text_embedding": output.text_embedding.float(),
                "predicted_embedding": output.predicted_embedding.float(),
            }
            ref = call(loss, CoTexNetOutput(**upcast))
        else:
            upcast |= {
                "patch_tokens": output.patch_tokens.float(),
                "text_embeddings": output.text_embeddings.float(),
            }
            ref = call(loss, MedCLIPSegOutput(**upcast))
        assert low.dtype == torch.float32 and torch.isfinite(low), name
        assert (low - ref).abs() <= 1e-5 * max(1.0, ref.abs().item()), name


@pytest.mark.parametrize("dtype", HALF)
def test_loss_gradients_reach_half_logits_finite(dtype):
    logits = _half_logits(dtype).requires_grad_()
    masks = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    DiceBCELoss()(logits, masks).backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
    ref = logits.detach().float().requires_grad_()
    DiceBCELoss()(ref, masks).backward()
    assert (logits.grad.float() - ref.grad).abs().max() <= 1e-2 * ref.grad.abs().max()


# ---------------------------------------------------------------------------- uncertainty
@pytest.mark.parametrize("dtype", HALF)
def test_monte_carlo_moments_of_half_logits_match_a_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(30, 2, 8, 8, generator=g) * 6).to(dtype)
    logits[:, 0, 0, 0] = 60.0  # saturated in every sample: H = 0, not NaN
    logits[::2, 1, 0, 0] = -60.0  # saturated in half the samples, the other way in the rest
    logits[1::2, 1, 0, 0] = 60.0
    acc = MonteCarloMoments(2, (8, 8), "cpu")
    for chunk in logits.split(7):  # several passes, as monte_carlo_predict folds them in
        acc.add_logits(chunk)
    got = acc.result()
    # plain re-statement in float64 from the same (half-rounded) logits
    p = torch.sigmoid(logits.double())
    mean = p.mean(0)
    entropy = binary_entropy(mean)
    aleatoric = binary_entropy(p).mean(0)
    ref = {
        "mean": mean,
        "entropy": entropy,
        "aleatoric": aleatoric,
        "epistemic": (entropy - aleatoric).clamp_min(0),
        "variance": (p.square().mean(0) - mean.square()).clamp_min(0),
    }
    for key, value in ref.items():
        assert got[key].dtype == torch.float32 and torch.isfinite(got[key]).all(), key
        assert (got[key].double() - value).abs().max() < 1e-6, key
    assert got["entropy"][0, 0, 0] == 0 and got["epistemic"][1, 0, 0] == pytest.approx(
        float(torch.log(torch.tensor(2.0))), abs=1e-6
    )  # half the samples say 0, half say 1: all of it is model disagreement


@pytest.mark.parametrize("dtype", HALF)
def test_predict_with_uncertainty_under_autocast(dtype):
    model = create_model("medclipseg-tiny")
    images = [torch.rand(3, 40, 48), torch.rand(3, 64, 64)]
    ref = model.predict_with_uncertainty(images, PROMPTS[:2], 4, seed=0)
    with torch.autocast("cpu", dtype=dtype):
        low = model.predict_with_uncertainty(images, PROMPTS[:2], 4, seed=0)
    for key in ("mean", "entropy", "aleatoric", "epistemic", "variance"):
        for a, b in zip(getattr(low, key), getattr(ref, key)):
            assert a.dtype == torch.float32 and torch.isfinite(a).all(), key
            assert (a - b).abs().max() < (0.02 if dtype == torch.float16 else 0.1), key


# ---------------------------------------------------------------------------- channels-last
@pytest.mark.parametrize("name", TINY)
def test_channels_last_images_give_the_same_outputs_and_gradients(name):
    model = _model(name, train=True)
    for m in model.modules():
        # a dropout mask is drawn in memory order: a channels-last activation (CRIS's ResNet
        # features) gets another mask from the same seed, so dropout is off for this comparison
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    x = _inputs(model)
    last = x.to(memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    kwargs = {"sample": False} if isinstance(model, SupportsUncertainty) else {}
    results = []
    for pixels in (x, last):
        model.zero_grad()
        torch.manual_seed(0)
        if isinstance(model, SupportsTextFree):
            out = model(pixels).logits
        else:
            out = model(pixels, PROMPTS[:2], **kwargs).logits
        out.square().mean().backward()
        grads = torch.cat(
            [
                torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                for p in model.trainable_parameters()
            ]
        )  # (parts unused without text -- CoTexNet's ROI mapping -- get no gradient)
        results.append((out.detach(), grads))
    # relative to the values' scale: convolutions in channels-last order sum in another order;
    # through train-mode BatchNorm (CRIS's ResNet) each layout's fp32 gradients are ~4e-5 (relative)
    # from a float64 run, so gradients get 1e-4
    for (a, b), tol in zip(zip(results[0], results[1]), (1e-5, 1e-4)):
        assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item())
