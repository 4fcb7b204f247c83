"""A plain, readable training loop for text-driven segmentation models.

The model contract: ``model(images, prompts)`` returns an object with ``.logits`` ``(B, C, H, W)`` at
the input resolution (C = 1 for one prompt per image); a bare logits tensor is accepted too. Batches
are the dicts of ``vlsegkit.data.collate_prompts``: ``image (B, 3, H, W)``, ``mask (B, C, H, W)``,
``prompt list[str]``.

``fit`` is deliberately one loop over epochs and batches with small helpers (device moves, the
forward pass, the optimiser step), so distributed training, resuming and LR schedulers can be added
without restructuring it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .losses import DiceBCELoss
from .metrics import MetricTracker, SegmentationMeter

__all__ = ["History", "evaluate", "fit", "seed_everything"]

_AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)


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


@dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        train_loss: mean training loss of each epoch (per sample).
        val: per epoch, the ``evaluate`` results on ``val_loader`` (``dice``, ``iou``, ``loss``,
            ``count``); empty without a validation loader.
        steps: optimiser steps taken.
    """

    train_loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0

    @property
    def epochs(self) -> int:
        """Number of (possibly partial, when ``max_steps`` stopped training) epochs run."""
        return len(self.train_loss)

    def metric(self, name: str) -> list[float]:
        """One validation metric over epochs, e.g. ``history.metric("dice")``."""
        return [record[name] for record in self.val]


# --------------------------------------------------------------------------- helpers
def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
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


# --------------------------------------------------------------------------- public loop
def fit(
    model: nn.Module,
    train_loader: Iterable[dict[str, Any]],
    *,
    val_loader: Iterable[dict[str, Any]] | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    grad_accum_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    max_steps: int | None = None,
) -> History:
    """Train ``model`` on ``train_loader``, validating after every epoch.

    Each optimiser step averages the gradients of ``grad_accum_steps`` consecutive batches (each
    batch loss is divided by the number of batches in its group), so with a mean-reduced loss and no
    batch-dependent layers, ``k`` batches of ``b`` give the same update as one batch of ``k·b``.
    A shorter last group in an epoch is averaged over its own size when the loader has a length.

    Args:
        model: obeys the contract in the module docstring.
        train_loader: iterable of ``collate_prompts`` batches (usually a ``DataLoader``).
        val_loader: optional loader scored with ``evaluate`` after every epoch.
        epochs: number of passes over ``train_loader``.
        lr: AdamW learning rate (ignored when ``optimizer`` is given).
        weight_decay: AdamW weight decay (ignored when ``optimizer`` is given).
        loss_fn: ``loss_fn(logits, masks) -> scalar``; default ``DiceBCELoss()`` (0.5 Dice + 0.5 BCE).
        optimizer: a ready optimiser; default AdamW over ``model.trainable_parameters()`` if the
            model defines it, else over every parameter with ``requires_grad``.
        grad_accum_steps: batches per optimiser step.
        autocast_dtype: None (full precision), ``torch.bfloat16`` or ``torch.float16`` (the latter
            with a gradient scaler).
        max_grad_norm: clip the global gradient norm to this value before each step.
        device: move the model and batches here; default the model's current device.
        progress: show a tqdm progress bar.
        log_fn: called with a dict after every optimiser step (``step``, ``epoch``, ``loss``,
            ``lr``) and after every epoch (``step``, ``epoch``, ``train_loss`` and ``val_*``).
        max_steps: stop after this many optimiser steps.

    Returns:
        ``History`` with per-epoch training loss and validation metrics.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    _check_autocast_dtype(autocast_dtype)

    device = _resolve_device(model, device)
    if optimizer is None:
        params = _trainable_parameters(model)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_fn = DiceBCELoss() if loss_fn is None else loss_fn
    # Loss scaling is only needed for fp16, whose small range underflows gradients.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    history = History()

    for epoch in range(epochs):
        model.train()
        running = MetricTracker()
        optimizer.zero_grad(set_to_none=True)
        num_batches = _num_batches(train_loader)
        pending = 0  # batches whose gradients are accumulated but not yet applied
        bar = tqdm(
            train_loader,
            total=num_batches,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
        )
        for index, batch in enumerate(bar):
            images, masks, prompts = _unpack(batch, device)
            with _autocast(device, autocast_dtype):
                logits = _logits(model(images, prompts), masks)
            loss = loss_fn(logits.float(), masks)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch}, batch {index}")
            scaler.scale(loss / _group_size(index, grad_accum_steps, num_batches)).backward()
            running.update("loss", value, n=images.shape[0])
            pending += 1
            bar.set_postfix(loss=f"{value:.4f}")
            if pending == grad_accum_steps or index + 1 == num_batches:
                _optimizer_step(optimizer, scaler, params, max_grad_norm)
                pending = 0
                history.steps += 1
                if log_fn is not None:
                    lr_now = optimizer.param_groups[0]["lr"]
                    log_fn({"step": history.steps, "epoch": epoch, "loss": value, "lr": lr_now})
                if max_steps is not None and history.steps >= max_steps:
                    break
        if pending:  # a loader without len() ended mid-group
            _optimizer_step(optimizer, scaler, params, max_grad_norm)
            history.steps += 1
        bar.close()

        history.train_loss.append(running.compute().get("loss", math.nan))
        record = {"step": history.steps, "epoch": epoch, "train_loss": history.train_loss[-1]}
        if val_loader is not None:
            metrics = evaluate(
                model, val_loader, device=device, autocast_dtype=autocast_dtype, loss_fn=loss_fn
            )
            history.val.append(metrics)
            record.update({f"val_{k}": v for k, v in metrics.items()})
        if log_fn is not None:
            log_fn(record)
        if max_steps is not None and history.steps >= max_steps:
            break
    return history


def _group_size(index: int, grad_accum_steps: int, num_batches: int | None) -> int:
    """How many batches share the optimiser step that batch ``index`` belongs to."""
    if num_batches is None:
        return grad_accum_steps
    group_start = index - index % grad_accum_steps
    return min(grad_accum_steps, num_batches - group_start)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device | str | None = None,
    threshold: float = 0.5,
    autocast_dtype: torch.dtype | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    empty_score: float = 1.0,
    progress: bool = False,
) -> dict[str, float]:
    """Mean per-image Dice, IoU and loss of ``model`` on ``loader``.

    Predictions are ``sigmoid(logits) > threshold``; Dice and IoU are per image and averaged over
    images (``vlsegkit.metrics``; empty prediction on an empty mask scores ``empty_score``). For
    several prompts per image (``C > 1``) every (image, prompt) pair counts as one image. The model's
    train/eval mode is restored afterwards.

    Args:
        model: obeys the contract in the module docstring.
        loader: iterable of ``collate_prompts`` batches.
        device: where to run; default the model's device (the model is moved if given).
        threshold: probability threshold.
        autocast_dtype: None, ``torch.bfloat16`` or ``torch.float16``.
        loss_fn: loss to report; default ``DiceBCELoss()``.
        empty_score: score of an empty prediction on an empty mask.
        progress: show a tqdm progress bar.

    Returns:
        ``{"dice": float, "iou": float, "loss": float, "count": number of (image, prompt) pairs}``.
    """
    _check_autocast_dtype(autocast_dtype)
    device = _resolve_device(model, device)
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
    return {**meter.compute(), "loss": losses.compute().get("loss", math.nan), "count": meter.count}


def _flatten_prompts(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B·C, 1, H, W)``: each (image, prompt) pair is scored as one image."""
    return x.reshape(-1, 1, *x.shape[2:])
