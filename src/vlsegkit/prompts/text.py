"""Textual context learners: CoOp (deep) and CoCoOp.

* CoOp -- Zhou et al., "Learning to Prompt for Vision-Language Models" (IJCV 2022); deep variant as in
  TuneVLSeg (Adhikari et al., ACCV 2024, §4.1 eq. 5-6): ``B`` learnable context tokens per depth
  ``i < J`` replace the prompt slots before text block ``i``; blocks ``i >= J`` carry them.
* CoCoOp -- Zhou et al., "Conditional Prompt Learning for Vision-Language Models" (CVPR 2022): a
  meta-network ``h_i`` maps the image embedding ``f`` to a shift added to every context token,
  ``P_i(f) = P_i + h_i(f)``, so the context depends on the image. TuneVLSeg's meta-net shape
  (``Linear -> ReLU -> Linear -> LayerNorm``, one per depth, unnormalised features) is the default.

The context sits after the start token (BOS / [CLS]) -- the convention of CoOp's code and of
TuneVLSeg's released code -- and the class name follows it, so every class of a task shares the
learned context.

Deep-prompt schedule. The paper (TuneVLSeg eq. 5-6) gives fresh contexts to J blocks: ``P_0`` at the
input of block 0 and ``P_i`` before block ``i`` for ``1 <= i < J``. TuneVLSeg's released CRIS code
overwrites the slots *after* block ``i`` with ``P_i`` for ``i < J``, so ``P_0`` enters block 0 and
again block 1, then ``P_{i-1}`` enters block ``i`` up to block J: J + 1 blocks receive prompts.
``first_context_twice=True`` reproduces that (for checkpoints and numbers of the released CRIS code);
the default is the paper's schedule.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

from torch import Tensor, nn

from ..encoders.base import TokenState
from ..encoders.hooks import RunContext
from .base import ContextLearner, PromptSet, TextOverflow, _check_image_features
from .projector import PromptProjector

__all__ = ["CoCoOp", "CoOp"]


class CoOp(ContextLearner):
    """Deep textual context learning (CoOp when ``depth == 1``).

    Parameters ``P_i ∈ R^{B x D_t}``, ``i = 0 .. J-1``, stored as ``context (J, B, D_t)`` and
    initialised ``N(0, init_std^2)``; ``P_0`` is then set to the token embeddings of ``init`` when given.
    Text input to block 0 is ``[BOS, P_0, w_1 .. EOS]`` (TuneVLSeg eq. 5); before block ``i < J`` the
    slots are overwritten by ``P_i``; after block ``J - 1`` they are ordinary tokens (eq. 6).

    Args:
        num_context: ``B`` (None: the token count of ``init``, else 4).
        depth: ``J``, ``1 <= J <= text_layers`` (``< text_layers`` with ``first_context_twice``).
        init: phrase initialising ``P_0`` (TuneVLSeg / CoOp: ``"a photo of a"``; None: Gaussian).
        init_std: std of the Gaussian initialisation.
        overflow: see :class:`~vlsegkit.prompts.ContextLearner`.
        first_context_twice: TuneVLSeg's released CRIS schedule (see the module docstring): ``P_0``
            before blocks 0 and 1, ``P_{i-1}`` before block ``i <= J`` (J + 1 prompted blocks).
            Default False: the paper's J blocks.
        text_width, text_layers: text tower sizes (read by ``bind`` / ``attach`` when omitted).

    Example:
        >>> tuned = CoOp(depth=3).attach(model)       # model: a VLSM such as CLIPSeg
        >>> logits = tuned(pixel_values, ["polyp"]).logits
    """

    phrase_init = True
    towers = ("text",)
    required_dims = ("text_width", "text_layers")
    RELEASED: ClassVar[dict[str, Any]] = {"init": "a photo of a", "overflow": "released"}

    def __init__(
        self,
        *,
        num_context: int | None = None,
        depth: int = 1,
        init: str | None = "a photo of a",
        init_std: float = 0.02,
        overflow: TextOverflow = "truncate",
        first_context_twice: bool = False,
        text_width: int | None = None,
        text_layers: int | None = None,
    ) -> None:
        self.first_context_twice = _check_flag(first_context_twice, "first_context_twice")
        super().__init__(
            num_context=num_context,
            depth=depth,
            init=init,
            init_std=init_std,
            overflow=overflow,
            text_width=text_width,
            text_layers=text_layers,
        )

    def _build(self) -> None:
        layers = self._dims["text_layers"]
        if self.first_context_twice and self.depth >= layers:
            raise ValueError(
                f"first_context_twice gives prompts to depth + 1 blocks: depth={self.depth} needs "
                f"more than the text tower's {layers} blocks (use depth <= {layers - 1})"
            )
        self.context = self._normal(self.depth, self.num_context, self._dims["text_width"])

    # ------------------------------------------------------------------ deep-prompt schedule
    def layers(self, tower: str) -> Collection[int]:
        """Blocks whose input slots get fresh contexts: ``1 .. J-1`` (paper) or ``1 .. J``
        (``first_context_twice``)."""
        return range(1, self.depth + 1) if self.first_context_twice else range(1, self.depth)

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        """Overwrite the context slots before block ``i`` with ``P_i`` (or ``P_{i-1}``)."""
        k = i - 1 if self.first_context_twice else i
        return {name: s.set_prompts(self._deep(name, ctx)[k]) for name, s in states.items()}

    def _first_text_context(self) -> Tensor:
        return self.context[0]

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per-depth contexts ``[P_0 .. P_{J-1}]``, each ``(num_context, D_t)``; features unused."""
        return PromptSet(text=list(self.context.unbind(0)))


class CoCoOp(CoOp):
    """Conditional (image-dependent) deep textual context: ``P_i(f) = P_i + h_i(f)``.

    ``f ∈ R^{E}`` is the pooled image embedding of the (unprompted) vision tower, ``h_i`` a
    :class:`~vlsegkit.prompts.PromptProjector` per depth (TuneVLSeg code: ``Linear(E, d_int) -> ReLU
    -> Linear(d_int, D_t, no bias) -> LayerNorm(D_t, no bias)``; ``low_rank`` gives the "LoRA"
    variant). The same shift is added to all ``B`` tokens of depth ``i``. Each image has its own
    context, so the text tower runs once per (image, prompt) pair -- CoCoOp's known cost.

    Args:
        num_context, depth, init, init_std, first_context_twice: as :class:`CoOp`.
        hidden_dim: meta-net width ``d_int`` (TuneVLSeg searches {32, 64, 96, 128}).
        low_rank: linear rank-``hidden_dim`` meta-net instead of the ReLU MLP.
        norm: LayerNorm after the meta-net (TuneVLSeg ``use_proj_norm``).
        final_bias: bias of that LayerNorm (TuneVLSeg's CoCoOp: none).
        overflow: see :class:`~vlsegkit.prompts.ContextLearner`.
        normalize_features: L2-normalise ``f`` first (original CoCoOp; TuneVLSeg: off).
        text_width, text_layers: text tower sizes.
        image_dim: width ``E`` of the image embedding (vision tower ``embed_dim``).

    Shapes:
        ``prompts(image_features (B, E))`` -> contexts ``(B, num_context, D_t)`` per depth.
    """

    required_dims = ("text_width", "text_layers", "image_dim")
    needs_image_features = True
    pairs_text_with_images = True
    RELEASED: ClassVar[dict[str, Any]] = {
        "init": "a photo of a", "hidden_dim": 64, "norm": True, "final_bias": False,
        "normalize_features": False, "overflow": "released",
    }  # fmt: skip

    def __init__(
        self,
        *,
        num_context: int | None = None,
        depth: int = 1,
        init: str | None = "a photo of a",
        init_std: float = 0.02,
        first_context_twice: bool = False,
        hidden_dim: int = 64,
        low_rank: bool = False,
        norm: bool = True,
        final_bias: bool = False,
        normalize_features: bool = False,
        overflow: TextOverflow = "truncate",
        text_width: int | None = None,
        text_layers: int | None = None,
        image_dim: int | None = None,
    ) -> None:
        self.hidden_dim, self.low_rank, self.norm = hidden_dim, low_rank, norm
        self.final_bias = final_bias
        self.normalize_features = normalize_features
        self.first_context_twice = _check_flag(first_context_twice, "first_context_twice")
        ContextLearner.__init__(
            self,
            num_context=num_context,
            depth=depth,
            init=init,
            init_std=init_std,
            overflow=overflow,
            text_width=text_width,
            text_layers=text_layers,
            image_dim=image_dim,
        )

    def _build(self) -> None:
        super()._build()
        self.meta_nets = nn.ModuleList(
            PromptProjector(
                self._dims["image_dim"],
                self._dims["text_width"],
                hidden_dim=self.hidden_dim,
                low_rank=self.low_rank,
                norm=self.norm,
                final_bias=self.final_bias,
            )
            for _ in range(self.depth)
        )

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per-image contexts ``P_i + h_i(f)``, each ``(B, num_context, D_t)``.

        Args:
            image_features: ``(B, E)`` pooled image embeddings.
        """
        f = _check_image_features(image_features, self._dims["image_dim"], "CoCoOp")
        f = f.to(self.context.dtype)
        if self.normalize_features:
            f = nn.functional.normalize(f, dim=-1)
        contexts = [
            p[None] + net(f)[:, None] for p, net in zip(self.context.unbind(0), self.meta_nets)
        ]
        return PromptSet(text=contexts)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
