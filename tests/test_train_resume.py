"""Checkpoints of ``fit``: best/last contents, crash-safe writes, corrupt files, exact resumption.

The kill test runs this file as a script (``python test_train_resume.py child ...``): the child
trains with periodic checkpoints and blocks after a known step; the parent SIGKILLs it, resumes in
process and compares with an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_train import Output, TinySeg, params_of
from vlsegkit import _checkpoint
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.hub import CheckpointError, load_checkpoint_file
from vlsegkit.losses import DiceBCELoss
from vlsegkit.train import (
    _MISSING,
    EarlyStopping,
    ResumeMismatchError,
    find_checkpoint,
    fit,
    read_checkpoint,
    seed_everything,
)

# one intra-op thread (tests/conftest.py): these tiny loops only lose to thread overhead
pytestmark = pytest.mark.usefixtures("single_thread")


class DropoutSeg(TinySeg):
    """TinySeg with dropout, so the torch RNG state shapes the trajectory."""

    def forward(self, images, prompts):
        logits = super().forward(images, prompts).logits
        return Output(logits=F.dropout(logits, p=0.2, training=self.training))


class Augmented(Dataset):
    """SyntheticLesions with random flips (Python RNG) and brightness jitter (numpy RNG)."""

    def __init__(self, **kwargs) -> None:
        self.inner = SyntheticLesions(**kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        image, mask = item["image"], item["mask"]
        if random.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        image = image * float(1 + 0.2 * (np.random.rand() - 0.5))
        return {**item, "image": image, "mask": mask}


def amplified_loss(logits, masks):
    """A loss large enough to overflow fp16 gradients at the initial loss scale of 2**16, so the
    gradient scaler backs off: its state then matters for an exact resume."""
    return 100 * DiceBCELoss()(logits, masks)


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def log_fn(record):
        if "loss" in record and record["step"] == step:
            raise Interrupt(step)

    return log_fn


CONFIGS = {
    # Dataset input, shuffling, dropout and augmentation RNG, cosine warmup, accumulation,
    # clipping, validation and early stopping; the run is cut mid-epoch.
    "dataset-cosine": dict(
        model=DropoutSeg,
        data=lambda: Augmented(length=16, image_size=16, seed=0),
        kwargs=dict(
            batch_size=2,
            grad_accum_steps=2,
            epochs=3,
            lr=1e-2,
            scheduler="cosine",
            warmup_steps=2,
            max_grad_norm=0.5,
            early_stopping=EarlyStopping(metric="dice", patience=10),
            checkpoint_every=3,
            seed=11,
        ),
        stop=7,  # last checkpoint at step 6: epoch 1, 4 of 8 batches done
        resumed_from=6,
        steps=12,
        uses_global_rng=True,
    ),
    # A shuffling DataLoader, plateau schedule, fp16 autocast with its gradient scaler, global seed.
    "loader-plateau-fp16": dict(
        model=TinySeg,
        data=lambda: DataLoader(
            SyntheticLesions(length=12, image_size=16, seed=1),
            batch_size=4,
            shuffle=True,
            collate_fn=collate_prompts,
        ),
        kwargs=dict(
            epochs=3,
            lr=1e-2,
            scheduler="plateau",
            autocast_dtype=torch.float16,
            loss=amplified_loss,
            checkpoint_every=2,
        ),
        stop=5,  # last checkpoint at step 4: epoch 1, 1 of 3 batches done
        resumed_from=4,
        steps=9,
        uses_global_rng=False,
    ),
}


def run_config(cfg, tmp: Path, *, log_fn=None, resume=False, checkpoints=True, scramble=False):
    kwargs = copy.deepcopy(cfg["kwargs"])
    if not checkpoints:
        del kwargs["checkpoint_every"]
    seed_everything(99)  # the model init; fit(seed=...) or the checkpoint sets the rest
    model = cfg["model"]()
    if scramble:  # a resumed run must restore every global stream from the checkpoint
        seed_everything(12345)
    history = fit(
        model,
        cfg["data"](),
        val_loader=SyntheticLesions(length=4, image_size=16, seed=50),
        checkpoint_dir=tmp / "ckpt" if checkpoints else None,
        log_dir=tmp / "logs",
        log_fn=log_fn,
        resume=resume,
        progress=False,
        **kwargs,
    )
    return model, history


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interrupted_and_resumed_run_equals_uninterrupted(name, tmp_path):
    cfg = CONFIGS[name]
    ref_model, ref_history = run_config(cfg, tmp_path / "ref", checkpoints=False)

    with pytest.raises(Interrupt):
        run_config(cfg, tmp_path / "cut", log_fn=stop_at(cfg["stop"]))
    _, state = read_checkpoint(find_checkpoint(tmp_path / "cut" / "ckpt"))
    assert state["progress"]["steps"] == cfg["resumed_from"] and state["progress"]["batch"] > 0
    if cfg["kwargs"].get("autocast_dtype") is torch.float16:
        assert state["scaler"]["scale"] < 2**16  # the scaler backed off after overflows
    shutil.copytree(tmp_path / "cut" / "ckpt", tmp_path / "no-rng" / "ckpt")
    model, history = run_config(cfg, tmp_path / "cut", resume=True, scramble=True)

    assert torch.equal(params_of(model), params_of(ref_model))
    assert history == ref_history and history.steps == cfg["steps"]
    logs = [(tmp_path / d / "logs" / "metrics.jsonl").read_text() for d in ("ref", "cut")]
    assert logs[0] == logs[1]
    # Controls: another seed ends elsewhere, and so does resuming without the saved RNG streams.
    other = copy.deepcopy(cfg)
    other["kwargs"]["seed"] = 12
    other_model, _ = run_config(other, tmp_path / "other", checkpoints=False)
    assert not torch.equal(params_of(other_model), params_of(ref_model))
    if cfg["uses_global_rng"]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_checkpoint, "restore_rng", lambda state: None)
            no_rng, _ = run_config(cfg, tmp_path / "no-rng", resume=True, scramble=True)
        assert not torch.equal(params_of(no_rng), params_of(ref_model))


# --------------------------------------------------------------------------- SIGKILL
KILL_STEP = 8  # dataset-cosine: last checkpoint at step 6 (epoch 1, batch 4), killed at step 8


def _child(tmp: str) -> None:
    """Train, then block after step KILL_STEP until the parent kills this process."""
    torch.set_num_threads(1)

    def block(record):
        if "loss" in record and record["step"] == KILL_STEP:
            time.sleep(600)

    run_config(CONFIGS["dataset-cosine"], Path(tmp), log_fn=block)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, __file__, "child", str(tmp_path / "cut")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = tmp_path / "cut" / "logs" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and f'"step": {KILL_STEP}, ' in log.read_text()):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the kill step"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    _, state = read_checkpoint(tmp_path / "cut" / "ckpt")
    assert state["progress"] == {"epoch": 1, "batch": 4, "steps": 6}

    cfg = CONFIGS["dataset-cosine"]
    model, history = run_config(cfg, tmp_path / "cut", resume=True, scramble=True)
    ref_model, ref_history = run_config(cfg, tmp_path / "ref", checkpoints=False)
    assert torch.equal(params_of(model), params_of(ref_model))
    assert history == ref_history
    logs = [(tmp_path / d / "logs" / "metrics.jsonl").read_text() for d in ("ref", "cut")]
    assert logs[0] == logs[1]  # the killed run's records after step 6 were dropped


# --------------------------------------------------------------------------- checkpoint files
class InvertedMasks(Dataset):
    """Validation data whose masks are inverted: the better the model trains, the worse it scores."""

    def __init__(self, **kwargs) -> None:
        self.inner = SyntheticLesions(**kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        return {**item, "mask": 1 - item["mask"]}


def test_best_and_last_checkpoints_hold_the_right_weights(tmp_path):
    torch.manual_seed(0)
    model = TinySeg()
    snapshots = {}

    def snapshot(record):
        if "train_loss" in record:
            snapshots[record["epoch"]] = copy.deepcopy(model.state_dict())

    history = fit(
        model,
        SyntheticLesions(length=16, image_size=16, seed=0),
        val_loader=InvertedMasks(length=8, image_size=16, seed=1),
        batch_size=4,
        epochs=4,
        lr=2e-2,
        monitor="loss",
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
        log_fn=snapshot,
        seed=0,
        progress=False,
    )
    val_loss = history.metric("loss")
    assert history.monitor == "val_loss" and history.best_epoch == val_loss.index(min(val_loss))
    assert history.best_epoch < 3 and history.best_value == min(val_loss)
    best, last = find_checkpoint(tmp_path, "best"), find_checkpoint(tmp_path, "last")
    for folder, expected in ((best, snapshots[history.best_epoch]), (last, model.state_dict())):
        weights = load_checkpoint_file(folder / "model.safetensors")
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    _, state = read_checkpoint(best)
    assert state["progress"] == {
        "epoch": history.best_epoch + 1,
        "batch": 0,
        "steps": 4 * (history.best_epoch + 1),
    }
    pointer = json.loads((tmp_path / "best.json").read_text())
    assert pointer["metric"] == "val_loss" and pointer["value"] == history.best_value
    _, state = read_checkpoint(tmp_path)  # a checkpoint_dir means its last checkpoint
    assert state["history"] == history.state_dict()
    # Older folders are removed once a newer one is in place; nothing temporary is left.
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_dir()) == [
        "best",
        "last",
    ]
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["step"] == 16 and manifest["epoch"] == 4
    assert set(manifest["sha256"]) == {"model.safetensors", "trainer_state.pt"}


def small_run(model, tmp, **kwargs):
    return fit(
        model,
        SyntheticLesions(length=8, image_size=8, seed=0),
        batch_size=2,
        epochs=2,
        lr=1e-2,
        seed=1,
        checkpoint_dir=tmp,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    torch.manual_seed(0)
    model = TinySeg(width=4)
    history = small_run(model, tmp)
    return tmp, model, history


def corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    folder = find_checkpoint(dst)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def rehash(name):
        manifest["sha256"][name] = _checkpoint._sha256(folder / name)
        manifest_path.write_text(json.dumps(manifest))

    if how == "truncated-model":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "flipped-byte-in-state":
        data = bytearray((folder / "trainer_state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "trainer_state.pt").write_bytes(bytes(data))
    elif how == "missing-state":
        (folder / "trainer_state.pt").unlink()
    elif how == "bad-pointer":
        (dst / "last.json").write_text("{not json")
    elif how == "dangling-pointer":
        shutil.rmtree(folder)
    elif how == "no-manifest":
        manifest_path.unlink()
        return folder
    elif how == "wrong-format":
        manifest["format"] = "something-else"
        manifest_path.write_text(json.dumps(manifest))
    elif how == "truncated-model-rehashed":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:100])
        rehash("model.safetensors")
    elif how == "unsafe-pickle":
        torch.save({"progress": Interrupt("not a plain type")}, folder / "trainer_state.pt")
        rehash("trainer_state.pt")
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated-model", "sha256 of model.safetensors does not match"),
        ("flipped-byte-in-state", "sha256 of trainer_state.pt does not match"),
        ("missing-state", "incomplete checkpoint.*trainer_state.pt is missing"),
        ("bad-pointer", "not valid JSON"),
        ("dangling-pointer", "which does not exist"),
        ("no-manifest", "no training checkpoint"),
        ("wrong-format", "is not a vlsegkit-training-checkpoint version 1 checkpoint"),
        ("truncated-model-rehashed", "not a readable safetensors file"),
        ("unsafe-pickle", "weights_only=True"),
    ],
)
def test_corrupt_or_partial_checkpoint_is_reported_and_not_loaded(
    finished_checkpoint, tmp_path, how, message
):
    src, _, _ = finished_checkpoint
    path = corrupt_copy(src, tmp_path / "ckpt", how)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    model = TinySeg(width=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=message):
        small_run(model, tmp_path / "new", resume=path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "new").exists()


def test_resume_edge_cases(finished_checkpoint, tmp_path):
    src, trained, history = finished_checkpoint
    # A finished run resumes to itself.
    model = TinySeg(width=4)
    again = small_run(model, src, resume=True)
    assert again == history and torch.equal(params_of(model), params_of(trained))
    # resume=True with nothing to resume starts afresh.
    torch.manual_seed(0)
    fresh = TinySeg(width=4)
    assert small_run(fresh, tmp_path / "empty", resume=True) == history
    assert torch.equal(params_of(fresh), params_of(trained))
    # Weights of another architecture are refused by the strict loader.
    with pytest.raises(CheckpointError, match="shape mismatches"):
        small_run(TinySeg(width=8), tmp_path / "x", resume=src)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        small_run(TinySeg(width=4), tmp_path / "x", resume=tmp_path / "missing")
    # A mid-epoch checkpoint cannot be resumed with another batch layout (here: fewer images).
    with pytest.raises(Interrupt):
        small_run(TinySeg(width=4), tmp_path / "mid", checkpoint_every=1, log_fn=stop_at(2))
    with pytest.raises(
        ValueError, match=r"cannot resume mid-epoch.*'num_batches': 4.*'num_batches': 2"
    ):
        fit(
            TinySeg(width=4),
            SyntheticLesions(length=4, image_size=8, seed=0),
            batch_size=2,
            epochs=2,
            lr=1e-2,
            seed=1,
            checkpoint_dir=tmp_path / "mid",
            resume=True,
            progress=False,
        )


# --------------------------------------------------------------------------- changed options
def options_run(model, tmp, **kwargs):
    options = dict(batch_size=2, epochs=1, lr=1e-2, seed=1, checkpoint_dir=tmp, progress=False)
    return fit(model, SyntheticLesions(length=8, image_size=8, seed=0), **{**options, **kwargs})


@pytest.mark.parametrize(
    ("first", "resumed", "changes"),
    [
        # A cosine schedule's length is fixed by its saved state: epochs 1 -> 3 would continue
        # the 4-step schedule (lr 0 after step 4) instead of a 12-step one.
        ({"scheduler": "cosine"}, {"scheduler": "cosine", "epochs": 3}, {"schedule_steps": (4, 12)}),
        ({"scheduler": "cosine"}, {"scheduler": "cosine", "max_steps": 2}, {"schedule_steps": (4, 2)}),
        ({}, {"lr": 0.05}, {"lr": (0.01, 0.05)}),
        ({}, {"weight_decay": 0.1}, {"weight_decay": (1e-4, 0.1)}),
        ({}, {"warmup_steps": 2}, {"warmup_steps": (0, 2)}),
        ({"scheduler": "cosine"}, {"scheduler": "cosine", "min_lr_ratio": 0.5},
         {"min_lr_ratio": (0.0, 0.5)}),
        ({}, {"scheduler": "plateau"}, {"scheduler": (None, "plateau")}),
        ({}, {"grad_accum_steps": 2}, {"grad_accum_steps": (1, 2)}),
        ({}, {"batch_size": 4}, {"batch_size": (2, 4)}),
        ({}, {"seed": 2}, {"seed": (1, 2)}),
        ({}, {"shuffle": False}, {"shuffle": (True, False)}),
        ({}, {"monitor": "dice", "val_loader": SyntheticLesions(length=2, image_size=8, seed=9)},
         {"monitor": ("train_loss", "val_dice")}),
        # every changed option is listed
        ({"scheduler": "cosine"}, {"lr": 0.05, "epochs": 2}, {
            "lr": (0.01, 0.05), "scheduler": ("cosine", None), "min_lr_ratio": (0.0, "(not set)"),
            "schedule_steps": (4, "(not set)"),
        }),
    ],
    ids=["cosine-epochs", "cosine-max-steps", "lr", "weight-decay", "warmup", "min-lr-ratio",
         "scheduler", "grad-accum", "batch-size", "seed", "shuffle", "monitor", "several"],
)  # fmt: skip
def test_resume_refuses_options_that_the_checkpoint_fixes(tmp_path, first, resumed, changes):
    torch.manual_seed(0)
    options_run(TinySeg(width=4), tmp_path, **first)
    model = TinySeg(width=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ResumeMismatchError) as info:
        options_run(model, tmp_path, resume=True, **resumed)
    err = info.value
    shown = {k: tuple("(not set)" if v is _MISSING else v for v in pair)
             for k, pair in err.changes.items()}  # fmt: skip
    assert shown == changes
    message = str(err)
    assert f"cannot resume from {find_checkpoint(tmp_path)}" in message
    assert f"{len(changes)} option(s) differ" in message
    for name in changes:
        assert f"\n  {name}: " in message
    assert "start a new run" in message
    assert ("To train a 'cosine' run longer" in message) == ("schedule_steps" in changes)
    # Nothing was loaded.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "schedule",
    [{}, {"warmup_steps": 3}, {"scheduler": "plateau"}],
    ids=["constant", "warmup", "plateau"],
)
def test_resume_extends_a_run_whose_schedule_does_not_depend_on_its_length(tmp_path, schedule):
    """More epochs (and another max_steps) on resume: the same weights as one longer run."""
    torch.manual_seed(0)
    start = TinySeg(width=4)
    straight = copy.deepcopy(start)
    options_run(straight, tmp_path / "straight", epochs=3, **schedule)
    options_run(start, tmp_path / "cut", epochs=2, max_steps=4, **schedule)  # stops at 1 epoch
    model = TinySeg(width=4)
    history = options_run(model, tmp_path / "cut", epochs=3, resume=True, **schedule)
    assert history.steps == 12
    assert torch.equal(params_of(model), params_of(straight))


def test_resume_compares_a_given_optimizer_and_scheduler(tmp_path):
    def run(lr, *, momentum=0.9, scheduler=None, **kwargs):
        torch.manual_seed(0)
        model = TinySeg(width=4)
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        sched = None if scheduler is None else scheduler(sgd)
        return options_run(model, tmp_path, optimizer=sgd, scheduler=sched, **kwargs)

    run(0.1)
    run(0.1, resume=True, epochs=2)  # the same optimiser: fine
    with pytest.raises(ResumeMismatchError, match=r"optimizer: .*'lr': 0.1.*'lr': 0.2") as info:
        run(0.2, resume=True, epochs=3)
    assert list(info.value.changes) == ["optimizer"]
    with pytest.raises(ResumeMismatchError, match="momentum"):
        run(0.1, momentum=0.5, resume=True, epochs=3)
    step = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1)  # noqa: E731
    with pytest.raises(ResumeMismatchError, match=r"scheduler: None .*, 'StepLR' now"):
        run(0.1, scheduler=step, resume=True, epochs=3)


def test_resume_from_a_checkpoint_without_options_warns(tmp_path):
    """Checkpoints of older versions carry no options: they still load, with a warning."""
    torch.manual_seed(0)
    start = TinySeg(width=4)
    straight = copy.deepcopy(start)
    options_run(straight, tmp_path / "straight", epochs=2)
    options_run(start, tmp_path / "old", epochs=1)
    folder = find_checkpoint(tmp_path / "old")
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    del state["options"]
    torch.save(state, folder / "trainer_state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["trainer_state.pt"] = _checkpoint._sha256(folder / "trainer_state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model = TinySeg(width=4)
    with pytest.warns(UserWarning, match="did not store its options"):
        options_run(model, tmp_path / "old", epochs=2, resume=True)
    assert torch.equal(params_of(model), params_of(straight))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = TinySeg(width=4)
    start = copy.deepcopy(reference)
    ref_history = small_run(reference, tmp_path / "ref")

    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    model = copy.deepcopy(start)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="disk full"):
            small_run(model, tmp_path / "ckpt", checkpoint_every=1)
    # Steps 1 and 2 were saved; the write at step 3 failed and left nothing behind.
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []
    _, state = read_checkpoint(tmp_path / "ckpt")
    assert state["progress"]["steps"] == 2
    # Leftovers of a write killed mid-way are cleaned up by the next run.
    (tmp_path / "ckpt" / ".tmp-last-killed").mkdir()
    (tmp_path / "ckpt" / ".tmp-last-killed" / "model.safetensors").write_bytes(b"partial")
    model = copy.deepcopy(start)
    history = small_run(model, tmp_path / "ckpt", resume=True)
    assert not (tmp_path / "ckpt" / ".tmp-last-killed").exists()
    assert history == ref_history and torch.equal(params_of(model), params_of(reference))


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2])
