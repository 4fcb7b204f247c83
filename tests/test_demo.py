"""The demo entry point runs end to end on a small budget and writes what it promises."""

from PIL import Image

from vlsegkit.demo import main, run_demo
from vlsegkit.models import VLSM


def test_demo_writes_overlays_and_model(tmp_path):
    result = run_demo(tmp_path, epochs=2, image_size=64, train_size=32, val_size=8, batch_size=8)
    assert set(result["before"]) >= {"dice", "iou"}
    assert 0.0 <= result["after"]["dice"] <= 1.0
    assert len(result["overlays"]) == 6
    panel = Image.open(result["overlays"][0])
    assert panel.width == 3 * 64 and panel.height > 64  # image | ground truth | prediction
    reloaded = VLSM.from_pretrained(tmp_path / "model")
    assert reloaded.image_size == (64, 64)


def test_demo_cli_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--epochs", "many"])
    assert exc.value.code != 0
    assert "invalid int value" in capsys.readouterr().err
