"""Steppable encoder towers: the one abstraction every vlsegkit model is built on.

A *tower* presents a CLIP-family encoder -- whatever library built it -- as a sequence of blocks that
can be stepped one at a time::

    state = tower.embed(inputs)              # TokenState
    for i in range(tower.num_layers):
        state = hook(i, state)               # prompt learners, adapters act here
        state = tower.block(i, state)
    pooled = tower.pool(state)               # (B, E)
    dense = tower.dense(state)               # (B, P, E)

That loop is written once, in :func:`vlsegkit.encoders.run_towers`, which also steps several towers
together and calls :class:`~vlsegkit.encoders.TowerHook` s. Backends (``vlsegkit.encoders.hf_clip``,
``vlsegkit.encoders.open_clip``) are thin adapters over the upstream module objects, which keep their
own weights and parameter names.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .hooks import TowerHook

#: What a text tower does when prompt + context tokens exceed its positions (``TokenState.fit_length``).
Overflow = Literal["error", "truncate", "released"]

__all__ = [
    "TokenState",
    "Tower",
    "TowerOutput",
    "attention_bias",
]


@dataclass(frozen=True)
class TokenState:
    """Tokens flowing through a tower, plus everything that changes when tokens are inserted.

    Layout of ``tokens`` along the sequence axis::

        [ prefix (num_prefix) | prompts (num_prompts) | content ]

    For vision the prefix is the CLS token (and any register tokens) and the content is the patch grid,
    row-major. For text the prefix is the start token (CLIP BOS / BERT CLS) and the content is the rest
    of the tokenised prompt, padding included.

    Attributes:
        tokens: ``(B, N, D)`` hidden states.
        attention_mask: ``(B, N)`` bool, True for tokens that may be attended to, or None when every
            token is valid.
        pool_index: ``(B,)`` long, the position ``pool`` reads (CLS = 0, CLIP's EOS elsewhere).
        num_prefix: number of leading tokens before the prompt slots.
        num_prompts: number of prompt tokens at ``[num_prefix, num_prefix + num_prompts)``.
        grid: ``(h, w)`` patch grid of the content tokens for vision towers, None for text.
        causal: whether blocks apply a causal mask (CLIP text towers).
    """

    tokens: Tensor
    attention_mask: Tensor | None = None
    pool_index: Tensor | None = None
    num_prefix: int = 1
    num_prompts: int = 0
    grid: tuple[int, int] | None = None
    causal: bool = False
    extras: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def content_start(self) -> int:
        """Index of the first content (patch / word) token."""
        return self.num_prefix + self.num_prompts

    @property
    def prompt_tokens(self) -> Tensor:
        """``(B, num_prompts, D)`` the prompt slots."""
        return self.tokens[:, self.num_prefix : self.content_start]

    @property
    def content_tokens(self) -> Tensor:
        """``(B, N - num_prefix - num_prompts, D)``: patch tokens (vision) or words (text)."""
        return self.tokens[:, self.content_start :]

    def without_prompts(self) -> Tensor:
        """``(B, N - num_prompts, D)``: prefix and content tokens, prompt slots removed."""
        if self.num_prompts == 0:
            return self.tokens
        return torch.cat([self.tokens[:, : self.num_prefix], self.content_tokens], dim=1)

    def grid_map(self) -> Tensor:
        """Content tokens as a feature map ``(B, D, h, w)`` (vision towers only)."""
        if self.grid is None:
            raise ValueError("grid_map() needs a vision TokenState (grid is None)")
        h, w = self.grid
        x = self.content_tokens
        if x.shape[1] != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} content tokens, found {x.shape[1]}")
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    # ------------------------------------------------------------------ edits
    def take(self, rows: Tensor) -> TokenState:
        """The states of batch rows ``rows`` (tokens, padding mask and pooling index together).

        Args:
            rows: ``(R,)`` long indices into the batch (repeats allowed).
        """
        rows = rows.to(self.tokens.device)
        mask, pool = self.attention_mask, self.pool_index
        return self.replace(
            tokens=self.tokens[rows],
            attention_mask=None if mask is None else mask[rows],
            pool_index=None if pool is None else pool[rows],
        )

    def fit_length(self, max_len: int, overflow: Overflow = "error") -> TokenState:
        """Fit the sequence into ``max_len`` positions (a text tower's position table).

        Args:
            max_len: the number of positions available.
            overflow: what to do when prompt tokens plus inserted context exceed ``max_len``:
                ``"error"`` raises; ``"truncate"`` cuts each row to ``max_len`` tokens keeping its
                last real token (EOS / [SEP]) last, with a ``PromptTruncationWarning`` -- the
                tokenizer's own rule; ``"released"`` keeps the first ``max_len - 1`` tokens and the
                sequence's last position, crops the mask's end and clamps the pooling index, as
                TuneVLSeg's released CoOp code does.

        Returns:
            The state, unchanged when it fits.
        """
        n = self.tokens.shape[1]
        if n <= max_len:
            return self
        if overflow == "error":
            raise ValueError(
                f"{n - self.num_prompts} prompt tokens + {self.num_prompts} context tokens = {n} "
                f"exceed the {max_len} text positions; shorten the prompt or let the context "
                "learner truncate it (overflow='truncate')"
            )
        mask, pool = self.attention_mask, self.pool_index
        if overflow == "released":
            tokens = torch.cat([self.tokens[:, : max_len - 1], self.tokens[:, -1:]], dim=1)
            return self.replace(
                tokens=tokens,
                attention_mask=None if mask is None else mask[:, :max_len],
                pool_index=None if pool is None else pool.clamp(max=max_len - 1),
            )
        if overflow != "truncate":
            raise ValueError(
                f"overflow must be 'error', 'truncate' or 'released', got {overflow!r}"
            )
        rows = torch.arange(self.batch_size, device=self.tokens.device)
        if mask is not None:  # each row's last real token
            last = (mask.long() * torch.arange(n, device=mask.device)).argmax(dim=1)
        elif pool is not None:
            last = pool
        else:
            last = torch.full_like(rows, n - 1)
        cut = last >= max_len
        tokens = self.tokens[:, :max_len].clone()
        new_mask = None if mask is None else mask[:, :max_len].clone()
        if bool(cut.any()):
            from ..tokenizers import PromptTruncationWarning

            warnings.warn(
                f"{int(cut.sum())} prompt(s) plus {self.num_prompts} context tokens exceed the "
                f"{max_len} text positions; their last tokens before the end token were cut",
                PromptTruncationWarning,
                stacklevel=3,
            )
            tokens[rows[cut], max_len - 1] = self.tokens[rows[cut], last[cut]]
            if new_mask is not None:
                new_mask[rows[cut], max_len - 1] = True
            if pool is not None:
                pool = torch.where(cut & (pool == last), torch.full_like(pool, max_len - 1), pool)
        if pool is not None:
            pool = pool.clamp(max=max_len - 1)
        return self.replace(tokens=tokens, attention_mask=new_mask, pool_index=pool)

    def replace(self, **changes) -> TokenState:
        """A copy with some fields changed (states are immutable so hooks cannot alias)."""
        return dataclasses.replace(self, **changes)

    def with_tokens(self, tokens: Tensor) -> TokenState:
        if tokens.shape[:2] != self.tokens.shape[:2]:
            raise ValueError(
                f"with_tokens expects shape (B={self.tokens.shape[0]}, N={self.tokens.shape[1]}, D), "
                f"got {tuple(tokens.shape)}"
            )
        return self.replace(tokens=tokens)

    def insert_prompts(self, prompts: Tensor) -> TokenState:
        """Insert prompt tokens after the existing prompt slots (VPT / CoOp style insertion).

        Args:
            prompts: ``(B, n, D)`` or ``(n, D)`` (shared by the batch).

        Returns:
            A state with ``num_prompts + n`` prompt slots; the attention mask and the pooling position
            are shifted to stay on the same tokens.
        """
        prompts = _as_batched(prompts, self.tokens)
        n = prompts.shape[1]
        if n == 0:
            return self
        at = self.content_start
        tokens = torch.cat(
            [self.tokens[:, :at], prompts.to(self.tokens.dtype), self.tokens[:, at:]], 1
        )
        mask = self.attention_mask
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], n)
            mask = torch.cat([mask[:, :at], ones, mask[:, at:]], dim=1)
        pool = self.pool_index
        if pool is not None:
            pool = torch.where(pool >= at, pool + n, pool)
        return self.replace(
            tokens=tokens, attention_mask=mask, pool_index=pool, num_prompts=self.num_prompts + n
        )

    def set_prompts(self, prompts: Tensor) -> TokenState:
        """Overwrite the prompt slots (deep prompt replacement, VPT-deep / MaPLe).

        Args:
            prompts: ``(B, num_prompts, D)`` or ``(num_prompts, D)``.
        """
        prompts = _as_batched(prompts, self.tokens)
        if prompts.shape[1] != self.num_prompts:
            raise ValueError(
                f"set_prompts expects {self.num_prompts} prompt tokens, got {prompts.shape[1]}"
            )
        tokens = torch.cat(
            [self.tokens[:, : self.num_prefix], prompts.to(self.tokens.dtype), self.content_tokens],
            1,
        )
        return self.replace(tokens=tokens)

    def remove_prompts(self) -> TokenState:
        """Drop every prompt slot, restoring the plain layout."""
        if self.num_prompts == 0:
            return self
        n, at = self.num_prompts, self.num_prefix
        mask = self.attention_mask
        if mask is not None:
            mask = torch.cat([mask[:, :at], mask[:, at + n :]], dim=1)
        pool = self.pool_index
        if pool is not None:
            pool = torch.where(pool >= at + n, pool - n, pool)
        return self.replace(
            tokens=self.without_prompts(), attention_mask=mask, pool_index=pool, num_prompts=0
        )


def _as_batched(prompts: Tensor, tokens: Tensor) -> Tensor:
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)
    if prompts.dim() != 3 or prompts.shape[-1] != tokens.shape[-1]:
        raise ValueError(
            f"prompts must have shape (B, n, {tokens.shape[-1]}) or (n, {tokens.shape[-1]}), "
            f"got {tuple(prompts.shape)}"
        )
    if prompts.shape[0] == 1 and tokens.shape[0] != 1:
        prompts = prompts.expand(tokens.shape[0], -1, -1)
    if prompts.shape[0] != tokens.shape[0]:
        raise ValueError(f"prompts batch {prompts.shape[0]} != token batch {tokens.shape[0]}")
    return prompts


def attention_bias(state: TokenState, dtype: torch.dtype | None = None) -> Tensor | None:
    """Additive attention bias ``(B, 1, N, N)`` from the padding mask and causality, or None.

    Masked entries are the dtype's most negative finite value (not -inf), so a fully masked row gives
    a uniform softmax instead of NaN -- the convention of transformers and open_clip.
    """
    dtype = dtype or state.tokens.dtype
    b, n = state.tokens.shape[:2]
    device = state.tokens.device
    if state.attention_mask is None and not state.causal:
        return None
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool, device=device)
    if state.attention_mask is not None:
        allowed = allowed & state.attention_mask.bool()[:, None, None, :]
    if state.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(b, 1, n, n, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class TowerOutput:
    """What ``Tower.forward`` returns.

    Attributes:
        pooled: ``(B, E)`` pooled embedding in the joint space.
        state: the final ``TokenState`` (after the last block, before the final norm).
        hidden_states: when requested, ``num_layers + 1`` tensors ``(B, N, D)``: index 0 is the
            embedding output, index ``i + 1`` the output of block ``i`` (the transformers convention;
            as the hooks' ``kept`` points present it).
    """

    pooled: Tensor
    state: TokenState
    hidden_states: list[Tensor] | None = None


class Tower(nn.Module):
    """Base class of steppable towers.

    Subclasses wrap an upstream module and implement ``embed``, ``block``, ``pool`` and ``dense``; they
    set ``modality`` (``"vision"`` or ``"text"``), ``num_layers``, ``width`` (residual width ``D``) and
    ``embed_dim`` (joint-space width ``E``).
    """

    modality: str = ""
    num_layers: int
    width: int
    embed_dim: int

    def embed(self, *args, **kwargs) -> TokenState:  # pragma: no cover - abstract
        raise NotImplementedError

    def block(self, i: int, state: TokenState) -> TokenState:  # pragma: no cover - abstract
        raise NotImplementedError

    def pool(self, state: TokenState) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self, state: TokenState) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """In-block hook points of block ``i``: ``{"attn": module, "mlp": module}``.

        Each module's output is its branch's contribution just before the residual add (attention
        after its output projection, MLP after its second linear). The runner attaches taps
        (:meth:`vlsegkit.encoders.TowerHook.taps`) as temporary forward hooks on these modules, so
        the upstream block code runs unchanged.
        """
        raise NotImplementedError(f"{type(self).__name__} exposes no in-block hook points")

    def forward(
        self,
        *args,
        hooks: Sequence[TowerHook] = (),
        output_hidden_states: bool = False,
        **kwargs,
    ) -> TowerOutput:
        """Embed, step through every block with ``hooks`` (:func:`~vlsegkit.encoders.run_towers`)
        and pool.

        Positional and keyword arguments go to ``embed``; the tower's role in the hooks is its
        ``modality`` (``"vision"`` / ``"text"``).
        """
        from .runner import embed_tower, run_towers

        name = self.modality
        state = embed_tower(name, self, *args, hooks=hooks, **kwargs)
        keep = {name: range(self.num_layers)} if output_hidden_states else None
        run = run_towers({name: self}, {name: state}, hooks=hooks, keep=keep)
        hidden = None
        if output_hidden_states:
            hidden = [state.tokens, *(s.tokens for s in run.kept[name].values())]
        final = run.states[name]
        return TowerOutput(pooled=self.pool(final), state=final, hidden_states=hidden)
