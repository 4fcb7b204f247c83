"""What ``fit`` does at each epoch start: ``set_epoch`` on the training data, and reproducible
random draws in DataLoader worker processes (so that a resumed run equals an uninterrupted one)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TinySeg, params_of
from test_train_resume import Augmented
from vlsegkit.data import ImageMaskPromptDataset, SyntheticLesions, collate_prompts
from vlsegkit.train import find_checkpoint, fit, read_checkpoint

# one intra-op thread (tests/conftest.py): these tiny loops only lose to thread overhead
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def prompt_root(tmp_path_factory):
    """A medvlsm root of 4 images with many prompts per image (``prompt_key="random"`` draws)."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "anns").mkdir()
    entries = []
    for i in range(4):
        rng = np.random.default_rng(i)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, i : i + 3] = 255
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        prompts = {"p0": "", **{f"p{k}": [f"lesion {i} {k} {j}" for j in range(4)] for k in (1, 2)}}
        entries.append({"img_name": f"{i}.png", "mask_name": f"{i}.png", "prompts": prompts})
    (root / "anns" / "train.json").write_text(json.dumps(entries))
    return root


class PromptLog(TinySeg):
    """TinySeg that records the prompts of every training forward (in the main process)."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.seen: list[str] = []

    def forward(self, images, prompts):
        if self.training:
            self.seen.extend(prompts)
        return super().forward(images, prompts)


def seeded(root, **kwargs):
    return ImageMaskPromptDataset.from_medvlsm(
        root, "train", image_size=8, prompt_key="random", seed=7, **kwargs
    )


def expected_prompts(root, order, epochs):
    """Prompts of a seeded dataset whose set_epoch was called at each epoch, in data order."""
    fresh = seeded(root)
    out = []
    for epoch in range(epochs):
        fresh.set_epoch(epoch)
        out += [fresh[i]["prompt"] for i in order]
    return out


ORDER = [2, 0, 3, 1]


def train_data(kind, ds):
    if kind == "dataset":
        return ds, [0, 1, 2, 3]
    if kind == "subset":  # e.g. the CLI's --val-fraction split
        return Subset(ds, ORDER), ORDER
    if kind == "custom-sampler":  # a loader fit uses as given
        return DataLoader(ds, batch_size=2, sampler=ORDER, collate_fn=collate_prompts), ORDER
    if kind == "persistent-workers":  # workers keep their dataset copy between epochs
        loader = DataLoader(
            ds, batch_size=2, num_workers=2, persistent_workers=True, collate_fn=collate_prompts
        )
        return loader, [0, 1, 2, 3]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dataset", "subset", "custom-sampler", "persistent-workers"])
def test_fit_calls_set_epoch_on_the_training_data(prompt_root, kind):
    """A seeded ImageMaskPromptDataset draws new prompts every epoch, as set_epoch promises."""
    model = PromptLog()
    data, order = train_data(kind, seeded(prompt_root))
    fit(model, data, batch_size=2, epochs=3, shuffle=False, lr=1e-2, seed=0, progress=False)
    expected = expected_prompts(prompt_root, order, 3)
    assert model.seen == expected
    per_epoch = [expected[4 * e : 4 * e + 4] for e in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # the draws do change between epochs


class Interrupt(Exception):
    pass


def stop_at(step):
    def log_fn(record):
        if "loss" in record and record["step"] == step:
            raise Interrupt

    return log_fn


def test_set_epoch_when_resuming_mid_epoch(prompt_root, tmp_path):
    torch.manual_seed(0)
    start = PromptLog()
    kwargs = dict(batch_size=2, epochs=3, shuffle=False, lr=1e-2, seed=0, progress=False)
    with pytest.raises(Interrupt):  # 2 steps per epoch: killed after step 4, saved at step 3
        fit(start, seeded(prompt_root), checkpoint_dir=tmp_path, checkpoint_every=1,
            log_fn=stop_at(4), **kwargs)  # fmt: skip
    _, state = read_checkpoint(find_checkpoint(tmp_path))
    assert state["progress"] == {"epoch": 1, "batch": 1, "steps": 3}
    model = PromptLog()
    fit(model, seeded(prompt_root), checkpoint_dir=tmp_path, resume=True, **kwargs)
    # The resumed run starts with epoch 1's second batch (items 2, 3), then all of epoch 2.
    assert model.seen == expected_prompts(prompt_root, [0, 1, 2, 3], 3)[6:]


class GlobalRandom(Augmented):
    """``Augmented`` (a flip from Python's RNG, a jitter from numpy's) plus noise from torch's RNG,
    all drawn from the process's global generators, i.e. the worker's when read by a worker."""

    def __init__(self) -> None:
        super().__init__(length=12, image_size=16, seed=3)

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "image": item["image"] + 0.05 * torch.randn(1)}


def worker_run(tmp, *, log_fn=None, resume=False, num_workers=2):
    torch.manual_seed(5)
    model = TinySeg(width=4)
    fit(model, GlobalRandom(), batch_size=2, epochs=2, num_workers=num_workers, lr=1e-2, seed=0,
        checkpoint_dir=tmp, checkpoint_every=1, log_fn=log_fn, resume=resume,
        progress=False)  # fmt: skip
    return params_of(model)


def test_resume_with_workers_equals_the_uninterrupted_run(tmp_path):
    """With worker processes, the items' random draws do not depend on which worker reads them
    or on what it read before: a run resumed mid-epoch (whose first batch goes to worker 0) ends
    with the uninterrupted run's weights."""
    straight = worker_run(tmp_path / "a")
    assert torch.equal(worker_run(tmp_path / "b"), straight)  # deterministic
    with pytest.raises(Interrupt):  # 6 steps per epoch; saved at step 8 (epoch 1, batch 2)
        worker_run(tmp_path / "c", log_fn=stop_at(9))
    _, state = read_checkpoint(find_checkpoint(tmp_path / "c"))
    assert state["progress"] == {"epoch": 1, "batch": 2, "steps": 8}
    assert torch.equal(worker_run(tmp_path / "c", resume=True), straight)
    # The items do not depend on the number of workers either.
    shutil.rmtree(tmp_path / "a")
    assert torch.equal(worker_run(tmp_path / "a", num_workers=1), straight)


class _Handles(Dataset):
    """A dataset whose workers open a handle in ``worker_init_fn`` (as for HDF5 / LMDB files)."""

    def __init__(self) -> None:
        self.inner = SyntheticLesions(length=8, image_size=16, seed=3)
        self.handle = None

    def open(self) -> None:
        self.handle = "opened"

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        assert self.handle == "opened", "worker_init_fn did not reach the dataset"
        return self.inner[i]


def _open_handle(_worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.open()


class _Batched(_Handles):
    """A dataset that is read whole batches at a time (``__getitems__``) and only so."""

    def __getitem__(self, i):
        raise AssertionError("read one item at a time")

    def __getitems__(self, indices):
        return [self.inner[i] for i in indices]


@pytest.mark.parametrize("kind", ["worker_init_fn", "__getitems__"])
def test_worker_datasets_keep_their_own_protocol(kind, tmp_path):
    """Per-item seeding wraps the dataset in workers; not when the user's worker_init_fn sets the
    dataset up, nor when the dataset reads whole batches (both broke when it was wrapped)."""
    data = _Handles() if kind == "worker_init_fn" else _Batched()
    if kind == "__getitems__":
        data.open()
    loader = DataLoader(
        data, batch_size=4, num_workers=1, collate_fn=collate_prompts,
        worker_init_fn=_open_handle if kind == "worker_init_fn" else None,
    )  # fmt: skip
    torch.manual_seed(0)
    history = fit(TinySeg(), loader, epochs=1, seed=0, progress=False)
    assert len(history.train_loss) == 1 and math.isfinite(history.train_loss[0])
