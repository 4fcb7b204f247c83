"""Soft patch-level contrastive loss ``L_SoftCon`` of MedCLIPSeg.

Koleilat et al., "MedCLIPSeg: Probabilistic Vision-Language Adaptation for Data-Efficient and
Generalizable Medical Image Segmentation" (CVPR 2026), section 3.4, eqs. 20-22; official code
``HealthX-Lab/MedCLIPSeg`` (training branch of ``CustomCLIP.forward``). Average-pooled patch embeddings
are aligned with text embeddings by a CLIP-style loss whose targets are *soft*: texts that are alike
(e.g. identical prompts in one batch) share the target mass instead of fighting over one-hot labels.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SoftPatchContrastiveLoss", "soft_patch_contrastive_loss"]

Variant = Literal["paper", "released"]
_VARIANTS = ("paper", "released")
# Cosine similarities are divided by tau: below this, 1 / tau overflows fp16 under autocast (and
# far below it, fp32), which makes the loss NaN. MedCLIPSeg uses 0.2, CLIP's smallest is 0.01.
_MIN_TEMPERATURE = 1e-4


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-(1/B) sum_i sum_j G_ij log softmax(P_i)_j`` (eq. 21)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def soft_patch_contrastive_loss(
    patch_tokens: Tensor,
    text_embeddings: Tensor,
    *,
    temperature: float = 0.2,
    variant: Variant = "paper",
) -> Tensor:
    """Soft patch-level contrastive loss (MedCLIPSeg eqs. 20-22).

    ``variant="paper"`` (eqs. 20-22 as written)::

        p_v = normalize(mean_p normalize(z_p))     p_t = normalize(z_t)
        P_v2t = p_v p_t^T / tau                    P_t2v = P_v2t^T
        G = softmax(p_t p_t^T / tau)               (rows; computed without gradient)
        L = 1/2 [ L_soft(P_v2t, G) + L_soft(P_t2v, G^T) ]

    ``variant="released"`` (the official training code, ``specs/medclipseg.md`` section 2.2): the mean
    of the normalised patches is *not* re-normalised, the text embeddings are *not* normalised, and
    each row of ``S = z_t z_t^T / tau`` is divided by its L2 norm before the softmax (which cancels
    ``tau`` in the targets): ``G = softmax(S_i / ||S_i||)``.

    In both, ``L_soft(P, G) = -(1/B) sum_i sum_j G_ij log softmax(P_i)_j`` (eq. 21); the image rows are
    paired with ``G`` and the text rows with ``G^T`` (the transpose, as in the paper and the code, so
    the text-row targets need not sum to one). A batch of one gives 0.

    Args:
        patch_tokens: ``(B, P, D)`` final patch embeddings in the joint space (CLS removed).
        text_embeddings: ``(B, D)`` global text embeddings ([EOS] / [CLS] after projection).
        temperature: ``tau`` (0.2 in the paper), at least 1e-4 (smaller values overflow).
        variant: ``"paper"`` or ``"released"``.

    Returns:
        Scalar loss, in float32 (float64 for float64 inputs), also under autocast.

    Raises:
        ValueError: a ``temperature`` that is not a finite number >= 1e-4, an unknown ``variant``, or
            shapes other than ``(B, P, D)`` and ``(B, D)`` with ``B, P, D >= 1`` (a batch of size
            0 included).
    """
    _check_inputs(patch_tokens, text_embeddings, temperature, variant)
    # at least fp32 with autocast off: the similarities are divided by tau (1 / tau = 1e4 at the
    # smallest tau), which half precision rounds to a few significant digits; fp64 stays fp64
    dtype = torch.promote_types(
        torch.promote_types(patch_tokens.dtype, text_embeddings.dtype), torch.float32
    )
    with torch.autocast(device_type=patch_tokens.device.type, enabled=False):
        pooled = F.normalize(patch_tokens.to(dtype), dim=-1).mean(dim=1)
        text = text_embeddings.to(dtype)
        if variant == "paper":
            pooled = F.normalize(pooled, dim=-1)
            text = F.normalize(text, dim=-1)
        logits_v2t = pooled @ text.T / temperature
        with torch.no_grad():
            sim = text @ text.T / temperature
            if variant == "released":
                sim = F.normalize(sim, dim=-1)
            targets = sim.softmax(dim=-1)
        return 0.5 * (
            _soft_cross_entropy(logits_v2t, targets) + _soft_cross_entropy(logits_v2t.T, targets.T)
        )


def _check_options(temperature: float, variant: str) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or not temperature >= _MIN_TEMPERATURE
    ):
        raise ValueError(
            f"temperature must be a finite number >= {_MIN_TEMPERATURE:g}, got {temperature!r}"
        )


def _check_inputs(patch_tokens: Tensor, text: Tensor, temperature: float, variant: str) -> None:
    _check_options(temperature, variant)
    if patch_tokens.dim() != 3 or 0 in patch_tokens.shape:
        # A batch of size 0 would give mean() of nothing, a NaN loss.
        raise ValueError(
            f"patch_tokens must have shape (B, P, D) with B, P, D >= 1, got "
            f"{tuple(patch_tokens.shape)}"
        )
    b, _, d = patch_tokens.shape
    if text.dim() != 2 or tuple(text.shape) != (b, d):
        raise ValueError(
            f"text_embeddings must have shape (B, D) = ({b}, {d}) to match patch_tokens, "
            f"got {tuple(text.shape)}"
        )


class SoftPatchContrastiveLoss(nn.Module):
    """Module form of :func:`soft_patch_contrastive_loss` (MedCLIPSeg ``L_SoftCon``, eqs. 20-22).

    The paper weights it by ``lambda_SoftCon = 0.1`` in the total loss (eq. 23); that weight is left to
    the caller.

    Args:
        temperature: ``tau`` (0.2 in the paper).
        variant: ``"paper"`` (default) or ``"released"`` (the official code's pooling / target
            construction, see :func:`soft_patch_contrastive_loss`).

    Shapes:
        ``forward(patch_tokens (B, P, D), text_embeddings (B, D)) -> ()``.
    """

    def __init__(self, *, temperature: float = 0.2, variant: Variant = "paper") -> None:
        super().__init__()
        _check_options(temperature, variant)
        self.temperature, self.variant = float(temperature), variant

    def forward(self, patch_tokens: Tensor, text_embeddings: Tensor) -> Tensor:
        """Loss for a batch of ``(patch_tokens (B, P, D), text_embeddings (B, D))``."""
        return soft_patch_contrastive_loss(
            patch_tokens, text_embeddings, temperature=self.temperature, variant=self.variant
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, variant={self.variant!r}"
