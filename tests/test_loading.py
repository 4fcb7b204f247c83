"""One copy of the weights on load: ``from_pretrained`` builds without weights and assigns the file's.

Every load path (vlsegkit folders of every tiny registered model, transformers CLIPSeg folders in
safetensors and pickle form, MedCLIPSeg's released ``.pth`` layout, tuned models, and
``create_model(pretrained=True)``) is compared with the previous one -- build with random weights,
read the file, ``load_state_dict`` (copy) -- tensor by tensor (values, dtype, ``requires_grad``,
layout, non-persistent buffers) and on the forward output, bit for bit. The one-copy property is
checked directly: every parameter of a loaded model lies inside the memory map of its checkpoint
file (``/proc/self/maps``), and every ``load_state_dict`` call of a load passes ``assign=True``.
Strict loading keeps failing with ``CheckpointError`` before anything is assigned; the finiteness
check that reads the file instead of the tensors is pinned against ``torch.isfinite`` (every float
dtype, window boundaries, tensors changed after reading).
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vlsegkit
from vlsegkit import VLSM, MedCLIPSeg, TunedModel, _loading, create_model, list_models
from vlsegkit.hub import (
    CheckpointError,
    check_state_dict,
    empty_weights,
    load_checkpoint_file,
    load_state_dict_strict,
)
from vlsegkit.registry import hook_class

TINY = list_models("*-tiny")
PROMPTS = ["a small round lesion", "two polyps"]


def _jitter(model: nn.Module, seed: int) -> None:
    """Move every parameter away from its seeded initialisation (biases / norms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _same_model(new: nn.Module, old: nn.Module) -> None:
    """Bit-identical parameters and buffers (non-persistent ones too), flags and layouts."""
    assert type(new) is type(old) and new.training == old.training
    new_p, old_p = dict(new.named_parameters()), dict(old.named_parameters())
    assert new_p.keys() == old_p.keys()
    for name, p in old_p.items():
        q = new_p[name]
        assert not q.is_meta and q.dtype == p.dtype and q.stride() == p.stride(), name
        assert q.requires_grad == p.requires_grad and torch.equal(q, p), name
    new_b, old_b = dict(new.named_buffers()), dict(old.named_buffers())
    assert new_b.keys() == old_b.keys()
    for name, b in old_b.items():
        assert not new_b[name].is_meta and new_b[name].dtype == b.dtype, name
        assert torch.equal(new_b[name], b), name


def _logits(model, pixels, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)  # stochastic models (MedCLIPSeg) sample from the global RNG
    with torch.no_grad():
        if isinstance(model, vlsegkit.CoTexNet):
            return model(pixels).logits
        if "prompts" in kwargs:  # positional: DualEncoder names its second argument texts
            return model(pixels, kwargs.pop("prompts"), **kwargs).logits
        return model(pixels, **kwargs).logits


def _pixels(model) -> torch.Tensor:
    return torch.randn(2, 3, *model.image_size, generator=torch.Generator().manual_seed(3))


def _inside_mapping(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s memory lies in this process's memory map of the file ``path``."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    maps = _loading._mappings_of(str(path.resolve()))
    return any(low <= start and end <= high for low, high, _ in maps)


# ---------------------------------------------------------------------- building without weights
def _non_persistent(model: nn.Module) -> set[str]:
    return {
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }


# non-persistent buffers of the upstream modules (transformers' CLIP embeddings keep position ids,
# open_clip's text transformer its causal mask): no checkpoint holds them
_CLIPSEG_HIDDEN = {
    "vision_tower.vision_model.embeddings.position_ids",
    "text_tower.text_model.embeddings.position_ids",
}
EXPECTED_NON_PERSISTENT = {
    "clipseg-tiny": _CLIPSEG_HIDDEN,
    "cotexnet-tiny": {f"clipseg.{k}" for k in _CLIPSEG_HIDDEN},
    "medclipseg-tiny": {"text_tower.text.attn_mask"},
    # open_clip's CLIP text transformer (CRIS's word encoder; the tiny BiomedCLIPSeg and dual
    # encoder use a CLIP-BPE text tower too)
    "cris-tiny": {"text_tower.text.attn_mask"},
    "biomedclipseg-tiny": {"text_tower.text.attn_mask"},
    "biomedclipseg-d-tiny": {"text_tower.text.attn_mask"},
    "dual-encoder-tiny": {"text_tower.text.attn_mask"},
}


def test_every_tiny_model_has_its_hidden_buffers_listed():
    assert set(TINY) <= set(EXPECTED_NON_PERSISTENT)  # a new tiny model: list its buffers here


@pytest.mark.parametrize("name", TINY)
def test_empty_weights_builds_parameters_on_meta_and_every_buffer_for_real(name):
    torch.manual_seed(0)
    ref = create_model(name)
    original = nn.Module.register_parameter
    with empty_weights():
        model = create_model(name)
        assert nn.Module.register_parameter is not original
    assert nn.Module.register_parameter is original  # restored
    assert not nn.Linear(2, 2).weight.is_meta  # outside the block, modules are real again
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == ref_params.keys()
    for key, p in params.items():
        assert p.is_meta and p.shape == ref_params[key].shape and p.dtype == ref_params[key].dtype
        assert p.requires_grad == ref_params[key].requires_grad
    buffers, ref_buffers = dict(model.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    assert all(not b.is_meta and torch.equal(b, ref_buffers[k]) for k, b in buffers.items())
    hidden = _non_persistent(model)
    assert EXPECTED_NON_PERSISTENT.get(name, set()) <= hidden
    assert hidden.isdisjoint(model.state_dict())


def test_empty_weights_acts_in_its_thread_only_and_nests():
    built = {}
    inside, go = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        built["other"] = nn.Linear(3, 3)
        go.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with empty_weights():
        inside.set()
        go.wait()
        with empty_weights():
            built["nested"] = nn.Linear(3, 3)
        built["after nested"] = nn.Linear(3, 3)
    worker.join()
    assert not built["other"].weight.is_meta
    assert built["nested"].weight.is_meta and built["after nested"].weight.is_meta


class _Tied(nn.Module):
    """Tied weights, a parameter attribute and a non-persistent buffer computed in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.embed.weight.flag = "tied"
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("steps", torch.arange(6) * 2, persistent=False)


def test_assign_keeps_ties_attributes_and_buffers():
    state = {
        "embed.weight": torch.randn(5, 4),
        "head.weight": torch.randn(5, 4),  # tied: copying in order leaves this value
        "scale": torch.randn(4),
    }
    with empty_weights():
        model = _Tied()
    assert model.head.weight is model.embed.weight and model.embed.weight.is_meta
    load_state_dict_strict(model, state, assign=True)
    copied = _Tied()
    load_state_dict_strict(copied, state)
    assert model.head.weight is model.embed.weight and model.embed.weight.flag == "tied"
    assert torch.equal(model.embed.weight, copied.embed.weight)
    assert torch.equal(model.embed.weight, state["head.weight"])
    assert torch.equal(model.steps, torch.arange(6) * 2)
    assert len(list(model.parameters())) == 2


def test_assign_converts_like_copying_and_unties_aliases():
    base = torch.randn(4, 6)
    state = {
        "a.weight": base[:, :3].T,  # a non-contiguous view ...
        "a.bias": base[0, :3].to(torch.float16),  # ... a half tensor ...
        "b.weight": base[:, :3].T,  # ... and an alias of a.weight
        "b.bias": base[0, :3],
    }
    path_model = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
    with empty_weights():
        model = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
    load_state_dict_strict(model, state, assign=True)
    load_state_dict_strict(path_model, state)
    for key, value in path_model.state_dict().items():
        new = model.state_dict()[key]
        assert new.dtype == torch.float32 and new.is_contiguous() and torch.equal(new, value)
    with torch.no_grad():
        model["a"].weight.add_(1.0)  # training one must not move the other
    assert torch.equal(model["b"].weight, path_model["b"].weight)


def test_a_meta_tensor_left_behind_is_refused():
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.cache = [self.lin.weight * 2]  # computed from a weight: meta when built empty

    with empty_weights():
        model = Cached()
    with pytest.raises(RuntimeError, match=r"meta device after loading: cache"):
        load_state_dict_strict(model, nn.Linear(2, 2).state_dict(prefix="lin."), assign=True)


# ---------------------------------------------------------------------- vlsegkit folders
@pytest.mark.parametrize("name", TINY)
def test_from_pretrained_equals_the_copy_path_and_holds_one_copy(name, tmp_path, load_calls):
    torch.manual_seed(1)
    model = create_model(name).eval()
    _jitter(model, 1)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    # the previous path: build with random weights, read the file, copy it in
    old = VLSM.from_config(json.loads((tmp_path / "config.json").read_text()))
    old.load_state_dict(load_file(weights), strict=True)
    old.eval()
    load_calls.clear()
    new = VLSM.from_pretrained(tmp_path)
    assert load_calls == [True]  # assigned, never copied
    _same_model(new, old)
    assert all(_inside_mapping(p, weights) for p in new.parameters())  # the file's own memory
    prompts = {} if isinstance(new, vlsegkit.CoTexNet) else {"prompts": PROMPTS}
    assert torch.equal(_logits(new, _pixels(new), **prompts), _logits(old, _pixels(old), **prompts))


# ---------------------------------------------------------------------- transformers CLIPSeg
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    config = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=64, patch_size=16),
        projection_dim=24, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=48, use_complex_transposed_convolution=True,
    )  # fmt: skip
    torch.manual_seed(2)
    hf = CLIPSegForImageSegmentation(config)
    _jitter(hf, 2)
    root = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(root / "safetensors")
    pickled = root / "pickle"
    pickled.mkdir()
    (pickled / "config.json").write_text((root / "safetensors" / "config.json").read_text())
    torch.save(load_file(root / "safetensors" / "model.safetensors"), pickled / "pytorch_model.bin")
    return root


def _hf_copy_path(folder) -> vlsegkit.CLIPSeg:
    """The previous conversion: build, read, rename, copy."""
    from vlsegkit.encoders.factory import TransformersCLIPSpec

    config = json.loads((folder / "config.json").read_text())
    model = vlsegkit.CLIPSeg(
        backbone=TransformersCLIPSpec.from_hf_config(config).to_dict(),
        extract_layers=config["extract_layers"], reduce_dim=config["reduce_dim"],
        decoder_num_heads=config["decoder_num_attention_heads"],
        decoder_mlp_dim=config["decoder_intermediate_size"], complex_upsampler=True,
    )  # fmt: skip
    file = next(f for f in folder.iterdir() if f.name != "config.json")
    state = (
        load_file(file)
        if file.suffix == ".safetensors"
        else torch.load(file, map_location="cpu", weights_only=True)
    )
    model.load_state_dict(model.convert_hf_state_dict(state), strict=True)
    return model.eval()


@pytest.mark.parametrize("layout", ["safetensors", "pickle"])
def test_transformers_folders_convert_without_a_copy(hf_folder, layout, load_calls, monkeypatch):
    folder = hf_folder / layout
    loads = []
    original_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return original_load(*args, **kwargs)

    old = _hf_copy_path(folder)
    monkeypatch.setattr(torch, "load", spy_load)
    load_calls.clear()
    new = VLSM.from_pretrained(folder)
    assert load_calls == [True]
    if layout == "pickle":  # still weights_only, now memory-mapped
        assert loads and all(kw["weights_only"] is True and kw["mmap"] is True for kw in loads)
    else:
        assert not loads
    _same_model(new, old)
    file = next(f for f in folder.iterdir() if f.name != "config.json")
    assert all(_inside_mapping(p, file) for p in new.parameters())
    pixels = _pixels(new)
    assert torch.equal(_logits(new, pixels, prompts=PROMPTS), _logits(old, pixels, prompts=PROMPTS))


def test_create_model_pretrained_takes_the_same_path(hf_folder, tmp_path, load_calls):
    from vlsegkit.registry import model_entry
    from vlsegkit.testing import populate_hub_cache

    repo = model_entry("clipseg-rd64-refined").hub_id
    populate_hub_cache(hf_folder / "safetensors", tmp_path, repo)
    load_calls.clear()
    model = create_model(
        "clipseg-rd64-refined", pretrained=True, cache_dir=tmp_path, local_files_only=True
    )
    assert load_calls == [True]
    _same_model(model, _hf_copy_path(hf_folder / "safetensors"))


# ---------------------------------------------------------------------- MedCLIPSeg released
def _to_released(state: dict) -> dict:
    """vlsegkit keys -> the released ``CustomCLIP`` keys (inverse of ``RELEASED_KEY_MAP``, which
    tests/test_medclipseg.py pins to the official module structure)."""
    from vlsegkit.models.medclipseg_released import RELEASED_KEY_MAP

    out = {}
    for key, value in state.items():
        for released, ours in RELEASED_KEY_MAP.items():
            if key.startswith(ours):
                key = released + key[len(ours) :]
                break
        out[re.sub(r"^(pvl_adapters\.\d+\.proj_vis_down)\.", r"\1.0.", key)] = value
    return {**out, "logit_scale": torch.tensor(4.6)}


def test_released_checkpoint_loads_without_a_copy(tmp_path, load_calls):
    from vlsegkit.models.medclipseg_released import convert_released_state_dict
    from vlsegkit.testing import write_bert_tokenizer_files
    from vlsegkit.tokenizers import load_tokenizer

    tokenizer = write_bert_tokenizer_files(tmp_path / "tok")
    vocab = load_tokenizer(str(tokenizer)).vocab_size
    config = MedCLIPSeg.released_config(
        backbone={
            "kind": "open_clip", "embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3,
                           "head_width": 16},
            "bert_config": {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 3,
                            "num_attention_heads": 2, "intermediate_size": 64,
                            "max_position_embeddings": 32},
            "text_proj": "mlp", "text_pooler": "cls_last_hidden_state_pooler",
        },
        layers=[1, 2], adapter_dim=8, context_length=24, image_size=[32, 32],
        tokenizer=str(tokenizer),
    )  # fmt: skip
    torch.manual_seed(4)
    trained = MedCLIPSeg(**config)
    _jitter(trained, 4)
    path = tmp_path / "MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
    torch.save(
        {"model": _to_released(trained.state_dict()), "epoch": 3,
         "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}},
        path,
    )  # fmt: skip
    old = MedCLIPSeg(**config)
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    old.load_state_dict(convert_released_state_dict(state), strict=True)
    old.eval()
    load_calls.clear()
    new = MedCLIPSeg.from_released(path, config=config)
    assert load_calls == [True]
    _same_model(new, old)
    assert all(_inside_mapping(p, path) for p in new.parameters())
    pixels = _pixels(new)
    assert torch.equal(_logits(new, pixels, prompts=PROMPTS), _logits(old, pixels, prompts=PROMPTS))


# ---------------------------------------------------------------------- tuned models
@pytest.mark.parametrize("hook_name", ["CoOp", "MaPLe", "PVLAdapters"])
def test_tuned_model_equals_the_copy_path(hook_name, tmp_path, load_calls):
    torch.manual_seed(5)
    create_model("clipseg-tiny").save_pretrained(tmp_path / "base")
    base = VLSM.from_pretrained(tmp_path / "base")
    hook = hook_class(hook_name)() if hook_name == "PVLAdapters" else hook_class(hook_name)(depth=2)
    tuned = hook.attach(base)
    _jitter(tuned.hooks, 5)
    tuned.save_pretrained(tmp_path / "tuned")
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    old = TunedModel(
        VLSM.from_pretrained(tmp_path / "base"), config["hooks"], upsampler=config["upsampler"]
    )
    old.load_state_dict(load_file(tmp_path / "tuned" / "model.safetensors"), strict=True)
    old.eval()
    load_calls.clear()
    new = VLSM.from_pretrained(tmp_path / "tuned")
    assert load_calls == [True, True]  # the base, then the hooks
    _same_model(new, old)
    pixels = _pixels(new)
    assert torch.equal(_logits(new, pixels, prompts=PROMPTS), _logits(old, pixels, prompts=PROMPTS))


# ---------------------------------------------------------------------- strict loading still
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(6)
    root = tmp_path_factory.mktemp("saved")
    create_model("clipseg-tiny").save_pretrained(root)
    return root


def _variant(saved, tmp_path, mutate):
    state = dict(load_file(saved / "model.safetensors"))
    mutate(state)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("decoder.film_mul.weight"), r"missing keys: decoder\.film_mul\.weight"),
        (lambda s: s.__setitem__("decoder.extra", torch.zeros(2)), r"unexpected keys"),
        (lambda s: s.__setitem__("decoder.film_add.bias", torch.zeros(3)), r"shape mismatches"),
        (lambda s: s.__setitem__("decoder.film_add.bias", torch.zeros(32, dtype=torch.long)),
         r"integer tensors"),
        (lambda s: s["decoder.film_add.bias"].__setitem__(7, float("nan")),
         r"non-finite values \(NaN / inf\): decoder\.film_add\.bias$"),
        (lambda s: s["vision_tower.visual_projection.weight"].__setitem__((1, 2), float("-inf")),
         r"non-finite.*vision_tower\.visual_projection\.weight"),
    ],
    ids=["missing", "unexpected", "shape", "integer", "nan", "inf"],
)  # fmt: skip
def test_bad_checkpoints_raise_before_anything_is_assigned(saved, tmp_path, mutate, message):
    folder = _variant(saved, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message):
        VLSM.from_pretrained(folder)
    # the same through the public function: the module keeps every tensor it had
    state = load_checkpoint_file(folder / "model.safetensors")
    with empty_weights():
        model = create_model("clipseg-tiny")
    before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_strict(model, state, source="x", assign=True)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == before
    assert all(p.is_meta for p in model.parameters())


def test_the_finiteness_check_reads_the_values_not_a_stale_file(saved):
    with empty_weights():
        model = create_model("clipseg-tiny")
    state = load_checkpoint_file(saved / "model.safetensors", check_in_background=True)
    key = "decoder.film_mul.bias"
    state[key][3] = float("nan")  # changed after reading: the file no longer tells
    with pytest.raises(CheckpointError, match=re.escape(key)):
        check_state_dict(model, state)
    state[key].zero_()  # and a repaired tensor passes
    check_state_dict(model, state)


# ---------------------------------------------------------------------- the finiteness check
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_file_and_memory_checks_agree_with_isfinite(dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(_loading, "_WINDOW_BYTES", 4096)  # many windows, pieces across them
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i, n in enumerate([1, 7, 1023, 1024, 2049, 5000]):
        for where, bad in (("first", 0), ("last", n - 1), ("none", None)):
            for value in (float("nan"), float("inf"), float("-inf")):
                t = torch.randn(n, generator=g).to(dtype)
                if bad is not None:
                    t[bad] = value
                tensors[f"t{i}.{where}.{value}"] = t
    big = torch.finfo(dtype).max
    tensors["huge"] = torch.full((300,), big, dtype=dtype)  # finite, though a dot overflows
    save_file(tensors, tmp_path / "t.safetensors")
    expected = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    assert len(expected) == 6 * 2 * 3
    mapped = load_checkpoint_file(tmp_path / "t.safetensors")
    assert all(_loading._region(t) is not None for t in mapped.values())  # read from the file
    assert sorted(_loading.non_finite(mapped)) == expected
    in_memory = {k: t.clone() for k, t in mapped.items()}
    assert sorted(_loading.non_finite(in_memory)) == expected
    again = load_checkpoint_file(tmp_path / "t.safetensors")
    _loading.start_finite_check(again.values())  # the background check gives the same
    assert sorted(_loading.non_finite(again)) == expected


def test_pickles_are_mapped_and_checked_from_the_file(tmp_path):
    state = {"a": torch.randn(100), "b": torch.randn(10, 10)}
    state["b"][4, 4] = float("nan")
    torch.save(state, tmp_path / "w.bin")
    loaded = load_checkpoint_file(tmp_path / "w.bin")
    assert all(_inside_mapping(t, tmp_path / "w.bin") for t in loaded.values())
    assert all(_loading._region(t) is not None for t in loaded.values())
    assert _loading.non_finite(loaded) == ["b"]
    with pytest.raises(CheckpointError, match="weights_only"):  # still no arbitrary pickles
        torch.save({"a": threading.Lock}, tmp_path / "evil.bin")
        load_checkpoint_file(tmp_path / "evil.bin")


def test_loading_a_clipseg_does_not_import_open_clip(saved):
    import subprocess
    import sys

    code = (
        "import sys, vlsegkit\n"
        f"vlsegkit.VLSM.from_pretrained({str(saved)!r})\n"
        "assert 'open_clip' not in sys.modules, 'loading imported open_clip'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_lazy_bundled_bpe_gives_open_clips_ids():
    from open_clip.tokenizer import SimpleTokenizer

    from vlsegkit.tokenizers import CLIPTokenizer

    lazy = CLIPTokenizer.from_open_clip(context_length=16)
    assert lazy.tokenizer._tokenizer is None  # nothing read yet
    eager = SimpleTokenizer(context_length=16)
    texts = ["a small round lesion", "", "two polyps, left colon"]
    expected = [[eager.sot_token_id, *eager.encode(t), eager.eot_token_id] for t in texts]
    batch = lazy(texts)
    assert [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)] == (
        expected
    )
    assert (lazy.bos_token_id, lazy.eos_token_id, lazy.vocab_size) == (
        eager.sot_token_id, eager.eot_token_id, eager.vocab_size
    )  # fmt: skip
    assert lazy.tokenizer.encoder == eager.encoder  # everything else is the real tokenizer's
