"""A plain, readable training loop over a :class:`~vlsegkit.tasks.Task`.

``fit(model, loader)`` optimises the model's own task (``model.default_task()``: the loss of its
paper) unless ``task=`` gives another one; the task turns a batch into named loss terms, so the same
loop serves segmentation with any loss, contrastive fine-tuning on image-text pairs and
distillation from a frozen teacher. Batches are whatever the task reads -- for segmentation the
dicts of ``vlsegkit.data.collate_prompts``: ``image (B, 3, H, W)``, ``mask (B, C, H, W)``,
``prompt list[str]``.

``fit`` is one loop over epochs and batches with small helpers (the step, checkpoints, logging).
The same code runs in one process or under ``torchrun --nproc_per_node N`` (PyTorch DDP): the process
group is joined from torchrun's environment, the model is wrapped in ``DistributedDataParallel``,
every process reads its own shard of the data, loss terms and metrics are reduced over processes, and
only rank 0 logs and writes files.

Runs are resumable mid-epoch: the data order of every epoch is a seeded permutation
(``vlsegkit._distributed.ResumableSampler``), DataLoader workers seed their random generators per
item from that seed, the epoch and the item, and a checkpoint holds the model, optimiser,
scheduler, gradient scaler, Python/numpy/torch RNG states, the position in the data, the
history and the options that these states fix (a resume with other values is refused). A resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)
from tqdm.auto import tqdm

from . import _checkpoint, _distributed
from ._checkpoint import find_checkpoint, read_checkpoint
from ._distributed import DistEnv, ResumableSampler, ShardSampler
from .data import collate_prompts
from .hub import CheckpointError, check_state_dict, load_state_dict_strict
from .metrics import MetricTracker
from .tasks import SegmentationTask, Task, move_to_device

__all__ = [
    "EarlyStopping",
    "FitConfig",
    "History",
    "ResumeMismatchError",
    "evaluate",
    "find_checkpoint",
    "fit",
    "read_checkpoint",
    "seed_everything",
]

_AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
_SCHEDULER_NAMES = ("cosine", "plateau")


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed Python's, numpy's and torch's (all devices) global random generators.

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic kernels
            (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN benchmark off).

    Returns:
        ``seed``, for logging.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for worker subprocesses started after this
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return seed


# --------------------------------------------------------------------------- records
@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        train_loss: mean training loss of each epoch (per sample, over all processes).
        train_terms: per epoch, the mean of every named loss term of the task (``loss`` included,
            e.g. ``dice_loss``, ``bce_loss``, ``softcon_loss`` for MedCLIPSeg).
        val: per epoch, the ``evaluate`` results on ``val_loader`` (``dice``, ``iou``, ``loss``, the
            loss terms, ``count`` for segmentation); empty without a validation loader.
        steps: optimiser steps taken.
        monitor: the epoch-record key that selects the best checkpoint (e.g. ``"val_dice"``).
        best_value: best value of ``monitor`` so far (None before the first epoch ends).
        best_epoch: epoch (0-based) of ``best_value``.
        stopped_early: whether ``early_stopping`` ended the run.
    """

    train_loss: list[float] = field(default_factory=list)
    train_terms: list[dict[str, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    monitor: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        """Number of (possibly partial, when ``max_steps`` stopped training) epochs run."""
        return len(self.train_loss)

    def metric(self, name: str) -> list[float]:
        """One validation metric over epochs, e.g. ``history.metric("dice")``."""
        return [record[name] for record in self.val]

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python copy, e.g. for a checkpoint."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def _infer_mode(key: str) -> str:
    return "min" if "loss" in key else "max"


def _improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass
class EarlyStopping:
    """Stop training when a per-epoch metric has not improved for ``patience`` epochs.

    After every epoch the monitored value ``v`` is compared with the best so far ``b``: it improves
    when ``v < b - min_delta`` (mode ``"min"``) or ``v > b + min_delta`` (mode ``"max"``); NaN never
    improves. Training stops once ``patience`` consecutive epochs did not improve (the Keras /
    Lightning ``EarlyStopping`` rule). ``fit`` resets the state at the start of a run and restores it
    when resuming; after ``fit`` it tells what happened.

    Args:
        metric: an epoch-record key: ``"train_loss"``, ``"val_dice"``, ``"val_iou"``, ``"val_loss"``;
            the short names ``"dice"``, ``"iou"``, ``"loss"`` mean the validation ones.
        mode: ``"min"`` or ``"max"``; None infers ``"min"`` for names containing ``"loss"``, else
            ``"max"``.
        patience: epochs without improvement tolerated before stopping (``>= 0``; 0 stops at the
            first epoch that does not improve).
        min_delta: smallest change that counts as an improvement (``>= 0``).

    Attributes:
        best: best value so far (None before the first epoch).
        bad_epochs: consecutive epochs without improvement.
    """

    metric: str = "dice"
    mode: str | None = None
    patience: int = 5
    min_delta: float = 0.0
    best: float | None = field(default=None, init=False)
    bad_epochs: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min', 'max' or None, got {self.mode!r}")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or self.patience < 0
        ):
            raise ValueError(f"EarlyStopping patience must be an int >= 0, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0, got {self.min_delta!r}")

    @property
    def resolved_mode(self) -> str:
        """``mode``, or the one inferred from ``metric``."""
        return self.mode or _infer_mode(self.metric)

    def reset(self) -> None:
        """Forget the best value and the bad-epoch count."""
        self.best, self.bad_epochs = None, 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; returns True when training should stop."""
        if _improves(value, self.best, self.resolved_mode, self.min_delta):
            self.best, self.bad_epochs = float(value), 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """The mutable state (``best``, ``bad_epochs``)."""
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


# --------------------------------------------------------------------------- small helpers
def _resolve_device(
    model: nn.Module, device: torch.device | str | None, env: DistEnv
) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and env.enabled:
            device = torch.device("cuda", env.local_rank)  # one GPU per process under torchrun
        model.to(device)
        return device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    if callable(getattr(model, "trainable_parameters", None)):
        params = list(model.trainable_parameters())
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    return params


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _no_sync(net: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    # Accumulating micro-batches need no gradient all-reduce until the group's last backward.
    if skip_sync and isinstance(net, DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


def _check_autocast_dtype(dtype: torch.dtype | None) -> None:
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {dtype}"
        )


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    max_grad_norm: float | None,
) -> None:
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _num_batches(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # iterable-style datasets have no length
        return None


def _groups(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive lists of ``size`` items (the last one may be shorter)."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def _reduce_means(values: Mapping[str, float], count: int, env: DistEnv) -> tuple[dict, int]:
    """Sample-weighted means of per-process batch means over all processes, and the sample count."""
    if not env.enabled:
        return dict(values), count
    keys = sorted(values)
    totals = _distributed.all_reduce_sum([*(values[k] * count for k in keys), count])
    n = int(totals[-1])
    return {k: (t / n if n else math.nan) for k, t in zip(keys, totals)}, n


# --------------------------------------------------------------------------- data
def _rebuildable(loader: Any) -> bool:
    """A plain ``DataLoader`` over a map-style dataset with a standard sampler, which fit may re-make
    with its own sampler without changing what the user asked for."""
    if type(loader) is not DataLoader or loader.batch_size is None:
        return False
    if isinstance(loader.dataset, IterableDataset):
        return False
    sampler = loader.sampler
    if type(sampler) is SequentialSampler:
        return True
    return (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(loader.dataset)
    )


def _remake(
    loader: DataLoader, sampler: Any, generator: torch.Generator | None, dataset: Any = None
) -> DataLoader:
    extra = {"pin_memory_device": loader.pin_memory_device} if loader.pin_memory_device else {}
    if hasattr(loader, "in_order"):  # torch >= 2.6
        extra["in_order"] = loader.in_order
    return DataLoader(
        loader.dataset if dataset is None else dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        **extra,
    )


def _draw_seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(2**62, (), generator=generator).item())


def _set_epoch(dataset: Any, epoch: int) -> None:
    """Call ``dataset.set_epoch(epoch)`` if it has one, also through ``Subset`` / ``ConcatDataset``
    (``ImageMaskPromptDataset(seed=...)`` draws new prompts and augmentations per epoch)."""
    set_epoch = getattr(dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    elif isinstance(dataset, Subset):
        _set_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_epoch(part, epoch)


def _can_seed_items(loader: DataLoader) -> bool:
    """Whether workers may read ``loader.dataset`` through :class:`_SeededItems`.

    Not when the user's ``worker_init_fn`` may set the dataset up from ``get_worker_info().dataset``
    (it would get the wrapper), nor when the dataset reads whole batches (``__getitems__``), which
    per-item seeding would split up: their random draws are then the workers' own, as in PyTorch,
    and a resumed epoch is not guaranteed to redraw them.
    """
    return loader.worker_init_fn is None and not hasattr(loader.dataset, "__getitems__")


class _SeededItems(Dataset):
    """A map-style dataset read by DataLoader worker processes through ``_KeyedSampler`` keys.

    Key ``(index, epoch, seed)`` seeds the worker's Python, numpy and torch generators with ``seed``
    (a function of fit's data seed, the epoch and ``index``) and returns ``dataset[index]``, so every
    random draw of an item (augmentations, ``prompt_key="random"``) is the same whichever worker
    reads it and however many batches that worker read before: a resumed epoch, whose first batch
    goes to worker 0, recreates the uninterrupted run's items. It also brings the worker's copy of
    the dataset to ``epoch`` (``set_epoch``), which persistent workers would otherwise miss.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        index, epoch, seed = key
        if epoch != self.epoch:
            _set_epoch(self.dataset, epoch)
            self.epoch = epoch
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


class _KeyedSampler(Sampler):
    """``ResumableSampler``'s indices as ``(index, epoch, item seed)`` keys for ``_SeededItems``."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch, seed = self.sampler.epoch, self.sampler.seed
        for index in self.sampler:
            yield index, epoch, _distributed.mix_seed(seed, epoch, index, 2)

    def __len__(self) -> int:
        return len(self.sampler)


class _TrainData:
    """The training batches of every epoch, in a reproducible, shardable, resumable order.

    Map-style datasets and plain ``DataLoader``s (sequential or shuffled) get a
    ``ResumableSampler``: the same batches whatever the process count, and a mid-epoch start that
    skips batches without loading them. With worker processes, each item is read with the workers'
    random generators seeded from ``(data seed, epoch, index)`` (``_SeededItems``), so resuming is
    exact for datasets that draw from the global generators too. Anything else (custom samplers,
    iterable datasets, lists of batches) is used as given: ``set_epoch`` is called on its sampler if
    it has one, and resuming skips batches by iterating over them, which is exact only if that
    iterable is deterministic. Every epoch starts with ``set_epoch(epoch)`` on the dataset, if it
    has that method.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        shuffle: bool,
        num_workers: int,
        seed: int | None,
        env: DistEnv,
    ) -> None:
        self.sampler: ResumableSampler | None = None
        self.dataset = source if isinstance(source, Dataset) else getattr(source, "dataset", None)
        if isinstance(source, Dataset) and not isinstance(source, IterableDataset):
            loader = DataLoader(
                source, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_prompts
            )
        elif _rebuildable(source):
            loader, shuffle = source, type(source.sampler) is RandomSampler
        else:
            loader = None
        if loader is None:
            self.loader = source
            sampler = getattr(source, "sampler", None)
            if env.enabled and not callable(getattr(sampler, "set_epoch", None)):
                warnings.warn(
                    "fit cannot shard this train_loader over processes; every process reads all "
                    "of it (give a Dataset or a plain DataLoader, or use a DistributedSampler)",
                    stacklevel=3,
                )
        else:
            if seed is None:
                seed = _draw_seed(getattr(loader, "generator", None)) if shuffle else 0
            seed = _distributed.broadcast_object(seed)  # every rank must use one permutation
            self.sampler = ResumableSampler(
                len(loader.dataset),
                shuffle=shuffle,
                seed=seed,
                rank=env.rank,
                world_size=env.world_size,
            )
            # An own generator keeps the workers' base seed off the global RNG and reproducible.
            if loader.num_workers > 0 and _can_seed_items(loader):
                keyed, items = _KeyedSampler(self.sampler), _SeededItems(loader.dataset)
                self.loader = _remake(loader, keyed, torch.Generator(), dataset=items)
            else:
                self.loader = _remake(loader, self.sampler, torch.Generator())
        self.num_batches = _num_batches(self.loader)
        self.batch_size = getattr(self.loader, "batch_size", None)
        self.shuffle = None if self.sampler is None else self.sampler.shuffle

    @property
    def seed(self) -> int | None:
        return None if self.sampler is None else self.sampler.seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        if self.sampler is not None and value is not None:
            self.sampler.seed = value

    def epoch(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        """The batches of ``epoch`` after its first ``skip``."""
        _set_epoch(self.dataset, epoch)
        if self.sampler is not None:
            self.sampler.set_position(epoch, skip * self.loader.batch_size)
            # Seeds the workers' base seed, which DataLoader draws from this generator every epoch.
            self.loader.generator.manual_seed(_distributed.mix_seed(self.sampler.seed, epoch, 1))
            return self.loader
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return itertools.islice(self.loader, skip, None) if skip else self.loader


def _eval_data(source: Any, batch_size: int, env: DistEnv) -> Iterable[dict[str, Any]]:
    """A loader over ``source`` that gives each process a disjoint, unpadded share of it."""
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset):
        sampler = ShardSampler(len(source), rank=env.rank, world_size=env.world_size)
        return DataLoader(
            source, batch_size=batch_size, sampler=sampler, collate_fn=collate_prompts
        )
    if env.enabled and _rebuildable(source):
        sampler = ShardSampler(len(source.dataset), rank=env.rank, world_size=env.world_size)
        return _remake(source, sampler, None)
    return source


# --------------------------------------------------------------------------- schedules
class _WarmupCosine:
    """LR multiplier of optimiser step ``t``: linear warmup, then cosine decay (or constant).

    ``f(t) = (t + 1) / (w + 1)`` for ``t < w``; then with ``p = (t - w) / (T - w)`` clipped to 1,
    ``f(t) = r + (1 - r)·(1 + cos(π·p)) / 2`` (SGDR, Loshchilov & Hutter 2017, without restarts),
    or ``f(t) = 1`` when ``T`` is None. A class, not a closure, so ``LambdaLR.state_dict`` keeps it.
    """

    def __init__(self, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


def _total_steps(
    num_batches: int | None, grad_accum_steps: int, epochs: int, max_steps: int | None
) -> int | None:
    total = None if num_batches is None else math.ceil(num_batches / grad_accum_steps) * epochs
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


def _build_scheduler(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    min_lr_ratio: float,
    interval: str,
    total_steps: int | None,
    mode: str,
) -> tuple[Any, bool]:
    """The scheduler and whether it steps per epoch (plateau, or a given one asked to) rather
    than per optimiser step (the built-in schedules)."""
    per_epoch = isinstance(scheduler, ReduceLROnPlateau) or scheduler == "plateau"
    per_epoch = per_epoch or (isinstance(scheduler, LRScheduler) and interval == "epoch")
    return _make_scheduler(
        scheduler,
        optimizer,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        total_steps=total_steps,
        mode=mode,
    ), per_epoch


def _make_scheduler(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    min_lr_ratio: float,
    total_steps: int | None,
    mode: str,
) -> Any:
    if isinstance(scheduler, str) and scheduler not in _SCHEDULER_NAMES:
        raise ValueError(
            f"scheduler must be 'cosine', 'plateau', None or a torch LR scheduler, got {scheduler!r}"
        )
    if warmup_steps and scheduler not in (None, "cosine"):
        raise ValueError(
            f"warmup_steps is only supported with scheduler='cosine' or None, got {scheduler!r}"
        )
    if scheduler is None:
        return LambdaLR(optimizer, _WarmupCosine(warmup_steps, None, 0.0)) if warmup_steps else None
    if scheduler == "cosine":
        if total_steps is None:
            raise ValueError(
                "scheduler='cosine' needs the number of steps: give max_steps, or a train_loader "
                "with len()"
            )
        return LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
    if scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode=mode)
    if isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        if scheduler.optimizer is not optimizer:
            raise ValueError("scheduler must be attached to the optimizer fit uses (optimizer=...)")
        return scheduler
    raise ValueError(
        f"scheduler must be 'cosine', 'plateau', None or a torch LR scheduler, got {type(scheduler)}"
    )


# --------------------------------------------------------------------------- run state
@dataclass
class _Run:
    """Everything a checkpoint restores besides the model weights, and where training stands."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    early_stopping: EarlyStopping | None
    data: _TrainData
    history: History
    running: MetricTracker = field(default_factory=MetricTracker)
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of ``epoch`` already trained on
    grad_accum_steps: int = 1
    world_size: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # _resume_options of this run

    def state_dict(self) -> dict[str, Any]:
        return {
            "options": dict(self.options),
            "progress": {"epoch": self.epoch, "batch": self.batch, "steps": self.history.steps},
            "layout": {
                "num_batches": self.data.num_batches,
                "grad_accum_steps": self.grad_accum_steps,
                "world_size": self.world_size,
            },
            "data_seed": self.data.seed,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": (
                None if self.early_stopping is None else self.early_stopping.state_dict()
            ),
            "history": self.history.state_dict(),
            "running": {"sums": dict(self.running.sums), "counts": dict(self.running.counts)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        progress, layout = state["progress"], state["layout"]
        here = {
            "num_batches": self.data.num_batches,
            "grad_accum_steps": self.grad_accum_steps,
            "world_size": self.world_size,
        }
        if progress["batch"] and layout != here:
            raise ValueError(
                f"cannot resume mid-epoch (epoch {progress['epoch']}, batch {progress['batch']}): "
                f"the checkpoint was written with {layout}, this run has {here}; keep the batch "
                "size, grad_accum_steps and number of processes, or resume from an epoch boundary"
            )
        self.epoch, self.batch = progress["epoch"], progress["batch"]
        self.data.seed = state["data_seed"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.early_stopping is not None and state["early_stopping"] is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self.history.load_state_dict(state["history"])
        self.running.sums.update(state["running"]["sums"])
        self.running.counts.update(state["running"]["counts"])


class ResumeMismatchError(CheckpointError):
    """``fit(resume=...)`` was given options that the checkpoint's saved state would override.

    Attributes:
        source: the checkpoint.
        changes: ``{option: (value in the checkpoint's run, value given now)}``.
    """

    def __init__(self, source: Any, changes: dict[str, tuple[Any, Any]], message: str) -> None:
        super().__init__(message)
        self.source, self.changes = source, changes


_MISSING = object()
#: why a resumed run cannot take another value of an option
_FIXED_BY = {
    "lr": "the saved optimiser state holds the learning rate",
    "weight_decay": "the saved optimiser state holds it",
    "optimizer": "the saved optimiser state replaces its hyperparameters",
    "scheduler": "the saved scheduler state belongs to this schedule",
    "scheduler_interval": "the saved scheduler state counts these intervals",
    "warmup_steps": "the saved scheduler state holds the schedule",
    "min_lr_ratio": "the saved scheduler state holds the schedule",
    "schedule_steps": (
        "the length of the 'cosine' schedule (optimiser steps over all epochs, from epochs, "
        "max_steps, the batches per epoch and grad_accum_steps); the saved scheduler state holds it"
    ),
    "batch_size": "the saved data position and step count are in batches of this size",
    "grad_accum_steps": "the saved step count and schedule are in steps of this many batches",
    "shuffle": "the saved data order uses it",
    "seed": "the saved data order and random states come from it",
    "monitor": "the saved best value and schedule track this metric",
}


def _jsonish(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonish(v) for v in value]
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def _resume_options(
    cfg: FitConfig,
    optimizer: torch.optim.Optimizer,
    data: _TrainData,
    *,
    total_steps: int | None,
    monitor: str,
) -> dict[str, Any]:
    """The options whose effect a checkpoint's saved state fixes: a resumed run must use the
    checkpoint's values (call before fit builds its scheduler on ``optimizer``)."""
    options: dict[str, Any] = {}
    if cfg.optimizer is None:
        options.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:  # its hyperparameters as given (a given scheduler may have set lr / initial_lr)
        groups = [
            {k: _jsonish(v) for k, v in sorted(g.items()) if k != "params"}
            for g in optimizer.param_groups
        ]
        options["optimizer"] = {"class": type(optimizer).__qualname__, "param_groups": groups}
    if cfg.scheduler is None or isinstance(cfg.scheduler, str):
        options.update(scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps)
        if cfg.scheduler == "cosine":
            options.update(min_lr_ratio=cfg.min_lr_ratio, schedule_steps=total_steps)
    else:  # a given torch scheduler: its own settings come from the checkpoint
        options.update(
            scheduler=type(cfg.scheduler).__qualname__, scheduler_interval=cfg.scheduler_interval
        )
    options.update(
        batch_size=data.batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        shuffle=data.shuffle,
        seed=cfg.seed,
        monitor=monitor,
    )
    return options


def _check_resume_options(state: dict[str, Any], options: dict[str, Any], source: Any) -> None:
    """Refuse to resume with options that the checkpoint's state would silently override."""
    saved = state.get("options")
    if saved is None:
        warnings.warn(
            f"{source} was written by an older vlsegkit that did not store its options, so they "
            "cannot be checked: the saved optimiser and scheduler states continue the run (its "
            "learning rate and schedule), whatever lr, weight_decay, scheduler, warmup_steps, "
            "min_lr_ratio, epochs or max_steps are given now",
            UserWarning,
            stacklevel=3,
        )
        return
    order = list(_FIXED_BY)
    names = sorted(
        set(saved) | set(options),
        key=lambda n: (n not in order, order.index(n) if n in order else n),
    )
    changes = {
        name: (saved.get(name, _MISSING), options.get(name, _MISSING))
        for name in names
        if saved.get(name, _MISSING) != options.get(name, _MISSING)
    }
    if not changes:
        return

    def show(value: Any) -> str:
        return "(not set)" if value is _MISSING else repr(value)

    lines = [
        f"  {name}: {show(old)} in the checkpoint's run, {show(new)} now ({_FIXED_BY.get(name, 'the saved state depends on it')})"
        for name, (old, new) in changes.items()
    ]
    extend = ""
    if "schedule_steps" in changes:
        extend = (
            " To train a 'cosine' run longer, start a new run from its weights (e.g. "
            "model.save_pretrained, then load them), or use scheduler=None or 'plateau', whose "
            "runs can be extended by resuming with more epochs."
        )
    raise ResumeMismatchError(
        source,
        changes,
        f"cannot resume from {source}: {len(changes)} option(s) differ from the run that wrote "
        "the checkpoint, and its saved state would override them:\n" + "\n".join(lines) + "\n"
        "Resume with the checkpoint's values, or start a new run (a new checkpoint_dir, or "
        f"resume=False) to use the new ones.{extend}",
    )


def _save(
    root: Path | None, kind: str, model: nn.Module, run: _Run, env: DistEnv, **info: Any
) -> None:
    """Write a ``kind`` checkpoint on rank 0 (every rank must call: RNG states are gathered)."""
    if root is None:
        return
    rng = _distributed.all_gather_object(_checkpoint.capture_rng())
    if env.is_main:
        info = {"step": run.history.steps, "epoch": run.epoch, "batch": run.batch, **info}
        state = {**run.state_dict(), "rng": rng}
        hub_config = getattr(model, "hub_config", None)
        _checkpoint.save_checkpoint(
            root,
            kind,
            model_state=model.state_dict(),
            trainer_state=state,
            info=info,
            model_config=hub_config() if callable(hub_config) else None,
        )
    _distributed.barrier()


def _resume_path(resume: Any, checkpoint_dir: Path | None) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where the last checkpoint is)")
        return find_checkpoint(checkpoint_dir, "last")  # None: nothing to resume, start afresh
    if isinstance(resume, (str, os.PathLike)):
        return Path(resume)
    raise ValueError(f"resume must be a bool or a checkpoint path, got {type(resume)}")


# --------------------------------------------------------------------------- logging
def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class _RunLog:
    """Sends each record to ``log_fn``, ``log_dir/metrics.jsonl`` and TensorBoard (rank 0 only).

    A fresh run truncates ``metrics.jsonl``; a resumed run keeps only the records written before
    its checkpoint, so the file reads as if the run had never been interrupted.
    """

    def __init__(
        self,
        *,
        log_dir: str | os.PathLike | None,
        log_fn: Callable[[dict[str, float]], None] | None,
        tensorboard: bool,
        enabled: bool,
        resumed: _Run | None,
        curves: str | os.PathLike | None = None,
    ) -> None:
        self.log_fn = log_fn if enabled else None
        self.curves = None if curves is None or not enabled else Path(curves)
        self.epochs: list[dict[str, Any]] = []
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir is not None and enabled else None
        self.writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self._records_before(resumed) if resumed is not None else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            self.epochs = [r for r in kept if "train_loss" in r]
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(log_dir))

    def _records_before(self, run: _Run) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if "train_loss" in record:  # an epoch record
                    keep = record["epoch"] < run.epoch
                else:
                    keep = record["step"] <= run.history.steps
            except (json.JSONDecodeError, KeyError, TypeError):  # e.g. a line cut by the crash
                continue
            if keep:
                kept.append(record)
        return kept

    def __call__(self, record: dict[str, float]) -> None:
        if self.path is not None:
            line = json.dumps({k: _json_safe(v) for k, v in record.items()})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if self.writer is not None:
            prefix = "epoch/" if "train_loss" in record else "step/"
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(prefix + key, value, global_step=record["step"])
        if self.log_fn is not None:
            self.log_fn(record)
        if "train_loss" in record and self.curves is not None:
            from .viz import plot_training_curves

            self.epochs.append(dict(record))
            plot_training_curves(self.epochs, self.curves)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- configuration
def _positive_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}"
        )


def _finite(name: str, value: Any, *, low: float, high: float = math.inf, open_low=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class FitConfig:
    """Every option of :func:`fit`, validated once (``fit(model, loader, **options)`` builds one).

    Optimisation:
        epochs: passes over the training data (``>= 0``).
        lr: AdamW learning rate, finite and ``> 0`` (ignored when ``optimizer`` is given).
        weight_decay: AdamW weight decay, finite and ``>= 0``.
        optimizer: a ready optimiser; default AdamW over ``model.trainable_parameters()``.
        scheduler: ``"cosine"`` (per optimiser step: linear warmup over ``warmup_steps``, then cosine
            decay towards ``min_lr_ratio·lr``), ``"plateau"`` (``ReduceLROnPlateau``, stepped each
            epoch with ``monitor``), None (constant after the optional warmup), or a torch
            scheduler built on ``optimizer`` (stepped every ``scheduler_interval``). With ``T``
            optimiser steps in all (``epochs`` × steps per epoch, at most ``max_steps``),
            ``w = warmup_steps`` and ``r = min_lr_ratio``, ``"cosine"``'s step ``t = 0 ... T-1``
            uses ``lr·(r + (1-r)·(1 + cos(π·(t-w)/(T-w)))/2)`` for ``t >= w``: the decay would
            reach ``r·lr`` at step ``T``, one step after the last, so the last step uses
            ``lr·(r + (1-r)·(1 - cos(π/(T-w)))/2)``, slightly above ``r·lr`` (with ``r = 0`` no
            step is wasted at learning rate 0; the convention of ``transformers``'
            ``get_cosine_schedule_with_warmup``).
        warmup_steps: optimiser steps of linear warmup: step ``t < warmup_steps`` uses
            ``lr·(t+1)/(warmup_steps+1)``.
        min_lr_ratio: floor of ``"cosine"`` as a fraction of ``lr`` (approached, see above).
        scheduler_interval: ``"step"`` or ``"epoch"``: when a given torch scheduler is stepped.
        grad_accum_steps: batches per optimiser step.
        max_grad_norm: clip the global gradient norm to this value (``> 0``) before each step.
        autocast_dtype: None (full precision), ``torch.bfloat16`` or ``torch.float16`` (with a
            gradient scaler).
        max_steps: stop after this many optimiser steps.

    Data:
        batch_size: per-process batch size when a loader is a ``Dataset``.
        shuffle: shuffle a training ``Dataset`` every epoch.
        num_workers: ``DataLoader`` workers for a training ``Dataset``. In workers (also those of
            a given plain ``DataLoader``), the Python, numpy and torch generators are seeded before
            each item from the data seed, the epoch and the item's index, so random draws of
            augmentations or prompts are reproducible and a resumed run equals an uninterrupted
            one whatever worker reads an item. Not for a loader with its own ``worker_init_fn``
            or a dataset that reads whole batches (``__getitems__``): their workers keep
            PyTorch's seeding.
        seed: seed Python, numpy and torch (``seed_everything``) and the data order at the start;
            None keeps the current global RNG state and draws the data order from it.

    Selection, checkpoints and logs:
        early_stopping: an :class:`EarlyStopping` rule checked after every epoch.
        monitor: epoch-record key that picks the best checkpoint and drives ``"plateau"``
            (``"train_loss"``, ``"val_<score>"``, or a score name meaning its ``val_`` key). Default:
            ``early_stopping``'s metric, else ``val_<task.monitor>`` with a validation loader, else
            ``"train_loss"``.
        checkpoint_dir: write ``last`` (every epoch and every ``checkpoint_every`` steps) and
            ``best`` (whenever ``monitor`` improves) checkpoints here; see ``find_checkpoint``.
        checkpoint_every: also write ``last`` every this many optimiser steps within epochs.
        resume: True resumes from ``checkpoint_dir``'s last checkpoint if there is one (else starts
            afresh); a path resumes from that checkpoint. Everything is verified before anything is
            loaded. The checkpoint's optimiser, scheduler, data order and random states continue
            the run, so the options they fix must be the checkpoint's: ``lr``, ``weight_decay``
            (or a given ``optimizer``'s class and hyperparameters), ``scheduler`` (a given one's
            class and ``scheduler_interval``), ``warmup_steps``, ``min_lr_ratio`` and, for
            ``"cosine"``, the schedule's length in steps (from ``epochs``, ``max_steps``, the
            batches per epoch and ``grad_accum_steps``), ``batch_size``, ``grad_accum_steps``,
            ``shuffle``, ``seed`` and ``monitor``; otherwise :class:`ResumeMismatchError` lists
            each changed option (start a new run to use new values). A run whose schedule does not
            depend on its length (None, warmup only, ``"plateau"``) can be extended by resuming
            with more ``epochs`` (or another ``max_steps``); other options (``max_grad_norm``,
            early-stopping patience, logging, device, workers...) take their new values.
            Checkpoints of older versions, which did not store these options, load with a
            warning.
        log_dir: append per-step and per-epoch records as JSON lines to ``log_dir/metrics.jsonl``.
        tensorboard: also write the records as TensorBoard scalars to ``log_dir``.
        log_fn: called (rank 0) with every step record (``step``, ``epoch``, ``loss``, the task's
            terms, ``lr``) and epoch record (``step``, ``epoch``, ``train_*``, ``val_*``).
        curves: write a PNG of the training loss terms and validation scores per epoch here after
            every epoch (rank 0; :func:`vlsegkit.viz.plot_training_curves`, Pillow only).
        progress: tqdm progress bars (rank 0, only when stderr is a terminal).

    Placement:
        device: move the model and batches here; default the model's current device. Under
            torchrun, ``"cuda"`` means ``cuda:LOCAL_RANK``.
        ddp_kwargs: extra ``DistributedDataParallel`` arguments.
    """

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: torch.optim.Optimizer | None = None
    scheduler: str | LRScheduler | ReduceLROnPlateau | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    scheduler_interval: str = "step"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    autocast_dtype: torch.dtype | None = None
    max_steps: int | None = None
    batch_size: int = 8
    shuffle: bool = True
    num_workers: int = 0
    seed: int | None = None
    early_stopping: EarlyStopping | None = None
    monitor: str | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    resume: bool | str | os.PathLike = False
    log_dir: str | os.PathLike | None = None
    tensorboard: bool = False
    log_fn: Callable[[dict[str, float]], None] | None = None
    curves: str | os.PathLike | None = None
    progress: bool = True
    device: torch.device | str | None = None
    ddp_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs, minimum=0)
        _positive_int("grad_accum_steps", self.grad_accum_steps)
        _positive_int("max_steps", self.max_steps, optional=True)
        _positive_int("batch_size", self.batch_size)
        _positive_int("num_workers", self.num_workers, minimum=0)
        _positive_int("warmup_steps", self.warmup_steps, minimum=0)
        _positive_int("checkpoint_every", self.checkpoint_every, optional=True)
        if self.optimizer is None:
            _finite("lr", self.lr, low=0.0, open_low=True)
            _finite("weight_decay", self.weight_decay, low=0.0)
        _finite("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        if self.max_grad_norm is not None:
            _finite("max_grad_norm", self.max_grad_norm, low=0.0, open_low=True)
        _check_autocast_dtype(self.autocast_dtype)
        if self.scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {self.scheduler_interval!r}"
            )
        if self.seed is not None:
            _positive_int("seed", self.seed, minimum=0)
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if self.early_stopping is not None and not isinstance(self.early_stopping, EarlyStopping):
            raise ValueError(
                f"early_stopping must be an EarlyStopping, got {type(self.early_stopping).__name__}"
            )
        if self.tensorboard:
            if self.log_dir is None:
                raise ValueError("tensorboard=True needs log_dir")
            try:
                import tensorboard as _tb  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "tensorboard=True needs the 'tensorboard' package (pip install tensorboard)"
                ) from e
        if self.checkpoint_dir is not None:
            root = Path(self.checkpoint_dir)
            if root.exists() and not root.is_dir():
                raise ValueError(f"checkpoint_dir {root} exists and is not a folder")
        if self.log_dir is not None:
            root = Path(self.log_dir)
            if root.exists() and not root.is_dir():
                raise ValueError(f"log_dir {root} exists and is not a folder")


def _fit_config(config: FitConfig | None, overrides: dict[str, Any]) -> FitConfig:
    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"fit() got unexpected options {unknown}; see vlsegkit.train.FitConfig")
    if config is None:
        return FitConfig(**overrides)
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a FitConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides)


def _task_for(model: nn.Module, task: Task | None, loss: Any) -> Task:
    if task is not None and loss is not None:
        raise ValueError("pass task= or loss=, not both")
    if task is not None:
        if not isinstance(task, Task):
            raise TypeError(f"task must be a vlsegkit.tasks.Task, got {type(task).__name__}")
        return task
    if loss is not None:
        return SegmentationTask(loss=loss)
    default = getattr(model, "default_task", None)
    return default() if callable(default) else SegmentationTask()


def _check_loader(loader: Any, name: str) -> None:
    if isinstance(loader, Dataset):
        return
    if isinstance(loader, (str, bytes, os.PathLike, Tensor)) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{name} must be a DataLoader, an iterable of batches or a Dataset, got "
            f"{type(loader).__name__}"
        )


# --------------------------------------------------------------------------- public loop
def fit(
    model: nn.Module,
    train_loader: Iterable[Any] | Dataset,
    *,
    val_loader: Iterable[Any] | Dataset | None = None,
    task: Task | None = None,
    loss: Any = None,
    config: FitConfig | None = None,
    **options: Any,
) -> History:
    """Train ``model`` on ``train_loader`` with its task, validating after every epoch.

    Each step: ``terms = task.training_step(model, batch)`` (under autocast when asked), backward of
    ``terms["loss"]`` and an optimiser step every ``grad_accum_steps`` batches (the epoch's last
    group may have fewer). The batches of a group are read before its first backward, and each
    batch loss is weighted by its share ``n_batch / n_group`` of the group's samples
    (``task.batch_size``, summed over processes), so ``k`` batches give the update of one batch of
    all their samples with a mean-reduced loss, also when the last batch is short. Every named term
    is averaged per epoch and logged. Each epoch starts with ``set_epoch(epoch)`` on the training
    dataset (through ``Subset`` / ``ConcatDataset``) and on a given loader's sampler, if they have
    that method, so e.g. ``ImageMaskPromptDataset(seed=...)`` draws new prompts every epoch.

    Under ``torchrun --nproc_per_node N`` the same call trains with DDP: each process reads ``1/N`` of
    every epoch, gradients are averaged over processes, terms and metrics are reduced over them, and
    rank 0 alone shows progress, logs and writes checkpoints.

    Args:
        model: the model; its ``default_task()`` (the paper's loss) is used unless ``task`` is given.
        train_loader: a ``DataLoader`` (or any iterable) of batches, or a map-style ``Dataset`` of
            items (batched here with ``batch_size``, ``shuffle``, ``num_workers``). A plain
            ``DataLoader`` with a sequential or shuffled sampler is re-made with fit's resumable,
            shardable sampler (same batch size, collate function, workers).
        val_loader: optional loader (or ``Dataset``) scored with :func:`evaluate` after every epoch.
        task: a :class:`~vlsegkit.tasks.Task` (segmentation, contrastive, distillation...).
        loss: shortcut for ``task=SegmentationTask(loss=loss)``.
        config: a :class:`FitConfig`; ``**options`` override its fields.
        **options: :class:`FitConfig` fields (``epochs``, ``lr``, ``checkpoint_dir``, ...).

    Returns:
        :class:`History` with per-epoch training terms and validation scores. The model's train /
        eval mode is restored afterwards.

    Raises:
        ValueError: a bad option (named in the message), or a training loader without batches.
        CheckpointError: the checkpoint to resume from is missing, incomplete, corrupt or does not
            fit this model / optimiser; nothing is loaded then.
        ResumeMismatchError: (a ``CheckpointError``) options that the checkpoint fixes differ
            from its run's (see ``FitConfig.resume``); nothing is loaded then.
        FloatingPointError: a non-finite training loss.
    """
    cfg = _fit_config(config, options)
    _check_loader(train_loader, "train_loader")
    if val_loader is not None:
        _check_loader(val_loader, "val_loader")
    task = _task_for(model, task, loss)
    keys = ["train_loss"] + ([] if val_loader is None else [f"val_{k}" for k in task.metrics])
    monitor, monitor_mode, stop_key = _resolve_monitor(
        cfg.monitor, cfg.early_stopping, keys, default=f"val_{task.monitor}"
    )
    checkpoint_dir = None if cfg.checkpoint_dir is None else Path(cfg.checkpoint_dir)
    resume_from = _resume_path(cfg.resume, checkpoint_dir)
    env = _distributed.setup()
    if cfg.seed is not None:
        seed_everything(cfg.seed)

    # Read and verify the checkpoint before touching anything, so a bad one changes nothing.
    model_state, state = read_checkpoint(resume_from) if resume_from else (None, None)
    if model_state is not None:
        check_state_dict(model, model_state, source=str(resume_from))
    was_training = model.training
    device = _resolve_device(model, cfg.device, env)
    task.to(device)
    optimizer = cfg.optimizer
    if optimizer is None:
        params = _trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    data = _TrainData(
        train_loader,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        env=env,
    )
    if data.num_batches == 0:
        raise ValueError("train_loader has no batches: there is nothing to train on")
    val_data = None if val_loader is None else _eval_data(val_loader, cfg.batch_size, env)
    total_steps = _total_steps(data.num_batches, cfg.grad_accum_steps, cfg.epochs, cfg.max_steps)
    options = _resume_options(cfg, optimizer, data, total_steps=total_steps, monitor=monitor)
    if state is not None:
        _check_resume_options(state, options, resume_from)
    scheduler, per_epoch = _build_scheduler(
        cfg.scheduler,
        optimizer,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        interval=cfg.scheduler_interval,
        total_steps=total_steps,
        mode=monitor_mode,
    )
    # Loss scaling is only needed for fp16, whose small range underflows gradients.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast_dtype is torch.float16)
    if cfg.early_stopping is not None:
        cfg.early_stopping.reset()
    history = History(monitor=monitor)
    run = _Run(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        early_stopping=cfg.early_stopping,
        data=data,
        history=history,
        grad_accum_steps=cfg.grad_accum_steps,
        world_size=env.world_size,
        options=options,
    )
    if state is not None:
        _check_optimizer_state(optimizer, state, resume_from)
        load_state_dict_strict(model, model_state, source=str(resume_from))
        run.load_state_dict(state)
    net = _wrap_ddp(model, device, env, cfg.ddp_kwargs)
    if checkpoint_dir is not None and env.is_main:
        _checkpoint.remove_stale(checkpoint_dir)
    log = _RunLog(
        log_dir=cfg.log_dir,
        log_fn=cfg.log_fn,
        tensorboard=cfg.tensorboard,
        enabled=env.is_main,
        resumed=run if state is not None else None,
        curves=cfg.curves,
    )
    if state is not None:  # last, so that nothing above consumes the restored random streams
        _checkpoint.restore_rng(state["rng"][env.rank % len(state["rng"])])
    step_terms = MetricTracker()  # terms of the batches accumulated since the last step
    try:
        _train_epochs(net, model, task, data, val_data, run, cfg, env, device, log, step_terms,
                      params=params, per_epoch=per_epoch, checkpoint_dir=checkpoint_dir,
                      monitor=(monitor, monitor_mode, stop_key))  # fmt: skip
    finally:
        log.close()
        model.train(was_training)
    return history


def _train_epochs(
    net, model, task, data, val_data, run, cfg, env, device, log, step_terms, *, params,
    per_epoch, checkpoint_dir, monitor,
) -> None:  # fmt: skip
    """The epoch / batch loop of :func:`fit` (see there)."""
    history, optimizer, scaler = run.history, run.optimizer, run.scaler
    num_batches = data.num_batches

    def done() -> bool:
        return history.stopped_early or (
            cfg.max_steps is not None and history.steps >= cfg.max_steps
        )

    def take_step(epoch: int) -> None:
        lr_now = optimizer.param_groups[0]["lr"]
        _optimizer_step(optimizer, scaler, params, cfg.max_grad_norm)
        history.steps += 1
        if run.scheduler is not None and not per_epoch:
            run.scheduler.step()
        means = step_terms.compute()
        log({"step": history.steps, "epoch": epoch, **means, "lr": lr_now})
        step_terms.reset()

    start_epoch, start_batch = run.epoch, run.batch
    for epoch in range(start_epoch, cfg.epochs):
        if done():
            break
        skip = start_batch if epoch == start_epoch else 0
        if not skip:
            run.running = MetricTracker()
        run.epoch, run.batch = epoch, skip
        net.train()
        task.train()
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            data.epoch(epoch, skip),
            total=num_batches,
            initial=skip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=_no_bar(cfg.progress, env),
        )
        # One optimiser step per group of grad_accum_steps batches (the epoch's last group may be
        # shorter). The group is read before its first backward so that each batch's loss can be
        # weighted by its share of the group's samples (over all processes): the accumulated
        # gradient is then that of one batch of all the group's samples with a mean-reduced loss.
        for group in _groups(enumerate(bar, start=skip), cfg.grad_accum_steps):
            sizes = [task.batch_size(batch) for _, batch in group]
            total = _distributed.all_reduce_sum([sum(sizes)])[0]
            for position, ((index, batch), size) in enumerate(zip(group, sizes)):
                batch = move_to_device(batch, device)
                with _no_sync(net, position + 1 < len(group)):
                    with _autocast(device, cfg.autocast_dtype):
                        terms = task.training_step(net, batch)
                    loss = _checked_loss(terms, epoch, index)
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    values, count = _reduce_means(values, size, env)
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(
                            f"the loss is {values['loss']} at epoch {epoch}, batch {index}"
                        )
                    # DDP averages gradients over processes, hence the world_size factor.
                    weight = size * env.world_size / total if total else 0.0
                    scaler.scale(loss * weight).backward()
                for name, value in values.items():
                    run.running.update(name, value, n=count)
                    step_terms.update(name, value, n=count)
                bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
            index = group[-1][0]
            run.batch = index + 1
            take_step(epoch)
            # (At the end of an epoch the epoch-level checkpoint follows right after.)
            ends_epoch = index + 1 == num_batches
            every = cfg.checkpoint_every
            if every and history.steps % every == 0 and not ends_epoch:
                _save(checkpoint_dir, "last", model, run, env)
            if done():
                break
        bar.close()
        means = run.running.compute()
        if not means:
            raise ValueError(f"train_loader yielded no batches in epoch {epoch}")
        record: dict[str, Any] = {"step": history.steps, "epoch": epoch}
        record.update({f"train_{k}": v for k, v in means.items()})
        if val_data is not None:
            metrics = _evaluate(
                model,
                val_data,
                task=task,
                device=device,
                autocast_dtype=cfg.autocast_dtype,
                progress=not _no_bar(cfg.progress, env),
            )
            history.val.append(metrics)
            record.update({f"val_{k}": v for k, v in metrics.items()})
        history.train_loss.append(record["train_loss"])
        history.train_terms.append(dict(means))
        run.epoch, run.batch = epoch + 1, 0
        key, mode, stop_key = monitor
        if key not in record:
            raise ValueError(f"monitor {key!r} is not in this epoch's record {sorted(record)}")
        improved = _end_of_epoch(run, record, key, mode, stop_key, per_epoch)
        log(record)
        if improved:
            _save(checkpoint_dir, "best", model, run, env, metric=key, value=record[key])
        _save(checkpoint_dir, "last", model, run, env)


def _no_bar(progress: bool, env: DistEnv) -> bool | None:
    # None lets tqdm show a bar only on a terminal, never in logs
    return True if (not progress or not env.is_main) else None


def _checked_loss(terms: Any, epoch: int, index: int) -> Tensor:
    if not isinstance(terms, Mapping) or not isinstance(terms.get("loss"), Tensor):
        raise TypeError(
            "task.training_step must return a dict with a tensor 'loss' entry (and other named "
            f"terms), got {type(terms).__name__} at epoch {epoch}, batch {index}"
        )
    loss = terms["loss"]
    if loss.dim() != 0:
        raise ValueError(f"terms['loss'] must be a scalar, got shape {tuple(loss.shape)}")
    return loss


def _check_optimizer_state(optimizer, state: dict[str, Any], source) -> None:
    """Refuse a checkpoint whose optimiser state does not fit this optimiser, before any load."""
    saved = state.get("optimizer", {})
    groups = saved.get("param_groups", [])
    here = [len(g["params"]) for g in optimizer.param_groups]
    there = [len(g.get("params", ())) for g in groups]
    if here != there:
        raise CheckpointError(
            f"{source}: the checkpoint's optimiser has parameter groups of sizes {there}, this run "
            f"has {here} (a different set of trainable parameters?); nothing was loaded"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g.get("params", ())]
    for p, i in zip(params, ids):
        for value in saved.get("state", {}).get(i, {}).values():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise CheckpointError(
                    f"{source}: optimiser state of shape {tuple(value.shape)} for a parameter of "
                    f"shape {tuple(p.shape)}; nothing was loaded"
                )


def _end_of_epoch(
    run: _Run,
    record: dict[str, float],
    monitor: str,
    mode: str,
    stop_key: str | None,
    per_epoch: bool,
) -> bool:
    """Epoch-level scheduler step, best-value tracking and early stopping; True if improved."""
    history, value = run.history, record[monitor]
    if per_epoch:
        if isinstance(run.scheduler, ReduceLROnPlateau):
            run.scheduler.step(value)
        else:
            run.scheduler.step()
    improved = _improves(value, history.best_value, mode, 0.0)
    if improved:
        history.best_value, history.best_epoch = float(value), int(record["epoch"])
    if run.early_stopping is not None and stop_key is not None:
        history.stopped_early = run.early_stopping.update(record[stop_key])
    return improved


def _wrap_ddp(
    model: nn.Module, device: torch.device, env: DistEnv, ddp_kwargs: dict[str, Any] | None
) -> nn.Module:
    if not env.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **(ddp_kwargs or {}))


def _record_key(name: str, keys: list[str], argument: str) -> str:
    for candidate in (name, f"val_{name}"):
        if candidate in keys:
            return candidate
    raise ValueError(
        f"{argument} {name!r} is not an epoch metric of this run; choose one of {keys}"
    )


def _resolve_monitor(
    monitor: str | None, early_stopping: EarlyStopping | None, keys: list[str], *, default: str
) -> tuple[str, str, str | None]:
    """``(monitor key, its mode, early-stopping key)``, validated against the epoch-record keys."""
    stop_key = None
    if early_stopping is not None:
        stop_key = _record_key(early_stopping.metric, keys, "early_stopping.metric")
    if monitor is None and early_stopping is not None:
        return stop_key, early_stopping.resolved_mode, stop_key
    if monitor is None:
        monitor = default if default in keys else "train_loss"
    key = _record_key(monitor, keys, "monitor")
    return key, _infer_mode(key), stop_key


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any] | Dataset,
    *,
    task: Task | None = None,
    loss: Any = None,
    device: torch.device | str | None = None,
    threshold: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Mean scores of ``model`` on ``loader`` under its task.

    For segmentation (the default task of every model): mean per-image Dice and IoU of
    ``sigmoid(logits) > threshold`` (``vlsegkit.metrics``; an empty prediction on an empty mask
    scores 1), the loss and its terms; with several prompts per image every (image, prompt) pair
    counts as one image. The model's train / eval mode is restored afterwards.

    Under ``torchrun`` every process must call it: a ``Dataset`` or plain ``DataLoader`` is split
    into disjoint shares (no padding, so no image counts twice) and the sums are all-reduced, so each
    process returns the scores of the whole set.

    Args:
        model: the model.
        loader: iterable of batches, or a map-style ``Dataset`` of items.
        task: the task whose ``evaluation_step`` scores a batch; default the model's own.
        loss: shortcut for ``task=SegmentationTask(loss=loss)``.
        device: where to run; default the model's device (the model is moved if given).
        threshold: probability threshold, in (0, 1), of a task that binarises predictions
            (:meth:`~vlsegkit.tasks.Task.with_threshold`); default the task's own (0.5 for
            most models, 0.35 for CRIS).
        autocast_dtype: None, ``torch.bfloat16`` or ``torch.float16``.
        batch_size: batch size when ``loader`` is a ``Dataset``.
        progress: show a tqdm progress bar (rank 0, only when stderr is a terminal).

    Returns:
        ``{score: mean}`` plus ``"count"``, the number of items scored.

    Raises:
        ValueError: a bad argument, or a loader without batches.
    """
    _check_autocast_dtype(autocast_dtype)
    _positive_int("batch_size", batch_size)
    _check_loader(loader, "loader")
    task = _task_for(model, task, loss)
    if threshold is not None:
        task = task.with_threshold(threshold)
    env = _distributed.setup()
    device = _resolve_device(model, device, env)
    task.to(device)
    return _evaluate(
        model,
        _eval_data(loader, batch_size, env),
        task=task,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=not _no_bar(progress, env),
    )


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    task: Task,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    items = 0
    was_training, task_training = model.training, task.training
    model.eval()
    task.eval()
    try:
        for batch in tqdm(loader, desc="eval", disable=None if progress else True, leave=False):
            batch = move_to_device(batch, device)
            with _autocast(device, autocast_dtype):
                scores = task.evaluation_step(model, batch)
            n = task.batch_size(batch)
            per_item = [v for v in scores.values() if isinstance(v, Tensor) and v.dim() == 1]
            items += per_item[0].numel() if per_item else n
            for name, value in scores.items():
                value = value.detach().double() if isinstance(value, Tensor) else value
                if isinstance(value, Tensor) and value.dim() == 1:
                    kept = value[~value.isnan()]
                    total, count = float(kept.sum()), kept.numel()
                else:
                    total, count = float(value) * n, n
                sums[name] = sums.get(name, 0.0) + total
                counts[name] = counts.get(name, 0) + count
    finally:
        model.train(was_training)
        task.train(task_training)
    names = sorted(sums)
    reduced = _distributed.all_reduce_sum(
        [*(sums[k] for k in names), *(counts[k] for k in names), items]
    )
    total_items = int(reduced[-1])
    if total_items == 0:
        raise ValueError("the evaluation loader has no batches: there is nothing to score")
    out = {}
    for j, name in enumerate(names):
        count = reduced[len(names) + j]
        out[name] = reduced[j] / count if count else math.nan
    out["count"] = total_items
    return out
