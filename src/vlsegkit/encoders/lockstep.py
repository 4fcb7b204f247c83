"""Step two towers in lockstep, with a hook that sees both streams between their blocks.

Methods whose vision and text encoders interact inside the encoders -- MedCLIPSeg's PVL adapters
(Koleilat et al., CVPR 2026, section 3.2: an adapter between layers ``k`` and ``k + 1`` of *both*
towers), MaPLe's vision-language prompt coupling (Khattak et al., CVPR 2023) -- need the two towers
to advance one block at a time, side by side. :func:`run_lockstep` is that loop, written once::

    for i in range(start, stop):
        if i in layers:
            vision_state, text_state = hook(i, vision_state, text_state)
        vision_state = vision.block(i, vision_state)
        text_state = text.block(i, text_state)

It only uses the :class:`~vlsegkit.encoders.base.Tower` protocol (``block`` and ``num_layers``), so it
works for any pair of backends (transformers CLIP, open_clip ViT / text transformer, timm ViT, HF
BERT) without knowing how either was built. Running ``[0, k)`` once and ``[k, L)`` several times (e.g.
per Monte Carlo sample) is just two calls with ``stop=k`` and ``start=k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlsegkit.encoders.base import TokenState, Tower

__all__ = ["LockstepHook", "check_lockstep_layers", "run_lockstep"]

#: ``hook(i, vision_state, text_state) -> (vision_state, text_state)``, called before block ``i``.
LockstepHook = Callable[[int, TokenState, TokenState], tuple[TokenState, TokenState]]


def check_lockstep_layers(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Validate hook layer indices: distinct ints in ``[0, num_layers)``, returned sorted.

    Args:
        layers: block indices (0-indexed) before which a hook acts.
        num_layers: depth shared by the two towers.

    Raises:
        ValueError: an index is not an int, out of range, or repeated.
    """
    layers = tuple(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers must be ints in [0, {num_layers}), got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers must be block indices in [0, {num_layers}), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat an index, got {layers!r}")
    return tuple(sorted(layers))


def _step(tower: Tower, i: int, state: TokenState, gradient_checkpointing: bool) -> TokenState:
    # checkpointing only pays off when a graph is recorded through the tokens
    if gradient_checkpointing and torch.is_grad_enabled() and state.tokens.requires_grad:

        def run(tokens: Tensor) -> Tensor:
            return tower.block(i, state.with_tokens(tokens)).tokens

        return state.with_tokens(checkpoint(run, state.tokens, use_reentrant=False))
    return tower.block(i, state)


def run_lockstep(
    vision: Tower,
    text: Tower,
    vision_state: TokenState,
    text_state: TokenState,
    hook: LockstepHook | None = None,
    *,
    layers: Iterable[int] | None = None,
    start: int = 0,
    stop: int | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[TokenState, TokenState]:
    """Advance two towers through blocks ``start .. stop - 1`` together, calling ``hook`` between.

    Before block ``i`` (for ``i`` in ``layers``, or every ``i`` when ``layers`` is None) the hook
    receives both states and returns both updated states; then ``vision.block(i)`` and
    ``text.block(i)`` run. With MedCLIPSeg's PVL adapters this is eqs. 14-17 of Koleilat et al.
    (CVPR 2026) applied between layers ``k`` and ``k + 1`` of the two encoders.

    Args:
        vision: the vision tower (any :class:`~vlsegkit.encoders.base.Tower`).
        text: the text tower; both towers must have the same ``num_layers`` unless ``stop`` is at
            most the smaller depth.
        vision_state: ``TokenState`` with tokens ``(B, N, D_v)`` from ``vision.embed`` (or from an
            earlier ``run_lockstep`` call ending at ``start``).
        text_state: ``TokenState`` with tokens ``(B, M, D_t)``; same batch size ``B``.
        hook: ``hook(i, vision_state, text_state) -> (vision_state, text_state)``, or None to step
            the towers only.
        layers: global block indices before which ``hook`` is called (indices outside
            ``[start, stop)`` are simply not reached); None calls it before every block.
        start: first block to run.
        stop: one past the last block to run; None runs to the end of the towers.
        gradient_checkpointing: recompute each block's activations in backward instead of storing
            them (only when a graph is recorded through the tokens). Hooks are not checkpointed.

    Returns:
        ``(vision_state, text_state)`` after block ``stop - 1``.

    Raises:
        ValueError: different depths without a ``stop``, a bad ``start`` / ``stop`` / ``layers``,
            different batch sizes, or a hook that does not return two ``TokenState`` s of the
            input batch size.
    """
    depth = min(vision.num_layers, text.num_layers)
    if stop is None:
        if vision.num_layers != text.num_layers:
            raise ValueError(
                f"towers have different depths (vision {vision.num_layers}, text "
                f"{text.num_layers}); pass stop <= {depth} to step them in lockstep"
            )
        stop = depth
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= depth):
        raise ValueError(f"need 0 <= start <= stop <= {depth}, got start={start}, stop={stop}")
    active = None if layers is None else set(check_lockstep_layers(layers, depth))
    batch = vision_state.batch_size
    if text_state.batch_size != batch:
        raise ValueError(
            f"vision_state and text_state must share the batch size, got tokens "
            f"{tuple(vision_state.tokens.shape)} and {tuple(text_state.tokens.shape)}"
        )
    for i in range(start, stop):
        if hook is not None and (active is None or i in active):
            vision_state, text_state = _checked(hook(i, vision_state, text_state), i, batch)
        vision_state = _step(vision, i, vision_state, gradient_checkpointing)
        text_state = _step(text, i, text_state, gradient_checkpointing)
    return vision_state, text_state


def _checked(result, i: int, batch: int) -> tuple[TokenState, TokenState]:
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not all(isinstance(s, TokenState) for s in result)
    ):
        raise ValueError(
            f"hook must return (vision_state, text_state) TokenStates, got {type(result).__name__} "
            f"before block {i}"
        )
    if any(s.batch_size != batch for s in result):
        raise ValueError(
            f"hook changed the batch size before block {i}: expected B={batch}, got "
            f"{result[0].batch_size} and {result[1].batch_size}"
        )
    return result
