"""CoTexNet's text latent-space transformation: ROI pseudo-text tokens written into the text embedding.

He et al., "Learning Conceptual Text Prompts from Visual Regions of Interest for Medical Image
Segmentation" (CoTexNet, *Engineering* 2026), §3.1, eq. 3: ``T_p = t_0 ⊕ phi(R~)``. Each class's ROI
image ``R_i = I ⊗ M_i`` goes through the frozen image encoder, whose [CLS] token (before the final
LayerNorm) is mapped by a trainable :class:`~vlsegkit.layers.MappingModule` (768 -> 512 -> 512) into
the text tower's *input* token space: one pseudo-word per ROI. The model writes placeholders into the
prompt ("segmentation area of * . <real text>") and this hook replaces each placeholder's word
embedding with its pseudo-token before the first text block, so the frozen text encoder reads the
ROI as a word (eq. 4, ``T_e = E_T(T_p ⊕ T_r)``).

Position embeddings: by default the placeholder keeps its position embedding (the pseudo-token
replaces only the word embedding, as a word would); ``position_embedding="overwrite"`` reproduces the
release, which overwrites the sum of word and position embedding at the slot, so the pseudo-token
carries no position (``model/CLIPSeg_code.py``: ``hidden_states[:, 5, :] = roi_embedding``).

The hook acts on CLIP-style text towers, whose embedding is word + position (transformers CLIP /
CLIPSeg, open_clip); slots follow any context a prompt learner inserted after the start token.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..encoders.base import TokenState
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..layers.sankd import MappingModule

__all__ = ["ROIPseudoTokens", "ROISlots"]

#: ``RunContext.extras`` key of this forward pass's :class:`ROISlots`.
ROI_SLOTS = "roi_slots"


@dataclass(frozen=True)
class ROISlots:
    """Where this forward pass's ROI pseudo-tokens go (one entry per ROI, M in all).

    Attributes:
        features: ``(M, D_v)`` frozen [CLS] tokens of the ROI images.
        rows: ``(M,)`` long, the text row of each ROI.
        positions: ``(M,)`` long, its placeholder's index in the row's token ids (before any
            context a prompt learner inserts).
        token_ids: ``(M,)`` long, the token id at that index (the placeholder).
    """

    features: Tensor
    rows: Tensor
    positions: Tensor
    token_ids: Tensor

    def __post_init__(self) -> None:
        m = self.features.shape[0] if self.features.dim() == 2 else -1
        if m < 0 or any(t.shape != (m,) for t in (self.rows, self.positions, self.token_ids)):
            raise ValueError(
                "ROISlots needs features (M, D) and rows / positions / token_ids of shape (M,), got "
                f"{tuple(self.features.shape)}, {tuple(self.rows.shape)}, "
                f"{tuple(self.positions.shape)}, {tuple(self.token_ids.shape)}"
            )


class ROIPseudoTokens(TowerHook):
    """Writes mapped ROI [CLS] tokens into the placeholder slots of the text embedding (eq. 3).

    Before text block 0, for every ROI ``j`` of :class:`ROISlots` (read from
    ``ctx.extras["roi_slots"]``, supplied by :class:`~vlsegkit.CoTexNet`)::

        x[row_j, p_j] = Map(cls_j) + (x[row_j, p_j] - E_word[id_j])   # "add": keep the position
        x[row_j, p_j] = Map(cls_j)                                    # "overwrite": the release

    where ``p_j`` is shifted by the number of context tokens inserted after the start token. Every
    other token is left exactly as it was. Without ROI slots in the context the hook does nothing.

    Args:
        position_embedding: ``"add"`` (default) or ``"overwrite"`` (the release), see above.
        hidden_dim: width of the mapping module's hidden layer (default: the text width, 512).

    Parameters (created by :meth:`bind` from the model's towers): ``mapping``, a
    :class:`~vlsegkit.layers.MappingModule` ``D_v -> hidden_dim -> D_t``.
    """

    towers: ClassVar[tuple[str, ...]] = ("text",)
    model_inputs: ClassVar[tuple[str, ...]] = (ROI_SLOTS,)

    def __init__(self, *, position_embedding: str = "add", hidden_dim: int | None = None) -> None:
        super().__init__()
        if position_embedding not in ("add", "overwrite"):
            raise ValueError(
                f"position_embedding must be 'add' or 'overwrite', got {position_embedding!r}"
            )
        if hidden_dim is not None and (
            isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1
        ):
            raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")
        self.position_embedding = position_embedding
        self.hidden_dim = hidden_dim
        self._word_embedding: list[nn.Embedding] = []  # a reference, not a submodule

    def bind(self, slots: HookSlots) -> ROIPseudoTokens:
        """Create the mapping module from the vision width and the text width of ``slots``."""
        from ..prompts.base import _token_embedding

        if "vision" not in slots.towers or "text" not in slots.towers:
            raise ValueError("ROIPseudoTokens needs a model with a vision and a text tower")
        text = slots.towers["text"]
        widths = (int(slots.towers["vision"].width), int(text.width))
        if hasattr(self, "mapping"):
            bound = (self.mapping[0].in_features, self.mapping[2].out_features)
            if bound != widths:
                raise ValueError(
                    f"ROIPseudoTokens is bound to towers of widths (vision, text) {bound}, not "
                    f"{widths}"
                )
        else:
            self.mapping = MappingModule(widths[0], self.hidden_dim or widths[1], widths[1])
        self._word_embedding = [_token_embedding(text)]
        return self

    def layers(self, tower: str) -> Collection[int]:
        return (0,) if tower == "text" else ()

    def pseudo_tokens(self, features: Tensor) -> Tensor:
        """``(M, D_v)`` ROI [CLS] tokens -> ``(M, D_t)`` pseudo-word embeddings."""
        if not hasattr(self, "mapping"):
            raise RuntimeError("ROIPseudoTokens has no parameters yet: it is bound by CoTexNet")
        return self.mapping(features.to(self.mapping[0].weight.dtype))

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        """Replace the placeholder slots of the text state (before block 0)."""
        found = ctx.extras.get(ROI_SLOTS)
        if found is None or "text" not in states:
            return states
        if not isinstance(found, ROISlots):
            raise TypeError(f"ctx.extras[{ROI_SLOTS!r}] must be ROISlots, got {type(found)}")
        state = states["text"]
        tokens = state.tokens
        if found.features.shape[0] == 0:
            return states
        rows = found.rows.to(tokens.device)
        positions = found.positions.to(tokens.device) + state.num_prompts
        # a data-dependent check (it reads the indices back): compiled graphs skip it
        if not torch.compiler.is_compiling() and (
            int(rows.max()) >= state.batch_size or int(positions.max()) >= tokens.shape[1]
        ):
            raise ValueError(
                f"ROI slots (rows < {int(rows.max()) + 1}, positions < {int(positions.max()) + 1}) "
                f"do not fit the text state {tuple(tokens.shape[:2])}"
            )
        new = self.pseudo_tokens(found.features.to(tokens.device)).to(tokens.dtype)
        if self.position_embedding == "add":
            word = self._word_embedding[0](found.token_ids.to(tokens.device)).to(tokens.dtype)
            new = new + (tokens[rows, positions] - word)
        return {"text": state.with_tokens(tokens.index_put((rows, positions), new))}

    def attach(self, model: nn.Module, **kwargs: Any):
        """Not available: the ROI tokens come from CoTexNet's masks (``CoTexNet`` owns this hook)."""
        raise TypeError(
            "ROIPseudoTokens is part of CoTexNet (it needs the ROI tokens CoTexNet computes from "
            "masks); build a vlsegkit.CoTexNet instead of attaching it"
        )

    def extra_repr(self) -> str:
        return f"position_embedding={self.position_embedding!r}"
