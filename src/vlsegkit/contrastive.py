"""Contrastive fine-tuning of a pair of towers on image-text pairs (MedCLIP-SAMv2 §3.1).

Koleilat et al., "MedCLIP-SAMv2" (Medical Image Analysis 2025) fine-tune BiomedCLIP on MedPix
image-caption pairs with their DHN-NCE loss before computing saliency maps; its public repository
does it with a vendored open_clip training script (``biomedclip_finetuning/.../biomedclip.sh``).
Here the same is a :class:`~vlsegkit.tasks.Task` that ``fit`` runs on any model returning image and
text embeddings -- :class:`~vlsegkit.models.dual_encoder.DualEncoder` built from BiomedCLIP (open_clip),
CLIP (transformers) or any other tower spec::

    model = DualEncoder.from_open_clip("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    recipe = contrastive_recipe("paper")             # or "released"
    history = fit(model, pairs, val_loader=val_pairs, task=recipe.task(),
                  **recipe.fit_options(model))
    model.save_pretrained("biomedclip-dhnnce")         # the fine-tuned towers

Batches are dicts with ``image (B, 3, H, W)`` and one caption per image (``"text"``, ``"caption"`` or
``"prompt"``: B strings; or ``input_ids`` / ``attention_mask``); no masks. Under ``torchrun`` the
embeddings of every process are gathered before the loss (:func:`gather_embeddings`), so the loss
sees the global batch -- its negatives come from every process -- and the update equals the
single-process update on that batch; gradients flow to each process's own rows.

Evaluation scores retrieval within each evaluation batch (:func:`vlsegkit.metrics.retrieval_hits`,
image-to-text and text-to-image top-1 / top-5; the paper retrieves within batches of 50, see
:func:`vlsegkit.metrics.retrieval_accuracy` for its whole protocol). Under ``torchrun`` each process
retrieves within its own share of a batch (nothing is gathered in evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .losses import DHNNCELoss
from .metrics import retrieval_hits
from .tasks import Task

__all__ = [
    "RECIPES",
    "ContrastiveRecipe",
    "ContrastiveTask",
    "contrastive_recipe",
    "gather_embeddings",
]

_TEXT_KEYS = ("text", "caption", "prompt")


# --------------------------------------------------------------------------- distributed
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_embeddings(x: Tensor) -> Tensor:
    """Concatenate every process's ``(B_r, E)`` rows in rank order; the local rows keep their graph.

    The other processes' rows are copies without gradient (``all_gather`` is not differentiable);
    this process's rows are ``x`` itself, so a loss on the result sends gradients to them only.
    Processes may hold different numbers of rows. In a single process ``x`` is returned.

    Args:
        x: ``(B_r, ...)`` this process's rows (on the device of its process-group backend).

    Returns:
        ``(sum_r B_r, ...)``.
    """
    world, rank = _world()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    rows = x.detach()
    if rows.shape[0] < max(counts):  # all_gather needs equal shapes: pad, then trim
        pad = rows.new_zeros(max(counts) - rows.shape[0], *rows.shape[1:])
        rows = torch.cat([rows, pad])
    parts = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(parts, rows.contiguous())
    trimmed = [part[:n] for part, n in zip(parts, counts)]
    trimmed[rank] = x
    return torch.cat(trimmed)


class _ScaleGradient(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


# --------------------------------------------------------------------------- the task
class ContrastiveTask(Task):
    """Contrastive image-text fine-tuning: a loss on paired embeddings, retrieval scores.

    ``training_step`` embeds the batch with ``model(images, texts)`` (an output with
    ``image_embeds (B, E)`` and ``text_embeds (B, E)``, or a pair of such tensors), gathers them
    over processes and returns the loss's named terms (``loss``, ``v2t_loss``, ``t2v_loss`` for the
    DHN-NCE family). ``evaluation_step`` adds per-pair retrieval hits within the batch
    (``i2t_top{k}``, ``t2i_top{k}``) and ``top1``, their image-to-text / text-to-image mean.

    DDP averages the processes' gradients, and each process backpropagates the whole-batch loss
    through its own rows only, so their mean is ``1 / W`` of the whole-batch gradient: with
    ``gather`` the gradient of the loss (not its value) is multiplied by the number of processes
    ``W``, which makes a ``torchrun`` step equal the single-process step on the gathered batch.

    Args:
        loss: called as ``loss(image_embeds, text_embeds)`` on ``(N, E)`` rows (a ``terms`` method,
            as :class:`~vlsegkit.losses.DHNNCELoss` has, gives named terms); default
            ``DHNNCELoss()`` (the paper: τ 0.6, β1 = β2 = 0.15, eqs. 9-13).
        gather: under ``torchrun``, compute the loss on every process's embeddings (the global
            batch); False computes it on the process's own batch (the released script's loss ran
            on one GPU).
        ks: the ``k`` of the top-k retrieval scores.
    """

    monitor = "top1"

    def __init__(
        self, *, loss: nn.Module | Any = None, gather: bool = True, ks: Sequence[int] = (1, 5)
    ) -> None:
        super().__init__()
        if loss is not None and not callable(loss):
            raise TypeError(
                f"loss must be callable as loss(image_embeds, text_embeds), got {loss!r}"
            )
        self.loss = DHNNCELoss() if loss is None else loss
        self.gather = bool(gather)
        ks = tuple(ks)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
            raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
        self.ks = ks
        hits = [f"{d}_top{k}" for d in ("i2t", "t2i") for k in ks]
        self.metrics = ("loss", "top1", *hits)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, dict[str, Any]]:
        """``(images, text arguments of the model call)`` of a batch, with clear errors."""
        if not isinstance(batch, Mapping) or "image" not in batch:
            raise ValueError(
                "a contrastive batch must be a dict with 'image' (B, 3, H, W) and one caption per "
                f"image ({', '.join(map(repr, _TEXT_KEYS))} or 'input_ids'), got "
                f"{type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            )
        images = batch["image"]
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"batch['image'] must be a (B, 3, H, W) tensor with B >= 1, got {shape}"
            )
        b = images.shape[0]
        if "input_ids" in batch:
            ids = batch["input_ids"]
            if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != b:
                shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
                raise ValueError(f"batch['input_ids'] must be a (B={b}, L) tensor, got {shape}")
            return images, {"input_ids": ids, "attention_mask": batch.get("attention_mask")}
        key = next((k for k in _TEXT_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"a contrastive batch needs one caption per image under one of {_TEXT_KEYS} (or "
                f"'input_ids'); found keys {sorted(batch)}"
            )
        texts = batch[key]
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(
                f"batch[{key!r}] must be a list of B={b} strings, got {type(texts).__name__}"
            )
        if len(texts) != b or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"batch[{key!r}] must hold one caption string per image (B={b}), got "
                f"{len(texts)} items of types {sorted({type(t).__name__ for t in texts})}"
            )
        return images, {"texts": list(texts)}

    def embed(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """``(image_embeds (B, E), text_embeds (B, E))`` of a batch, through ``model(...)``."""
        images, text_args = self.unpack(batch)
        if "texts" in text_args:
            output = model(images, text_args["texts"])
        else:
            output = model(images, **text_args)
        if isinstance(output, (tuple, list)) and len(output) == 2:
            image_embeds, text_embeds = output
        else:
            image_embeds = getattr(output, "image_embeds", None)
            text_embeds = getattr(output, "text_embeds", None)
        b = images.shape[0]
        for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != b:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"the model must return {name} of shape (B={b}, E) (an output with "
                    f"image_embeds / text_embeds, or a pair of tensors), got {shape}"
                )
        return image_embeds, text_embeds

    def _terms(self, image_embeds: Tensor, text_embeds: Tensor) -> dict[str, Tensor]:
        terms_fn = getattr(self.loss, "terms", None)
        if callable(terms_fn):
            terms = dict(terms_fn(image_embeds, text_embeds))
            if "loss" not in terms:
                raise ValueError(f"{type(self.loss).__name__}.terms must return a 'loss' entry")
            return terms
        return {"loss": self.loss(image_embeds, text_embeds)}

    # ------------------------------------------------------------------ steps
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        image_embeds, text_embeds = self.embed(model, batch)
        world = _world()[0] if self.gather else 1
        if world > 1:
            image_embeds = gather_embeddings(image_embeds)
            text_embeds = gather_embeddings(text_embeds)
        terms = self._terms(image_embeds, text_embeds)
        if world > 1:
            terms["loss"] = _ScaleGradient.apply(terms["loss"], float(world))
        return terms

    def evaluation_step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        image_embeds, text_embeds = self.embed(model, batch)
        b = image_embeds.shape[0]
        if b >= 2:
            scores = {k: v.detach() for k, v in self._terms(image_embeds, text_embeds).items()}
            hits = retrieval_hits(image_embeds.detach(), text_embeds.detach(), ks=self.ks)
        else:
            # a single pair has no negatives: no loss, and retrieving it is no test (it would
            # always be a hit); NaN per item is left out of the means
            nan = image_embeds.new_full((b,), float("nan"), dtype=torch.float32)
            scores = {"loss": nan}
            hits = {f"{d}_top{k}": nan for d in ("i2t", "t2i") for k in self.ks}
        scores.update(hits)
        if 1 in self.ks:
            scores["top1"] = (hits["i2t_top1"] + hits["t2i_top1"]) / 2
        else:
            k = min(self.ks)
            scores["top1"] = (hits[f"i2t_top{k}"] + hits[f"t2i_top{k}"]) / 2
        return scores

    def extra_repr(self) -> str:
        return f"gather={self.gather}, ks={self.ks}"


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class ContrastiveRecipe:
    """The hyper-parameters of one contrastive fine-tuning setting (a named recipe).

    Attributes:
        name: ``"paper"`` or ``"released"`` (see :data:`RECIPES`).
        description: where the values come from.
        loss: keyword arguments of :class:`~vlsegkit.losses.DHNNCELoss`.
        lr: peak learning rate.
        batch_size: pairs per optimiser step (all processes together).
        epochs: passes over the data.
        weight_decay: AdamW weight decay of the matrices (gains, biases and ``logit_scale`` get
            none: open_clip's rule, ``p.ndim < 2`` or a name containing ``bn`` / ``ln`` / ``bias`` /
            ``logit_scale``).
        betas, eps: AdamW's.
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: final learning rate of the cosine decay as a fraction of ``lr``.
        autocast_dtype: mixed precision on CUDA (open_clip's ``amp``: fp16 with loss scaling);
            not used on CPU.
    """

    name: str
    description: str
    loss: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-6
    batch_size: int = 64
    epochs: int = 32
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0
    autocast_dtype: torch.dtype | None = torch.float16

    def make_loss(self) -> DHNNCELoss:
        """The recipe's loss."""
        return DHNNCELoss(**self.loss)

    def task(self, **kwargs: Any) -> ContrastiveTask:
        """A :class:`ContrastiveTask` with the recipe's loss (``kwargs``: ``gather``, ``ks``)."""
        return ContrastiveTask(loss=self.make_loss(), **kwargs)

    def optimizer(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW over the trainable parameters, weight decay on matrices only (open_clip's groups)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")

        def no_decay(name: str, p: Tensor) -> bool:
            return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

        groups = [
            {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            {
                "params": [p for n, p in named if not no_decay(n, p)],
                "weight_decay": self.weight_decay,
            },
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.lr, betas=self.betas, eps=self.eps
        )

    def fit_options(
        self,
        model: nn.Module,
        *,
        world_size: int = 1,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Keyword arguments of :func:`vlsegkit.train.fit` for this recipe.

        Args:
            model: the model (its trainable parameters go to the optimiser).
            world_size: number of ``torchrun`` processes: each reads ``batch_size / world_size``
                pairs per step (the gathered loss sees ``batch_size``).
            device: the training device; mixed precision is used on CUDA only.
            **overrides: any ``fit`` option to change (e.g. ``epochs=1``).

        Returns:
            ``{"optimizer", "scheduler": "cosine", "warmup_steps", "min_lr_ratio", "batch_size",
            "epochs", "autocast_dtype", ...}``.
        """
        if world_size < 1 or self.batch_size % world_size:
            raise ValueError(
                f"the recipe's batch size {self.batch_size} must split evenly over world_size "
                f"processes, got world_size={world_size}"
            )
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        cuda = torch.device(device).type == "cuda"
        options = {
            "optimizer": self.optimizer(model),
            "scheduler": "cosine",
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "batch_size": self.batch_size // world_size,
            "epochs": self.epochs,
            "autocast_dtype": self.autocast_dtype if cuda else None,
        }
        if "lr" in overrides or "weight_decay" in overrides:
            raise ValueError(
                "lr / weight_decay come from the recipe's optimizer; use dataclasses.replace"
            )
        return {**options, **overrides}


#: The named settings: the paper's (§3.4.1) and the released script's
#: (``biomedclip_finetuning/open_clip/scripts/biomedclip.sh``).
RECIPES: dict[str, ContrastiveRecipe] = {
    "paper": ContrastiveRecipe(
        name="paper",
        description=(
            "MedCLIP-SAMv2 §3.4.1: DHN-NCE (eqs. 9-13, τ 0.6, β1 = β2 = 0.15), lr 1e-6, batch 64, "
            "'50% decay rate' read as a cosine decay to half the learning rate [inference]; the "
            "paper reports neither optimiser nor epochs, which follow the released script (AdamW "
            "0.9 / 0.98 / 1e-6, weight decay 0.1, 1000 warmup steps, 32 epochs, AMP)"
        ),
        loss={"temperature": 0.6, "alpha": 0.0, "beta1": 0.15, "beta2": 0.15},
        lr=1e-6,
        batch_size=64,
        min_lr_ratio=0.5,
    ),
    "released": ContrastiveRecipe(
        name="released",
        description=(
            "biomedclip.sh: the released HardNegativeLoss (released=True: τ 0.6, α 0, β 0.15), "
            "lr 1e-3, batch 16, 32 epochs, AdamW (0.9, 0.98, eps 1e-6), weight decay 0.1 on "
            "matrices, 1000 linear warmup steps then cosine to 0, AMP (fp16), both towers trained"
        ),
        loss={"temperature": 0.6, "alpha": 0.0, "beta1": 0.15, "beta2": 0.15, "released": True},
        lr=1e-3,
        batch_size=16,
    ),
}


def contrastive_recipe(name: str) -> ContrastiveRecipe:
    """The named recipe (``"paper"`` or ``"released"``)."""
    if name not in RECIPES:
        raise KeyError(f"unknown contrastive recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
