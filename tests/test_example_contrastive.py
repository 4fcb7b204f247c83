"""examples/contrastive_finetune.py runs as documented (tiny settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import vlsegkit
from vlsegkit.models import DualEncoder

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "contrastive_finetune.py"


def _load():
    spec = importlib.util.spec_from_file_location("contrastive_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contrastive_finetune_example(tmp_path):
    example = _load()
    assert example.__doc__.strip()
    small = ["--epochs", "1", "--train-size", "16", "--val-size", "8", "--batch-size", "8"]
    result = example.main([*small, "--out", str(tmp_path / "m")])
    assert result["before"].keys() == {"i2t_top1", "i2t_top2", "t2i_top1", "t2i_top2"}
    assert all(0.0 <= v <= 1.0 for v in (*result["before"].values(), *result["after"].values()))
    assert result["history"].steps == 2
    assert type(vlsegkit.VLSM.from_pretrained(tmp_path / "m")) is DualEncoder
