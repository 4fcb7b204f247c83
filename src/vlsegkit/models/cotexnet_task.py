"""CoTexNet's training task, evaluation and the recipes of the paper and of the release.

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (CoTexNet, *Engineering* 2026), §3.3 and §4.2; released code github.com/Rango-bit/CoTexNet
(``main.py``, ``train_utils/train_and_eval.py``, ``dataset_config/train_config.yaml``).

:class:`CoTexNetTask` trains with the joint objective (eq. 15, :class:`~vlsegkit.losses.CoTexNetLoss`:
Dice + CE on the SAN-KD-conditioned prediction, plus the KL distillation of the text embedding into
the predicted one) and evaluates the **text-free** prediction as the paper reports it: Dice on soft
probabilities per image, IoU and pixel accuracy at 0.5, HD95 in pixels at the input resolution with
undefined (NaN) values dropped from the means (``vlsegkit.metrics``).

:data:`COTEXNET_RECIPES` holds the two training settings side by side ("paper" and "released");
``recipe.fit_config()`` gives the :class:`~vlsegkit.train.FitConfig`, ``recipe.task()`` the task and
``recipe.transform()`` the release's joint augmentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.cotexnet import CoTexNetLoss, class_targets
from ..metrics import hausdorff_distance, iou_score, pixel_accuracy, soft_dice_score
from ..tasks import SegmentationTask, Task, _check_threshold, check_unit_range
from ..train import EarlyStopping

__all__ = [
    "COTEXNET_RECIPES",
    "CoTexNetRecipe",
    "CoTexNetTask",
    "DelayedEarlyStopping",
    "RandomResizeCrop",
]


class CoTexNetTask(Task):
    """CoTexNet's joint training (eq. 15) and its text-free evaluation.

    Batches are ``collate_prompts`` dicts: ``image (B, 3, H, W)``, ``mask (B, K, H, W)`` class masks in
    [0, 1] and ``prompt`` (B real-text prompts, e.g. from :class:`~vlsegkit.data.ConceptualPrompts`).
    Training calls ``model(image, prompt, masks=mask, condition="mixture")`` and returns ``loss``,
    ``dice_loss``, ``ce_loss`` and ``kl_loss``. Evaluation calls the model with
    ``condition="image"`` -- the prediction uses no text -- and, when the batch has prompts, still
    scores the loss terms (the KL against the text teacher, as the release logs it). Scores per
    (image, class): ``dice`` (soft), ``iou`` and ``accuracy`` (pixel accuracy of the binarised class
    map; for K > 1 classes of the argmax map, per image) and ``hd95`` (pixels; NaN when either mask
    is empty, left out of the means); with K > 1 also ``iou_1`` ... ``iou_K`` (the paper's IoU-k).

    Args:
        loss: a :class:`~vlsegkit.losses.CoTexNetLoss` (default: the paper's, KL weight 1).
        threshold: probability threshold of IoU, accuracy and HD95, in (0, 1).
        hd95: compute HD95 in evaluation (exact pairwise distances; off for speed).
        empty_score: Dice / IoU of an empty prediction on an empty mask.
    """

    monitor = "dice"
    metrics = ("loss", "dice_loss", "ce_loss", "kl_loss", "dice", "iou", "accuracy", "hd95")

    def __init__(
        self,
        *,
        loss: CoTexNetLoss | None = None,
        threshold: float = 0.5,
        hd95: bool = True,
        empty_score: float = 1.0,
    ) -> None:
        super().__init__()
        if loss is not None and not isinstance(loss, CoTexNetLoss):
            raise TypeError(f"loss must be a CoTexNetLoss, got {type(loss).__name__}")
        self.loss = CoTexNetLoss() if loss is None else loss
        self.threshold = _check_threshold(threshold)
        self.hd95 = bool(hd95)
        self.empty_score = float(empty_score)

    @staticmethod
    def _logits(output: Any, masks: Tensor) -> Tensor:
        logits = getattr(output, "logits", None)
        if not isinstance(logits, Tensor):
            raise TypeError(f"the model must return an output with .logits, got {type(output)}")
        b, k, h, w = masks.shape
        expected = (b, 1 if k == 1 else k + 1, h, w)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"model logits have shape {tuple(logits.shape)}; masks {tuple(masks.shape)} need "
                f"{expected} (one channel for one class, K + 1 for K classes)"
            )
        return logits

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        images, masks, prompts = SegmentationTask.unpack(batch)
        check_unit_range("batch['mask']", masks)
        output = model(images, prompts, masks=masks, condition="mixture")
        self._logits(output, masks)
        return self.loss.terms(output, masks.to(output.logits.dtype))

    def evaluation_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping) or "image" not in batch or "mask" not in batch:
            raise ValueError("an evaluation batch must be a dict with 'image' and 'mask'")
        images, masks = batch["image"], batch["mask"]
        if not isinstance(masks, Tensor) or masks.dim() != 4:
            raise ValueError(f"batch['mask'] must be a (B, K, H, W) tensor, got {type(masks)}")
        check_unit_range("batch['mask']", masks)
        prompts = batch.get("prompt")
        if prompts is None:
            output = model(images, condition="image")
        else:
            output = model(images, prompts, masks=masks, condition="image")
        logits = self._logits(output, masks).float()
        masks = masks.float()
        scores: dict[str, Tensor] = {}
        if output.text_embedding is not None:
            scores.update({k: v.detach() for k, v in self.loss.terms(output, masks).items()})
        else:
            dice, ce = self.loss.segmentation_terms(logits, masks)
            scores.update({"loss": (dice + ce).detach(), "dice_loss": dice, "ce_loss": ce})
        scores.update(self.scores(logits, masks))
        return scores

    @torch.no_grad()
    def scores(self, logits: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """The paper's metrics of logits ``(B, 1 or K + 1, H, W)`` against masks ``(B, K, H, W)``.

        Returns:
            ``dice``, ``iou``, ``hd95`` per (image, class) ``(B·K,)``; ``accuracy`` ``(B·K,)`` for
            one class, ``(B,)`` (argmax map) for K > 1 together with ``iou_1`` ... ``iou_K``.
        """
        b, k = masks.shape[:2]
        if logits.shape[1] == 1:
            fg = torch.sigmoid(logits)
        else:
            fg = torch.softmax(logits, dim=1)[:, 1:]
        fg = fg.clamp(0, 1).reshape(b * k, 1, *fg.shape[2:])
        target = (masks > 0.5).float().reshape(b * k, 1, *masks.shape[2:])
        kw = {"threshold": self.threshold}
        out = {
            "dice": soft_dice_score(fg, target, empty_score=self.empty_score),
            "iou": iou_score(fg, target, empty_score=self.empty_score, **kw),
        }
        if k == 1:
            out["accuracy"] = pixel_accuracy(fg, target, **kw)
        else:
            labels = class_targets(masks)
            out["accuracy"] = (logits.argmax(1) == labels).flatten(1).float().mean(1)
            per_class = out["iou"].view(b, k)
            for c in range(k):
                out[f"iou_{c + 1}"] = per_class[:, c]
        if self.hd95:
            out["hd95"] = hausdorff_distance(fg, target, percentile=95.0, backend="torch", **kw)
        return out

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, hd95={self.hd95}"


@dataclass
class DelayedEarlyStopping(EarlyStopping):
    """:class:`~vlsegkit.train.EarlyStopping` that ignores the first ``start_epoch`` epochs.

    The release starts counting only after ``epochs // 5`` (= 100) epochs
    (``main.py``: ``if epoch > epochs // 5: early_stopping(dice)``); before that the monitored value
    is neither recorded nor counted.

    Args:
        start_epoch: epochs ignored at the start of training (``>= 0``).
    """

    start_epoch: int = 0
    epochs_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.start_epoch, bool)
            or not isinstance(self.start_epoch, int)
            or self.start_epoch < 0
        ):
            raise ValueError(f"start_epoch must be an int >= 0, got {self.start_epoch!r}")

    def reset(self) -> None:
        super().reset()
        self.epochs_seen = 0

    def update(self, value: float) -> bool:
        self.epochs_seen += 1
        if self.epochs_seen <= self.start_epoch:
            return False
        return super().update(value)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epochs_seen = int(state.get("epochs_seen", 0))


class RandomResizeCrop:
    """The release's joint augmentation: resize the shorter side to a random length, random crop.

    ``data_process/transforms.py``: the shorter side becomes a random integer in
    ``[round(size·lo), round(size·hi)]`` (212-268 for 224 and (0.95, 1.2); aspect kept, mask by
    nearest neighbour), then a random ``size x size`` crop, zero-padded where the image is smaller.
    A ``transform(image, mask)`` for :class:`~vlsegkit.data.ImageMaskPromptDataset` (torchvision
    ``tv_tensors``; also plain ``(C, H, W)`` tensors).

    Args:
        size: output side.
        scale: ``(lo, hi)`` range of the shorter side relative to ``size``.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.95, 1.2)) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
        self.size, self.scale = size, (lo, hi)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        lo, hi = round(self.size * self.scale[0]), round(self.size * self.scale[1])
        side = int(torch.randint(lo, hi + 1, ()))
        image = TF.resize(image, [side], antialias=True)
        mask = TF.resize(mask, [side], interpolation=InterpolationMode.NEAREST_EXACT)
        h, w = image.shape[-2:]
        pad_h, pad_w = max(0, self.size - h), max(0, self.size - w)
        if pad_h or pad_w:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=0)
            h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return (
            TF.crop(image, top, left, self.size, self.size),
            TF.crop(mask, top, left, self.size, self.size),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale})"


@dataclass(frozen=True)
class CoTexNetRecipe:
    """One training setting of CoTexNet (see :data:`COTEXNET_RECIPES`).

    Attributes:
        name: ``"paper"`` or ``"released"``.
        lr: peak learning rate (3e-4 in both).
        weight_decay: AdamW weight decay (paper: Adam, i.e. 0; release: AdamW 1e-4).
        batch_size: 8 (paper) or 16 (release).
        epochs: at most 500.
        image_size: input side (224).
        early_stopping_metric: ``"loss"`` (paper: validation loss) or ``"dice"`` (release).
        patience: 50 epochs.
        early_stopping_start: epochs before early stopping counts (release: 100).
        kl_weight: 1 (paper) or 10 (release).
        released_double_sigmoid: the release's BCE on sigmoid probabilities.
        resize_scale: the release's random resize range with a random crop, or None.
        autocast_dtype: None, or ``torch.float16`` (the release trains with AMP; meant for GPUs).
        seed: the release seeds everything with 666.
        model_options: :class:`~vlsegkit.CoTexNet` options (``RELEASED_OPTIONS`` for the release).
    """

    name: str
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    epochs: int = 500
    image_size: int = 224
    early_stopping_metric: str = "loss"
    patience: int = 50
    early_stopping_start: int = 0
    kl_weight: float = 1.0
    released_double_sigmoid: bool = False
    resize_scale: tuple[float, float] | None = None
    autocast_dtype: torch.dtype | None = None
    seed: int | None = None
    model_options: Mapping[str, Any] = field(default_factory=dict)

    def task(self, **kwargs: Any) -> CoTexNetTask:
        """The :class:`CoTexNetTask` with this recipe's loss weights."""
        loss = CoTexNetLoss(
            kl_weight=self.kl_weight, released_double_sigmoid=self.released_double_sigmoid
        )
        return CoTexNetTask(loss=loss, **kwargs)

    def early_stopping(self) -> DelayedEarlyStopping:
        """The early-stopping rule (validation loss or Dice, patience 50, optional delay)."""
        return DelayedEarlyStopping(
            metric=self.early_stopping_metric,
            patience=self.patience,
            start_epoch=self.early_stopping_start,
        )

    def fit_config(self, **overrides: Any):
        """A :class:`~vlsegkit.train.FitConfig`: AdamW, cosine decay per optimiser step to 0, no
        warmup, this recipe's batch size, epochs, early stopping (needs a validation loader),
        autocast and seed; ``overrides`` replace any field."""
        from ..train import FitConfig

        options: dict[str, Any] = dict(
            lr=self.lr,
            weight_decay=self.weight_decay,
            scheduler="cosine",
            min_lr_ratio=0.0,
            batch_size=self.batch_size,
            epochs=self.epochs,
            early_stopping=self.early_stopping(),
            autocast_dtype=self.autocast_dtype,
            seed=self.seed,
        )
        options.update(overrides)
        return FitConfig(**options)

    def transform(self) -> RandomResizeCrop | None:
        """The joint training augmentation (release), or None (the paper describes none)."""
        if self.resize_scale is None:
            return None
        return RandomResizeCrop(self.image_size, self.resize_scale)


#: The paper's (§4.2) and the release's (``dataset_config/train_config.yaml``, ``main.py``) settings.
COTEXNET_RECIPES: dict[str, CoTexNetRecipe] = {
    "paper": CoTexNetRecipe(name="paper"),
    "released": CoTexNetRecipe(
        name="released",
        weight_decay=1e-4,
        batch_size=16,
        early_stopping_metric="dice",
        early_stopping_start=100,
        kl_weight=10.0,
        released_double_sigmoid=True,
        resize_scale=(0.95, 1.2),
        autocast_dtype=torch.float16,
        seed=666,
        model_options={
            "slot_mode": "released",
            "position_embedding": "overwrite",
            "roi_background": "mean",
            "cls_predictor": "released",
            "double_sigmoid": True,
            "dropout": 0.0,
        },
    ),
}
