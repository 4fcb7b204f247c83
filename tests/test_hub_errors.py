"""Loading from the Hub or a folder: every wrong place, wrong file and wrong content fails fast with a
:class:`~vlsegkit.hub.CheckpointError` that says what was looked for and what to do.

Expected messages are checked for the words a user needs (the argument, the folder, the fix), not
for exact wording.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlsegkit import VLSM, CoOp, TunedModel, create_model
from vlsegkit.hub import CheckpointError, read_json, resolve_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny CLIPSeg saved in vlsegkit layout."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clipseg")
    create_model("clipseg-tiny").save_pretrained(root)
    return root


@pytest.fixture
def copy(saved, tmp_path):
    """A writable copy of the saved folder."""
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="no such folder"):
        VLSM.from_pretrained(tmp_path / "not-here")
    with pytest.raises(CheckpointError, match="no such folder"):
        VLSM.from_pretrained("./runs/model")  # relative, looks like a path
    assert time.perf_counter() - start < 2.0  # no network retries


def test_a_file_instead_of_the_folder(saved):
    with pytest.raises(CheckpointError, match="is a file; give the folder"):
        VLSM.from_pretrained(saved / "model.safetensors")


def test_folder_without_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors not found in the folder"):
        VLSM.from_pretrained(copy)


def test_invalid_repo_id():
    with pytest.raises(CheckpointError, match="neither a local folder nor a valid Hub repo id"):
        VLSM.from_pretrained("org name/with spaces")


def test_offline_names_the_switch_and_the_way_out(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1") as e:
        VLSM.from_pretrained("someone/not-cached", cache_dir=tmp_path)
    assert "local folder" in str(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match="local_files_only=True"):
        VLSM.from_pretrained("someone/not-cached", cache_dir=tmp_path, local_files_only=True)
    # optional files are simply absent offline
    assert resolve_file("someone/x", "a.json", cache_dir=tmp_path, local_files_only=True,
                        required=False) is None  # fmt: skip


def test_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # a closed local port: refused at once, as a firewalled machine would be after the probe
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="unreachable") as e:
        VLSM.from_pretrained("someone/model", cache_dir=tmp_path)
    assert "HF_HUB_OFFLINE=1" in str(e.value)
    assert time.perf_counter() - start < 5.0


def test_config_of_another_library(copy):
    (copy / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="neither a vlsegkit config"):
        VLSM.from_pretrained(copy)


def test_config_that_is_not_json_or_not_utf8(copy):
    (copy / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_json(copy / "config.json")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        VLSM.from_pretrained(copy)
    (copy / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        VLSM.from_pretrained(copy)
    (copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        VLSM.from_pretrained(copy)


def test_config_of_another_family_does_not_fit(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "medclipseg"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit MedCLIPSeg"):
        VLSM.from_pretrained(copy)


def test_a_class_loads_only_its_own_configs(saved):
    """``CRIS.from_pretrained`` of a CLIPSeg folder used to return a CLIPSeg without a word."""
    from vlsegkit import CRIS, CLIPSeg, MedCLIPSeg

    for klass in (CRIS, MedCLIPSeg):
        with pytest.raises(CheckpointError, match=rf"is for CLIPSeg .*not {klass.__name__}"):
            klass.from_pretrained(saved)
    assert type(CLIPSeg.from_pretrained(saved)) is CLIPSeg
    assert type(VLSM.from_pretrained(saved)) is CLIPSeg


@pytest.mark.parametrize(
    ("model_type", "words"),
    [
        ("nonsense", "unknown model_type 'nonsense'"),
        (None, "'model_type' must name the model class"),
        (3, "'model_type' must name the model class"),
        ("", "'model_type' must name the model class"),
    ],
)
def test_unknown_or_missing_model_type(copy, model_type, words):
    config = json.loads((copy / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=words):
        VLSM.from_pretrained(copy)


def test_newer_format_version(copy):
    config = json.loads((copy / "config.json").read_text())
    config["vlsegkit_format_version"] = 99
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade vlsegkit"):
        VLSM.from_pretrained(copy)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("image_std", [0.0, 0.2, 0.2], "image_std must be three positive"),
        ("image_std", [float("nan"), 0.2, 0.2], "image_std must be three positive"),
        ("image_mean", [0.5, 0.5], "image_mean must be three finite"),
        ("image_size", 0, "image_size must be a positive int"),
        ("image_size", [224, "x"], "field .image_size. must be int"),
    ],
)
def test_bad_preprocessing_in_config(copy, key, value, words):
    config = json.loads((copy / "config.json").read_text())
    assert key in config  # the saved config records the preprocessing
    config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=words):
        VLSM.from_pretrained(copy)


def test_bad_preprocessing_arguments_at_construction():
    with pytest.raises(ValueError, match="image_std"):
        create_model("clipseg-tiny", image_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="image_size"):
        create_model("clipseg-tiny", image_size=-3)


@pytest.mark.parametrize("damage", ["nan", "integer", "shape", "missing", "extra", "truncated"])
def test_damaged_weights(copy, damage):
    path = copy / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    if damage == "nan":
        weights[name] = weights[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    elif damage == "integer":
        weights[name] = weights[name].round().to(torch.int64)
    elif damage == "shape":
        weights[name] = weights[name].flatten()[:-1].clone()
    elif damage == "missing":
        del weights[name]
    elif damage == "extra":
        weights["not.a.parameter"] = torch.zeros(2)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        save_file(weights, str(path))
    with pytest.raises(CheckpointError) as e:
        VLSM.from_pretrained(copy)
    assert str(path) in str(e.value) or "model.safetensors" in str(e.value)


def test_tuned_model_finds_its_base_from_another_directory(saved, tmp_path, monkeypatch):
    """A base loaded from a relative folder is recorded absolute, so the tuned model loads from
    anywhere."""
    monkeypatch.chdir(saved.parent)
    base = VLSM.from_pretrained(saved.name)  # relative
    assert base.name_or_path == str(saved.resolve())
    torch.manual_seed(1)
    tuned = CoOp(num_context=4).attach(base)
    with torch.no_grad():
        for p in tuned.hooks.parameters():
            p.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = TunedModel.from_pretrained(tmp_path / "tuned")
    a, b = tuned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tuned_model_with_a_moved_base_says_so(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "base")
    base = VLSM.from_pretrained(tmp_path / "base")
    CoOp(num_context=4).attach(base).save_pretrained(tmp_path / "tuned")
    shutil.move(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"cannot load this tuned model.s base.*pass base="):
        TunedModel.from_pretrained(tmp_path / "tuned")
    # the way out the message names works
    loaded = TunedModel.from_pretrained(tmp_path / "tuned", base=VLSM.from_pretrained(saved))
    assert isinstance(loaded, TunedModel)
