"""The demo entry point runs end to end on a small budget and writes what it promises."""

from PIL import Image

from vlsegkit.demo import main, run_demo
from vlsegkit.models import VLSM


def test_demo_writes_its_pictures_and_model(tmp_path, capsys):
    result = run_demo(
        tmp_path, epochs=2, image_size=64, train_size=32, val_size=8, batch_size=8,
        uncertainty=True, uncertainty_steps=2,
    )  # fmt: skip
    assert set(result["before"]) >= {"dice", "iou"}
    assert 0.0 <= result["after"]["dice"] <= 1.0
    pictures = result["pictures"]
    assert set(pictures) == {"overlay_sheet", "training_curves", "uncertainty_sheet"}
    with Image.open(pictures["overlay_sheet"]) as sheet:
        # three columns of tiles of at least 256 px, six rows (best ... worst)
        assert sheet.width >= 3 * 256 and sheet.height >= 6 * 256
    with Image.open(pictures["training_curves"]) as curves:
        assert curves.width > 400 and curves.height > 200
    with Image.open(pictures["uncertainty_sheet"]) as unc:
        assert unc.width >= 4 * 256
    out = capsys.readouterr().out
    for path in pictures.values():  # the demo says where each picture is
        assert str(path.resolve()) in out
    assert "epoch  2/2" in out and "val Dice" in out
    reloaded = VLSM.from_pretrained(tmp_path / "model")
    assert reloaded.image_size == (64, 64)


def test_demo_cli_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--epochs", "many"])
    assert exc.value.code != 0
    assert "invalid int value" in capsys.readouterr().err
