"""Context learners as hooks on steppable towers: the shared protocol and helpers.

A context learner owns learnable prompt tokens for one or both towers and, for every forward pass,
produces a :class:`PromptSet`: for each prompted tower a list ``[P_0, P_1, ..., P_{J-1}]`` of per-depth
prompts (J = prompt depth). The deep-prompt rule of TuneVLSeg (Adhikari et al., ACCV 2024, eq. 5-8;
after VPT-deep, Jia et al. 2022, and MaPLe, Khattak et al. 2023) is then the same for every tower::

    state = tower.embed(inputs, prompts / context = P_0)      # B prompt slots inserted
    for i in range(num_layers):
        if 1 <= i < J: state = state.set_prompts(P_i)          # slots replaced: outputs discarded
        state = tower.block(i, state)                          # i >= J: slots carried
    pooled = tower.pool(state)

Text towers insert the context after the start token (BOS / [CLS]) before the position embeddings
(CoOp convention) and shift the pooling index; vision towers insert the prompts after CLS. Because
vision prompts carry no position embedding and attention over them is unmasked, their place in the
sequence does not change any CLS / patch output -- TuneVLSeg's "append after the patches" and VPT's
"after CLS" are the same computation.

Models take a learner through a ``prompter=`` argument of their ``forward`` (see
:class:`vlsegkit.CLIPSeg`): they call ``prompter(image_features)`` (features only when
``prompter.needs_image_features``) and run their towers with the returned prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..encoders.base import Hook, TokenState, Tower, TowerOutput

__all__ = [
    "ContextLearner",
    "PromptSet",
    "deep_prompt_hook",
    "learner_from_config",
    "prompted_forward",
    "step_block",
]

_LEARNERS: dict[str, type[ContextLearner]] = {}
_DIM_KEYS = ("text_width", "text_layers", "vision_width", "vision_layers", "image_dim")


@dataclass(frozen=True)
class PromptSet:
    """The prompts a learner produced for one forward pass.

    Attributes:
        text: per-depth text contexts ``[P_0, ..., P_{J-1}]``, each ``(n, D_t)`` (shared by every
            prompt) or ``(B, n, D_t)`` (one per image, CoCoOp); None when the text tower is not
            prompted.
        vision: per-depth vision prompts, each ``(n, D_v)``; None when the vision tower is not
            prompted.
        decoder_sees_prompts: hand the vision prompt tokens to the decoder along with CLS and patches
            (TuneVLSeg's released CLIPSeg code) instead of removing them first (the default).
    """

    text: list[Tensor] | None = None
    vision: list[Tensor] | None = None
    decoder_sees_prompts: bool = False

    def tensors(self) -> list[Tensor]:
        """Every prompt tensor (to decide whether a frozen tower must record its graph)."""
        return [*(self.text or ()), *(self.vision or ())]


def deep_prompt_hook(prompts: Sequence[Tensor] | None) -> Hook:
    """Hook replacing the prompt slots with ``prompts[i]`` before block ``i`` for ``1 <= i < J``.

    ``prompts[0]`` is inserted by ``Tower.embed``; blocks ``i >= J = len(prompts)`` carry the slots
    forward like ordinary tokens (TuneVLSeg eq. 5-6 / 7-8).

    Args:
        prompts: ``J`` tensors ``(n, D)`` or ``(B, n, D)``; None or empty gives the identity hook.

    Returns:
        ``hook(i, state) -> state``.
    """
    deep = list(prompts or ())

    def hook(i: int, state: TokenState) -> TokenState:
        if 1 <= i < len(deep):
            return state.set_prompts(deep[i])
        return state

    return hook


def step_block(
    tower: Tower, i: int, state: TokenState, *, gradient_checkpointing: bool = False
) -> TokenState:
    """``tower.block(i, state)``, optionally recomputing its activations in the backward pass.

    With ``gradient_checkpointing`` (and autograd recording a graph through the tokens), the block's
    intermediate activations are not stored; they are recomputed during backward
    (``torch.utils.checkpoint``, non-reentrant). This trades one extra block forward for the memory of
    its activations -- useful when gradients must flow through frozen blocks to prompts.
    """
    if gradient_checkpointing and torch.is_grad_enabled() and state.tokens.requires_grad:

        def run(tokens: Tensor) -> Tensor:
            return tower.block(i, state.with_tokens(tokens)).tokens

        return state.with_tokens(checkpoint(run, state.tokens, use_reentrant=False))
    return tower.block(i, state)


def prompted_forward(
    tower: Tower,
    *inputs: Any,
    prompts: Sequence[Tensor] | None = None,
    output_hidden_states: bool = False,
    gradient_checkpointing: bool = False,
    **embed_kwargs: Any,
) -> TowerOutput:
    """Run a tower with per-depth prompts: embed with ``P_0``, replace slots below depth J, pool.

    Args:
        tower: any steppable :class:`~vlsegkit.encoders.Tower`.
        *inputs: what ``tower.embed`` takes (``input_ids[, attention_mask]`` or ``pixel_values``).
        prompts: ``[P_0, ..., P_{J-1}]``, each ``(n, D)`` or ``(B, n, D)``; passed to ``embed`` as
            ``context=`` (text towers) or ``prompts=`` (vision towers).
        output_hidden_states: also return the ``num_layers + 1`` hidden states.
        gradient_checkpointing: recompute block activations in backward (see :func:`step_block`).
        **embed_kwargs: other keyword arguments of ``embed`` (e.g. ``attention_mask``).

    Returns:
        :class:`~vlsegkit.encoders.TowerOutput` (``pooled (B, E)``, final state, hidden states).
    """
    prompts = list(prompts or ())
    if prompts:
        key = "context" if tower.modality == "text" else "prompts"
        embed_kwargs[key] = prompts[0]
    state = tower.embed(*inputs, **embed_kwargs)
    hook = deep_prompt_hook(prompts)
    hidden = [state.tokens] if output_hidden_states else None
    for i in range(tower.num_layers):
        state = step_block(tower, i, hook(i, state), gradient_checkpointing=gradient_checkpointing)
        if hidden is not None:
            hidden.append(state.tokens)
    return TowerOutput(pooled=tower.pool(state), state=state, hidden_states=hidden)


def _token_embedding(tower: nn.Module) -> nn.Embedding:
    """The word-embedding table of a text tower (CLIP / CLIPSeg, open_clip text, BERT)."""
    for path in (
        "text_model.embeddings.token_embedding",  # transformers CLIP / CLIPSeg
        "text.token_embedding",  # open_clip TextTransformer / CLIP
        "text.transformer.embeddings.word_embeddings",  # open_clip HFTextEncoder (BERT)
    ):
        module: Any = tower
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(
        f"cannot find the token embedding table of {type(tower).__name__}; pass token_embedding="
    )


class ContextLearner(nn.Module):
    """Base class of context learners (CoOp, CoCoOp, VPT, MaPLe, SharedSeparate, SharedAttention).

    A learner is built from the widths / depths of the towers it prompts. They can be given to the
    constructor (``text_width=...``) or read from the towers by :meth:`bind`; parameters are created
    once everything is known, so ``CoOp(depth=3).attach(model)`` is a complete recipe.

    Subclasses set ``modalities`` and ``required_dims`` and implement ``_build`` (create parameters)
    and ``forward(image_features=None) -> PromptSet``.

    Args:
        num_context: prompt length ``B`` (tokens per depth); None: the number of tokens of ``init``
            for text learners initialised from a phrase, else 4.
        depth: prompt depth ``J`` (``1`` = shallow: prompts only at the input).
        init_std: standard deviation of the Gaussian initialisation ``N(0, init_std^2)``.
        init: phrase whose token embeddings initialise the first text context ``P_0`` (text-space
            learners only), e.g. ``"a photo of a"``.
        args: the subclass's own constructor arguments, recorded in ``config``.
        text_width, text_layers, vision_width, vision_layers, image_dim: tower sizes (width ``D``,
            number of blocks, joint embedding width ``E`` of the vision tower).
    """

    modalities: ClassVar[tuple[str, ...]] = ()
    required_dims: ClassVar[tuple[str, ...]] = ()
    needs_image_features: ClassVar[bool] = False
    #: The first text context lives in token-embedding space and can start from a phrase.
    phrase_init: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.modalities:
            _LEARNERS[cls.__name__] = cls

    def __init__(
        self,
        *,
        num_context: int | None,
        depth: int,
        init_std: float = 0.02,
        init: str | None = None,
        args: dict[str, Any] | None = None,
        **dims: int | None,
    ) -> None:
        super().__init__()
        unknown = set(dims) - set(_DIM_KEYS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if num_context is not None and (not isinstance(num_context, int) or num_context < 0):
            raise ValueError(f"num_context must be an int >= 0 or None, got {num_context!r}")
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise ValueError(f"init must be a non-empty phrase or None, got {init!r}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.depth = depth
        self.init_std = float(init_std)
        self.init = init
        self.num_context = num_context if (num_context is not None or init) else 4
        self._dims: dict[str, int | None] = {k: dims.get(k) for k in self.required_dims}
        self._args = dict(args or {})
        self._phrase_pending = init is not None
        self.built = False
        self._maybe_build()

    # ------------------------------------------------------------------ construction
    @property
    def dims(self) -> dict[str, int | None]:
        """Tower sizes the learner is built for (None = not known yet)."""
        return dict(self._dims)

    def _maybe_build(self) -> None:
        if self.built or self.num_context is None or any(v is None for v in self._dims.values()):
            return
        for key in ("text_layers", "vision_layers"):
            layers = self._dims.get(key)
            if layers is not None and self.depth > layers:
                raise ValueError(
                    f"depth={self.depth} exceeds the {layers} blocks of the "
                    f"{key.split('_')[0]} tower"
                )
        self._build()
        self.built = True

    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _normal(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape) * self.init_std)

    def bind(
        self,
        *,
        text_tower: Tower | None = None,
        vision_tower: Tower | None = None,
        tokenizer: Any = None,
        token_embedding: nn.Embedding | None = None,
    ) -> ContextLearner:
        """Read sizes from the towers, create the parameters and apply the phrase initialisation.

        Args:
            text_tower: the text tower the learner will prompt (width, depth, token embeddings).
            vision_tower: the vision tower (width, depth, joint width for CoCoOp's image features).
            tokenizer: a vlsegkit tokenizer facade (``encode(text) -> ids`` without special tokens),
                needed to initialise from the ``init`` phrase.
            token_embedding: the word-embedding table, when it cannot be found on ``text_tower``.

        Returns:
            ``self``. Sizes given to the constructor must match the towers (``ValueError`` otherwise).
            Calling ``bind`` again never re-initialises trained parameters.
        """
        found: dict[str, int] = {}
        if text_tower is not None:
            found.update(text_width=text_tower.width, text_layers=text_tower.num_layers)
        if vision_tower is not None:
            found.update(
                vision_width=vision_tower.width,
                vision_layers=vision_tower.num_layers,
                image_dim=vision_tower.embed_dim,
            )
        for key in self.required_dims:
            if key not in found:
                continue
            if self._dims[key] is None:
                self._dims[key] = int(found[key])
            elif self._dims[key] != found[key]:
                raise ValueError(
                    f"{type(self).__name__} was built for {key}={self._dims[key]}, but the tower "
                    f"has {key}={found[key]}"
                )
        missing = [k for k, v in self._dims.items() if v is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {missing}: pass the towers to bind() (text_tower=, "
                "vision_tower=) or the sizes to the constructor"
            )
        if self._phrase_pending and (tokenizer is not None or self.num_context is None):
            if tokenizer is None:
                raise ValueError(
                    f"{type(self).__name__}(init={self.init!r}) needs tokenizer= to count and embed "
                    "the phrase's tokens"
                )
            ids = list(tokenizer.encode(self.init))
            if self.num_context is None:
                self.num_context = len(ids)
            self._maybe_build()
            if token_embedding is None:
                if text_tower is None:
                    raise ValueError(
                        "initialising from a phrase needs text_tower= or token_embedding="
                    )
                token_embedding = _token_embedding(text_tower)
            self.initialize_from_phrase_ids(ids, token_embedding)
        self._maybe_build()
        return self

    def initialize_from_phrase_ids(self, ids: Sequence[int], token_embedding: nn.Embedding) -> None:
        """Set the first text context ``P_0`` to the token embeddings of ``ids`` (CoOp init).

        Args:
            ids: token ids of the phrase, without special tokens; their number must be ``num_context``.
            token_embedding: the text tower's word-embedding table ``(vocab, D_t)``.
        """
        if not self.phrase_init:
            raise ValueError(f"{type(self).__name__} has no text-space context to initialise")
        if len(ids) != self.num_context:
            raise ValueError(
                f"init phrase {self.init!r} has {len(ids)} tokens but num_context="
                f"{self.num_context}; pass num_context={len(ids)} or another phrase"
            )
        weight = token_embedding.weight
        if weight.shape[-1] != self._dims["text_width"]:
            raise ValueError(
                f"token_embedding has width {weight.shape[-1]}, expected text_width="
                f"{self._dims['text_width']}"
            )
        index = torch.as_tensor(list(ids), dtype=torch.long, device=weight.device)
        with torch.no_grad():
            self._first_text_context().copy_(weight[index].to(self._first_text_context()))
        self._phrase_pending = False

    def _first_text_context(self) -> Tensor:  # pragma: no cover - text learners override
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # loaded weights replace the phrase initialisation
        if any(k.startswith(prefix) for k in state_dict):
            self._phrase_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_ready(self) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call bind() with its towers or "
                "attach() it to a model first"
            )
        if self._phrase_pending:
            raise RuntimeError(
                f"{type(self).__name__}(init={self.init!r}) was not initialised from its phrase: "
                "call bind(text_tower=..., tokenizer=...) or attach() it to a model"
            )

    # ------------------------------------------------------------------ use
    def forward(self, image_features: Tensor | None = None) -> PromptSet:  # pragma: no cover
        raise NotImplementedError

    def text_prompts(self, image_features: Tensor | None = None) -> list[Tensor] | None:
        """Per-depth text contexts ``[P_0 .. P_{J-1}]`` (see :class:`PromptSet`)."""
        return self(image_features).text

    def vision_prompts(self) -> list[Tensor] | None:
        """Per-depth vision prompts ``[P~_0 .. P~_{J-1}]``, each ``(n, D_v)``."""
        return self().vision

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description that rebuilds the learner (``learner_from_config``)."""
        args = {
            **self._args,
            "num_context": self.num_context,
            "depth": self.depth,
            "init_std": self.init_std,
            **self._dims,
        }
        if self.phrase_init:
            args["init"] = self.init
        return {"name": type(self).__name__, "args": args}

    def attach(self, model: nn.Module, **kwargs: Any):
        """Freeze ``model`` and wrap it with this learner: ``CoOp(...).attach(model)``.

        Args:
            model: a VLSM whose ``forward`` takes ``prompter=`` (e.g. :class:`vlsegkit.CLIPSeg`).
            **kwargs: :class:`~vlsegkit.prompts.TunedModel` options (``upsampler``,
                ``gradient_checkpointing``).

        Returns:
            The :class:`~vlsegkit.prompts.TunedModel`; only the learner (and upsampler) train.
        """
        from .tuned import TunedModel

        return TunedModel(model, self, **kwargs)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self._dims.items())
        return f"num_context={self.num_context}, depth={self.depth}, {dims}"


def learner_from_config(config: dict[str, Any]) -> ContextLearner:
    """Rebuild a learner from ``learner.config`` (``{"name": "CoOp", "args": {...}}``)."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"learner config must be a dict with 'name' and 'args', got {config!r}")
    # the learner modules register their classes on import
    from . import multimodal, text, visual  # noqa: F401

    cls = _LEARNERS.get(config["name"])
    if cls is None:
        raise ValueError(f"unknown learner {config['name']!r}; known: {sorted(_LEARNERS)}")
    return cls(**config.get("args", {}))


def _check_image_features(features: Tensor | None, dim: int, owner: str) -> Tensor:
    if features is None:
        raise ValueError(f"{owner} needs image_features of shape (B, {dim})")
    if features.dim() != 2 or features.shape[-1] != dim:
        raise ValueError(f"image_features must have shape (B, {dim}), got {tuple(features.shape)}")
    return features
