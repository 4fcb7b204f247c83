"""Weak supervision: the cyclic schedule, checkpoint ensembling through ``fit``, nnU-Net export.

The released schedule and checkpoint rule are restated from MedCLIP-SAMv2's patched nnU-Net
(``training/lr_scheduler/polylr.py``'s ``PolyLRScheduler.step`` and the trainer's
``(epoch + 1) % T_c >= T_c - save_last`` rule); the ensemble statistics are recomputed by hand from
each checkpoint's probabilities with the binary entropy written out.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vlsegkit
from vlsegkit.data import SyntheticLesions
from vlsegkit.hub import CheckpointError
from vlsegkit.weak import (
    CheckpointEnsemble,
    CyclicSchedule,
    PseudoLabelTask,
    export_nnunet_raw,
    fit_checkpoint_ensemble,
)


def _released_lr(epoch, *, initial=0.01, max_steps=600, cycles=3, gamma=0.8, exponent=0.9):
    """``PolyLRScheduler.step(epoch)`` of the release (alpha_r hard-coded to 0.01)."""
    tc = max_steps // cycles
    t = epoch % tc
    step_part = min(t, int(gamma * tc))
    if t == 0:
        return initial
    return 0.01 * (1 - step_part / max_steps) ** exponent


def _paper_lr(epoch, *, initial=0.01, epochs=600, cycles=3, gamma=0.8, exponent=0.9):
    tc = epochs // cycles
    t = epoch % tc
    return initial if t == 0 else initial * (1 - min(t, int(gamma * tc)) / tc) ** exponent


def test_schedule_factors_match_both_restatements():
    paper, released = CyclicSchedule(), CyclicSchedule(released=True)
    for epoch in range(600):
        assert 0.01 * paper.lr_factor(epoch) == pytest.approx(_paper_lr(epoch), rel=1e-12)
        assert 0.01 * released.lr_factor(epoch) == pytest.approx(_released_lr(epoch), rel=1e-12)
    # the released denominator is the total epochs: the rate barely decays within a cycle
    assert 0.01 * released.lr_factor(199) == pytest.approx(0.0076, abs=1e-4)
    assert paper.lr_factor(199) == pytest.approx(0.2**0.9)
    assert CyclicSchedule(gamma=0.5, released=True).lr_factor(150) == pytest.approx(
        (1 - 100 / 600) ** 0.9
    )


def test_snapshot_epochs_paper_and_released():
    paper = CyclicSchedule().snapshot_epochs()
    assert paper == tuple(e for c in range(3) for e in range(c * 200 + 190, c * 200 + 200))
    released = CyclicSchedule(released=True).snapshot_epochs()
    rule = tuple(e for e in range(600) if (e + 1) % 200 >= 200 - 10)
    assert released == rule and released[:2] == (189, 190) and released[-1] == 598
    assert len(paper) == len(released) == 30


def test_schedule_refuses_bad_settings():
    with pytest.raises(ValueError, match="multiple of cycles"):
        CyclicSchedule(epochs=10, cycles=3)
    with pytest.raises(ValueError, match="keep"):
        CyclicSchedule(epochs=6, cycles=2, keep=4)
    with pytest.raises(ValueError, match="keep"):
        CyclicSchedule(epochs=6, cycles=2, keep=3, released=True)
    with pytest.raises(ValueError, match="gamma"):
        CyclicSchedule(gamma=1.5)
    with pytest.raises(ValueError, match="epochs"):
        CyclicSchedule(epochs=0)


class _TinyNet(nn.Module):
    """A plain image-only segmenter (stands in for a UNet): logits (B, 1, H, W)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 1, 3, padding=1),
        )

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def lesions():
    return SyntheticLesions(length=16, image_size=32, seed=0)


def test_fit_checkpoint_ensemble_keeps_the_right_weights(lesions, tmp_path):
    torch.manual_seed(0)
    net = _TinyNet()
    schedule = CyclicSchedule(epochs=6, cycles=2, keep=2)
    seen, lrs = {}, {}

    def log_fn(record):  # a user log_fn still sees every record
        if "train_loss" in record:
            seen[int(record["epoch"])] = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            lrs.setdefault(int(record["epoch"]), record["lr"])

    ensemble = fit_checkpoint_ensemble(
        net, lesions, out_dir=tmp_path, schedule=schedule, lr=0.05, batch_size=8,
        progress=False, seed=0, log_fn=log_fn,
    )  # fmt: skip
    assert [p.name for p in ensemble.checkpoints] == [
        "epoch_0002.safetensors", "epoch_0003.safetensors",
        "epoch_0005.safetensors", "epoch_0006.safetensors",
    ]  # fmt: skip
    assert ensemble.history.epochs == 6 and len(ensemble) == 4
    for epoch in range(6):  # fit stepped the schedule once per epoch
        assert lrs[epoch] == pytest.approx(0.05 * schedule.lr_factor(epoch))
    from vlsegkit.hub import load_checkpoint_file

    for path, epoch in zip(ensemble.checkpoints, schedule.snapshot_epochs()):
        state = load_checkpoint_file(path)
        assert set(state) == set(net.state_dict())  # all trainable + BatchNorm buffers
        for k, v in state.items():
            assert torch.equal(v, seen[epoch][k]), (path.name, k)
    manifest = json.loads((tmp_path / "ensemble.json").read_text())
    assert manifest["schedule"]["epochs"] == 6 and len(manifest["checkpoints"]) == 4

    # the ensemble: mean probability over the checkpoints, entropy of the mean (natural log)
    images = torch.stack([lesions[i]["image"] for i in range(3)])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = ensemble.predict(images)
    probs = []
    for epoch in schedule.snapshot_epochs():
        net.load_state_dict(seen[epoch])
        with torch.no_grad():
            probs.append(torch.sigmoid(net.eval()(images)))
    net.load_state_dict(before)
    mean = torch.stack(probs).mean(0)
    entropy = -(mean * mean.log() + (1 - mean) * (1 - mean).log())
    assert out.samples == 4
    for i in range(3):
        assert torch.allclose(out.mean[i], mean[i], atol=1e-6)
        assert torch.allclose(out.entropy[i], entropy[i], atol=1e-5)
        assert (out.epistemic[i] >= 0).all() and out.epistemic[i].max() > 0
    # the model's own weights are back afterwards
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_cyclic_run_resumes_from_fit_checkpoints(lesions, tmp_path):
    """Interrupted after the first cycle and resumed, the run ends with the same weights and
    snapshots as an uninterrupted one (the schedule's state loads with weights_only=True)."""
    schedule = CyclicSchedule(epochs=4, cycles=2, keep=1)
    kwargs = dict(schedule=schedule, batch_size=8, progress=False, seed=0)
    torch.manual_seed(0)
    full = fit_checkpoint_ensemble(_TinyNet(), lesions, out_dir=tmp_path / "full", **kwargs)
    torch.manual_seed(0)
    net = _TinyNet()
    run = dict(out_dir=tmp_path / "cut", checkpoint_dir=tmp_path / "ckpt", **kwargs)
    first = fit_checkpoint_ensemble(net, lesions, max_steps=4, **run)  # 2 batches per epoch
    assert first.history.epochs == 2 and len(first) == 1
    resumed = fit_checkpoint_ensemble(net, lesions, resume=True, **run)
    assert len(resumed) == len(full) == 2
    # ensemble.json lists the snapshots written before the resume too, as the full run's does.
    names = ["epoch_0002.safetensors", "epoch_0004.safetensors"]
    assert [p.name for p in resumed.checkpoints] == [p.name for p in full.checkpoints] == names
    for folder in ("full", "cut"):
        listed = json.loads((tmp_path / folder / "ensemble.json").read_text())["checkpoints"]
        assert listed == names, folder
    from vlsegkit.hub import load_checkpoint_file

    for a, b in zip(full.checkpoints, resumed.checkpoints):
        sa, sb = load_checkpoint_file(a), load_checkpoint_file(b)
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa), a.name


def test_vlsm_trains_on_pseudo_labels_with_prompts(tmp_path):
    torch.manual_seed(0)
    model = vlsegkit.create_model("clipseg-tiny")
    data = SyntheticLesions(length=8, image_size=model.image_size, seed=0,
                            mean=model.image_mean, std=model.image_std)  # fmt: skip
    ensemble = fit_checkpoint_ensemble(
        model, data, out_dir=tmp_path, schedule=CyclicSchedule(epochs=2, cycles=2, keep=1),
        batch_size=8, progress=False,
    )  # fmt: skip
    raw = SyntheticLesions(length=2, image_size=(40, 50), seed=3)
    out = ensemble.predict([raw[i]["image"] for i in range(2)], "a lesion")
    assert out.samples == 2 and out.mean[0].shape == (1, 40, 50)
    with pytest.raises(ValueError, match="needs prompts"):
        ensemble.predict([raw[0]["image"]])


def test_pseudo_label_task_checks_its_inputs(lesions):
    task = PseudoLabelTask()
    net = _TinyNet()
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.ones(2, 1, 32, 32)}
    terms = task.training_step(net, batch)
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        task.training_step(net, {**batch, "mask": batch["mask"] * 255})
    with pytest.raises(ValueError, match="logits of the mask's shape"):
        task.training_step(net, {**batch, "mask": torch.ones(2, 2, 32, 32)})
    with pytest.raises(ValueError, match="prompted"):
        PseudoLabelTask(prompted="yes")
    with pytest.raises(ValueError, match="epochs"):
        fit_checkpoint_ensemble(net, lesions, out_dir="unused", epochs=3)


def test_snapshots_that_do_not_fit_are_refused(tmp_path, lesions):
    from vlsegkit.weak import load_snapshot, save_snapshot

    path = save_snapshot(_TinyNet(), tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_snapshot(other, path)
    with pytest.raises(FileNotFoundError):
        CheckpointEnsemble(other, [tmp_path / "missing.safetensors"])


# ------------------------------------------------------------------------------ nnU-Net export
def test_export_nnunet_raw_layout(tmp_path):
    data = SyntheticLesions(length=3, image_size=(24, 30), seed=2)
    images = [data[i]["image"] for i in range(2)]
    masks = [data[i]["mask"][0] > 0 for i in range(2)]
    folder = export_nnunet_raw(tmp_path, images, masks, dataset_id=42, name="BreastPseudo",
                               label="tumor", test_images=[data[2]["image"]])  # fmt: skip
    assert folder.name == "Dataset042_BreastPseudo"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "tumor": 1}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".png"
    for i in range(2):
        with Image.open(folder / "imagesTr" / f"BreastPseudo_{i:04d}_0000.png") as im:
            rgb = np.asarray(im)
        expected = np.round(images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(rgb, expected)
        with Image.open(folder / "labelsTr" / f"BreastPseudo_{i:04d}.png") as im:
            lab = np.asarray(im)
        assert lab.dtype == np.uint8 and np.array_equal(lab, masks[i].numpy().astype(np.uint8))
    assert (folder / "imagesTs" / "BreastPseudo_0002_0000.png").is_file()
    # grey images keep one channel
    grey = [images[0].mean(0, keepdim=True).expand(3, -1, -1)]
    g = export_nnunet_raw(tmp_path, grey, masks[:1], dataset_id=43, name="Grey")
    assert json.loads((g / "dataset.json").read_text())["channel_names"] == {"0": "grey"}
    with Image.open(g / "imagesTr" / "Grey_0000_0000.png") as im:
        assert im.mode == "L"


def test_export_nnunet_raw_refuses_bad_input(tmp_path):
    image = torch.rand(3, 8, 8)
    mask = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="dataset_id"):
        export_nnunet_raw(tmp_path, [image], [mask], dataset_id=0, name="X")
    with pytest.raises(ValueError, match="name"):
        export_nnunet_raw(tmp_path, [image], [mask], dataset_id=1, name="bad name")
    with pytest.raises(ValueError, match="binary"):
        export_nnunet_raw(tmp_path, [image], [mask + 0.5], dataset_id=1, name="X")
    with pytest.raises(ValueError, match="size"):
        export_nnunet_raw(tmp_path, [image], [torch.zeros(4, 8)], dataset_id=1, name="X")
    with pytest.raises(ValueError, match="one mask per image"):
        export_nnunet_raw(tmp_path, [image, image], [mask], dataset_id=1, name="X")
    grey = image.mean(0, keepdim=True).expand(3, -1, -1)
    with pytest.raises(ValueError, match="all RGB or all grey"):
        export_nnunet_raw(tmp_path, [image, grey], [mask, mask], dataset_id=1, name="X")
    export_nnunet_raw(tmp_path, [image], [mask], dataset_id=1, name="X")
    with pytest.raises(ValueError, match="already exists"):
        export_nnunet_raw(tmp_path, [image], [mask], dataset_id=1, name="X")
