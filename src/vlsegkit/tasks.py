"""Tasks: how a batch becomes named loss terms (training) and scores (evaluation).

``fit`` and ``evaluate`` are loops over a :class:`Task`; everything specific to a kind of training
lives in the task, so one loop serves segmentation with any loss, contrastive fine-tuning on
image-text pairs without masks, and distillation from a frozen teacher::

    terms = task.training_step(model, batch)     # {"loss": scalar, "<term>": scalar, ...}
    terms["loss"].backward()
    scores = task.evaluation_step(model, batch)  # {"loss": scalar, "dice": (N,), ...}

Every model names its paper's task (``model.default_task()``): CLIPSeg trains with
``0.5 Dice + 0.5 BCE``, MedCLIPSeg with ``0.5 Dice + 0.5 BCE + 0.1 SoftCon`` (eq. 23), so
``fit(model, loader)`` reproduces the paper's objective.

A task is an ``nn.Module``: modules it owns (a loss with parameters, a frozen teacher) move to the
training device with it. It must call the model through ``model(...)`` (``fit`` may hand it a
``DistributedDataParallel`` wrapper, whose gradient synchronisation runs in ``forward``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .metrics import dice_score, iou_score

__all__ = ["OutputLoss", "SegmentationTask", "Task", "check_unit_range", "move_to_device"]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _check_threshold(threshold: Any) -> float:
    """``threshold`` as a float in the open interval (0, 1), or a ValueError."""
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (ok and math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    return float(threshold)


def check_unit_range(name: str, x: Tensor) -> None:
    """Raise if ``x`` has values outside [0, 1] or NaN (one reduction and one sync per call).

    Masks read as 0/255, or -1 / 1 labels, would otherwise train on nonsense with a finite loss.
    """
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.dtype == torch.bool or torch.compiler.is_compiling():
        return  # (compiled graphs skip data-dependent checks: they would sync and break the graph)
    lo, hi = torch.aminmax(x.detach().float())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons
        raise ValueError(
            f"{name} must hold values in [0, 1] (binary masks or soft labels), got values in "
            f"[{lo}, {hi}]; 0/255 masks must be divided by 255"
        )


@runtime_checkable
class OutputLoss(Protocol):
    """A loss that reads the model's whole output and reports named terms.

    ``terms(output, target)`` returns ``{"loss": total, "<name>_loss": part, ...}`` (scalars);
    :class:`SegmentationTask` logs every term. Losses without ``terms`` are called as
    ``loss(logits, target) -> scalar``.
    """

    def terms(self, output: Any, target: Tensor) -> dict[str, Tensor]: ...


class Task(nn.Module):
    """Base class of training tasks (see the module docstring).

    Subclasses implement :meth:`training_step` and :meth:`evaluation_step`. ``monitor`` names the
    evaluation score that selects the best checkpoint by default (``"val_" + monitor``).
    """

    #: Evaluation score that picks the best checkpoint; higher is better unless it names a loss.
    monitor: str = "loss"
    #: Scores ``evaluation_step`` always returns (what ``monitor`` / early stopping may name).
    metrics: tuple[str, ...] = ("loss",)

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """Loss terms of one batch: ``{"loss": scalar to minimise, name: scalar, ...}``."""
        raise NotImplementedError  # pragma: no cover

    def evaluation_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """Scores of one batch: scalars (batch means) or ``(N,)`` tensors (one value per item;
        NaN values are left out of the means). Called under ``torch.no_grad`` in eval mode."""
        terms = self.training_step(model, batch)
        return {k: v.detach() for k, v in terms.items()}

    def batch_size(self, batch: Any) -> int:
        """Number of samples in ``batch`` (weights batch means across batches and processes)."""
        if isinstance(batch, Mapping):
            for value in batch.values():
                if isinstance(value, Tensor) and value.dim() > 0:
                    return int(value.shape[0])
                if isinstance(value, (list, tuple)):
                    return len(value)
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return int(batch[0].shape[0])
        raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}")

    def train(self, mode: bool = True) -> Task:
        """Tasks keep what they own frozen (e.g. a teacher) in eval mode; see subclasses."""
        return super().train(mode)

    def with_threshold(self, threshold: float) -> Task:
        """A copy of this task that binarises probabilities at ``threshold`` (same class, same
        loss and settings; the loss module itself is shared, not copied, but assigning another
        loss to the copy leaves this task's).

        Tasks that score binarised predictions (:class:`SegmentationTask` and its subclasses,
        :class:`~vlsegkit.CoTexNetTask`) keep the threshold in a ``threshold`` attribute; any
        other task raises, as a threshold would be silently ignored.

        Raises:
            ValueError: the task has no probability threshold, or ``threshold`` is not in (0, 1).
        """
        if not isinstance(getattr(self, "threshold", None), float):
            raise ValueError(
                f"{type(self).__name__} scores no binarised predictions, so a probability "
                "threshold does not apply to it"
            )
        task = copy.copy(self)
        # a module's registries are dicts: give the copy its own, so that assigning a submodule
        # (task.loss = ...) or a hook on it leaves this task alone
        for name in ("_parameters", "_buffers", "_modules"):
            setattr(task, name, dict(getattr(self, name)))
        task.threshold = _check_threshold(threshold)
        return task


class SegmentationTask(Task):
    """Text-prompted segmentation: ``model(images, prompts).logits`` against masks.

    Batches are ``collate_prompts`` dicts: ``image (B, 3, H, W)``, ``mask (B, C, H, W)`` in [0, 1]
    and ``prompt`` (B strings, or B lists of C strings) -- or, instead of ``prompt``, pre-tokenised
    ``input_ids`` (+ ``attention_mask``) ``(T, L)`` passed to ``model(image, input_ids=...,
    attention_mask=...)``, which keeps the step tensor-only for ``torch.compile``. Training returns the loss terms; evaluation
    adds per-(image, prompt) Dice and IoU of ``sigmoid(logits) > threshold`` (``vlsegkit.metrics``,
    empty prediction on an empty mask scoring ``empty_score``).

    Args:
        loss: an :class:`OutputLoss` (e.g. :class:`~vlsegkit.losses.MedCLIPSegLoss`,
            :class:`~vlsegkit.losses.DiceBCELoss`), or any ``loss(logits, masks) -> scalar``;
            default ``DiceBCELoss()`` (0.5 Dice + 0.5 BCE).
        threshold: probability threshold of the evaluation scores, in (0, 1).
        empty_score: Dice / IoU of an empty prediction on an empty mask.
    """

    monitor = "dice"
    metrics = ("loss", "dice", "iou")

    def __init__(
        self, *, loss: nn.Module | Any = None, threshold: float = 0.5, empty_score: float = 1.0
    ) -> None:
        super().__init__()
        from .losses import DiceBCELoss

        self.loss = DiceBCELoss() if loss is None else loss
        self.threshold = _check_threshold(threshold)
        self.empty_score = float(empty_score)

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor, Any]:
        """``(images, masks, prompts)`` of a batch, with clear errors for anything else."""
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"a segmentation batch must be a dict with 'image', 'mask' and 'prompt' (see "
                f"vlsegkit.data.collate_prompts), got {type(batch).__name__}"
            )
        # pre-tokenised prompts ("input_ids" + optional "attention_mask", one row per image or T
        # rows for every image) may replace the strings: the pass is then tensor-only (torch.compile)
        missing = {"image", "mask"} - set(batch)
        if "prompt" not in batch and "input_ids" not in batch:
            missing.add("prompt")
        if missing:
            raise ValueError(
                "a segmentation batch must be a dict with 'image', 'mask' and 'prompt' (see "
                f"vlsegkit.data.collate_prompts); missing {sorted(missing)}"
            )
        images, masks = batch["image"], batch["mask"]
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"batch['image'] must be a (B, 3, H, W) tensor with B >= 1, got {shape}"
            )
        if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[0] != images.shape[0]:
            shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(
                f"batch['mask'] must be a (B={images.shape[0]}, C, H, W) tensor, got {shape}"
            )
        return images, masks, batch.get("prompt")

    def _forward(self, model: nn.Module, batch: Any) -> tuple[Any, Tensor, Tensor]:
        images, masks, prompts = self.unpack(batch)
        check_unit_range("batch['mask']", masks)
        if prompts is None:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            output = model(images, input_ids=ids, attention_mask=mask)
        else:
            output = model(images, prompts)
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"the model must return logits or an object with .logits, got {type(output)}"
            )
        if logits.shape != masks.shape:
            raise ValueError(
                f"model logits have shape {tuple(logits.shape)} but batch['mask'] has shape "
                f"{tuple(masks.shape)}; the model must return (B, C, H, W) logits at the input "
                "resolution"
            )
        return output, logits, masks

    def _terms(self, output: Any, logits: Tensor, masks: Tensor) -> dict[str, Tensor]:
        if isinstance(self.loss, OutputLoss):
            terms = dict(self.loss.terms(output, masks.to(logits.dtype)))
            if "loss" not in terms:
                raise ValueError(f"{type(self.loss).__name__}.terms must return a 'loss' entry")
            return terms
        return {"loss": self.loss(logits.float(), masks.to(torch.float32))}

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        output, logits, masks = self._forward(model, batch)
        return self._terms(output, logits, masks)

    def evaluation_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        output, logits, masks = self._forward(model, batch)
        scores = {k: v.detach() for k, v in self._terms(output, logits, masks).items()}
        # every (image, prompt) pair is scored as one image
        probs = torch.sigmoid(logits.float()).reshape(-1, 1, *logits.shape[2:])
        target = masks.reshape(-1, 1, *masks.shape[2:])
        kw = {"threshold": self.threshold, "empty_score": self.empty_score}
        scores["dice"] = dice_score(probs, target, **kw)
        scores["iou"] = iou_score(probs, target, **kw)
        return scores

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, empty_score={self.empty_score}"
