"""docs/make_figures.py regenerates the documentation pictures (here with tiny training budgets)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "make_figures.py"


def test_make_figures_writes_every_picture(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.main(
        ["--out", str(tmp_path), "--epochs", "1", "--steps", "1", "--cotexnet-epochs", "1"]
    )
    names = {p.name for p in paths}
    assert {"training_curves.png", "overlay_sheet.png", "uncertainty_sheet.png"} <= names
    assert {"cotexnet_training_curves.png", "cotexnet_text_vs_textfree.png"} <= names
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 192
    out = capsys.readouterr().out
    assert "overlay_sheet.png" in out and "done in" in out
