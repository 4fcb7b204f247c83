"""The scripts in examples/ run as documented (with small settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_towers_example(capsys):
    _load("step_towers").main()
    out = capsys.readouterr().out
    assert "pooled by hand == tower(pixels).pooled" in out
    assert "content tokens (2, 96, 64), grid (8, 12)" in out


def test_finetune_clipseg_example(tmp_path):
    result = _load("finetune_clipseg").main(
        ["--epochs", "1", "--train-size", "16", "--image-size", "64", "--out", str(tmp_path / "m")]
    )
    assert 0.0 <= result["after"]["dice"] <= 1.0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_compose_example(capsys):
    results = _load("compose").main(["--steps", "2"])
    assert set(results) == {"maple+medclipseg", "dense-adapters+clipseg", "pvl+clipseg"}
    assert all(0.0 <= r["after"] <= 1.0 for r in results.values())
    assert "softcon_loss" in capsys.readouterr().out  # MedCLIPSeg trained with its paper task


def test_cotexnet_example(tmp_path, capsys):
    result = _load("cotexnet_text_free").main(
        ["--epochs", "1", "--train-size", "8", "--val-size", "4", "--out", str(tmp_path)]
    )
    assert result["history"].epochs == 1 and result["picture"].is_file()
    assert set(result["history"].train_terms[0]) == {"loss", "dice_loss", "ce_loss", "kl_loss"}
    assert 0.0 <= result["after"]["dice"] <= 1.0
    out = capsys.readouterr().out
    assert "lesion area, located in the" in out and "text-free dice" in out


def test_finetune_cris_example(tmp_path):
    result = _load("finetune_cris").main(
        ["--epochs", "1", "--train-size", "8", "--out", str(tmp_path / "m")]
    )
    assert 0.0 <= result["after"]["dice"] <= 1.0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_prompt_tune_cris_example(tmp_path, capsys):
    result = _load("finetune_cris").main(
        ["--epochs", "1", "--train-size", "8", "--learner", "coop", "--first-context-twice",
         "--out", str(tmp_path / "t")]
    )  # fmt: skip
    assert result["history"].steps == 1
    assert "TunedModel" in capsys.readouterr().out
    assert (tmp_path / "t" / "base" / "model.safetensors").is_file()
    import vlsegkit

    tuned = vlsegkit.VLSM.from_pretrained(tmp_path / "t")
    assert tuned.learner.first_context_twice


def test_biomedclipseg_example(tmp_path, capsys):
    result = _load("biomedclipseg").main(
        ["--epochs", "1", "--train-size", "8", "--out", str(tmp_path / "b")]
    )
    assert 0.0 <= result["after"]["dice"] <= 1.0
    assert "clipseg decoder on blocks (2, 3, 4)" in capsys.readouterr().out
    assert (tmp_path / "b" / "config.json").is_file()


def test_medclipseg_training_cost_example(capsys):
    results = _load("medclipseg_training_cost").main(["--batch-size", "4", "--steps", "3"])
    defaults, released = results["defaults"], results["released padding + train-mode towers"]
    checkpointed = results["defaults + checkpointing"]
    assert defaults["text_positions"] < released["text_positions"] == 77  # longest vs 77 tokens
    assert checkpointed["saved_kb"] < 0.8 * defaults["saved_kb"] < 0.8 * released["saved_kb"]
    assert abs(checkpointed["loss"] - defaults["loss"]) < 1e-5  # same function
    cache = results["cache"]
    assert cache["misses"] > 0 and cache["hits"] == 2 * cache["misses"]
    assert "text cache over 3 steps" in capsys.readouterr().out


def test_compile_training_example(capsys):
    import torch

    result = _load("compile_training").main(
        ["--backend", "aot_eager", "--steps", "1", "--batch-size", "2", "--val-size", "0"]
    )
    torch._dynamo.reset()
    terms = result["history"].train_terms
    assert result["history"].steps == 1 and 0.0 < terms[0]["loss"] < 10.0
    assert "compiled (aot_eager) training loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name",
    [
        "step_towers",
        "finetune_clipseg",
        "compose",
        "cotexnet_text_free",
        "finetune_cris",
        "biomedclipseg",
        "medclipseg_training_cost",
        "compile_training",
    ],
)
def test_examples_have_docstrings(name):
    assert _load(name).__doc__.strip()
