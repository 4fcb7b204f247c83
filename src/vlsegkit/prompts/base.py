"""Context learners as tower hooks: the shared protocol and helpers.

A context learner owns learnable prompt tokens for one or both towers and, for every forward pass,
produces a :class:`PromptSet`: for each prompted tower a list ``[P_0, P_1, ..., P_{J-1}]`` of per-depth
prompts (J = prompt depth). As a :class:`~vlsegkit.encoders.TowerHook` it applies the deep-prompt rule
of TuneVLSeg (Adhikari et al., ACCV 2024, eq. 5-8; after VPT-deep, Jia et al. 2022, and MaPLe, Khattak
et al. 2023) to every tower it prompts, through the one runner::

    state = tower.embed(inputs, prompts / context = P_0)      # hook.embed: B prompt slots inserted
    for i in range(num_layers):
        if 1 <= i < J: state = state.set_prompts(P_i)          # hook(i, ...): outputs discarded
        state = tower.block(i, state)                          # i >= J: slots carried
    pooled = tower.pool(state)

Text towers insert the context after the start token (BOS / [CLS]) before the position embeddings
(CoOp convention) and shift the pooling index; vision towers insert the prompts after CLS. Because
vision prompts carry no position embedding and attention over them is unmasked, their place in the
sequence does not change any CLS / patch output -- TuneVLSeg's "append after the patches" and VPT's
"after CLS" are the same computation.

What a decoder reads at the kept vision blocks is the learner's choice (``decoder_sees_prompts``):
the prompt slots removed (default), the blocks' outputs at the slots, or -- as TuneVLSeg's released
CLIPSeg code does, which overwrites the slots *before* storing each hidden state -- the next depth's
fresh prompts for every kept block below depth J (``"released"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..encoders.base import TokenState, Tower
from ..encoders.hooks import HookSlots, RunContext, TowerHook

__all__ = ["ContextLearner", "DecoderPrompts", "PromptSet", "TextOverflow"]

_DIM_KEYS = ("text_width", "text_layers", "vision_width", "vision_layers", "image_dim")

#: What the decoder reads in the prompt slots of kept vision blocks (see the module docstring).
DecoderPrompts = bool | Literal["released"]
#: How a text learner fits a long prompt plus its context into the text positions.
TextOverflow = Literal["truncate", "released"]


@dataclass(frozen=True)
class PromptSet:
    """The prompts a learner produced for one forward pass.

    Attributes:
        text: per-depth text contexts ``[P_0, ..., P_{J-1}]``, each ``(n, D_t)`` (shared by every
            prompt) or ``(B, n, D_t)`` (one per image, CoCoOp); None when the text tower is not
            prompted.
        vision: per-depth vision prompts, each ``(n, D_v)``; None when the vision tower is not
            prompted.
    """

    text: list[Tensor] | None = None
    vision: list[Tensor] | None = None

    def tensors(self) -> list[Tensor]:
        """Every prompt tensor."""
        return [*(self.text or ()), *(self.vision or ())]


def _check_decoder_prompts(value: Any) -> DecoderPrompts:
    if value not in (True, False, "released"):
        raise ValueError(f"decoder_sees_prompts must be True, False or 'released', got {value!r}")
    return value


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


class ContextLearner(TowerHook):
    """Base class of context learners (CoOp, CoCoOp, VPT, MaPLe, SharedSeparate, SharedAttention).

    A learner is built from the widths / depths of the towers it prompts. They can be given to the
    constructor (``text_width=...``) or read from a model's towers by :meth:`bind`; parameters are
    created once everything is known, so ``CoOp(depth=3).attach(model)`` is a complete recipe.

    Subclasses set ``towers`` and ``required_dims`` and implement ``_build`` (create parameters)
    and ``_prompts(image_features) -> PromptSet``.

    Args:
        num_context: prompt length ``B`` (tokens per depth); None: the number of tokens of ``init``
            for text learners initialised from a phrase, else 4.
        depth: prompt depth ``J`` (``1`` = shallow: prompts only at the input).
        init_std: standard deviation of the Gaussian initialisation ``N(0, init_std^2)``.
        init: phrase whose token embeddings initialise the first text context ``P_0`` (text-space
            learners only), e.g. ``"a photo of a"``. When the phrase has fewer tokens than
            ``num_context``, it initialises the first ones and the rest stay Gaussian; more tokens
            than ``num_context`` is an error.
        decoder_sees_prompts: what the decoder reads in the prompt slots of kept vision blocks
            (vision-prompting learners): False removes them (default), True keeps the blocks' outputs
            there, ``"released"`` reproduces TuneVLSeg's released CLIPSeg code (the next depth's
            prompts for kept blocks below depth J).
        overflow: text learners, when a prompt plus the context exceeds the text positions:
            ``"truncate"`` (default) has the tokenizer leave room for the context and cut long
            prompts keeping their end token, with a warning; ``"released"`` tokenizes without room
            and crops the middle of the sequence, keeping its last position, as TuneVLSeg's released
            code does (:meth:`~vlsegkit.encoders.TokenState.fit_length`).
        text_width, text_layers, vision_width, vision_layers, image_dim: tower sizes (width ``D``,
            number of blocks, joint embedding width ``E`` of the vision tower).
    """

    required_dims: ClassVar[tuple[str, ...]] = ()
    #: The first text context lives in token-embedding space and can start from a phrase.
    phrase_init: ClassVar[bool] = False
    #: TuneVLSeg's released configuration of this learner (``configs/model/*.yaml`` of
    #: ``naamiinepal/tunevlseg``) as constructor arguments; see :meth:`released`.
    RELEASED: ClassVar[dict[str, Any]] = {}
    #: How TuneVLSeg's released CLIPSeg code joins the learnable upsampler to the logits for this
    #: learner (a :class:`~vlsegkit.prompts.LearnableUpsampler` ``mode``), or None where it creates
    #: the upsampler but never calls it (CoOp, CoCoOp).
    RELEASED_UPSAMPLER: ClassVar[str | None] = None

    @classmethod
    def released(cls, **overrides: Any) -> ContextLearner:
        """This learner as TuneVLSeg released it (``RELEASED`` arguments, then ``overrides``).

        Attach it with ``upsampler="released"`` to get the released upsampler as well.
        """
        return cls(**{**cls.RELEASED, **overrides})

    def __init__(
        self,
        *,
        num_context: int | None,
        depth: int,
        init_std: float = 0.02,
        init: str | None = None,
        decoder_sees_prompts: DecoderPrompts = False,
        overflow: TextOverflow = "truncate",
        **dims: int | None,
    ) -> None:
        super().__init__()
        if overflow not in ("truncate", "released"):
            raise ValueError(f"overflow must be 'truncate' or 'released', got {overflow!r}")
        self.overflow = overflow
        unknown = set(dims) - set(_DIM_KEYS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if num_context is not None and (
            isinstance(num_context, bool) or not isinstance(num_context, int) or num_context < 0
        ):
            raise ValueError(f"num_context must be an int >= 0 or None, got {num_context!r}")
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise ValueError(f"init must be a non-empty phrase or None, got {init!r}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.depth = depth
        self.init_std = float(init_std)
        self.init = init
        self.decoder_sees_prompts = _check_decoder_prompts(decoder_sees_prompts)
        self.num_context = num_context if (num_context is not None or init) else 4
        self._dims: dict[str, int | None] = {k: dims.get(k) for k in self.required_dims}
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
        slots: HookSlots | None = None,
        *,
        text_tower: Tower | None = None,
        vision_tower: Tower | None = None,
        tokenizer: Any = None,
        token_embedding: nn.Embedding | None = None,
    ) -> ContextLearner:
        """Read sizes from the towers, create the parameters and apply the phrase initialisation.

        Args:
            slots: a model's :class:`~vlsegkit.encoders.HookSlots` (towers and tokenizer), or None
                to give the parts below directly.
            text_tower: the text tower the learner will prompt (width, depth, token embeddings).
            vision_tower: the vision tower (width, depth, joint width for CoCoOp's image features).
            tokenizer: a vlsegkit tokenizer facade (``encode(text) -> ids`` without special tokens),
                needed to initialise from the ``init`` phrase.
            token_embedding: the word-embedding table, when it cannot be found on ``text_tower``.

        Returns:
            ``self``. Sizes given to the constructor must match the towers (``ValueError`` otherwise).
            Calling ``bind`` again never re-initialises trained parameters.
        """
        if slots is not None:
            text_tower = text_tower or slots.towers.get("text")
            vision_tower = vision_tower or slots.towers.get("vision")
            tokenizer = tokenizer if tokenizer is not None else slots.tokenizer
        found: dict[str, int] = {}
        if text_tower is not None:
            found.update(text_width=text_tower.width, text_layers=text_tower.num_layers)
        if vision_tower is not None:
            found.update(
                vision_width=vision_tower.width,
                vision_layers=vision_tower.num_layers,
                image_dim=vision_tower.embed_dim,
            )
        if slots is not None:
            # models whose vision tower is not a token tower (CRIS's ResNet): name the reason, and
            # take the image-feature width (CoCoOp) from the slots
            slots.require(self)
            if slots.image_features_dim is not None:
                found["image_dim"] = int(slots.image_features_dim)
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
        if slots is not None:
            self._warn_unused_depths(slots)
        return self

    def _warn_unused_depths(self, slots: HookSlots) -> None:
        """Warn when deep prompts go to blocks the model never runs (they would get no gradient).

        The depth is checked against the tower's blocks at construction; a model may run fewer
        (CLIPSeg stops its vision tower after the deepest block its decoder reads). Released
        configurations use such depths, so this warns instead of raising.
        """
        for tower in self.towers:
            if tower not in slots.towers:
                continue
            run = slots.depth(tower)
            unused = sorted(i for i in self.layers(tower) if i >= run)
            if unused:
                warnings.warn(
                    f"{type(self).__name__}(depth={self.depth}) prompts {tower} blocks up to "
                    f"{unused[-1]}, but this model runs only blocks 0..{run - 1} of its {tower} "
                    f"tower: the prompts for blocks {unused} are never used and get no gradient "
                    f"(a smaller depth gives the same model with fewer parameters)",
                    stacklevel=3,
                )

    def initialize_from_phrase_ids(self, ids: Sequence[int], token_embedding: nn.Embedding) -> None:
        """Set the first tokens of ``P_0`` to the token embeddings of ``ids`` (CoOp init).

        Args:
            ids: token ids of the phrase, without special tokens; at most ``num_context`` of them
                (the remaining context tokens keep their Gaussian initialisation).
            token_embedding: the text tower's word-embedding table ``(vocab, D_t)``.
        """
        if not self.phrase_init:
            raise ValueError(f"{type(self).__name__} has no text-space context to initialise")
        if len(ids) > self.num_context:
            raise ValueError(
                f"init phrase {self.init!r} has {len(ids)} tokens but num_context="
                f"{self.num_context}; pass num_context >= {len(ids)}, a shorter phrase or init=None"
            )
        weight = token_embedding.weight
        if weight.shape[-1] != self._dims["text_width"]:
            raise ValueError(
                f"token_embedding has width {weight.shape[-1]}, expected text_width="
                f"{self._dims['text_width']}"
            )
        index = torch.as_tensor(list(ids), dtype=torch.long, device=weight.device)
        first = self._first_text_context()
        with torch.no_grad():
            first[: len(ids)].copy_(weight[index].to(first))
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

    # ------------------------------------------------------------------ prompts
    def _prompts(self, image_features: Tensor | None) -> PromptSet:  # pragma: no cover - abstract
        raise NotImplementedError

    def prompts(self, image_features: Tensor | None = None) -> PromptSet:
        """This forward pass's per-depth prompts (see :class:`PromptSet`).

        Args:
            image_features: ``(B, E)`` pooled image embeddings (learners with
                ``needs_image_features``; ignored by the others).
        """
        self._check_ready()
        return self._prompts(image_features)

    def text_prompts(self, image_features: Tensor | None = None) -> list[Tensor] | None:
        """Per-depth text contexts ``[P_0 .. P_{J-1}]`` (see :class:`PromptSet`)."""
        return self.prompts(image_features).text

    def vision_prompts(self) -> list[Tensor] | None:
        """Per-depth vision prompts ``[P~_0 .. P~_{J-1}]``, each ``(n, D_v)``."""
        return self.prompts().vision

    def _deep(self, tower: str, ctx: RunContext) -> list[Tensor]:
        """The per-depth prompts for ``tower`` in this forward pass (computed once, memoised)."""
        key = (id(self), "prompts")
        if key not in ctx.memo:
            prompts = self.prompts(ctx.image_features if self.needs_image_features else None)
            text = prompts.text
            if text is not None and text[0].dim() == 3:
                # one context per image: give every text row the context of its own image
                if ctx.text_image_index is None:
                    raise ValueError(
                        f"{type(self).__name__} makes one text context per image, but this model "
                        "call shares its text rows between images"
                    )
                rows = ctx.text_image_index.to(text[0].device)
                text = [p[rows] for p in text]
            ctx.memo[key] = {"text": text, "vision": prompts.vision}
        deep = ctx.memo[key][tower]
        if deep is None:  # pragma: no cover - guarded by ``towers``
            raise ValueError(f"{type(self).__name__} has no {tower} prompts")
        return deep

    # ------------------------------------------------------------------ hook points
    def layers(self, tower: str) -> Collection[int]:
        return range(1, self.depth)

    def num_tokens(self, tower: str) -> int:
        if tower not in self.towers or (tower == "text" and self.overflow == "released"):
            return 0  # released: the tokenizer leaves no room; the tower crops instead
        return int(self.num_context or 0)

    def embed(self, tower: str, ctx: RunContext) -> dict[str, Any]:
        if tower == "text":
            return {"context": self._deep(tower, ctx)[0], "overflow": self.overflow}
        return {"prompts": self._deep(tower, ctx)[0]}

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        """Replace the prompt slots of every prompted tower with this depth's prompts."""
        return {name: s.set_prompts(self._deep(name, ctx)[i]) for name, s in states.items()}

    def kept(self, tower: str, i: int, state: TokenState, ctx: RunContext) -> TokenState:
        if tower != "vision" or state.num_prompts == 0:
            return state
        if self.decoder_sees_prompts == "released":
            if i + 1 < self.depth:
                return state.set_prompts(self._deep(tower, ctx)[i + 1])
            return state
        return state if self.decoder_sees_prompts else state.remove_prompts()

    def attach(self, model: nn.Module, **kwargs: Any):
        """Freeze ``model`` and tune it with this learner: ``CoOp(...).attach(model)``.

        Args:
            model: any model with hook slots (e.g. :class:`~vlsegkit.CLIPSeg`,
                :class:`~vlsegkit.MedCLIPSeg`).
            **kwargs: :class:`~vlsegkit.TunedModel` options; ``upsampler`` defaults to ``"auto"``
                (TuneVLSeg's learnable upsampler when the model offers decoder features);
                ``"released"`` uses the released code's upsampler mode (``RELEASED_UPSAMPLER``).

        Returns:
            The :class:`~vlsegkit.TunedModel`; only the learner (and upsampler) train.
        """
        kwargs.setdefault("upsampler", "auto")
        if kwargs["upsampler"] == "released":
            kwargs["upsampler"] = self.RELEASED_UPSAMPLER
        return super().attach(model, **kwargs)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description that rebuilds the learner
        (:func:`vlsegkit.registry.hook_from_config`); tower sizes learned by ``bind`` included."""
        args = {**self.config_args, "num_context": self.num_context, **self._dims}
        return {"name": type(self).__name__, "args": args}

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self._dims.items())
        return f"num_context={self.num_context}, depth={self.depth}, {dims}"


def _check_image_features(features: Tensor | None, dim: int, owner: str) -> Tensor:
    if features is None:
        raise ValueError(f"{owner} needs image_features of shape (B, {dim})")
    if features.dim() != 2 or features.shape[-1] != dim:
        raise ValueError(f"image_features must have shape (B, {dim}), got {tuple(features.shape)}")
    return features
