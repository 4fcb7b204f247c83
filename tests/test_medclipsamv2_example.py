"""examples/medclipsamv2_zeroshot.py runs end to end with tiny settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "medclipsamv2_zeroshot.py"


def test_medclipsamv2_example_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("medclipsamv2_zeroshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__doc__.strip()
    figure = tmp_path / "figure.png"
    result = module.main(
        ["--out", str(tmp_path / "out"), "--train-size", "4", "--test-size", "2",
         "--image-size", "32", "--steps", "2", "--samples", "2", "--epochs", "2",
         "--cycles", "1", "--keep", "1", "--rows", "2", "--finetune-epochs", "1",
         "--figure", str(figure)]
    )  # fmt: skip
    assert len(result["zero_shot_dice"]) == 4 and len(result["weak_dice"]) == 2
    assert all(0.0 <= d <= 1.0 for d in result["zero_shot_dice"] + result["weak_dice"])
    assert len(result["checkpoints"]) == 1
    raw = Path(result["nnunet_raw"])
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and len(list((raw / "labelsTr").iterdir())) == 4
    for path in (tmp_path / "out" / "pipeline.png", figure):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 4 * 32
    out = capsys.readouterr().out
    assert "zero-shot on 4 images" in out and "ensemble of 1" in out
    assert "DHN-NCE fine-tuning: 1 epochs" in out
    assert (tmp_path / "out" / "models" / "clip-dhn-nce" / "config.json").is_file()
