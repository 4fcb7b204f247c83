"""Small projection networks between prompt spaces (CoCoOp meta-nets, MaPLe couplings).

TuneVLSeg (Adhikari et al., ACCV 2024) searches, for CoCoOp's meta-net and MaPLe's text-to-vision
coupling, over an intermediate width ``d_int`` and a low-rank ("LoRA") variant; its released code
(``BaseProjectorLearner``) builds ``Linear -> ReLU -> Linear -> LayerNorm``. :class:`PromptProjector`
covers the three shapes with one module.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PromptProjector"]


class PromptProjector(nn.Module):
    """Map prompt or feature vectors from one width to another.

    Three shapes, by arguments::

        hidden_dim=None:         y = W x + b                                 (MaPLe's coupling)
        hidden_dim=h:            y = LN(W_2 ReLU(W_1 x + b_1) [+ b_2])        (TuneVLSeg MLP)
        hidden_dim=h, low_rank:  y = LN(W_2 W_1 x [+ b_2]),  W_1: min(h, out) x in   (rank-h)

    As in TuneVLSeg's released ``BaseProjectorLearner``: the last linear layer has a bias only
    without the LayerNorm and with ``final_bias``; the LayerNorm has a bias iff ``final_bias``
    (MaPLe's released couplings: True; CoCoOp's meta-nets: False); in the low-rank form a ``h`` at
    least the output width leaves a single linear layer; the MLP's hidden layer is
    Kaiming-initialised for the ReLU.

    Args:
        in_dim: input width.
        out_dim: output width.
        hidden_dim: intermediate width (None: a single affine layer).
        low_rank: use the linear rank-``hidden_dim`` factorisation instead of the ReLU MLP.
        norm: final LayerNorm (ignored without ``hidden_dim``).
        final_bias: bias of the final LayerNorm (or, without it, of the final linear layer).

    Shapes:
        ``(..., in_dim) -> (..., out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int | None = None,
        low_rank: bool = False,
        norm: bool = True,
        final_bias: bool = False,
    ) -> None:
        super().__init__()
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1 or None, got {hidden_dim}")
        if low_rank and hidden_dim is None:
            raise ValueError("low_rank=True needs hidden_dim (the rank)")
        self.in_dim, self.out_dim = in_dim, out_dim
        if hidden_dim is None:
            self.net = nn.Linear(in_dim, out_dim)
            return
        last_bias = final_bias and not norm
        if low_rank:
            rank = min(hidden_dim, out_dim)
            layers: list[nn.Module] = [nn.Linear(in_dim, rank, bias=False)]
            if hidden_dim <= out_dim:
                layers.append(nn.Linear(hidden_dim, out_dim, bias=last_bias))
        else:
            first = nn.Linear(in_dim, hidden_dim)
            nn.init.kaiming_normal_(first.weight, nonlinearity="relu")
            layers = [first, nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=last_bias)]
        if norm:
            layers.append(nn.LayerNorm(out_dim, bias=final_bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"PromptProjector input must have shape (..., {self.in_dim}), got {tuple(x.shape)}"
            )
        return self.net(x)
