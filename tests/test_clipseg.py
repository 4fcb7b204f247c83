"""CLIPSeg: parity with transformers, conditioning modes, predict, Hub I/O and strict loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

import vlsegkit
from vlsegkit import VLSM, CLIPSeg
from vlsegkit.hub import CheckpointError
from vlsegkit.testing import populate_hub_cache

ATOL = 1e-5


def _hf_config(*, complex_upsampler: bool) -> CLIPSegConfig:
    return CLIPSegConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            image_size=224, patch_size=16,
        ),
        projection_dim=24, extract_layers=[1, 2, 3], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=48, use_complex_transposed_convolution=complex_upsampler,
    )  # fmt: skip


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Default inits leave biases at zero and LayerNorms at identity, which would hide mapping bugs;
    # perturb those (weights keep their init so logits stay at realistic magnitudes).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        # Random tiny decoders give logits in the hundreds; rescale the last layer so they sit in
        # the range real checkpoints produce (|logits| ~ 10), where an absolute tolerance is meaningful.
        last = model.decoder.transposed_convolution
        last = last[-1] if isinstance(last, torch.nn.Sequential) else last
        last.weight.mul_(0.02)


@pytest.fixture(scope="module", params=[False, True], ids=["rd", "refined"])
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = CLIPSegForImageSegmentation(_hf_config(complex_upsampler=request.param)).eval()
    _randomise(hf, 1 + request.param)
    path = tmp_path_factory.mktemp("hf_clipseg")
    hf.save_pretrained(path)
    return hf, path


def _ids(texts_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 49000, (texts_len, 7), generator=g)
    ids[:, 0] = 49406
    ids[:, -1] = 49407
    mask = torch.ones_like(ids)
    ids[0, 4] = 49407  # a shorter prompt: EOS early, then padding
    ids[0, 5:] = 49407
    mask[0, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("size", [224, 352])
def test_logits_match_transformers(hf_checkpoint, size):
    hf, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    assert isinstance(model, CLIPSeg)
    torch.manual_seed(size)
    pixels = torch.randn(2, 3, size, size)
    ids, mask = _ids(2)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        out = model(pixels, input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, 1, size, size)
    err = (out[:, 0] - ref).abs().max().item()
    assert err <= ATOL, err


def test_support_image_conditioning_matches_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    pixels, support = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, conditional_pixel_values=support).logits
        out = model(pixels, conditional_pixel_values=support).logits
    assert (out[:, 0] - ref).abs().max().item() <= ATOL


def test_multi_prompt_equals_repeated_images(hf_checkpoint):
    hf, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    pixels = torch.randn(2, 3, 224, 224)
    ids, mask = _ids(3, seed=5)
    with torch.no_grad():
        out = model(pixels, input_ids=ids, attention_mask=mask).logits  # 2 images x 3 prompts
        ref = hf(
            input_ids=ids.repeat(2, 1),
            pixel_values=pixels.repeat_interleave(3, 0),
            attention_mask=mask.repeat(2, 1),
        ).logits
    assert out.shape == (2, 3, 224, 224)
    # Different batch sizes take different matmul blockings: allow fp32 round-off relative to |logits|.
    err = (out.reshape(6, 224, 224) - ref).abs().max().item()
    assert err <= ATOL + 1e-6 * ref.abs().max().item(), err


def test_string_prompts_match_transformers_tokenizer(hf_checkpoint, tmp_path):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from vlsegkit.testing import write_clip_tokenizer_files

    hf, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    tok = HFCLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tok"))
    prompts = ["one small round lesion at the top left", "polyp", ""]
    batch = tok(prompts, padding=True, return_tensors="pt")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=pixels.expand(3, -1, -1, -1),
        ).logits
        out = model(pixels, prompts).logits[0]
    assert (out - ref).abs().max().item() <= ATOL


def test_conditioning_modes_agree(hf_checkpoint):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    pixels = torch.randn(2, 3, 224, 224)
    support = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        emb_text = model.encode_text(["a", "b"])
        by_text = model(pixels, ["a", "b"]).logits
        by_emb = model(pixels, conditional_embeddings=emb_text).logits
        nested = model(pixels, [["a"], ["b"]]).logits
        shared = model(pixels, "a").logits
        emb_img = model.encode_image(support)
        by_img = model(pixels, conditional_pixel_values=support).logits
        by_img_emb = model(pixels, conditional_embeddings=emb_img).logits
        per_image = model(pixels, conditional_embeddings=emb_text[:, None]).logits
    torch.testing.assert_close(by_text, by_emb)
    torch.testing.assert_close(by_text, nested)
    torch.testing.assert_close(by_text, per_image)
    # 'a' alone vs inside a padded batch of two: equal up to fp32 round-off.
    torch.testing.assert_close(shared[0], by_text[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(by_img, by_img_emb)
    assert not torch.allclose(by_text[1], shared[1])  # image 1 got a different prompt


def test_bad_conditions_raise(hf_checkpoint):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    pixels = torch.randn(2, 3, 224, 224)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixels)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixels, "a", conditional_embeddings=torch.randn(2, 24))
    with pytest.raises(ValueError, match="empty"):
        model(pixels, [])
    with pytest.raises(ValueError, match="nested prompts"):
        model(pixels, [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="conditional_embeddings"):
        model(pixels, conditional_embeddings=torch.randn(2, 7))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 224, 224), "a")
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 100, 224), "a")  # not a multiple of the patch size


def test_decoder_trains_backbone_frozen(hf_checkpoint):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path).train()
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    pixels, target = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pixels, "x").logits, target)
    loss.backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is None for p in model.text_tower.parameters())
    opt.step()
    for k, v in model.vision_tower.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model.num_parameters(trainable_only=True) == sum(
        p.numel() for p in model.decoder.parameters()
    )


def test_unfrozen_backbone_gets_gradients(hf_checkpoint):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path).freeze_backbone(False)
    model(torch.randn(1, 3, 64, 64), "x").logits.sum().backward()
    grads = [p.grad for p in model.vision_tower.vision_model.encoder.layers[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_predict_original_sizes(hf_checkpoint):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    model.image_size = (224, 224)
    rng = np.random.default_rng(0)
    img_np = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    img_t = torch.rand(3, 50, 70)
    from PIL import Image

    img_pil = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    outs = model.predict([img_np, img_t, img_pil], ["a", "b"])
    assert [tuple(o.shape) for o in outs] == [(2, 90, 130), (2, 50, 70), (2, 40, 60)]
    assert all(((o >= 0) & (o <= 1)).all() for o in outs)
    # Same numbers as a manual preprocess + forward + resize.
    pixels, _ = model.preprocess(img_t)
    with torch.no_grad():
        ref = model(pixels, ["a", "b"]).logits.sigmoid()
    ref = torch.nn.functional.interpolate(ref, size=(50, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(outs[1], ref[0])
    single = model.predict(img_t, "a")
    assert single.shape == (1, 50, 70)
    torch.testing.assert_close(single[0], outs[1][0])


def test_save_load_roundtrip(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    model.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "clipseg"
    assert config["vlsegkit_format_version"] == 1
    again = CLIPSeg.from_pretrained(tmp_path / "ours")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, "x").logits, model(pixels, "x").logits)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ours").iterdir())


def test_hub_cache_offline_by_repo_id(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint
    cache = tmp_path / "cache"
    populate_hub_cache(path, cache, "CIDAS/clipseg-tiny-test")
    script = textwrap.dedent(
        f"""
        import torch, vlsegkit
        from transformers import CLIPSegForImageSegmentation
        m = vlsegkit.VLSM.from_pretrained("CIDAS/clipseg-tiny-test")
        hf = CLIPSegForImageSegmentation.from_pretrained({str(path)!r}).eval()
        x = torch.randn(1, 3, 224, 224)
        ids = torch.tensor([[49406, 320, 1125, 49407]])
        with torch.no_grad():
            d = (m(x, input_ids=ids).logits[:, 0] - hf(input_ids=ids, pixel_values=x).logits)
        print(type(m).__name__, float(d.abs().max()))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path),
    }
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    name, err = res.stdout.split()[-2:]
    assert name == "CLIPSeg" and float(err) <= ATOL


def test_missing_repo_offline_fails(tmp_path):
    with pytest.raises(Exception, match=r"(?i)offline|not found|cannot find|local"):
        VLSM.from_pretrained("nobody/not-a-repo", cache_dir=tmp_path, local_files_only=True)


def test_legacy_position_ids_are_dropped(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, path = hf_checkpoint
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    state["clip.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["clip.vision_model.embeddings.position_ids"] = torch.arange(197)[None]
    save_file(state, legacy / "model.safetensors")
    model = VLSM.from_pretrained(legacy)
    x, ids = torch.randn(1, 3, 224, 224), torch.tensor([[49406, 320, 49407]])
    with torch.no_grad():
        err = model(x, input_ids=ids).logits[:, 0] - hf(input_ids=ids, pixel_values=x).logits
    assert err.abs().max() <= ATOL


def test_pickle_checkpoint_loads_weights_only(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file

    hf, path = hf_checkpoint
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((path / "config.json").read_text())
    torch.save(load_file(path / "model.safetensors"), pkl / "pytorch_model.bin")
    model = VLSM.from_pretrained(pkl)
    x, ids = torch.randn(1, 3, 224, 224), torch.tensor([[49406, 320, 49407]])
    with torch.no_grad():
        err = model(x, input_ids=ids).logits[:, 0] - hf(input_ids=ids, pixel_values=x).logits
    assert err.abs().max() <= ATOL


def _copy_ours(model: CLIPSeg, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def test_strict_loading_errors(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_checkpoint
    model = VLSM.from_pretrained(path)
    good = _copy_ours(model, tmp_path / "good")
    weights = good / "model.safetensors"
    state = load_file(weights)

    def variant(name, mutate):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        s = dict(state)
        mutate(s)
        save_file(s, d / "model.safetensors")
        return d

    missing = variant("missing", lambda s: s.pop("decoder.film_mul.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.film_mul\.weight"):
        VLSM.from_pretrained(missing)
    extra = variant("extra", lambda s: s.__setitem__("decoder.bogus", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.bogus"):
        VLSM.from_pretrained(extra)
    shape = variant("shape", lambda s: s.__setitem__("decoder.film_add.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"decoder\.film_add\.bias: checkpoint \(3,\)"):
        VLSM.from_pretrained(shape)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    data = weights.read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        VLSM.from_pretrained(truncated)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        VLSM.from_pretrained(garbage)

    future = tmp_path / "future"
    future.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    cfg["vlsegkit_format_version"] = 99
    (future / "config.json").write_text(json.dumps(cfg))
    (future / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="newer"):
        VLSM.from_pretrained(future)

    bad_pickle = tmp_path / "badpickle"
    bad_pickle.mkdir()
    (bad_pickle / "config.json").write_text((path / "config.json").read_text())
    (bad_pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError, match="weights_only"):
        VLSM.from_pretrained(bad_pickle)


def test_registry_full_size_matches_transformers_parameter_count():
    names = vlsegkit.list_models("clipseg*")
    assert {"clipseg-rd16", "clipseg-rd64", "clipseg-rd64-refined", "clipseg-tiny"} <= set(names)
    assert "clipseg-tiny" not in vlsegkit.list_models(pretrained=True)
    with torch.device("meta"):
        model = vlsegkit.create_model("clipseg-rd64-refined")
        hf = CLIPSegForImageSegmentation(
            CLIPSegConfig(
                vision_config=dict(patch_size=16), reduce_dim=64,
                use_complex_transposed_convolution=True,
            )
        )  # fmt: skip
    hf_count = sum(p.numel() for p in hf.parameters())
    # The spec's figure for the CIDAS file; vlsegkit drops CLIP's unused logit_scale.
    assert hf_count == 150_747_746
    assert model.num_parameters() == hf_count - 1
    assert model.config["complex_upsampler"] is True
    with pytest.raises(KeyError, match="did you mean"):
        vlsegkit.create_model("clipseg-rd64-refine")


def test_tiny_registry_model_runs_and_is_seeded():
    torch.manual_seed(0)
    a = vlsegkit.create_model("clipseg-tiny")
    torch.manual_seed(0)
    b = vlsegkit.create_model("clipseg-tiny")
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        la, lb = a(x, ["lesion", ""]).logits, b(x, ["lesion", ""]).logits
    assert la.shape == (2, 1, 64, 96)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert torch.isfinite(la).all()


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = vlsegkit.create_model("clipseg-tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, "lesion").logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, "lesion").logits
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
