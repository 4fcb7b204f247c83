"""CoTexNet's mapping modules and self-adding-noise knowledge distillation (SAN-KD).

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (CoTexNet, *Engineering* 2026), §3.1-3.2, and the authors' release
(github.com/Rango-bit/CoTexNet, ``model/CoTexNet.py`` and ``model/CLIPSeg_pse.py``):

* :class:`MappingModule` -- Linear, GELU, Linear, LayerNorm (768 -> 512 -> 512 at full size): maps a
  frozen CLIP [CLS] token into another space (the text tower's input token space for the ROI
  pseudo-tokens, the conditional-embedding space for the predicted embedding ``T_c``).
* :class:`CLSEmbeddingPredictor` -- eq. 8, ``T_c = Sigmoid(Map(C))`` from the image's [CLS] token ``C``;
  the release uses a deeper ReLU MLP and applies the sigmoid twice (``variant="released"``).
* :class:`SANKD` -- the conditioning of the FiLM decoder: in training the noised mixture
  ``T' = (1 - a)·sigmoid(T_e) + a·T_c`` (learnable ``a``, initially 0.2), then the learnable inverse
  z-score ``T^ = Dropout(T'·s + m)`` (eq. 11; ``s`` = 1, ``m`` = -0.002 initially); at test time
  ``T^_c = T_c·s + m`` (eq. 12), computed from the image alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SANKD", "CLSEmbeddingPredictor", "MappingModule", "sankd_kl_divergence"]


class MappingModule(nn.Sequential):
    """CoTexNet's mapping module: ``LayerNorm(W_2 · GELU(W_1 x + b_1) + b_2)``.

    "Two linear layers with GELU activation inserted between them, followed by a layer normalization
    layer" (§3.1). Submodules ``0`` (Linear), ``1`` (GELU), ``2`` (Linear), ``3`` (LayerNorm), the
    layout of the release's ``mapping_module``.

    Args:
        in_dim: input width (the vision tower's width, 768 for ViT-B/16).
        hidden_dim: width after the first linear layer (512).
        out_dim: output width (512).

    Shapes: ``(..., in_dim) -> (..., out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
            nn.LayerNorm(out_dim),
        )


class _ReleasedCLSMLP(nn.Module):
    """The release's ``Img2text_module`` body: ``[Linear(d, d), ReLU] x 2 -> Linear(d, out)``.

    (Its dropout has p = 0 and is omitted.) Submodule names ``layers.{0,1}.0`` and ``fc_out`` follow
    the release.
    """

    def __init__(self, in_dim: int, out_dim: int, *, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU()) for _ in range(depth)
        )
        self.fc_out = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc_out(x)


class CLSEmbeddingPredictor(nn.Module):
    """The predicted embedding ``T_c`` of an image, from its frozen [CLS] token (eq. 8).

    * ``variant="paper"``: ``T_c = sigmoid(Map(C))`` with the mapping module of Fig. 2
      (:class:`MappingModule`, ``in_dim -> out_dim -> out_dim``);
    * ``variant="released"``: the release's MLP, ``[Linear(d, d), ReLU] x 2 -> Linear(d, out)``, and
      ``double_sigmoid=True`` reproduces its second sigmoid in ``CLIPseg_pse.forward``:
      ``T_c = sigmoid(sigmoid(MLP(C)))``, values in (0.5, 0.731).

    Args:
        in_dim: width of the [CLS] token (768).
        out_dim: width of the conditional embedding (512).
        variant: ``"paper"`` or ``"released"``.
        double_sigmoid: apply the sigmoid twice (the release).

    Shapes: ``(B, in_dim) -> (B, out_dim)`` in (0, 1).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        variant: str = "paper",
        double_sigmoid: bool = False,
    ) -> None:
        super().__init__()
        if variant not in ("paper", "released"):
            raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
        self.variant = variant
        self.double_sigmoid = bool(double_sigmoid)
        if variant == "paper":
            self.mlp: nn.Module = MappingModule(in_dim, out_dim, out_dim)
        else:
            self.mlp = _ReleasedCLSMLP(in_dim, out_dim)

    def forward(self, cls_token: Tensor) -> Tensor:
        """``(B, in_dim)`` [CLS] tokens -> ``(B, out_dim)`` predicted embeddings ``T_c``."""
        t = torch.sigmoid(self.mlp(cls_token))
        return torch.sigmoid(t) if self.double_sigmoid else t

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, double_sigmoid={self.double_sigmoid}"


class SANKD(nn.Module):
    """Self-adding-noise conditioning of CoTexNet's FiLM decoder (eqs. 9, 11, 12).

    Training (``mixture``), with ``t_e = sigmoid(T_e)`` the squashed text embedding::

        T'  = (1 - a)·t_e + a·T_c                     (release; default)
        T'  = sigmoid((1 - a)·T_e + a·T_c)            (eq. 9 as printed; ``outer_sigmoid=True``)
        T^  = Dropout_p(T'·s + m)                     (eq. 11; the release never applies the dropout)

    Test (``image``): ``T^_c = T_c·s + m`` (eq. 12). ``text``: ``sigmoid(T_e)·s + m`` (eq. 6's
    ``phi(T_e)``: the real-text conditioning, for comparisons). ``a``, ``s`` and ``m`` are learnable
    scalars shared by all dimensions, initially 0.2, 1 and -0.002 (§3.2).

    Eq. 9 applies a sigmoid to a mixture of the raw ``T_e`` and the already squashed ``T_c``; the
    release squashes ``T_e`` first and mixes the two probabilities without an outer sigmoid, which
    eq. 6 (``phi`` = sigmoid then inverse z-score) and eq. 12 agree with, so that is the default and
    the literal eq. 9 is the option.

    Args:
        alpha: initial noise weight ``a``.
        scale: initial inverse z-score scale ``s``.
        shift: initial inverse z-score shift ``m``.
        dropout: dropout rate on ``T^`` in training (paper 0.2; 0 reproduces the release).
        outer_sigmoid: eq. 9 as printed (see above).

    Shapes: embeddings ``(B, E)``.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        scale: float = 1.0,
        shift: float = -0.002,
        dropout: float = 0.2,
        outer_sigmoid: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.alpha = nn.Parameter(torch.tensor([float(alpha)]))
        self.scale = nn.Parameter(torch.tensor([float(scale)]))
        self.shift = nn.Parameter(torch.tensor([float(shift)]))
        self.dropout = nn.Dropout(float(dropout))
        self.outer_sigmoid = bool(outer_sigmoid)

    def inverse_zscore(self, t: Tensor) -> Tensor:
        """``t·s + m`` (eqs. 11-12 without dropout)."""
        return t * self.scale.to(t.dtype) + self.shift.to(t.dtype)

    def mixture(self, text_embedding: Tensor, predicted: Tensor) -> Tensor:
        """``T'`` from the raw text embedding ``T_e`` and the predicted ``T_c`` (both ``(B, E)``)."""
        a = self.alpha.to(predicted.dtype)
        if self.outer_sigmoid:
            return torch.sigmoid((1 - a) * text_embedding + a * predicted)
        return (1 - a) * torch.sigmoid(text_embedding) + a * predicted

    def forward(self, mode: str, predicted: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """The FiLM conditioning vector.

        Args:
            mode: ``"mixture"`` (training, eq. 11), ``"image"`` (test, eq. 12) or ``"text"``
                (``sigmoid(T_e)·s + m``).
            predicted: ``(B, E)`` predicted embedding ``T_c``.
            text_embedding: ``(B, E)`` raw text embedding ``T_e`` (``mixture`` / ``text``).

        Returns:
            ``(B, E)`` conditioning vectors.
        """
        if mode == "image":
            return self.inverse_zscore(predicted)
        if text_embedding is None:
            raise ValueError(f"SANKD mode {mode!r} needs the text embedding T_e")
        if mode == "text":
            return self.inverse_zscore(torch.sigmoid(text_embedding))
        if mode == "mixture":
            return self.dropout(self.inverse_zscore(self.mixture(text_embedding, predicted)))
        raise ValueError(f"mode must be 'mixture', 'image' or 'text', got {mode!r}")

    def extra_repr(self) -> str:
        return f"dropout={self.dropout.p}, outer_sigmoid={self.outer_sigmoid}"


def sankd_kl_divergence(student: Tensor, teacher: Tensor, *, temperature: float = 1.0) -> Tensor:
    """SAN-KD's distillation loss ``KL(softmax(teacher/τ) || softmax(student/τ))·τ²``.

    The release's ``KLDiv``: softmax over the embedding dimensions, ``batchmean`` reduction (sum
    over dimensions, mean over the batch); the teacher is ``stopgrad(sigmoid(T_e))`` and the student
    ``T_c`` (eqs. 10, 14-15).

    Args:
        student: ``(B, E)`` predicted embeddings ``T_c``.
        teacher: ``(B, E)`` targets (detached here).
        temperature: ``τ > 0``.

    Returns:
        Scalar loss.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher must both be (B, E), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    target = F.softmax(teacher.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature**2
