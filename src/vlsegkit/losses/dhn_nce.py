"""DHN-NCE, the decoupled hard-negative contrastive loss of MedCLIP-SAMv2, and its family.

Koleilat, Asgariandehkordi, Rivaz and Xiao, "MedCLIP-SAMv2: Towards universal text-driven medical
image segmentation" (Medical Image Analysis 2025, arXiv 2409.19483), section 3.1, eqs. 1-13; public
code ``HealthX-Lab/MedCLIP-SAMv2`` (``loss/hnl.py``, the same class as ``HardNegativeLoss`` in its
vendored open_clip). It combines decoupled contrastive learning (DCL; Yeh et al., ECCV 2022: the
positive leaves the denominator) with hard-negative weighting (HN-NCE; Radenovic et al., CVPR 2023,
after Robinson et al., ICLR 2021: similar negatives weigh more).

The paper's loss (the default). With L2-normalised image / text embeddings ``I_i``, ``T_i`` of B
pairs and ``s_ij = I_i·T_j / τ``::

    W^{v→t}_ij = (B-1) · exp(β1 s_ij) / Σ_{k≠i} exp(β1 s_ik)                       (eq. 12)
    W^{t→v}_ij = (B-1) · exp(β2 s_ji) / Σ_{k≠i} exp(β2 s_ki)                       (eq. 13)
    ℓ^{v→t}_i  = -s_ii + log( α·exp(s_ii) + Σ_{j≠i} W^{v→t}_ij · exp(s_ij) )       (eq. 9)
    ℓ^{t→v}_i  = -s_ii + log( α·exp(s_ii) + Σ_{j≠i} W^{t→v}_ij · exp(s_ji) )       (eq. 10)
    L = Σ_i ℓ^{v→t}_i + Σ_i ℓ^{t→v}_i                                              (eq. 11)

``α = 0`` is DHN-NCE (eqs. 9-10 as printed). ``α`` and ``β`` span the family the paper compares in
Table 2: ``α = 0, β = 0`` is DCL (eqs. 7-8), ``α = 1`` HN-NCE and ``α = 1, β = 0`` the symmetric
InfoNCE of CLIP (eqs. 2-3, summed over anchors and over the two directions, so ``reduction="mean"``
is twice CLIP's ``(CE(S) + CE(Sᵀ)) / 2``). Each log-sum is computed in log space::

    log Σ_{j≠i} W_ij exp(s_ij) = log(B-1) + LSE_{j≠i}((1+β) s_ij) - LSE_{k≠i}(β s_ik)

so nothing overflows for small ``τ``, and nothing larger than the ``(B, B)`` similarity matrix is
built (a few ``(B, B)`` temporaries; ``benchmarks/dhn_nce.py`` compares the cost with CLIP's
cross-entropy loss). Gradients flow through the weights W (neither the paper nor the code stops them);
``detach_weights=True`` is the stop-gradient variant.

The released code (``released=True``) computes something else (``specs/medclipsamv2.md`` §1.4,
verified there numerically). Per entry ``(i, j)`` of the ``B x B`` matrix, with ``N = B - 1`` and
``n_j = 1 + Σ_{k≠j} exp(s_jk)`` (the diagonal zeroed *before* the exponential, hence the 1)::

    img_ij = -log( p_ij / (α p_ij + N·exp(β1 s_ij [i≠j]) · exp(s_ij [i≠j]) / n_j) )
    L_code = mean_ij( img_ij + txt_ij )             (txt: the same on sᵀ with β2 and column sums)

with ``p_ij = exp(s_ii)`` on the diagonal and 1 elsewhere. It differs from eqs. 9-13 in four ways:
(1) the weights are normalised by column ``j``'s sum instead of anchor ``i``'s (torch broadcasting
of a ``(B,)`` vector over the last axis); (2) the normaliser holds no ``β`` (``exp(s)``, not
``exp(β s)``) and an extra ``exp(0) = 1``; (3) the negatives are never summed inside the log: every
off-diagonal entry is its own ``log`` term; (4) the result is averaged over the ``B²`` entries. In
closed form (α = 0) ``β`` enters only linearly and the log-sum-exp of the negatives enters with a
*negative* sign, so the released loss pulls the hardest negatives closer instead of pushing them
away. ``released=True`` reproduces that value (to float rounding, again in log space) whatever
``reduction`` says, with ``N = B - 1`` from the actual batch (the release takes the command-line
batch size; the two agree because open_clip drops the last incomplete batch).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DCLLoss",
    "DHNNCELoss",
    "HNNCELoss",
    "InfoNCELoss",
    "dhn_nce_directions",
    "dhn_nce_loss",
]

Reduction = Literal["sum", "mean", "none"]
_REDUCTIONS = ("sum", "mean", "none")
# Cosine similarities are divided by the temperature: below this, 1 / τ overflows fp16.
_MIN_TEMPERATURE = 1e-4


# --------------------------------------------------------------------------- checks
def _check_number(name: str, value: object, *, low: float, strict: bool = False) -> float:
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and (float(value) > low if strict else float(value) >= low)
    )
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_options(
    temperature: float, alpha: float, beta1: float, beta2: float, reduction: str
) -> tuple[float, float, float, float]:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return (
        _check_number("temperature", temperature, low=_MIN_TEMPERATURE),
        _check_number("alpha", alpha, low=0.0),
        _check_number("beta1", beta1, low=0.0),
        _check_number("beta2", beta2, low=0.0),
    )


def _check_embeddings(image_embeds: Tensor, text_embeds: Tensor) -> None:
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a (B, D) tensor, got {type(x).__name__}")
        if x.dim() != 2 or 0 in x.shape or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point (B, D) tensor with D >= 1, got shape "
                f"{tuple(x.shape)} and dtype {x.dtype}"
            )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must have the same shape (B, D) (row i of each is pair "
            f"i), got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] < 2:
        raise ValueError(
            "contrastive losses need a batch of at least 2 pairs (a pair alone has no negatives), "
            f"got B={image_embeds.shape[0]}"
        )


def _similarity(image_embeds: Tensor, text_embeds: Tensor, temperature: float) -> Tensor:
    """``S = normalize(I) normalize(T)ᵀ / τ`` ``(B, B)``, in float32 at least (autocast-safe)."""
    dtype = torch.promote_types(image_embeds.dtype, torch.float32)
    # autocast would run the product in bf16 / fp16 again; the loss is computed in float32
    with torch.autocast(image_embeds.device.type, enabled=False):
        image = F.normalize(image_embeds.to(dtype), dim=-1)
        text = F.normalize(text_embeds.to(dtype), dim=-1)
        return image @ text.T / temperature


# --------------------------------------------------------------------------- paper, eqs. 9-13
def _paper_direction(s: Tensor, beta: float, alpha: float, detach_weights: bool) -> Tensor:
    """Per-anchor terms ``ℓ_i`` (B,) of one direction; anchors are the rows of ``s``.

    With ``W_ij = (B-1) exp(β s_ij) / Σ_{k≠i} exp(β s_ik)`` (eqs. 12-13) the weighted log-sum is

        log Σ_{j≠i} W_ij e^{s_ij} = log(B-1) + LSE_{j≠i}((1+β) s_ij) - LSE_{k≠i}(β s_ik)

    (two masked ``(B, B)`` log-sum-exps; with β = 0 the weights are 1 and the last two terms
    cancel). With ``detach_weights`` the β parts carry no gradient.
    """
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=s.device)  # the anchor's own pair: no negative
    if beta == 0:
        log_neg = torch.logsumexp(s.masked_fill(eye, -math.inf), dim=-1)
    else:
        hard = beta * s
        if detach_weights:
            hard = hard.detach()
        log_neg = (
            math.log(b - 1)
            + torch.logsumexp((s + hard).masked_fill(eye, -math.inf), dim=-1)
            - torch.logsumexp(hard.masked_fill(eye, -math.inf), dim=-1)
        )
    positive = s.diagonal()
    if alpha > 0:
        log_neg = torch.logaddexp(log_neg, positive + math.log(alpha))
    return log_neg - positive


# --------------------------------------------------------------------------- released loss/hnl.py
def _released_entries(s: Tensor, beta: float, alpha: float) -> Tensor:
    """The released per-entry terms ``(B, B)`` of one side (image side: ``s``; text side: ``sᵀ``).

    Entry ``(i, j)`` is ``-log(p_ij / (α p_ij + neg_ij))`` of the released code, in log space.
    """
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    zeroed = s.masked_fill(eye, 0.0)  # s * neg_mask: the diagonal becomes exp(0) = 1 below
    log_norm = torch.logsumexp(zeroed, dim=-1)  # n_r = 1 + sum_{k != r} exp(s_rk), per row r
    # neg_ij = N exp(beta s_ij [i!=j]) exp(s_ij [i!=j]) / n_j: the normaliser of row j divides
    # column j (a (B,) vector broadcast over the last axis)
    log_neg = math.log(b - 1) + (1.0 + beta) * zeroed - log_norm[None, :]
    log_pos = torch.where(eye, s, torch.zeros_like(s))  # log p: s_ii on the diagonal, 0 elsewhere
    if alpha > 0:
        log_denominator = torch.logaddexp(log_neg, log_pos + math.log(alpha))
    else:
        log_denominator = log_neg
    return log_denominator - log_pos


# --------------------------------------------------------------------------- functional API
def dhn_nce_directions(
    image_embeds: Tensor,
    text_embeds: Tensor,
    *,
    temperature: float = 0.6,
    alpha: float = 0.0,
    beta1: float = 0.15,
    beta2: float = 0.15,
    detach_weights: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-anchor terms of the paper's loss (eqs. 9-10), one vector per direction.

    Args:
        image_embeds: ``(B, D)`` image embeddings (any norm; they are L2-normalised here).
        text_embeds: ``(B, D)`` text embeddings; row ``i`` is the caption of image ``i``.
        temperature: ``τ`` (0.6 in the paper), at least 1e-4.
        alpha: weight of the positive in the denominator (0: decoupled; 1: HN-NCE / InfoNCE).
        beta1: image-to-text hardness ``β1 >= 0`` (0: uniform weights).
        beta2: text-to-image hardness ``β2 >= 0``.
        detach_weights: stop the gradient through the hardness weights W.

    Returns:
        ``(v2t, t2v)``, each ``(B,)``: ``ℓ^{v→t}_i`` (image ``i`` as anchor) and ``ℓ^{t→v}_i`` (text
        ``i`` as anchor), in float32 (float64 for float64 inputs).

    Raises:
        ValueError: bad options, shapes other than two equal ``(B, D)``, or ``B < 2``.
    """
    temperature, alpha, beta1, beta2 = _check_options(temperature, alpha, beta1, beta2, "sum")
    _check_embeddings(image_embeds, text_embeds)
    s = _similarity(image_embeds, text_embeds, temperature)
    return (
        _paper_direction(s, beta1, alpha, detach_weights),
        _paper_direction(s.T, beta2, alpha, detach_weights),
    )


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean()
    return x


def dhn_nce_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    *,
    temperature: float = 0.6,
    alpha: float = 0.0,
    beta1: float = 0.15,
    beta2: float = 0.15,
    reduction: Reduction = "sum",
    released: bool = False,
    detach_weights: bool = False,
) -> Tensor:
    """DHN-NCE (MedCLIP-SAMv2 eqs. 9-13) or a member of its family; see the module docstring.

    Args:
        image_embeds: ``(B, D)`` image embeddings (L2-normalised here), ``B >= 2``.
        text_embeds: ``(B, D)`` text embeddings, row ``i`` paired with image ``i``.
        temperature: ``τ`` (0.6), at least 1e-4.
        alpha: positive weight in the denominator (0 DHN-NCE / DCL, 1 HN-NCE / InfoNCE).
        beta1: image-to-text hardness ``β1 >= 0`` (0.15).
        beta2: text-to-image hardness ``β2 >= 0`` (0.15).
        reduction: ``"sum"`` over anchors (eq. 11, the paper), ``"mean"`` (the sum divided by B)
            or ``"none"`` (``(B,)``: ``ℓ^{v→t}_i + ℓ^{t→v}_i`` per pair).
        released: the public ``loss/hnl.py`` instead of the paper: a scalar averaged over the
            ``B²`` entries of its matrix, whatever ``reduction`` says.
        detach_weights: stop the gradient through the weights W (paper form only).

    Returns:
        The loss: a scalar, or ``(B,)`` for ``reduction="none"`` (paper form).
    """
    temperature, alpha, beta1, beta2 = _check_options(temperature, alpha, beta1, beta2, reduction)
    _check_embeddings(image_embeds, text_embeds)
    s = _similarity(image_embeds, text_embeds, temperature)
    if released:
        if detach_weights:
            raise ValueError("detach_weights applies to the paper's loss, not to released=True")
        return (_released_entries(s, beta1, alpha) + _released_entries(s.T, beta2, alpha)).mean()
    v2t = _paper_direction(s, beta1, alpha, detach_weights)
    t2v = _paper_direction(s.T, beta2, alpha, detach_weights)
    return _reduce(v2t + t2v, reduction)


# --------------------------------------------------------------------------- modules
class DHNNCELoss(nn.Module):
    """Decoupled Hard-Negative NCE of MedCLIP-SAMv2 (eqs. 9-13), on raw ``(B, D)`` embeddings.

    ``loss(image_embeds, text_embeds)`` normalises the embeddings, forms ``s = I Tᵀ / τ`` and returns
    ``L^{v→t} + L^{t→v}`` (see the module docstring for the equations). ``alpha`` and ``beta``
    select the family: :class:`DCLLoss`, :class:`HNNCELoss` and :class:`InfoNCELoss` are this class
    with other presets.

    Args:
        temperature: ``τ`` (0.6, the paper and the released script); at least 1e-4.
        alpha: weight of the positive in the denominator (0: the positive is removed).
        beta1: image-to-text hardness ``β1 >= 0`` (0.15).
        beta2: text-to-image hardness ``β2 >= 0`` (0.15).
        reduction: ``"sum"`` over anchors as in eq. 11 (default), ``"mean"`` (sum / B), or
            ``"none"`` (per pair ``(B,)``).
        released: reproduce the public ``loss/hnl.py`` exactly (to float rounding). It is not the
            paper's loss: its weights are normalised by the wrong axis and without β, its negatives
            are not summed inside the log, and it is **averaged over the B² entries of its matrix
            whatever** ``reduction`` **says**. It pulls the hardest negatives closer
            (``specs/medclipsamv2.md`` §1.4).
        detach_weights: stop the gradient through the hardness weights W (paper form only; the
            paper and the code let it flow).

    Shapes:
        ``forward(image_embeds (B, D), text_embeds (B, D)) -> ()`` (``(B,)`` with
        ``reduction="none"``), ``B >= 2``; computed in float32 or wider, also under autocast.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.6,
        alpha: float = 0.0,
        beta1: float = 0.15,
        beta2: float = 0.15,
        reduction: Reduction = "sum",
        released: bool = False,
        detach_weights: bool = False,
    ) -> None:
        super().__init__()
        self.temperature, self.alpha, self.beta1, self.beta2 = _check_options(
            temperature, alpha, beta1, beta2, reduction
        )
        if released and detach_weights:
            raise ValueError("detach_weights applies to the paper's loss, not to released=True")
        self.reduction: str = reduction
        self.released = bool(released)
        self.detach_weights = bool(detach_weights)

    def _kwargs(self) -> dict:
        return dict(
            temperature=self.temperature,
            alpha=self.alpha,
            beta1=self.beta1,
            beta2=self.beta2,
            detach_weights=self.detach_weights,
        )

    def forward(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """The loss of a batch of ``B`` pairs (row ``i`` of each tensor is pair ``i``)."""
        return dhn_nce_loss(
            image_embeds,
            text_embeds,
            reduction=self.reduction,  # type: ignore[arg-type]
            released=self.released,
            **self._kwargs(),
        )

    def terms(self, image_embeds: Tensor, text_embeds: Tensor) -> dict[str, Tensor]:
        """Named terms: ``loss`` and, for the paper form, ``v2t_loss`` / ``t2v_loss`` (eqs. 9, 10)
        with the same reduction (``"none"`` is summed here, so every term is a scalar)."""
        if self.released:
            return {"loss": self(image_embeds, text_embeds)}
        v2t, t2v = dhn_nce_directions(image_embeds, text_embeds, **self._kwargs())
        reduction = "sum" if self.reduction == "none" else self.reduction
        v2t, t2v = _reduce(v2t, reduction), _reduce(t2v, reduction)
        return {"loss": v2t + t2v, "v2t_loss": v2t, "t2v_loss": t2v}

    def extra_repr(self) -> str:
        flags = (", released=True" if self.released else "") + (
            ", detach_weights=True" if self.detach_weights else ""
        )
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta1={self.beta1}, "
            f"beta2={self.beta2}, reduction={self.reduction!r}{flags}"
        )


class DCLLoss(DHNNCELoss):
    """Decoupled contrastive loss (Yeh et al., ECCV 2022; MedCLIP-SAMv2 eqs. 7-8):
    :class:`DHNNCELoss` with ``alpha = 0`` and ``beta1 = beta2 = 0`` (uniform weights).

    Takes the keyword arguments of :class:`DHNNCELoss`; only the presets differ.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.6,
        alpha: float = 0.0,
        beta1: float = 0.0,
        beta2: float = 0.0,
        reduction: Reduction = "sum",
        released: bool = False,
        detach_weights: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature, alpha=alpha, beta1=beta1, beta2=beta2, reduction=reduction,
            released=released, detach_weights=detach_weights,
        )  # fmt: skip


class HNNCELoss(DHNNCELoss):
    """Hard-negative NCE (Radenovic et al., CVPR 2023): :class:`DHNNCELoss` with the positive kept
    in the denominator (``alpha = 1``) and ``beta1 = beta2 = 0.15`` (the paper's comparison).

    Takes the keyword arguments of :class:`DHNNCELoss`; only the presets differ.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.6,
        alpha: float = 1.0,
        beta1: float = 0.15,
        beta2: float = 0.15,
        reduction: Reduction = "sum",
        released: bool = False,
        detach_weights: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature, alpha=alpha, beta1=beta1, beta2=beta2, reduction=reduction,
            released=released, detach_weights=detach_weights,
        )  # fmt: skip


class InfoNCELoss(DHNNCELoss):
    """Symmetric InfoNCE (Oord et al. 2018; CLIP; MedCLIP-SAMv2 eqs. 2-3): :class:`DHNNCELoss` with
    ``alpha = 1`` and ``beta1 = beta2 = 0``, i.e. ``CE(S) + CE(Sᵀ)`` with targets ``arange(B)``,
    summed over anchors (``reduction="mean"``: each cross-entropy averaged, twice CLIP's loss).

    Takes the keyword arguments of :class:`DHNNCELoss`; only the presets differ.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.6,
        alpha: float = 1.0,
        beta1: float = 0.0,
        beta2: float = 0.0,
        reduction: Reduction = "sum",
        released: bool = False,
        detach_weights: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature, alpha=alpha, beta1=beta1, beta2=beta2, reduction=reduction,
            released=released, detach_weights=detach_weights,
        )  # fmt: skip
