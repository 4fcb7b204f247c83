"""Weak supervision on zero-shot pseudo-labels with checkpoint ensembling (MedCLIP-SAMv2 §3.3).

Koleilat et al. train a segmenter (nnU-Net, 2d) from scratch on the zero-shot masks of the training
images, in one run of ``E`` epochs split into ``D`` cycles with a cyclic learning rate (Zhao et al.,
"Efficient Bayesian uncertainty estimation for nnU-Net", MICCAI 2022); the last ``G_d`` checkpoints
of every cycle are kept, the prediction is the mean probability of the ``G = D · G_d`` checkpoints
(Eq. 21) and the uncertainty is the entropy of that mean (Eqs. 22-23). The paper's setting: 600
epochs, 3 cycles, 10 checkpoints per cycle, initial learning rate 0.01.

Here any segmenter trains that way through :func:`vlsegkit.train.fit`:

* :class:`CyclicSchedule` -- the per-epoch learning-rate factor and the epochs whose weights are kept;
* :class:`PseudoLabelTask` -- the loss on pseudo-labels, for text-prompted VLSMs
  (``model(images, prompts)``) and plain image-only networks such as MONAI's ``UNet``
  (``model(images)``, ``pip install "vlsegkit[metrics]"`` brings MONAI);
* :func:`fit_checkpoint_ensemble` -- ``fit`` with nnU-Net's SGD, the schedule, and the kept weights
  written as safetensors; it returns a :class:`CheckpointEnsemble`;
* :class:`CheckpointEnsemble` -- mean probability and entropy over the checkpoints, through the
  shared :mod:`vlsegkit.uncertainty` statistics (aleatoric / epistemic split included);
* :func:`export_nnunet_raw` -- the pseudo-labels in nnU-Net v2's raw-dataset layout, for training
  nnU-Net itself.

Paper and released code differ (the released code is a patched nnU-Net v2); the paper is the
default and the release a named option:

* learning rate within a cycle of ``T_c = E / D`` epochs, at epoch ``t_c`` of the cycle: the paper
  cites Zhao et al.'s schedule (the rate restarts at every cycle, decays polynomially and then stays
  at its minimum, where the checkpoints are taken) -- ``(1 - min(t_c, ⌊γ T_c⌋) / T_c)^0.9``
  [inference from the citation; the paper gives no formula]. The released ``PolyLRScheduler``
  divides by the *total* ``E`` instead of ``T_c``, so the rate barely decays (0.01 -> ~0.0076 for
  E = 600, D = 3, γ = 0.8): ``released=True``;
* kept epochs: the paper's "last 10 of each cycle" are epochs ``T_c - 10 .. T_c - 1`` of a cycle;
  the released trainer keeps ``T_c - 11 .. T_c - 2`` (it skips each cycle's last epoch), and its
  predictor's file filter also picks up ``checkpoint_best`` (twice) and ``checkpoint_final``, ~33
  members -- the off-by-one is ``released=True``, the extra members are not reproduced;
* the released fusion thresholds the mean foreground probability at 0.2 and reports the entropy
  in bits (log2); the paper only says "thresholded": use ``mean > 0.5`` (or 0.2) and
  ``entropy / ln 2`` for bits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .hub import CheckpointError, load_checkpoint_file, save_safetensors, write_json
from .tasks import SegmentationTask, check_unit_range
from .uncertainty import MonteCarloMoments, UncertaintyOutput

__all__ = [
    "CheckpointEnsemble",
    "CyclicSchedule",
    "PseudoLabelTask",
    "export_nnunet_raw",
    "fit_checkpoint_ensemble",
    "load_snapshot",
    "save_snapshot",
]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class CyclicSchedule:
    """The cyclic learning rate and the checkpoint epochs of checkpoint ensembling.

    Args:
        epochs: total epochs ``E`` (the paper: 600).
        cycles: cycles ``D`` (3); ``epochs`` must be a multiple.
        keep: checkpoints kept at the end of every cycle ``G_d`` (10).
        gamma: fraction of a cycle over which the rate decays before it stays flat (the released
            trainer's default 0.8; its command line passes 0.5; the paper gives none).
        exponent: polynomial exponent (nnU-Net's 0.9).
        released: the released ``PolyLRScheduler`` and checkpoint rule (see the module docstring).
    """

    epochs: int = 600
    cycles: int = 3
    keep: int = 10
    gamma: float = 0.8
    exponent: float = 0.9
    released: bool = False

    def __post_init__(self) -> None:
        _int("epochs", self.epochs, 1)
        _int("cycles", self.cycles, 1)
        _int("keep", self.keep, 1)
        if self.epochs % self.cycles:
            raise ValueError(
                f"epochs ({self.epochs}) must be a multiple of cycles ({self.cycles}): every cycle "
                "has E / D epochs"
            )
        extra = 1 if self.released else 0  # the released rule skips each cycle's last epoch
        if self.keep + extra > self.cycle_length:
            raise ValueError(
                f"keep ({self.keep}) does not fit in a cycle of {self.cycle_length} epochs"
            )
        for name, value in (("gamma", self.gamma), ("exponent", self.exponent)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (
                not ok
                or not math.isfinite(value)
                or not 0 <= value <= (1 if name == "gamma" else 10)
            ):
                raise ValueError(f"{name} is out of range, got {value!r}")

    @property
    def cycle_length(self) -> int:
        """``T_c = E / D`` epochs."""
        return self.epochs // self.cycles

    def lr_factor(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (0-based) as a fraction of the initial one.

        ``1`` at the first epoch of every cycle, then ``(1 - min(t_c, ⌊γ T_c⌋) / T)^exponent``
        with ``T = T_c`` (paper) or ``T = E`` (released).
        """
        t = epoch % self.cycle_length
        if t == 0:
            return 1.0
        denominator = self.epochs if self.released else self.cycle_length
        step = min(t, int(self.gamma * self.cycle_length))
        return (1 - step / denominator) ** self.exponent

    def snapshot_epochs(self) -> tuple[int, ...]:
        """The 0-based epochs after which the weights are kept (``cycles · keep`` of them)."""
        tc, shift = self.cycle_length, 1 if self.released else 0
        return tuple(
            c * tc + tc - shift - self.keep + j
            for c in range(self.cycles)
            for j in range(self.keep)
        )

    def scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """A ``LambdaLR`` applying :meth:`lr_factor`, to be stepped once per epoch."""
        return LambdaLR(optimizer, _Factor(self))


class _Factor:
    """``LambdaLR`` function holding plain values only: ``LambdaLR.state_dict`` stores its
    ``__dict__``, and ``fit``'s checkpoints must load with ``torch.load(weights_only=True)``."""

    def __init__(self, schedule: CyclicSchedule) -> None:
        self.schedule = dataclasses.asdict(schedule)

    def __call__(self, epoch: int) -> float:
        return CyclicSchedule(**self.schedule).lr_factor(epoch)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


class PseudoLabelTask(SegmentationTask):
    """Segmentation on pseudo-labels, for text-prompted VLSMs and plain image-only networks.

    Batches are ``collate_prompts`` dicts: ``image (B, 3, H, W)``, ``mask (B, C, H, W)`` in
    ``[0, 1]`` (the zero-shot masks) and, for text-prompted models, ``prompt``. The loss and the
    evaluation scores are :class:`~vlsegkit.tasks.SegmentationTask`'s (default 0.5 Dice + 0.5 BCE;
    nnU-Net trains with Dice + cross-entropy as well).

    Args:
        loss: as in :class:`~vlsegkit.tasks.SegmentationTask`.
        threshold, empty_score: evaluation settings.
        prompted: True calls ``model(images, prompts)``, False ``model(images)``; None decides per
            model: a :class:`~vlsegkit.VLSM` is prompted, anything else is not.
    """

    def __init__(
        self,
        *,
        loss: nn.Module | Any = None,
        threshold: float = 0.5,
        empty_score: float = 1.0,
        prompted: bool | None = None,
    ) -> None:
        super().__init__(loss=loss, threshold=threshold, empty_score=empty_score)
        if prompted not in (None, True, False):
            raise ValueError(f"prompted must be True, False or None, got {prompted!r}")
        self.prompted = prompted

    def _is_prompted(self, model: nn.Module) -> bool:
        if self.prompted is not None:
            return self.prompted
        from .models.base import VLSM

        return isinstance(_unwrap(model), VLSM)

    def _forward(self, model: nn.Module, batch: Any) -> tuple[Any, Tensor, Tensor]:
        if self._is_prompted(model):
            return super()._forward(model, batch)
        if not isinstance(batch, dict) or "image" not in batch or "mask" not in batch:
            raise ValueError("a pseudo-label batch must be a dict with 'image' and 'mask'")
        images, masks = batch["image"], batch["mask"]
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError("batch['image'] must be a (B, C, H, W) tensor")
        if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[0] != images.shape[0]:
            raise ValueError(f"batch['mask'] must be a (B={images.shape[0]}, C, H, W) tensor")
        check_unit_range("batch['mask']", masks)
        output = model(images)
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if not isinstance(logits, Tensor) or logits.shape != masks.shape:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(output).__name__
            raise ValueError(
                f"the model must return logits of the mask's shape {tuple(masks.shape)}, got {shape}"
            )
        return output, logits, masks

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prompted={self.prompted}"


# --------------------------------------------------------------------------- snapshots
def _kept_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a snapshot stores: trainable parameters and every buffer (e.g. BatchNorm
    statistics); frozen weights are the same in every checkpoint and are not repeated."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in trainable or k in buffers}


def save_snapshot(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s trainable parameters and buffers to ``path`` (safetensors, atomically)."""
    return save_safetensors(_kept_state(_unwrap(model)), path)


def load_snapshot(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a :func:`save_snapshot` file into ``model``.

    Raises:
        CheckpointError: keys the model does not have, or shapes that differ (nothing is loaded).
    """
    state = load_checkpoint_file(path)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unknown or wrong:
        raise CheckpointError(
            f"{path}: does not fit the model (unknown keys {unknown[:5]}, shape mismatches "
            f"{wrong[:5]}); nothing was loaded"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


class CheckpointEnsemble:
    """Prediction with the mean probability of several checkpoints of one model (Eq. 21).

    Each checkpoint is loaded in turn into ``model`` (whose own weights are restored afterwards);
    per image the probabilities are folded into :class:`~vlsegkit.uncertainty.MonteCarloMoments`,
    so the result has the mean, the entropy of the mean (Eqs. 22-23, natural log), its aleatoric /
    epistemic split and the variance, with memory independent of the number of checkpoints.

    Args:
        model: the trained model (a VLSM, or a plain network returning ``(B, C, H, W)`` logits).
        checkpoints: snapshot files written by :func:`fit_checkpoint_ensemble` / ``save_snapshot``.
        prompted: as in :class:`PseudoLabelTask` (None: VLSMs are prompted).

    Attributes:
        history: the ``fit`` history when built by :func:`fit_checkpoint_ensemble`, else None.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[str | os.PathLike],
        *,
        prompted: bool | None = None,
    ) -> None:
        paths = [Path(p) for p in checkpoints]
        if not paths:
            raise ValueError("checkpoints must name at least one file")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint files not found: {missing}")
        self.model = model
        self.checkpoints = paths
        self.task = PseudoLabelTask(prompted=prompted)
        self.history = None

    def __len__(self) -> int:
        return len(self.checkpoints)

    def _probabilities(self, images: Any, prompts: Any, batch_size: int) -> list[Tensor]:
        """Per image ``(C, H, W)`` probabilities of the model as currently loaded."""
        model = self.model
        if self.task._is_prompted(model):
            if prompts is None:
                raise ValueError("a text-prompted model needs prompts")
            probs = model.predict(images, prompts, batch_size=batch_size)
            return probs if isinstance(probs, list) else [probs]
        if prompts is not None:
            raise ValueError("prompts were given for a model that is not text-prompted")
        batch = images if isinstance(images, Tensor) else torch.stack(list(images))
        if batch.dim() == 3:
            batch = batch[None]
        if batch.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got {tuple(batch.shape)}")
        device = next(model.parameters()).device
        out = []
        for start in range(0, batch.shape[0], batch_size):
            logits = model(batch[start : start + batch_size].to(device))
            logits = logits if isinstance(logits, Tensor) else logits.logits
            out.extend(torch.sigmoid(logits.float()).cpu())
        return out

    @torch.no_grad()
    def predict(
        self, images: Any, prompts: Any = None, *, batch_size: int = 8
    ) -> UncertaintyOutput:
        """Ensemble statistics of ``images``.

        Args:
            images: for a VLSM, anything its ``predict`` accepts (PIL / numpy / tensors, any size;
                maps come back at each image's original size); for a plain network, normalised
                ``(B, C, H, W)`` (or ``(C, H, W)``) tensors at its input size.
            prompts: the VLSM's prompts (``predict``'s rule); None for a plain network.
            batch_size: images per forward pass.

        Returns:
            :class:`~vlsegkit.uncertainty.UncertaintyOutput` with ``samples`` the number of
            checkpoints (maps ``(C, H, W)``, or lists of them for several images). Threshold
            ``mean`` for the mask (the released fusion uses 0.2).
        """
        from .models.base import eval_mode

        model = self.model
        single = isinstance(images, Tensor) and images.dim() == 3
        single = single or not isinstance(images, (list, tuple, Tensor))
        original = {k: v.detach().clone() for k, v in _kept_state(model).items()}
        moments: list[MonteCarloMoments] | None = None
        try:
            with eval_mode(model):
                for path in self.checkpoints:
                    load_snapshot(model, path)
                    probs = self._probabilities(images, prompts, batch_size)
                    if moments is None:
                        moments = [
                            MonteCarloMoments(p.shape[0], tuple(p.shape[-2:]), "cpu") for p in probs
                        ]
                    for acc, p in zip(moments, probs):
                        acc.add_probs(p[None])
        finally:
            with torch.no_grad():
                own = model.state_dict()
                for k, v in original.items():
                    own[k].copy_(v)
        stats = [acc.result() for acc in moments]
        fields = {k: [s[k] for s in stats] for k in stats[0]}
        if single:
            fields = {k: v[0] for k, v in fields.items()}
        return UncertaintyOutput(samples=len(self.checkpoints), **fields)


def _nnunet_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """nnU-Net's optimiser: SGD, momentum 0.99, Nesterov, weight decay 3e-5."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)


def fit_checkpoint_ensemble(
    model: nn.Module,
    train_loader: Any,
    *,
    out_dir: str | os.PathLike,
    schedule: CyclicSchedule | None = None,
    task: PseudoLabelTask | None = None,
    lr: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
    **fit_options: Any,
) -> CheckpointEnsemble:
    """Train with the cyclic schedule and keep the last checkpoints of every cycle.

    One :func:`vlsegkit.train.fit` run of ``schedule.epochs`` epochs (DDP, AMP, resume and logging
    as usual), with nnU-Net's SGD (``lr`` 0.01, momentum 0.99, Nesterov, weight decay 3e-5) unless
    ``optimizer`` is given and a per-epoch ``LambdaLR`` of ``schedule``. After each epoch in
    ``schedule.snapshot_epochs()`` the trainable weights and buffers are written to
    ``out_dir/epoch_XXXX.safetensors`` (rank 0, through ``fit``'s per-epoch ``log_fn`` call; a given
    ``log_fn`` is still called).

    Args:
        model: any segmenter (see :class:`PseudoLabelTask`).
        train_loader: batches (or a ``Dataset``) of images and pseudo-labels.
        out_dir: where the checkpoints go.
        schedule: default ``CyclicSchedule()`` (the paper's 600 epochs, 3 cycles, 10 kept).
        task: default ``PseudoLabelTask()``.
        lr: initial learning rate of the default optimiser.
        optimizer: another optimiser over the model's trainable parameters.
        **fit_options: other :class:`vlsegkit.train.FitConfig` options (``batch_size``,
            ``val_loader``, ``device``, ``checkpoint_dir``, ...); not ``epochs`` or ``scheduler``,
            which the schedule sets.

    Returns:
        A :class:`CheckpointEnsemble` over the kept checkpoints, with ``history`` set.
    """
    from .train import fit

    for name in ("epochs", "scheduler", "scheduler_interval"):
        if name in fit_options:
            raise ValueError(f"{name} is set by the schedule; change the CyclicSchedule instead")
    schedule = CyclicSchedule() if schedule is None else schedule
    if not isinstance(schedule, CyclicSchedule):
        raise TypeError(f"schedule must be a CyclicSchedule, got {type(schedule).__name__}")
    task = PseudoLabelTask() if task is None else task
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    optimizer = _nnunet_optimizer(model, lr) if optimizer is None else optimizer
    kept = set(schedule.snapshot_epochs())
    user_log: Callable[[dict[str, float]], None] | None = fit_options.pop("log_fn", None)

    def log_fn(record: dict[str, float]) -> None:
        # fit calls this on rank 0 after every step and, with "train_loss", after every epoch
        if "train_loss" in record and int(record["epoch"]) in kept:
            save_snapshot(model, out / f"epoch_{int(record['epoch']) + 1:04d}.safetensors")
        if user_log is not None:
            user_log(record)

    history = fit(
        model, train_loader, task=task, optimizer=optimizer, epochs=schedule.epochs,
        scheduler=schedule.scheduler(optimizer), scheduler_interval="epoch", log_fn=log_fn,
        **fit_options,
    )  # fmt: skip
    # Every kept epoch this run reached, including those written before a resume; files of
    # epochs not reached (e.g. of an earlier run in out_dir) are not this run's.
    paths = [out / f"epoch_{e + 1:04d}.safetensors" for e in sorted(kept) if e < history.epochs]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 wrote the snapshots
        if torch.distributed.get_rank() != 0:
            ensemble = CheckpointEnsemble(model, paths, prompted=task.prompted)
            ensemble.history = history
            return ensemble
    missing = [p.name for p in paths if not p.is_file()]
    if missing:  # e.g. a resumed run given another out_dir than the run it continues
        warnings.warn(
            f"snapshots {missing} of epochs this run trained are not in {out}; the ensemble and "
            "ensemble.json leave them out",
            UserWarning,
            stacklevel=2,
        )
        paths = [p for p in paths if p.is_file()]
    write_json(
        out / "ensemble.json",
        {"schedule": dataclasses.asdict(schedule), "checkpoints": [p.name for p in paths]},
    )
    ensemble = CheckpointEnsemble(model, paths, prompted=task.prompted)
    ensemble.history = history
    return ensemble


# --------------------------------------------------------------------------- nnU-Net export
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _uint8_image(image: Any) -> np.ndarray:
    from .data.images import to_image_tensor

    t = to_image_tensor(image)
    arr = (t.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        return arr[..., 0]  # grey images stay one channel
    return arr


def _label(mask: Any, size: tuple[int, int], name: str) -> np.ndarray:
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).detach().cpu()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2 or tuple(m.shape) != size:
        raise ValueError(
            f"{name} must be an (H, W) mask of its image's size {size}, got {tuple(m.shape)}"
        )
    values = torch.unique(m)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError(f"{name} must be binary (0/1 or bool), got values {values.tolist()[:6]}")
    return m.to(torch.uint8).numpy()


def export_nnunet_raw(
    root: str | os.PathLike,
    images: Iterable[Any],
    masks: Iterable[Any],
    *,
    dataset_id: int,
    name: str,
    label: str = "foreground",
    test_images: Iterable[Any] | None = None,
    case_ids: Sequence[str] | None = None,
    description: str | None = None,
) -> Path:
    """Write images and (pseudo-)labels as an nnU-Net v2 raw dataset of 2-D PNGs.

    Layout (nnU-Net v2 ``dataset_format``; natural 2-D images are read by its
    ``NaturalImage2DIO``)::

        root/DatasetXXX_Name/
            imagesTr/{case}_0000.png    RGB (channels R, G, B) or grey (one channel)
            labelsTr/{case}.png         uint8: 0 background, 1 the label
            imagesTs/{case}_0000.png    optional test images
            dataset.json                channel_names, labels, numTraining, file_ending ".png"

    Train nnU-Net on it with ``nnUNetv2_plan_and_preprocess -d XXX`` and ``nnUNetv2_train XXX 2d
    all`` (the paper trains on all training cases; MedCLIP-SAMv2's patched nnU-Net adds
    ``--num_of_cycles`` for checkpoint ensembling).

    Args:
        root: the ``nnUNet_raw`` folder.
        images: training images (PIL, numpy, tensors in ``[0, 1]``), all RGB or all grey.
        masks: their binary pseudo-labels ``(H, W)``, one per image.
        dataset_id: nnU-Net dataset id, 1-999.
        name: dataset name (letters, digits, underscores).
        label: name of label 1 in ``dataset.json``.
        test_images: optional images for ``imagesTs``.
        case_ids: case identifiers (default ``{name}_0000``, ``{name}_0001``, ...).
        description: written to ``dataset.json``.

    Returns:
        The dataset folder ``root/DatasetXXX_Name``.

    Raises:
        ValueError: bad id or name, an existing dataset folder, images and masks that do not pair
            up, non-binary masks or a mix of RGB and grey images.
    """
    if (
        isinstance(dataset_id, bool)
        or not isinstance(dataset_id, int)
        or not 1 <= dataset_id <= 999
    ):
        raise ValueError(f"dataset_id must be an int in [1, 999], got {dataset_id!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must hold letters, digits and underscores only, got {name!r}")
    folder = Path(root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        raise ValueError(f"{folder} already exists; nnU-Net datasets are written once")
    images, masks = list(images), list(masks)
    if not images or len(images) != len(masks):
        raise ValueError(
            f"need one mask per image, got {len(images)} images and {len(masks)} masks"
        )
    tests = [] if test_images is None else list(test_images)
    count = len(images) + len(tests)
    ids = list(case_ids) if case_ids is not None else [f"{name}_{i:04d}" for i in range(count)]
    if len(ids) != count or len(set(ids)) != count or not all(_NAME.match(str(i)) for i in ids):
        raise ValueError(f"case_ids must be {count} distinct names of letters, digits, underscores")
    from PIL import Image

    arrays = [_uint8_image(im) for im in images]
    test_arrays = [_uint8_image(im) for im in tests]
    kinds = {a.ndim for a in (*arrays, *test_arrays)}
    if len(kinds) != 1:
        raise ValueError("images must be all RGB or all grey (nnU-Net needs one channel layout)")
    labels = [_label(m, a.shape[:2], f"masks[{i}]") for i, (m, a) in enumerate(zip(masks, arrays))]
    for sub in ("imagesTr", "labelsTr", *(("imagesTs",) if tests else ())):
        (folder / sub).mkdir(parents=True)
    for case, arr, lab in zip(ids, arrays, labels):
        Image.fromarray(arr).save(folder / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(lab).save(folder / "labelsTr" / f"{case}.png")
    for case, arr in zip(ids[len(images) :], test_arrays):
        Image.fromarray(arr).save(folder / "imagesTs" / f"{case}_0000.png")
    channels = {"0": "R", "1": "G", "2": "B"} if kinds == {3} else {"0": "grey"}
    dataset = {
        "channel_names": channels,
        "labels": {"background": 0, label: 1},
        "numTraining": len(images),
        "file_ending": ".png",
        "name": f"Dataset{dataset_id:03d}_{name}",
    }
    if description:
        dataset["description"] = description
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
    return folder
