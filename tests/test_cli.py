"""The ``vlsegkit`` command line, through ``python -m vlsegkit`` and ``vlsegkit.cli.main``.

One tiny training run (clipseg-tiny, 64 px, 16 images, JSON config + command-line overrides) feeds
the evaluate and predict tests; their outputs are checked against the same computation done
in-process with the library API (vlsegkit.train.evaluate, VLSM.predict, vlsegkit.viz).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vlsegkit import cli, viz
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.models import VLSM, SupportsTextFree, SupportsUncertainty
from vlsegkit.registry import create_model, list_models, model_entry
from vlsegkit.testing import populate_hub_cache
from vlsegkit.train import evaluate, seed_everything

SIZE = 64
TRAIN = {"train_size": 16, "val_size": 8, "image_size": SIZE, "batch_size": 8, "lr": 3e-3}


def run_cli(*args, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vlsegkit", *map(str, args)],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _val_loader(model, *, length: int = 8, seed: int = 10_000) -> DataLoader:
    data = SyntheticLesions(
        length=length, image_size=SIZE, seed=seed, mean=model.image_mean, std=model.image_std
    )
    return DataLoader(data, batch_size=32, collate_fn=collate_prompts)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_images(folder: Path) -> list[Path]:
    """Two synthetic lesion pictures of different, non-square sizes (PNG and JPEG)."""
    paths = []
    for i, (size, suffix) in enumerate((((72, 96), ".png"), ((80, 60), ".jpg"))):
        image, _ = SyntheticLesions(length=1, image_size=size, seed=7 + i).render(0)
        path = folder / f"case{i}{suffix}"
        Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-epoch training run through the real entry point; options from a JSON config + flags."""
    root = tmp_path_factory.mktemp("train")
    config = {"model": "clipseg-tiny", "data": "synthetic", "epochs": 5, **TRAIN}
    (root / "cfg.json").write_text(json.dumps(config))
    proc = run_cli(
        "train", "--config", "cfg.json", "--epochs", 2, "--out", "run", "--scheduler", "cosine",
        "--warmup-steps", 1, "--min-lr-ratio", 0.1, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2: train loss" in proc.stdout
    return root / "run"


# --------------------------------------------------------------------------- train
def test_train_writes_model_history_and_resolved_config(trained):
    saved = json.loads((trained / "train_config.json").read_text())
    assert saved["epochs"] == 2  # the command line beats the config file ...
    assert saved["lr"] == TRAIN["lr"] and saved["train_size"] == 16  # ... which beats defaults
    assert saved["weight_decay"] == 1e-4
    assert saved["monitor"] == "val_dice"  # as used: fit's default, not the null typed (none)
    history = json.loads((trained / "history.json").read_text())
    assert len(history["train_loss"]) == 2 and all(math.isfinite(x) for x in history["train_loss"])
    assert history["steps"] == 2 * math.ceil(16 / 8)
    # The schedule options reach the loop: one warmup step at lr / 2, then cosine down to lr / 10.
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r and "train_loss" not in r]
    assert len(lrs) == 4
    assert lrs[0] == pytest.approx(TRAIN["lr"] / 2)
    assert lrs[1] > lrs[2] > lrs[3] >= TRAIN["lr"] / 10 - 1e-12

    model = VLSM.from_pretrained(trained / "model")
    assert model.image_size == (SIZE, SIZE)
    # The same seed gives the same initial weights in-process: the frozen towers must be untouched
    # and the trained decoder must have moved.
    seed_everything(0)
    init = create_model("clipseg-tiny", image_size=SIZE)
    for name, p in init.vision_tower.named_parameters():
        torch.testing.assert_close(model.vision_tower.get_parameter(name), p, rtol=0, atol=0)
    moved = [
        (model.decoder.get_parameter(n) - p).abs().max().item()
        for n, p in init.decoder.named_parameters()
    ]
    assert max(moved) > 1e-3
    # OUT/model is the best epoch by the monitored metric (val_dice), OUT/last the last epoch: each
    # scores exactly as its epoch's validation record on the seed + 10000 synthetic set.
    assert history["monitor"] == "val_dice"
    best = history["val"][history["best_epoch"]]
    assert best["dice"] == max(r["dice"] for r in history["val"])
    expected = evaluate(model, _val_loader(model))
    last = evaluate(VLSM.from_pretrained(trained / "last"), _val_loader(model))
    for key in ("dice", "iou", "loss"):
        assert best[key] == pytest.approx(expected[key], abs=1e-5)
        assert history["val"][-1][key] == pytest.approx(last[key], abs=1e-5)
    with Image.open(trained / "training_curves.png") as curves:
        assert curves.width > 400


def test_train_yaml_config_is_deterministic_and_resumable(tmp_path, capsys):
    pytest.importorskip("yaml")
    (tmp_path / "cfg.yaml").write_text(
        "model: clipseg-tiny\ntrain-size: 8\nval_size: 0\nimage_size: 64\nbatch_size: 4\nlr: 0.01\n"
    )
    base = ["train", "--config", str(tmp_path / "cfg.yaml")]

    def train(run: str, *extra: str) -> dict[str, torch.Tensor]:
        assert cli.main([*base, "--out", str(tmp_path / run), *extra]) == 0, capsys.readouterr()
        return load_file(tmp_path / run / "model" / "model.safetensors")

    straight = train("a", "--epochs", "2")
    again = train("b", "--epochs", "2")
    train("c", "--epochs", "1")
    resumed = train("c", "--epochs", "2", "--resume")  # continues c's checkpoint at epoch 1
    assert json.loads((tmp_path / "c" / "history.json").read_text())["steps"] == 4
    for other in (again, resumed):
        assert other.keys() == straight.keys()
        for key in straight:
            torch.testing.assert_close(other[key], straight[key], rtol=0, atol=0)
    seed_everything(0)
    init = create_model("clipseg-tiny", image_size=SIZE).state_dict()
    assert any(not torch.equal(init[k], straight[k]) for k in straight)


def test_train_resume_refuses_options_the_checkpoint_fixes(tmp_path, capsys):
    """--resume with another --lr, or more --epochs of a cosine schedule, would silently train
    with the checkpoint's learning rate / schedule: refused (exit 2) naming the options, and
    train_config.json keeps the values the run used."""
    base = ["train", "clipseg-tiny", "--image-size", "32", "--train-size", "4", "--val-size", "0",
            "--batch-size", "4", "--lr", "0.005", "--no-progress", "--out", str(tmp_path / "r")]  # fmt: skip
    assert cli.main([*base, "--epochs", "1", "--scheduler", "cosine"]) == 0
    config = (tmp_path / "r" / "train_config.json").read_text()
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "3", "--scheduler", "cosine", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--epochs/--max-steps (the length of --scheduler cosine, in steps): 1 in the " in err
    assert "run, 3 now" in err and "start a new run from its weights" in err
    assert (
        cli.main([*base, "--epochs", "1", "--scheduler", "cosine", "--lr", "0.05", "--resume"]) == 2
    )
    assert "--lr: 0.005 in the checkpoint's run, 0.05 now" in capsys.readouterr().err
    assert (tmp_path / "r" / "train_config.json").read_text() == config
    # The same options resume (a finished run stays finished).
    assert cli.main([*base, "--epochs", "1", "--scheduler", "cosine", "--resume"]) == 0


def test_train_plateau_with_warmup_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "clipseg-tiny", "--scheduler", "plateau", "--warmup-steps", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "--warmup-steps 2 needs --scheduler cosine or none" in captured.err
    assert captured.out == "" and not out.exists()  # no model was built, nothing written


def test_random_prompt_keys_train_anew_each_epoch_and_validate_on_one_draw(tmp_path):
    """Datasets on disk are seeded by --seed: fit's set_epoch redraws training prompts each epoch,
    while the validation items (--val-data: seed + 10000; --val-fraction: a copy) keep one draw."""
    root = tmp_path / "data"
    entries = []
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
            _mkdir(root / "images") / f"{i}.png"
        )
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(_mkdir(root / "masks") / f"{i}.png")
        prompts = {
            "p0": "",
            "p1": [f"a{i}{j}" for j in range(5)],
            "p2": [f"b{i}{j}" for j in range(5)],
        }
        entries.append({"img_name": f"{i}.png", "mask_name": f"{i}.png", "prompts": prompts})
    _mkdir(root / "anns")
    (root / "anns" / "train.json").write_text(json.dumps(entries))
    opts = argparse.Namespace(prompt_key="random", mask_threshold=None, mask_values=None,
                              mask_suffix="", prompt_style="attributes", negative_fraction=0.0)  # fmt: skip
    model = create_model("clipseg-tiny", image_size=32)
    train = cli._dataset(opts, model, str(root), length=0, seed=3, split="train")
    assert train.seed == 3

    def prompts(ds):
        return [ds[i]["prompt"] for i in range(len(ds))]

    draws = []
    for epoch in range(3):
        train.set_epoch(epoch)
        draws.append(prompts(train))
    assert draws[0] != draws[1] != draws[2]
    fit_part, held_out = cli._split(train, 0.5, seed=3)
    before = prompts(held_out)
    from vlsegkit.train import _set_epoch  # what fit calls on the training data every epoch

    _set_epoch(fit_part, 5)
    assert prompts(held_out) == before and train.epoch == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "synthetic"], "MODEL is required"),
        (["train", "clipseg-tiny", "--epochs", "-1"], "--epochs must be >= 0, got -1"),
        (["train", "clipseg-tiny", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["train", "clipseg-tiny", "--image-size", "4"], "--image-size must be >= 8"),
        (["train", "clipseg-tiny", "--config", "missing.json"], "--config: no such file"),
        (["train", "./no/such/folder"], "MODEL: no such folder"),
        (["evaluate", "clipseg-tiny", "--pretrained"], "'clipseg-tiny' has no Hub checkpoint"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    for argv in (
        [],
        ["frobnicate"],
        ["predict", "m", "x.png", "--prompt", "a", "--cmap", "rainbow"],
        ["train", "clipseg-tiny", "--epochs", "many"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": "clipseg-tiny", "epochs": "2"}, "--config 'epochs' must be int, got '2'"),
        ({"model": "clipseg-tiny", "lr": True}, "--config 'lr' must be float"),
        ({"model": "clipseg-tiny", "autocast": "fp8"}, "must be one of none, bf16, fp16"),
        ({"model": "clipseg-tiny", "epoch": 2}, "unknown option(s) epoch"),
        ({"model": 3}, "'model' must be a string"),
        ({"model": "clipseg-tiny", "model_kwargs": [1]}, "'model_kwargs' must be a mapping"),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, config, message, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_invalid_json_config_and_model_kwargs_rules(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{epochs: 2")
    assert cli.main(["train", "clipseg-tiny", "--config", str(tmp_path / "bad.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    (tmp_path / "kw.json").write_text(json.dumps({"model_kwargs": {"no_such_arg": 1}}))
    assert cli.main(["train", "clipseg-tiny", "--config", str(tmp_path / "kw.json")]) == 2
    assert "cannot build 'clipseg-tiny'" in capsys.readouterr().err


def _write_folder_dataset(root: Path, count: int = 6) -> Path:
    """``images/`` + ``masks/`` (0/255 PNG) + ``prompts.json`` from SyntheticLesions renders."""
    data = SyntheticLesions(length=count, image_size=SIZE, seed=3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    prompts = {}
    for i in range(count):
        image, mask = data.render(i)
        Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(
            root / "images" / f"case{i}.png"
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"case{i}.png")
        prompts[f"case{i}"] = data[i]["prompt"]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def test_train_and_evaluate_on_datasets_on_disk(tmp_path, capsys):
    from vlsegkit.data import ImageMaskPromptDataset

    folder = _write_folder_dataset(tmp_path / "folder")
    out = tmp_path / "run"
    argv = ["train", "clipseg-tiny", "--data", str(folder), "--val-data", str(folder),
            "--image-size", "64", "--epochs", "1", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "6 training / 6 validation images" in capsys.readouterr().out
    model = VLSM.from_pretrained(out / "model")
    norm = dict(image_size=SIZE, mean=model.image_mean, std=model.image_std)
    folder_set = ImageMaskPromptDataset.from_folder(folder, **norm)
    expected = evaluate(model, DataLoader(folder_set, batch_size=4, collate_fn=collate_prompts))
    assert cli.main(["evaluate", str(out / "model"), "--data", str(folder), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 6
    assert report["dice"] == pytest.approx(expected["dice"], abs=1e-6)
    assert report["loss"] == pytest.approx(expected["loss"], abs=1e-6)

    # medvlsm / TuneVLSeg layout: anns/<split>.json next to images/ and masks/ (split "test").
    entries = [{"img_name": f"case{i}.png", "mask_name": f"case{i}.png",
                "prompts": {"p0": "lesion", "p1": "a lesion"}} for i in (0, 1, 2)]  # fmt: skip
    (folder / "anns").mkdir()
    (folder / "anns" / "test.json").write_text(json.dumps(entries))
    medvlsm_set = ImageMaskPromptDataset.from_medvlsm(folder, "test", **norm)
    expected = evaluate(model, DataLoader(medvlsm_set, batch_size=4, collate_fn=collate_prompts))
    assert cli.main(["evaluate", str(out / "model"), "--data", str(folder), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 3 and report["dice"] == pytest.approx(expected["dice"], abs=1e-6)
    assert cli.main(["evaluate", str(out / "model"), "--data", str(folder), "--split", "val"]) == 2
    assert "val.json" in capsys.readouterr().err


def test_bad_dataset_paths(tmp_path, capsys):
    assert cli.main(["train", "clipseg-tiny", "--data", str(tmp_path / "nope")]) == 2
    assert "--data: no such file or folder" in capsys.readouterr().err
    assert cli.main(["train", "clipseg-tiny", "--data", str(tmp_path)]) == 2
    assert "a folder with images/ and masks/" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate
def test_evaluate_matches_library_evaluate(trained):
    proc = run_cli("evaluate", trained / "model", "--val-size", 8, "--json", "m.json", cwd=trained)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "m.json").read_text())
    model = VLSM.from_pretrained(trained / "model")
    expected = evaluate(model, _val_loader(model))
    assert report["count"] == expected["count"] == 8
    for key in ("dice", "iou", "loss"):
        assert report[key] == pytest.approx(expected[key], abs=1e-5)
        assert f"{report[key]:.4f}" in proc.stdout  # the table
    assert proc.stdout.splitlines()[1].split() == ["metric", "value"]


def test_evaluate_bf16_autocast_and_json_stdout(trained, capsys):
    args = ["evaluate", str(trained / "model"), "--val-size", "2", "--json", "-"]
    assert cli.main(args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--autocast", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["count"] == fp32["count"] == 2
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=2e-2)
    assert bf16["dice"] == pytest.approx(fp32["dice"], abs=5e-2)


# --------------------------------------------------------------------------- predict
def test_predict_from_a_hub_cache_writes_masks_and_overlays(trained, tmp_path):
    cache = tmp_path / "hub"
    populate_hub_cache(trained / "model", cache, "acme/tiny-lesions")
    images = _write_images(tmp_path)
    prompts = ["lesion", "one small round lesion at the top left of the image"]
    proc = run_cli(
        "predict", "acme/tiny-lesions", *images, "--prompt", prompts[0], "--prompt", prompts[1],
        "--out", "pred", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "pred"
    records = json.loads((out / "predictions.json").read_text())
    assert [(Path(r["image"]).name, r["prompt"]) for r in records] == [
        (p.name, q) for p in images for q in prompts
    ]
    model = VLSM.from_pretrained(trained / "model")
    for path, record in zip([p for p in images for _ in prompts], records):
        k = prompts.index(record["prompt"])
        rgb = np.asarray(Image.open(path).convert("RGB"))
        probs = model.predict(Image.fromarray(rgb), prompts)[k].numpy()
        mask = np.asarray(Image.open(out / record["mask"]))
        assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) <= {0, 255}
        # Thread counts differ between processes: allow pixels within float noise of 0.5 to flip.
        decided = np.abs(probs - 0.5) > 1e-4
        np.testing.assert_array_equal((mask == 255)[decided], (probs > 0.5)[decided])
        assert record["mean_probability"] == pytest.approx(float(probs.mean()), abs=1e-5)
        overlay = np.asarray(Image.open(out / record["overlay"]))
        np.testing.assert_array_equal(overlay, viz.overlay_mask(rgb, mask == 255))
        np.testing.assert_array_equal(overlay[mask == 0], rgb[mask == 0])
        assert "uncertainty" not in record


def _fake_probabilistic(calls: list):
    """A clipseg-tiny whose predict_with_uncertainty returns analytic maps (mean = predict)."""
    torch.manual_seed(0)
    model = create_model("clipseg-tiny", image_size=SIZE)

    def predict_with_uncertainty(image, prompts, samples=30, *, seed=None):
        calls.append({"samples": samples, "seed": seed, "prompts": list(prompts)})
        mean = model.predict(image, prompts)
        entropy = -(torch.special.xlogy(mean, mean) + torch.special.xlogy(1 - mean, 1 - mean))
        return {"mean": mean, "entropy": entropy}

    model.predict_with_uncertainty = predict_with_uncertainty
    return model


def test_predict_uncertainty_maps(tmp_path, monkeypatch, capsys):
    calls: list = []
    model = _fake_probabilistic(calls)
    monkeypatch.setattr(cli, "_load_model", lambda opts, **kw: (model, "test model"))
    images = _write_images(tmp_path)
    argv = ["predict", "fake", str(images[0]), "--prompt", "lesion", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--samples", "3", "--seed", "5", "--cmap", "inferno"]) == 0
    assert calls == [{"samples": 3, "seed": 5, "prompts": ["lesion"]}]
    (record,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    mean = model.predict(Image.fromarray(rgb), "lesion")[0].double()
    entropy = -(mean * mean.log() + (1 - mean) * (1 - mean).log())
    heat = np.asarray(Image.open(tmp_path / "o" / record["uncertainty"]))
    expected = viz.apply_colormap(entropy.numpy(), cmap="inferno", vmin=0.0, vmax=math.log(2))
    assert np.abs(heat.astype(int) - expected).max() <= 1
    assert record["mean_entropy"] == pytest.approx(float(entropy.mean()), abs=1e-5)
    mask = np.asarray(Image.open(tmp_path / "o" / record["mask"])) == 255
    np.testing.assert_array_equal(mask, mean.numpy() > 0.5)

    # --no-uncertainty falls back to predict; --samples is then refused.
    assert cli.main([*argv, "--no-uncertainty"]) == 0
    assert "uncertainty" not in json.loads((tmp_path / "o" / "predictions.json").read_text())[0]
    assert cli.main([*argv, "--no-uncertainty", "--samples", "2"]) == 2
    assert "--no-uncertainty was given" in capsys.readouterr().err


def test_predict_bad_inputs(tmp_path, monkeypatch, capsys):
    model = create_model("clipseg-tiny", image_size=SIZE)
    monkeypatch.setattr(cli, "_load_model", lambda opts, **kw: (model, "test model"))
    (tmp_path / "notes.png").write_text("not a picture")
    image = _write_images(tmp_path)[0]
    cases = [
        ([str(tmp_path / "missing.png")], "IMAGE: no such file"),
        ([str(tmp_path / "notes.png")], "is not an image file"),
        ([str(image), "--samples", "4"], "it is not probabilistic"),
        ([str(image), "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    ]
    for args, message in cases:
        assert cli.main(["predict", "m", *args, "--prompt", "x", "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_predict_with_a_registered_probabilistic_model(tmp_path, capsys):
    if "medclipseg-tiny" not in list_models():
        pytest.skip("no probabilistic model registered")
    image = _write_images(tmp_path)[0]
    argv = ["predict", "medclipseg-tiny", str(image), "--prompt", "lesion", "--samples", "2",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(argv) == 0
    assert "random weights" in capsys.readouterr().err
    (record,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    heat = np.asarray(Image.open(tmp_path / "o" / record["uncertainty"]))
    assert heat.shape == (72, 96, 3)
    assert 0.0 <= record["mean_entropy"] <= math.log(2) + 1e-6
    assert cli.main([*argv, "--out", str(tmp_path / "p")]) == 0  # seeded: same maps again
    again = np.asarray(Image.open(tmp_path / "p" / record["uncertainty"]))
    np.testing.assert_array_equal(heat, again)


def test_predict_text_free_cotexnet_needs_no_prompt(tmp_path, capsys):
    """CoTexNet segments from the image alone: no --prompt, masks equal ``predict(images)``."""
    torch.manual_seed(0)
    create_model("cotexnet-tiny", image_size=SIZE).save_pretrained(tmp_path / "cotex")
    model = VLSM.from_pretrained(tmp_path / "cotex")
    images = _write_images(tmp_path)
    out = tmp_path / "o"
    assert cli.main(["predict", str(tmp_path / "cotex"), *map(str, images), "--out", str(out)]) == 0
    assert "class 1 (text-free)" in capsys.readouterr().out
    records = json.loads((out / "predictions.json").read_text())
    assert [(Path(r["image"]).name, r["prompt"], r["class"]) for r in records] == [
        (p.name, None, 1) for p in images
    ]
    for path, record in zip(images, records):
        probs = model.predict(Image.open(path).convert("RGB"))[0].numpy()
        mask = np.asarray(Image.open(out / record["mask"])) == 255
        decided = np.abs(probs - 0.5) > 1e-4
        np.testing.assert_array_equal(mask[decided], (probs > 0.5)[decided])
        assert record["mean_probability"] == pytest.approx(float(probs.mean()), abs=1e-5)

    # a prompt would be silently ignored: refused
    argv = ["predict", str(tmp_path / "cotex"), str(images[0]), "--out", str(out)]
    assert cli.main([*argv, "--prompt", "lesion"]) == 2
    assert "segments from the image alone" in capsys.readouterr().err


def test_predict_text_free_multi_class_writes_one_mask_per_class(tmp_path):
    torch.manual_seed(0)
    create_model("cotexnet-tiny", image_size=SIZE, num_classes=2).save_pretrained(tmp_path / "m")
    model = VLSM.from_pretrained(tmp_path / "m")
    image = _write_images(tmp_path)[0]
    assert cli.main(["predict", str(tmp_path / "m"), str(image), "--out", str(tmp_path / "o")]) == 0
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert [(r["class"], r["mask"]) for r in records] == [
        (1, "case0_c1_mask.png"), (2, "case0_c2_mask.png")
    ]  # fmt: skip
    probs = model.predict(Image.open(image).convert("RGB"))  # (K + 1, H, W) softmax
    top2 = probs.topk(2, dim=0).values
    decided = ((top2[0] - top2[1]) > 1e-4).numpy()  # argmax not within float noise of a tie
    for k, record in zip((1, 2), records):
        mask = np.asarray(Image.open(tmp_path / "o" / record["mask"])) == 255
        np.testing.assert_array_equal(mask[decided], (probs.argmax(0) == k).numpy()[decided])


def test_predict_refuses_a_missing_prompt_and_a_dual_encoder(tmp_path, capsys):
    image = str(_write_images(tmp_path)[0])
    assert cli.main(["predict", "clipseg-tiny", image, "--out", str(tmp_path / "o")]) == 2
    assert "--prompt is required: clipseg-tiny is text-prompted" in capsys.readouterr().err
    argv = ["predict", "dual-encoder-tiny", image, "--prompt", "x", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "predicts no masks" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cris_evaluates_and_predicts_at_its_own_threshold(tmp_path, capsys):
    """CRIS thresholds at 0.35 (CRIS.pytorch): the CLI's default is the model's task, not 0.5."""
    torch.manual_seed(0)
    create_model("cris-tiny", image_size=SIZE).save_pretrained(tmp_path / "cris")
    model = VLSM.from_pretrained(tmp_path / "cris")
    assert cli.main(["evaluate", str(tmp_path / "cris"), "--val-size", "4", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    loader = _val_loader(model, length=4)
    assert report["threshold"] == 0.35
    assert report["iou"] == pytest.approx(evaluate(model, loader, threshold=0.35)["iou"], abs=1e-6)
    argv = ["evaluate", str(tmp_path / "cris"), "--val-size", "4", "--json", "-"]
    assert cli.main([*argv, "--threshold", "0.6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == 0.6
    assert report["iou"] == pytest.approx(evaluate(model, loader, threshold=0.6)["iou"], abs=1e-6)

    image = _write_images(tmp_path)[0]
    out = tmp_path / "o"
    argv = ["predict", str(tmp_path / "cris"), str(image), "--prompt", "lesion", "--out", str(out)]
    assert cli.main(argv) == 0
    (record,) = json.loads((out / "predictions.json").read_text())
    probs = model.predict(Image.open(image).convert("RGB"), "lesion")[0].numpy()
    mask = np.asarray(Image.open(out / record["mask"])) == 255
    decided = np.abs(probs - 0.35) > 1e-4
    np.testing.assert_array_equal(mask[decided], (probs > 0.35)[decided])


def test_evaluate_points_into_a_training_output_folder(trained, capsys):
    assert cli.main(["evaluate", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "is a 'vlsegkit train' output folder" in err
    assert f"{trained / 'model'} (the best epoch)" in err and f"{trained / 'last'}" in err


def test_threshold_is_refused_for_a_model_without_masks(tmp_path, capsys):
    argv = ["evaluate", "dual-encoder-tiny", "--val-size", "2", "--threshold", "0.4"]
    assert cli.main(argv) == 2
    assert "--threshold: dual-encoder-tiny: ContrastiveTask" in capsys.readouterr().err


@pytest.mark.parametrize("name", list_models("*tiny"))
def test_every_tiny_model_trains_evaluates_and_predicts_through_the_cli(name, tmp_path, capsys):
    """Every model family runs the three commands; each reports its own task's scores."""
    from vlsegkit.models.capabilities import SupportsRetrieval

    out = tmp_path / "run"
    argv = ["train", name, "--epochs", "1", "--train-size", "4", "--val-size", "2",
            "--batch-size", "2", "--image-size", str(SIZE), "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    model = VLSM.from_pretrained(out / "model")
    assert cli.main(["evaluate", str(out / "model"), "--val-size", "2", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    task = model.default_task()
    assert report["count"] >= 2
    assert {"loss", *[m for m in task.metrics if "top5" not in m]} <= set(report)
    assert all(math.isfinite(report[m]) for m in ("loss", *task.metrics) if m in report)
    assert report["threshold"] == getattr(task, "threshold", None)

    image = str(_write_images(tmp_path)[0])
    argv = ["predict", str(out / "model"), image, "--out", str(tmp_path / "pred")]
    if isinstance(model, SupportsRetrieval):
        assert cli.main([*argv, "--prompt", "lesion"]) == 2
        return
    prompt = [] if isinstance(model, SupportsTextFree) else ["--prompt", "lesion"]
    assert cli.main([*argv, *prompt, "--samples", "2"] if isinstance(model, SupportsUncertainty)
                    else [*argv, *prompt]) == 0  # fmt: skip
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(records) == 1 and (tmp_path / "pred" / records[0]["mask"]).is_file()
    assert 0.0 <= records[0]["mean_probability"] <= 1.0


# --------------------------------------------------------------------------- models / demo
def test_models_lists_the_registry(tmp_path):
    proc = run_cli("models", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [m["name"] for m in listed] == list_models()
    for m in listed:
        entry = model_entry(m["name"])
        assert (m["hub_id"], m["description"]) == (entry.hub_id, entry.description)


def test_models_table_and_filters(capsys):
    assert cli.main(["models", "clipseg*", "--pretrained"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "pretrained"]
    assert [line.split()[0] for line in lines[1:]] == list_models("clipseg*", pretrained=True)
    assert all(model_entry(line.split()[0]).hub_id == line.split()[1] for line in lines[1:])
    assert cli.main(["models", "no-such-*"]) == 1


def test_unknown_model_is_refused_with_suggestions(capsys):
    assert cli.main(["train", "clipseg-tny"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'clipseg-tny'" in err and "did you mean clipseg-tiny" in err
    # the command line speaks of its own commands, not of Python functions
    assert "'vlsegkit models'" in err and "list_models" not in err


def test_demo_through_the_entry_point(tmp_path):
    proc = run_cli(
        "demo", "--epochs", 1, "--image-size", SIZE, "--train-size", 16, "--val-size", 8,
        "--batch-size", 8, "--out", "d", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "before training: Dice" in proc.stdout
    with Image.open(tmp_path / "d" / "overlay_sheet.png") as sheet:
        assert sheet.width >= 3 * 256  # image | ground truth | prediction, readable tiles
    assert (tmp_path / "d" / "training_curves.png").is_file()
    assert "overlay_sheet.png" in proc.stdout and "training_curves.png" in proc.stdout
    assert VLSM.from_pretrained(tmp_path / "d" / "model").image_size == (SIZE, SIZE)


def test_demo_rejects_bad_sizes(capsys, tmp_path):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert cli.main(["demo", "--image-size", "30"]) == 2
    assert "--image-size must be a multiple of 8" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_the_cli_reference_page_lists_every_option():
    page = Path(__file__).resolve().parents[1] / "docs" / "api" / "cli.md"
    if not page.is_file():
        pytest.skip("documentation sources are not next to the tests")
    text = page.read_text(encoding="utf-8")
    commands = next(a for a in cli.build_parser()._actions if a.dest == "_command").choices
    for name, sub in commands.items():
        assert f"vlsegkit {name}" in text
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    base = flag[2:].removeprefix("no-")
                    assert f"--{base}" in text or f"--[no-]{base}" in text, (name, flag)


def test_every_option_has_a_description():
    """``--help`` explains every argument in words, not just its default."""
    commands = next(a for a in cli.build_parser()._actions if a.dest == "_command")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or "--help" in action.option_strings:
                continue
            words = re.sub(r"\(default[^)]*\)", "", action.help or "")
            assert len(re.findall(r"[a-zA-Z]{2,}", words)) >= 2, (name, action.dest, action.help)
    assert all(c.help for c in commands._choices_actions)


def test_train_val_fraction_and_the_fallback_notice(tmp_path):
    proc = run_cli(
        "train", "clipseg-tiny", "--data", "synthetic", "--val-size", 0, "--train-size", 10,
        "--image-size", SIZE, "--epochs", 1, "--batch-size", 5, "--out", "a", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "best epoch is chosen by the training loss" in proc.stdout
    proc = run_cli(
        "train", "clipseg-tiny", "--data", "synthetic", "--val-size", 0, "--train-size", 10,
        "--val-fraction", 0.3, "--image-size", SIZE, "--epochs", 1, "--batch-size", 5,
        "--out", "b", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "7 training / 3 validation images" in proc.stdout
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert history["monitor"] == "val_dice" and history["val"][0]["count"] == 3
    bad = run_cli("train", "clipseg-tiny", "--val-fraction", 1.5, cwd=tmp_path)
    assert bad.returncode == 2 and "--val-fraction must be in [0, 1)" in bad.stderr
