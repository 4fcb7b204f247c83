"""A plain, readable training loop for text-driven segmentation models.

The model contract: ``model(images, prompts)`` returns an object with ``.logits`` ``(B, C, H, W)`` at
the input resolution (C = 1 for one prompt per image); a bare logits tensor is accepted too. Batches
are the dicts of ``vlsegkit.data.collate_prompts``: ``image (B, 3, H, W)``, ``mask (B, C, H, W)``,
``prompt list[str]``.

``fit`` is one loop over epochs and batches with small helpers (device moves, the forward pass, the
optimiser step, checkpoints). The same code runs in one process or under
``torchrun --nproc_per_node N`` (PyTorch DDP): the process group is joined from torchrun's
environment, the model is wrapped in ``DistributedDataParallel``, every process reads its own shard
of the data, losses and metrics are reduced over processes, and only rank 0 logs and writes files.

Runs are resumable mid-epoch: the data order of every epoch is a seeded permutation
(``vlsegkit._distributed.ResumableSampler``), and a checkpoint holds the model, optimiser,
scheduler, gradient scaler, Python/numpy/torch RNG states, the position in the data and the
history. A resumed run ends with the same weights as an uninterrupted one.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from tqdm.auto import tqdm

from . import _checkpoint, _distributed
from ._checkpoint import find_checkpoint, read_checkpoint
from ._distributed import DistEnv, ResumableSampler, ShardSampler
from .data import collate_prompts
from .hub import load_state_dict_strict
from .losses import DiceBCELoss
from .metrics import MetricTracker, SegmentationMeter

__all__ = [
    "EarlyStopping",
    "History",
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
        val: per epoch, the ``evaluate`` results on ``val_loader`` (``dice``, ``iou``, ``loss``,
            ``count``); empty without a validation loader.
        steps: optimiser steps taken.
        monitor: the epoch-record key that selects the best checkpoint (e.g. ``"val_dice"``).
        best_value: best value of ``monitor`` so far (None before the first epoch ends).
        best_epoch: epoch (0-based) of ``best_value``.
        stopped_early: whether ``early_stopping`` ended the run.
    """

    train_loss: list[float] = field(default_factory=list)
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


def _unpack(batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, list[str]]:
    missing = {"image", "mask", "prompt"} - set(batch)
    if missing:
        raise ValueError(
            f"batch must be a dict with 'image', 'mask' and 'prompt' (see collate_prompts); "
            f"missing {sorted(missing)}"
        )
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    return images, masks, batch["prompt"]


def _logits(output: Any, masks: Tensor) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"model must return logits or an object with .logits, got {type(output)}")
    if logits.shape != masks.shape:
        raise ValueError(
            f"model logits have shape {tuple(logits.shape)} but batch['mask'] has shape "
            f"{tuple(masks.shape)}; the model must return (B, C, H, W) logits at the input resolution"
        )
    return logits


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


def _group_size(index: int, grad_accum_steps: int, num_batches: int | None) -> int:
    """How many batches share the optimiser step that batch ``index`` belongs to."""
    if num_batches is None:
        return grad_accum_steps
    group_start = index - index % grad_accum_steps
    return min(grad_accum_steps, num_batches - group_start)


def _mean_over_processes(value: float, count: int, env: DistEnv) -> tuple[float, int]:
    """Sample-weighted mean of a per-process batch mean over all processes, and the sample count."""
    if not env.enabled:
        return value, count
    total, n = _distributed.all_reduce_sum([value * count, count])
    return (total / n if n else math.nan), int(n)


def _flatten_prompts(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B·C, 1, H, W)``: each (image, prompt) pair is scored as one image."""
    return x.reshape(-1, 1, *x.shape[2:])


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


def _remake(loader: DataLoader, sampler: Any, generator: torch.Generator | None) -> DataLoader:
    extra = {"pin_memory_device": loader.pin_memory_device} if loader.pin_memory_device else {}
    if hasattr(loader, "in_order"):  # torch >= 2.6
        extra["in_order"] = loader.in_order
    return DataLoader(
        loader.dataset,
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


class _TrainData:
    """The training batches of every epoch, in a reproducible, shardable, resumable order.

    Map-style datasets and plain ``DataLoader``s (sequential or shuffled) get a
    ``ResumableSampler``: the same batches whatever the process count, and a mid-epoch start that
    skips batches without loading them. Anything else (custom samplers, iterable datasets, lists
    of batches) is used as given: ``set_epoch`` is called on its sampler if it has one, and resuming
    skips batches by iterating over them, which is exact only if that iterable is deterministic.
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
            self.loader = _remake(loader, self.sampler, torch.Generator())
        self.num_batches = _num_batches(self.loader)

    @property
    def seed(self) -> int | None:
        return None if self.sampler is None else self.sampler.seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        if self.sampler is not None and value is not None:
            self.sampler.seed = value

    def epoch(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        """The batches of ``epoch`` after its first ``skip``."""
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

    def state_dict(self) -> dict[str, Any]:
        return {
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
        _checkpoint.save_checkpoint(
            root, kind, model_state=model.state_dict(), trainer_state=state, info=info
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
    ) -> None:
        self.log_fn = log_fn if enabled else None
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir is not None and enabled else None
        self.writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self._records_before(resumed) if resumed is not None else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- public loop
def fit(
    model: nn.Module,
    train_loader: Iterable[dict[str, Any]] | Dataset,
    *,
    val_loader: Iterable[dict[str, Any]] | Dataset | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    shuffle: bool = True,
    num_workers: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: str | LRScheduler | ReduceLROnPlateau | None = None,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    scheduler_interval: str = "step",
    grad_accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    early_stopping: EarlyStopping | None = None,
    monitor: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str | os.PathLike = False,
    log_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    ddp_kwargs: dict[str, Any] | None = None,
) -> History:
    """Train ``model`` on ``train_loader``, validating after every epoch.

    Each optimiser step averages the gradients of ``grad_accum_steps`` consecutive batches (each
    batch loss is divided by the number of batches in its group), so with a mean-reduced loss and no
    batch-dependent layers, ``k`` batches of ``b`` give the same update as one batch of ``k·b``.
    A shorter last group in an epoch is averaged over its own size when the loader has a length.

    Under ``torchrun --nproc_per_node N`` the same call trains with DDP: each process reads
    ``1/N`` of every epoch (per-process batch ``j`` of all processes together is single-process
    batch ``j`` of ``N``-times the size), gradients are averaged over processes, and losses and
    metrics are reduced over them; the progress bar, ``log_fn``, the log files and the checkpoints
    are handled by rank 0 only.

    Args:
        model: obeys the contract in the module docstring.
        train_loader: a ``DataLoader`` (or any iterable) of ``collate_prompts`` batches, or a
            map-style ``Dataset`` of items (batched here with ``batch_size``, ``shuffle`` and
            ``num_workers``). A plain ``DataLoader`` with a sequential or shuffled sampler is re-made
            with fit's resumable, shardable sampler (same batch size, collate function, workers);
            its ``generator`` seeds the shuffle when ``seed`` is None.
        val_loader: optional loader (or ``Dataset``) scored with ``evaluate`` after every epoch.
        epochs: number of passes over the training data.
        lr: AdamW learning rate (ignored when ``optimizer`` is given).
        weight_decay: AdamW weight decay (ignored when ``optimizer`` is given).
        batch_size: per-process batch size when ``train_loader`` / ``val_loader`` is a ``Dataset``.
        shuffle: shuffle a training ``Dataset`` every epoch.
        num_workers: ``DataLoader`` workers for a training ``Dataset``.
        loss_fn: ``loss_fn(logits, masks) -> scalar``; default ``DiceBCELoss()`` (0.5 Dice + 0.5 BCE).
        optimizer: a ready optimiser; default AdamW over ``model.trainable_parameters()`` if the
            model defines it, else over every parameter with ``requires_grad``.
        scheduler: ``"cosine"`` (per optimiser step: linear warmup over ``warmup_steps``, then
            cosine decay to ``min_lr_ratio·lr`` at the last step), ``"plateau"``
            (``ReduceLROnPlateau`` with torch's defaults, stepped each epoch with ``monitor``), None
            (constant, after the optional warmup), or a torch scheduler built on ``optimizer``
            (stepped every ``scheduler_interval``; a ``ReduceLROnPlateau`` gets ``monitor``).
        warmup_steps: optimiser steps of linear warmup (``scheduler`` ``"cosine"`` or None): step
            ``t < warmup_steps`` uses ``lr·(t + 1)/(warmup_steps + 1)``.
        min_lr_ratio: final learning rate of ``"cosine"`` as a fraction of ``lr``.
        scheduler_interval: ``"step"`` or ``"epoch"``: when a given torch scheduler is stepped.
        grad_accum_steps: batches per optimiser step.
        autocast_dtype: None (full precision), ``torch.bfloat16`` or ``torch.float16`` (the latter
            with a gradient scaler).
        max_grad_norm: clip the global gradient norm to this value before each step.
        early_stopping: an ``EarlyStopping`` rule checked after every epoch.
        monitor: epoch-record key that picks the best checkpoint and drives ``"plateau"`` (same
            names as ``EarlyStopping.metric``; mode ``"min"`` if it contains ``"loss"``, else
            ``"max"``). Default: ``early_stopping``'s metric (and mode), else ``"val_dice"`` with a
            ``val_loader``, else ``"train_loss"``.
        checkpoint_dir: write checkpoints here (rank 0): ``last`` after every epoch and every
            ``checkpoint_every`` steps, ``best`` whenever ``monitor`` improves. Each holds
            ``model.safetensors`` and the complete training state; see ``find_checkpoint``.
        checkpoint_every: also write ``last`` every this many optimiser steps within epochs.
        resume: True resumes from ``checkpoint_dir``'s last checkpoint if there is one (else
            starts afresh, so the same command can be re-run after a crash); a path resumes from
            that checkpoint folder or checkpoint directory. The epoch order, RNG states and position
            in the data are restored, so the result equals an uninterrupted run's. The batch size,
            ``grad_accum_steps`` and process count must match to resume mid-epoch; an epoch cut
            short by ``max_steps`` counts as finished.
        log_dir: append per-step and per-epoch records as JSON lines to ``log_dir/metrics.jsonl``
            (rank 0; truncated by a fresh run, trimmed to the checkpoint by a resumed one).
        tensorboard: also write the records as TensorBoard scalars to ``log_dir`` (needs the
            ``tensorboard`` package).
        log_fn: called (on rank 0) with a dict after every optimiser step (``step``, ``epoch``,
            ``loss`` = mean loss of the step's batches over all processes, ``lr`` used by the step)
            and after every epoch (``step``, ``epoch``, ``train_loss`` and ``val_*``).
        progress: show a tqdm progress bar (rank 0).
        max_steps: stop after this many optimiser steps.
        seed: seed Python, numpy and torch (``seed_everything``) and the data order at the start;
            None keeps the current global RNG state and draws the data order from it.
        device: move the model and batches here; default the model's current device. Under
            torchrun, ``"cuda"`` means ``cuda:LOCAL_RANK``.
        ddp_kwargs: extra ``DistributedDataParallel`` arguments (e.g.
            ``{"find_unused_parameters": True}``).

    Returns:
        ``History`` with per-epoch training loss and validation metrics.

    Raises:
        ValueError: a bad argument (named in the message).
        CheckpointError: the checkpoint to resume from is missing, incomplete or corrupt; nothing
            is loaded then.
        FloatingPointError: a non-finite training loss.
    """
    _check_fit_args(
        epochs=epochs,
        grad_accum_steps=grad_accum_steps,
        max_steps=max_steps,
        autocast_dtype=autocast_dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        scheduler_interval=scheduler_interval,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        log_dir=log_dir,
        tensorboard=tensorboard,
    )
    keys = ["train_loss"] + ([] if val_loader is None else ["val_dice", "val_iou", "val_loss"])
    monitor, monitor_mode, stop_key = _resolve_monitor(monitor, early_stopping, keys)
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    resume_from = _resume_path(resume, checkpoint_dir)
    env = _distributed.setup()
    if seed is not None:
        seed_everything(seed)

    # Read (and verify) the checkpoint before touching anything, so a bad one changes nothing.
    model_state, state = read_checkpoint(resume_from) if resume_from else (None, None)
    if model_state is not None:
        load_state_dict_strict(model, model_state, source=str(resume_from))
    device = _resolve_device(model, device, env)
    if optimizer is None:
        params = _trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    data = _TrainData(
        train_loader,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        seed=seed,
        env=env,
    )
    val_data = None if val_loader is None else _eval_data(val_loader, batch_size, env)
    num_batches = data.num_batches
    scheduler, per_epoch = _build_scheduler(
        scheduler,
        optimizer,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        interval=scheduler_interval,
        total_steps=_total_steps(num_batches, grad_accum_steps, epochs, max_steps),
        mode=monitor_mode,
    )
    loss_fn = DiceBCELoss() if loss_fn is None else loss_fn
    # Loss scaling is only needed for fp16, whose small range underflows gradients.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    if early_stopping is not None:
        early_stopping.reset()
    history = History(monitor=monitor)
    run = _Run(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        early_stopping=early_stopping,
        data=data,
        history=history,
        grad_accum_steps=grad_accum_steps,
        world_size=env.world_size,
    )
    if state is not None:
        run.load_state_dict(state)
    net = _wrap_ddp(model, device, env, ddp_kwargs)
    if checkpoint_dir is not None and env.is_main:
        _checkpoint.remove_stale(checkpoint_dir)
    log = _RunLog(
        log_dir=log_dir,
        log_fn=log_fn,
        tensorboard=tensorboard,
        enabled=env.is_main,
        resumed=run if state is not None else None,
    )
    if state is not None:  # last, so that nothing above consumes the restored random streams
        _checkpoint.restore_rng(state["rng"][env.rank % len(state["rng"])])
    step_loss = MetricTracker()  # loss of the batches accumulated since the last step

    def done() -> bool:
        return history.stopped_early or (max_steps is not None and history.steps >= max_steps)

    def take_step(epoch: int) -> None:
        lr_now = optimizer.param_groups[0]["lr"]
        _optimizer_step(optimizer, scaler, params, max_grad_norm)
        history.steps += 1
        if scheduler is not None and not per_epoch:
            scheduler.step()
        loss = step_loss.compute().get("loss", math.nan)
        log({"step": history.steps, "epoch": epoch, "loss": loss, "lr": lr_now})
        step_loss.reset()

    start_epoch, start_batch = run.epoch, run.batch
    for epoch in range(start_epoch, epochs):
        if done():
            break
        skip = start_batch if epoch == start_epoch else 0
        if not skip:
            run.running = MetricTracker()
        run.epoch, run.batch = epoch, skip
        net.train()
        optimizer.zero_grad(set_to_none=True)
        pending = 0  # batches whose gradients are accumulated but not yet applied
        bar = tqdm(
            data.epoch(epoch, skip),
            total=num_batches,
            initial=skip,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress or not env.is_main,
        )
        for index, batch in enumerate(bar, start=skip):
            images, masks, prompts = _unpack(batch, device)
            closes_group = pending + 1 == grad_accum_steps or index + 1 == num_batches
            with _no_sync(net, not closes_group and num_batches is not None):
                with _autocast(device, autocast_dtype):
                    logits = _logits(net(images, prompts), masks)
                loss = loss_fn(logits.float(), masks)
                value, count = _mean_over_processes(loss.item(), images.shape[0], env)
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at epoch {epoch}, batch {index}")
                scaler.scale(loss / _group_size(index, grad_accum_steps, num_batches)).backward()
            run.running.update("loss", value, n=count)
            step_loss.update("loss", value, n=count)
            pending += 1
            bar.set_postfix(loss=f"{value:.4f}")
            if closes_group:
                pending, run.batch = 0, index + 1
                take_step(epoch)
                # (At the end of an epoch the epoch-level checkpoint follows right after.)
                ends_epoch = index + 1 == num_batches
                if checkpoint_every and history.steps % checkpoint_every == 0 and not ends_epoch:
                    _save(checkpoint_dir, "last", model, run, env)
                if done():
                    break
        if pending:  # a loader without len() ended mid-group
            take_step(epoch)
        bar.close()

        record = {"step": history.steps, "epoch": epoch}
        record["train_loss"] = run.running.compute().get("loss", math.nan)
        if val_data is not None:
            metrics = _evaluate(
                model, val_data, device=device, autocast_dtype=autocast_dtype, loss_fn=loss_fn
            )
            history.val.append(metrics)
            record.update({f"val_{k}": v for k, v in metrics.items()})
        history.train_loss.append(record["train_loss"])
        run.epoch, run.batch = epoch + 1, 0
        improved = _end_of_epoch(run, record, monitor, monitor_mode, stop_key, per_epoch)
        log(record)
        if improved:
            _save(checkpoint_dir, "best", model, run, env, metric=monitor, value=record[monitor])
        _save(checkpoint_dir, "last", model, run, env)
    log.close()
    return history


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
    monitor: str | None, early_stopping: EarlyStopping | None, keys: list[str]
) -> tuple[str, str, str | None]:
    """``(monitor key, its mode, early-stopping key)``, validated against the epoch-record keys."""
    stop_key = None
    if early_stopping is not None:
        stop_key = _record_key(early_stopping.metric, keys, "early_stopping.metric")
    if monitor is None and early_stopping is not None:
        return stop_key, early_stopping.resolved_mode, stop_key
    if monitor is None:
        monitor = "val_dice" if "val_dice" in keys else "train_loss"
    key = _record_key(monitor, keys, "monitor")
    return key, _infer_mode(key), stop_key


def _check_fit_args(
    *,
    epochs: int,
    grad_accum_steps: int,
    max_steps: int | None,
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    num_workers: int,
    warmup_steps: int,
    min_lr_ratio: float,
    scheduler_interval: str,
    checkpoint_dir: Any,
    checkpoint_every: int | None,
    log_dir: Any,
    tensorboard: bool,
) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    _check_autocast_dtype(autocast_dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if scheduler_interval not in ("step", "epoch"):
        raise ValueError(
            f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
        )
    if checkpoint_every is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every}")
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir")
    if tensorboard:
        if log_dir is None:
            raise ValueError("tensorboard=True needs log_dir")
        try:
            import tensorboard as _tb  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "tensorboard=True needs the 'tensorboard' package (pip install tensorboard)"
            ) from e


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]] | Dataset,
    *,
    device: torch.device | str | None = None,
    threshold: float = 0.5,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    empty_score: float = 1.0,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Mean per-image Dice, IoU and loss of ``model`` on ``loader``.

    Predictions are ``sigmoid(logits) > threshold``; Dice and IoU are per image and averaged over
    images (``vlsegkit.metrics``; empty prediction on an empty mask scores ``empty_score``). For
    several prompts per image (``C > 1``) every (image, prompt) pair counts as one image. The model's
    train/eval mode is restored afterwards.

    Under ``torchrun`` every process must call it: a ``Dataset`` or plain ``DataLoader`` is split
    into disjoint shares (no padding, so no image counts twice) and the sums are all-reduced, so each
    process returns the scores of the whole set. Other iterables are used as given.

    Args:
        model: obeys the contract in the module docstring.
        loader: iterable of ``collate_prompts`` batches, or a map-style ``Dataset`` of items.
        device: where to run; default the model's device (the model is moved if given).
        threshold: probability threshold.
        autocast_dtype: None, ``torch.bfloat16`` or ``torch.float16``.
        loss_fn: loss to report; default ``DiceBCELoss()``.
        empty_score: score of an empty prediction on an empty mask.
        batch_size: batch size when ``loader`` is a ``Dataset``.
        progress: show a tqdm progress bar (rank 0).

    Returns:
        ``{"dice": float, "iou": float, "loss": float, "count": number of (image, prompt) pairs}``.
    """
    _check_autocast_dtype(autocast_dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    env = _distributed.setup()
    device = _resolve_device(model, device, env)
    return _evaluate(
        model,
        _eval_data(loader, batch_size, env),
        device=device,
        threshold=threshold,
        autocast_dtype=autocast_dtype,
        loss_fn=loss_fn,
        empty_score=empty_score,
        progress=progress and env.is_main,
    )


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    threshold: float = 0.5,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    empty_score: float = 1.0,
    progress: bool = False,
) -> dict[str, float]:
    loss_fn = DiceBCELoss() if loss_fn is None else loss_fn
    meter = SegmentationMeter(threshold=threshold, empty_score=empty_score)
    losses = MetricTracker()
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
            images, masks, prompts = _unpack(batch, device)
            with _autocast(device, autocast_dtype):
                logits = _logits(model(images, prompts), masks)
            logits = logits.float()
            losses.update("loss", loss_fn(logits, masks).item(), n=images.shape[0])
            meter.update(_flatten_prompts(torch.sigmoid(logits)), _flatten_prompts(masks))
    finally:
        model.train(was_training)
    # Per-process sums and counts, all-reduced: the means are over the whole set.
    local = []
    for scores in meter.scores().values():  # dice, iou
        kept = scores[~scores.isnan()].double()
        local += [float(kept.sum()), kept.numel()]
    local += [losses.sums.get("loss", 0.0), losses.counts.get("loss", 0), meter.count]
    d_sum, d_n, i_sum, i_n, l_sum, l_n, count = _distributed.all_reduce_sum(local)
    return {
        "dice": d_sum / d_n if d_n else math.nan,
        "iou": i_sum / i_n if i_n else math.nan,
        "loss": l_sum / l_n if l_n else math.nan,
        "count": int(count),
    }
