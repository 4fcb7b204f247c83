"""Tasks: fit and evaluate as loops over ``Task.training_step`` / ``evaluation_step``.

Covers the paper task of each model (MedCLIPSeg trains with Dice + BCE + SoftCon through ``fit`` and
logs every term), a contrastive task on image-text pairs without masks, a distillation task that
owns a frozen teacher, and the failure modes ``fit`` must refuse instead of training on nonsense.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsegkit import create_model
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.hub import CheckpointError
from vlsegkit.losses import DiceBCELoss, MedCLIPSegLoss
from vlsegkit.tasks import SegmentationTask, Task
from vlsegkit.train import evaluate, fit


def _lesions(model, length=8, batch_size=4, seed=0):
    ds = SyntheticLesions(length=length, image_size=model.image_size, seed=seed,
                          mean=model.image_mean, std=model.image_std)  # fmt: skip
    items = [ds[i] for i in range(length)]
    return [collate_prompts(items[i : i + batch_size]) for i in range(0, length, batch_size)]


# ------------------------------------------------------------------------ the paper's task
def test_fit_trains_medclipseg_with_its_paper_loss_and_logs_every_term(tmp_path):
    torch.manual_seed(0)
    model = create_model("medclipseg-tiny")
    task = model.default_task()
    assert isinstance(task, SegmentationTask) and isinstance(task.loss, MedCLIPSegLoss)
    batches = _lesions(model)
    # the first step's logged terms equal the loss of that batch computed by hand
    torch.manual_seed(5)
    with torch.no_grad():
        expected = MedCLIPSegLoss().terms(model.train()(batches[0]["image"],
                                                        batches[0]["prompt"]), batches[0]["mask"])  # fmt: skip
    records = []
    torch.manual_seed(5)
    history = fit(model, batches, epochs=2, lr=1e-3, log_fn=records.append, log_dir=tmp_path,
                  shuffle=False, progress=False)  # fmt: skip
    step = records[0]
    assert {"loss", "dice_loss", "bce_loss", "softcon_loss", "lr"} <= set(step)
    for name in ("loss", "dice_loss", "bce_loss", "softcon_loss"):
        assert step[name] == pytest.approx(expected[name].item(), abs=1e-5), name
    assert step["loss"] == pytest.approx(
        0.5 * step["dice_loss"] + 0.5 * step["bce_loss"] + 0.1 * step["softcon_loss"], abs=1e-5
    )
    assert history.train_terms[0].keys() == {"loss", "dice_loss", "bce_loss", "softcon_loss"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "train_loss" in r]
    assert len(epochs) == 2 and "train_softcon_loss" in epochs[0]
    scores = evaluate(model, batches, progress=False)
    assert {"dice", "iou", "loss", "softcon_loss", "count"} <= set(scores)
    assert scores["count"] == 8


def test_loss_shortcut_and_task_conflicts():
    model = create_model("clipseg-tiny")
    batches = _lesions(model, length=4)
    history = fit(model, batches, loss=DiceBCELoss(dice_weight=1.0, bce_weight=0.2),
                  max_steps=1, progress=False)  # fmt: skip
    assert history.steps == 1
    with pytest.raises(ValueError, match="task= or loss=, not both"):
        fit(model, batches, task=SegmentationTask(), loss=DiceBCELoss(), progress=False)
    with pytest.raises(TypeError, match=r"task must be a vlsegkit\.tasks\.Task"):
        fit(model, batches, task=DiceBCELoss(), progress=False)
    with pytest.raises(TypeError, match="unexpected options \\['loss_fn'\\]"):
        fit(model, batches, loss_fn=DiceBCELoss(), progress=False)


# ------------------------------------------------------------------------ contrastive
class DualEncoder(nn.Module):
    """Image and text encoders into one space (a stand-in for a pair of CLIP towers)."""

    def __init__(self, vocab: int = 97, dim: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.image = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.GELU(), nn.Flatten(),
                                   nn.LazyLinear(dim))  # fmt: skip
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")

    def forward(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = [[zlib.crc32(w.encode()) % self.vocab for w in p.split()] for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        flat = torch.tensor([i for words in ids for i in words])
        return self.image(images), self.words(flat, offsets)


class ContrastiveTask(Task):
    """Symmetric InfoNCE on image-text pairs; batches carry no masks."""

    monitor = "top1"
    metrics = ("loss", "top1")

    def training_step(self, model, batch):
        img, txt = model(batch["image"], batch["prompt"])
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / 0.1
        target = torch.arange(len(logits))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return {"loss": loss}

    def evaluation_step(self, model, batch):
        img, txt = model(batch["image"], batch["prompt"])
        sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        top1 = (sim.argmax(-1) == torch.arange(len(sim))).float()  # per-item scores
        return {**self.training_step(model, batch), "top1": top1}


def _pairs(n_batches=6, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["polyp", "tumor", "cyst", "ulcer", "nodule", "lesion", "mass", "spot"]
    batches = []
    for _ in range(n_batches):
        cls = torch.randperm(len(words), generator=g)[:batch_size]
        # the class shows as a brightness pattern the image encoder can learn
        images = torch.randn(batch_size, 3, 16, 16, generator=g) * 0.1
        images += cls.float()[:, None, None, None] / 4
        batches.append({"image": images, "prompt": [f"a {words[c]}" for c in cls.tolist()]})
    return batches


def test_contrastive_task_trains_on_pairs_without_masks():
    torch.manual_seed(0)
    model = DualEncoder()
    model(*[_pairs(1)[0][k] for k in ("image", "prompt")])  # materialise the lazy layer
    data = _pairs()
    task = ContrastiveTask()
    before = evaluate(model, data, task=task, progress=False)
    history = fit(model, data, task=task, val_loader=data, epochs=8, lr=1e-2, progress=False)
    after = history.val[-1]
    assert history.monitor == "val_top1"  # the task's monitor picks the best checkpoint
    assert after["top1"] > before["top1"] + 0.3 and after["loss"] < before["loss"]
    assert after["count"] == 48


# ------------------------------------------------------------------------ distillation
class DistillationTask(Task):
    """Match a frozen teacher's logits (MSE); the teacher belongs to the task, not the model."""

    metrics = ("loss",)

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode (no dropout, fixed statistics)
        return self

    def training_step(self, model, batch):
        with torch.no_grad():
            target = self.teacher(batch["image"], batch["prompt"]).logits
        student = model(batch["image"], batch["prompt"]).logits
        return {"loss": F.mse_loss(student, target)}


def test_distillation_task_owns_a_frozen_teacher():
    torch.manual_seed(0)
    teacher = create_model("clipseg-tiny")
    student = create_model("clipseg-tiny")
    data = _lesions(student, length=8)
    task = DistillationTask(teacher)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    start = evaluate(student, data, task=task, progress=False)["loss"]
    fit(student, data, task=task, epochs=4, lr=3e-3, progress=False)
    end = evaluate(student, data, task=task, progress=False)["loss"]
    assert end < 0.5 * start
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------ refusals
def test_masks_out_of_range_are_refused():
    model = create_model("clipseg-tiny")
    batch = _lesions(model, length=4)[0]
    for bad in (batch["mask"] * 255, batch["mask"] * 2 - 1, batch["mask"] * math.nan):
        with pytest.raises(ValueError, match=r"batch\['mask'\] must hold values in \[0, 1\]"):
            fit(model, [{**batch, "mask": bad}], max_steps=1, progress=False)
    with pytest.raises(ValueError, match="missing \\['mask'\\]"):
        fit(model, [{"image": batch["image"], "prompt": batch["prompt"]}], progress=False)


def test_empty_loaders_and_bad_options_are_refused():
    model = create_model("clipseg-tiny")
    data = _lesions(model, length=4)
    with pytest.raises(ValueError, match="train_loader has no batches"):
        fit(model, [], progress=False)
    with pytest.raises(ValueError, match="evaluation loader has no batches"):
        evaluate(model, [], progress=False)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        fit(model, data, max_grad_norm=-1.0, progress=False)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        fit(model, data, lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\)"):
        evaluate(model, data, threshold=2.0, progress=False)
    with pytest.raises(TypeError, match="train_loader must be a DataLoader"):
        fit(model, "data/", progress=False)


def test_fit_restores_the_models_mode():
    model = create_model("clipseg-tiny").eval()
    fit(model, _lesions(model, length=4), max_steps=1, progress=False)
    assert not model.training
    model.train()
    fit(model, _lesions(model, length=4), max_steps=1, progress=False)
    assert model.training


def test_a_failed_resume_changes_nothing(tmp_path):
    model = create_model("clipseg-tiny")
    data = _lesions(model, length=4)
    fit(model, data, epochs=1, checkpoint_dir=tmp_path, progress=False)
    other = create_model("clipseg-tiny", freeze_backbone=False)  # a different trainable set
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        fit(other, data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_task_must_return_a_loss():
    class NoLoss(SegmentationTask):
        def training_step(self, model, batch):
            return {"dice": torch.tensor(1.0)}

    model = create_model("clipseg-tiny")
    with pytest.raises(TypeError, match="must return a dict with a tensor 'loss' entry"):
        fit(model, _lesions(model, length=4), task=NoLoss(), progress=False)


def test_checkpoints_load_as_models_and_fit_draws_curves(tmp_path):
    from PIL import Image

    from vlsegkit import VLSM
    from vlsegkit.train import find_checkpoint

    model = create_model("clipseg-tiny")
    data = _lesions(model, length=4)
    curves = tmp_path / "curves.png"
    fit(model, data, val_loader=data, epochs=2, checkpoint_dir=tmp_path / "ckpt", curves=curves,
        progress=False)  # fmt: skip
    with Image.open(curves) as image:
        assert image.width > 400 and image.height > 200
    for kind in ("best", "last"):
        folder = find_checkpoint(tmp_path / "ckpt", kind)
        loaded = VLSM.from_pretrained(folder)
        assert type(loaded) is type(model)
    last = VLSM.from_pretrained(find_checkpoint(tmp_path / "ckpt", "last"))
    a, b = last.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ evaluation threshold
class _ConvNet(nn.Module):
    """An image-only segmenter: ``model(images)`` -> logits (B, 1, H, W); it takes no prompts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, images):
        return self.conv(images)


def _plain_dice(probs, masks, threshold):
    """Per-image Dice of ``probs > threshold``, written out (an empty pair scores 1)."""
    pred = (probs > threshold).flatten(1).double()
    target = masks.flatten(1).double()
    inter, total = (pred * target).sum(1), pred.sum(1) + target.sum(1)
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp_min(1e-12))


def test_evaluate_threshold_keeps_the_task_class_and_its_settings():
    """``evaluate(threshold=)`` once rebuilt a plain SegmentationTask, so a pseudo-label task for
    an image-only network called ``net(images, prompts)``; the copy keeps class and settings."""
    from vlsegkit.weak import PseudoLabelTask

    net = _ConvNet()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 16, 16, generator=g)
    masks = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    batch = {"image": images, "mask": masks}
    task = PseudoLabelTask(prompted=False, empty_score=0.0)
    scores = evaluate(net, [batch], task=task, threshold=0.3, progress=False)
    with torch.no_grad():
        expected = _plain_dice(torch.sigmoid(net(images)), masks, 0.3).mean()
    assert scores["dice"] == pytest.approx(float(expected), abs=1e-6)
    at_half = evaluate(net, [batch], task=task, progress=False)["dice"]
    assert at_half != pytest.approx(scores["dice"], abs=1e-4)  # the threshold was used

    copy = task.with_threshold(0.3)
    assert type(copy) is PseudoLabelTask and copy.prompted is False and copy.empty_score == 0.0
    assert copy.threshold == 0.3 and task.threshold == 0.5 and copy.loss is task.loss
    loss = task.loss
    copy.loss = nn.BCEWithLogitsLoss()  # the copy's own module registry
    assert task.loss is loss and isinstance(copy.loss, nn.BCEWithLogitsLoss)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan"), True, "0.5", None])
def test_with_threshold_refuses_values_outside_the_open_unit_interval(bad):
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\)"):
        SegmentationTask().with_threshold(bad)


def test_threshold_on_a_task_without_one_is_refused_not_ignored():
    from vlsegkit.contrastive import ContrastiveTask

    model = create_model("dual-encoder-tiny")
    with pytest.raises(ValueError, match="ContrastiveTask scores no binarised predictions"):
        ContrastiveTask().with_threshold(0.5)
    batch = {"image": torch.randn(2, 3, *model.image_size), "prompt": ["a", "b"]}
    with pytest.raises(ValueError, match="threshold does not apply"):
        evaluate(model, [batch], threshold=0.4, progress=False)


def test_cotexnet_evaluation_takes_a_threshold():
    from vlsegkit import CoTexNetTask

    torch.manual_seed(0)
    model = create_model("cotexnet-tiny")
    data = _lesions(model, length=4)
    via_evaluate = evaluate(model, data, threshold=0.3, progress=False)
    direct = evaluate(model, data, task=CoTexNetTask(threshold=0.3), progress=False)
    assert via_evaluate["iou"] == pytest.approx(direct["iou"], abs=1e-9)
    assert via_evaluate["dice"] == pytest.approx(direct["dice"], abs=1e-9)  # soft Dice
