"""The hook protocol: everything that acts on tower states between (or inside) blocks.

Prompt learners (CoOp, CoCoOp, VPT, MaPLe, Shared-*), MedCLIPSeg's PVL adapters, VLSM-Adapter's
bottleneck adapters -- and later the M2IB bottleneck and CoTexNet's ROI tokens -- are all
:class:`TowerHook` s. A hook says which towers and which blocks it acts on; the one layer loop,
:func:`vlsegkit.encoders.run_towers`, calls it there. A model never knows which hooks exist: it exposes
its hook *slots* (:class:`HookSlots`: its towers, the layers its decoder reads, the width of its
conditioning vector) and runs its towers through the runner with whatever hooks it is given.

Hook points, in the order the runner visits them for block ``i`` of a tower::

    embed:      tower.embed(inputs, **hook.embed(tower, ctx))          # once, before block 0
    before:     states = hook(i, states, ctx)                          # i in hook.layers(tower)
    inside:     branch = hook.taps(tower, i, ctx)["attn" | "mlp"](branch)   # i in hook.tap_layers(tower)
    kept:       decoder_input[i] = hook.kept(tower, i, state, ctx)      # i kept by the model
    condition:  cond = hook.condition(cond, ctx)                         # the model's conditioning

``inside`` points are the outputs of a block's attention and MLP branches just before they are added
to the residual stream (Houlsby et al. 2019's adapter position); the towers expose them without any
fork of the upstream block code (see :meth:`vlsegkit.encoders.Tower.branch_modules`).

Adding a hook family is one new file: subclass :class:`TowerHook`, set the class attributes, create
parameters in :meth:`TowerHook.bind` (sizes come from the model's slots) and implement the points
you need; every model built from towers accepts it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._config import RecordsConfig
from ..registry import register_hook
from .base import TokenState

if TYPE_CHECKING:
    from .base import Tower

__all__ = ["HookSlots", "RunContext", "Tap", "TowerHook"]

#: In-block hook: maps a branch output ``(..., D)`` (attention or MLP, before the residual add) to a
#: tensor of the same shape. Layouts are the backend's (batch- or sequence-first): taps must act per
#: token.
Tap = Callable[[Tensor], Tensor]


@dataclass
class HookSlots:
    """What a model offers hooks: its towers and the places where hooks may act.

    Attributes:
        towers: ``{"vision": Tower, "text": Tower}`` (the model's towers by role).
        kept: per tower, the blocks (0-indexed) whose outputs the decoder reads, e.g.
            ``{"vision": (3, 6, 9)}`` for CLIPSeg; empty when the decoder reads the final state only.
        condition_dim: width of the conditioning vector the decoder receives (CLIPSeg's conditional
            embedding, MedCLIPSeg's global text token), or None when the model has none.
        depths: per tower, how many blocks the model runs (CLIPSeg stops its vision tower after the
            deepest block its decoder reads); towers not listed run all their blocks.
        tokenizer: the model's prompt tokenizer (phrase initialisation of text contexts), or None.
        lockstep: the model can step its towers together with one text row per image
            (needed by hooks with ``lockstep = True``).
        unavailable: towers the model has but offers no hook slots in, with the reason (CRIS's
            convolutional vision tower has no token sequence); a hook acting on one of them fails
            to bind with that reason (:meth:`require`).
        image_features_dim: width of ``ctx.image_features`` the model gives hooks with
            ``needs_image_features``, when there is no ``"vision"`` token tower to read it from
            (None: the vision tower's ``embed_dim``).
    """

    towers: dict[str, Tower]
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)
    condition_dim: int | None = None
    tokenizer: Any = None
    lockstep: bool = True
    unavailable: dict[str, str] = field(default_factory=dict)
    image_features_dim: int | None = None

    def depth(self, tower: str) -> int:
        """Number of blocks of ``tower`` the model runs."""
        return self.depths.get(tower, self.towers[tower].num_layers)

    def require(self, hook: TowerHook) -> None:
        """Check that every tower ``hook`` acts on is offered here.

        Raises:
            ValueError: naming the hook, the tower and the model's reason (``unavailable``).
        """
        for name in hook.towers:
            if name in self.towers:
                continue
            reason = self.unavailable.get(name, f"the model has no {name} tower")
            raise ValueError(
                f"{type(hook).__name__} acts on the {name} tower, where this model offers no hook "
                f"slots: {reason}"
            )


@dataclass
class RunContext:
    """Per-forward information shared by the hooks of one model call.

    Attributes:
        image_features: ``(B, E)`` pooled image embeddings, for hooks with
            ``needs_image_features`` (CoCoOp).
        text_image_index: ``(R,)`` long, the image each text row belongs to, or None when the text
            rows are shared by every image (then no hook may condition text on the image).
        generators: one ``torch.Generator`` per equal chunk of the batch (Monte Carlo copies,
            copy-major), or None for the global RNG; stochastic hooks draw their noise from them.
        sample: whether stochastic hooks sample (None: each hook's own default).
        kept: per tower, the kept states ``{block: TokenState}`` of this forward (after the
            ``kept`` hooks), filled by the runner.
        extras: hook-specific per-forward inputs (e.g. ROI tokens), by name.
        memo: per-forward cache, e.g. ``memo[id(hook)]`` for prompts computed once per forward.
    """

    image_features: Tensor | None = None
    text_image_index: Tensor | None = None
    generators: list[torch.Generator] | None = None
    sample: bool | None = None
    kept: dict[str, dict[int, TokenState]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)


class TowerHook(RecordsConfig, nn.Module):
    """Base class of everything that acts inside a model's towers (see the module docstring).

    Class attributes (capabilities; the model reads them instead of inspecting signatures):
        towers: the tower roles the hook acts on (``"vision"``, ``"text"``).
        needs_image_features: the hook reads ``ctx.image_features`` (so the model computes the pooled
            image embedding before the text pass).
        pairs_text_with_images: text rows must be one per (image, prompt) pair
            (``ctx.text_image_index`` is then set).
        lockstep: the hook reads several towers at the same block, so they must be stepped together
            with paired rows (implies ``pairs_text_with_images``).
        model_inputs: ``ctx.extras`` keys the hook reads that only the model owning it supplies
            (CoTexNet's ROI tokens); such a hook is part of that model and cannot be attached to
            another one.

    Subclasses record their constructor arguments automatically (``hook.config``); parameters whose
    shapes depend on the model are created in :meth:`bind`.
    """

    towers: ClassVar[tuple[str, ...]] = ()
    needs_image_features: ClassVar[bool] = False
    pairs_text_with_images: ClassVar[bool] = False
    lockstep: ClassVar[bool] = False
    model_inputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.towers:  # concrete hook families are rebuilt from their saved config by name
            register_hook(cls)

    @property
    def config(self) -> dict[str, Any]:
        """``{"name": class name, "args": constructor arguments}`` (JSON; see
        :func:`vlsegkit.registry.hook_from_config`)."""
        return {"name": type(self).__name__, "args": self.config_args}

    # ------------------------------------------------------------------ binding
    def bind(self, slots: HookSlots) -> TowerHook:
        """Read sizes from the model's slots and create the parameters (idempotent).

        Returns:
            ``self``.
        """
        return self

    # ------------------------------------------------------------------ where
    def layers(self, tower: str) -> Collection[int]:
        """Blocks (0-indexed) before which ``forward`` acts on ``tower``."""
        return ()

    def tap_layers(self, tower: str) -> Collection[int]:
        """Blocks inside which :meth:`taps` act on ``tower``."""
        return ()

    def num_tokens(self, tower: str) -> int:
        """Tokens the hook inserts into ``tower``'s sequence at embedding time (text positions the
        model's tokenizer must leave free)."""
        return 0

    def keep_layers(self, tower: str) -> Collection[int]:
        """Blocks of ``tower`` whose outputs the hook itself needs (read from ``ctx.kept``)."""
        return ()

    def acts_on(self, target: str) -> bool:
        """Whether the (bound) hook changes ``target``: a tower role (``"vision"``, ``"text"``) or
        ``"condition"`` (the model's conditioning vector, :meth:`condition`).

        Default: the towers in ``towers``, never the condition. Hooks whose switches turn a part
        off, or that transform the condition, say so here: models read it to refuse hooks that
        would change nothing on the path they run (e.g. CoTexNet's text-free inference).
        """
        return target in self.towers

    # ------------------------------------------------------------------ what
    def embed(self, tower: str, ctx: RunContext) -> dict[str, Any]:
        """Keyword arguments for ``tower.embed`` (``context=`` / ``prompts=`` of prompt learners)."""
        return {}

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        """Act before block ``i`` on the states of the towers in ``states`` (those it acts on here).

        Returns:
            The updated states (same keys, same batch sizes).
        """
        return states

    def taps(self, tower: str, i: int, ctx: RunContext) -> Mapping[str, Tap]:
        """In-block taps of block ``i`` of ``tower``: ``{"attn": f, "mlp": f}`` (either optional)."""
        return {}

    def kept(self, tower: str, i: int, state: TokenState, ctx: RunContext) -> TokenState:
        """What the decoder reads as the output of kept block ``i`` (default: the state itself)."""
        return state

    def condition(self, cond: Tensor, ctx: RunContext) -> Tensor:
        """Transform the model's conditioning vectors ``(R, condition_dim)`` (default: unchanged)."""
        return cond

    # ------------------------------------------------------------------ use
    def attach(self, model: nn.Module, **kwargs: Any):
        """Freeze ``model`` and drive it with this hook: a :class:`~vlsegkit.TunedModel`.

        Only this hook's parameters (and an optional learnable upsampler) train; ``save_pretrained``
        stores only them plus the base's id and fingerprint.
        """
        from ..models.tuned import TunedModel

        return TunedModel(model, [self], **kwargs)

    def trainable(self) -> bool:
        """Whether the hook has parameters that require gradients."""
        return any(p.requires_grad for p in self.parameters())
