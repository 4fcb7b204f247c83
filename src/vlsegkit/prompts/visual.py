"""Visual prompt tuning: VPT-shallow (``depth=1``) and VPT-deep.

Jia et al., "Visual Prompt Tuning" (ECCV 2022), as benchmarked in TuneVLSeg (Adhikari et al.,
ACCV 2024, §4.2 eq. 7-8): ``B`` learnable tokens per depth ``i < J`` join the vision token sequence
before block ``i``, their outputs are discarded and replaced by the next depth's tokens; blocks
``i >= J`` carry them as ordinary tokens. The prompts are removed before the patch grid is read
(``Tower.dense`` / the decoder), so decoders see the patch grid unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from .base import ContextLearner, PromptSet

__all__ = ["VPT"]


class VPT(ContextLearner):
    """Deep visual prompts ``P~_i ∈ R^{B x D_v}``, ``i = 0 .. J-1``.

    Stored as ``tokens (J, B, D_v)``, initialised ``N(0, init_std^2)`` (TuneVLSeg's code; VPT's
    original uses a Xavier-uniform bound). ``P~_0`` enters the vision tower at embedding time, before
    the pre-LayerNorm (TuneVLSeg: inserting after it was unstable); deeper prompts overwrite the
    slots before blocks ``1 .. J-1``.

    Args:
        num_context: ``B`` prompt tokens per depth (TuneVLSeg: 4).
        depth: ``J``, ``1 <= J <= vision_layers`` (CLIPSeg runs its vision tower only up to the
            deepest extracted block, so deeper prompts there have no effect; binding warns).
        init_std: std of the Gaussian initialisation.
        decoder_sees_prompts: what the decoder reads in the prompt slots of kept blocks: removed
            (False, default), the blocks' outputs (True), or the released CLIPSeg code's behaviour
            (``"released"``: the next depth's prompts below depth J).
        vision_width, vision_layers: vision tower sizes (read by ``bind`` / ``attach`` when omitted).
    """

    towers = ("vision",)
    required_dims = ("vision_width", "vision_layers")
    RELEASED: ClassVar[dict[str, Any]] = {"num_context": 4, "decoder_sees_prompts": "released"}
    RELEASED_UPSAMPLER: ClassVar[str | None] = "add"

    def __init__(
        self,
        *,
        num_context: int = 4,
        depth: int = 1,
        init_std: float = 0.02,
        decoder_sees_prompts: bool | str = False,
        vision_width: int | None = None,
        vision_layers: int | None = None,
    ) -> None:
        super().__init__(
            num_context=num_context,
            depth=depth,
            init_std=init_std,
            decoder_sees_prompts=decoder_sees_prompts,
            vision_width=vision_width,
            vision_layers=vision_layers,
        )

    def _build(self) -> None:
        self.tokens = self._normal(self.depth, self.num_context, self._dims["vision_width"])

    def _prompts(self, image_features: Tensor | None) -> PromptSet:
        """Per-depth vision prompts, each ``(num_context, D_v)``; ``image_features`` unused."""
        return PromptSet(vision=list(self.tokens.unbind(0)))
