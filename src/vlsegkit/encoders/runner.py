"""The one layer loop of vlsegkit: step one or more towers block by block, calling hooks.

Every model and every hook goes through :func:`run_towers`; nothing else iterates over blocks. For
towers ``{name: tower}`` and their embedded states it runs, for ``i`` from ``start`` to ``stop``::

    for hook in hooks:                            # before block i
        if i in hook.layers(name): states = hook(i, states, ctx)
    for name in towers:                           # block i of every tower still running
        state = tower.block(i, state)             # with hook.taps(name, i) inside, if any
        if i in keep[name]: kept[name][i] = hook.kept(name, i, state, ctx)   # what the decoder reads

Towers are stepped together ("lockstep"), so a hook acting on several towers sees all of their
states at the same depth (MedCLIPSeg's PVL adapters, MaPLe's coupled prompts). Towers may have
different depths and batch sizes; each runs ``[start, stop)`` of its own.

Frozen blocks record no autograd graph unless something upstream needs gradients (a trainable hook
before them, trainable tower weights or a tap), and with ``gradient_checkpointing`` the blocks that
do record one are recomputed in backward instead of storing their activations.

``gradient_checkpointing="auto"`` checkpoints only the *frozen* blocks that must record a graph (those
between or after trainable hooks, e.g. MedCLIPSeg's adapters), and only when storing their
activations would take more than :data:`AUTO_CHECKPOINT_BYTES`. The estimate, made once per run, is
``sum over frozen towers of rows x tokens x width x (graph-recording blocks) x itemsize x``
:data:`SAVED_VALUES_PER_ELEMENT`: a pre-norm transformer block stores about ten values per
residual-stream element for backward (measured: 10.0 for an open_clip ViT-B block, 9.5-13 for a BERT
layer in eval mode, up to 23 with dropout active), so 12 is used.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .base import TokenState, Tower
from .hooks import RunContext, Tap, TowerHook

__all__ = [
    "AUTO_CHECKPOINT_BYTES",
    "SAVED_VALUES_PER_ELEMENT",
    "Checkpointing",
    "TowerRun",
    "check_layers",
    "embed_tower",
    "estimate_saved_bytes",
    "run_towers",
]

PerTower = int | Mapping[str, int] | None

#: ``gradient_checkpointing`` of :func:`run_towers`: False, True (every block that records a graph)
#: or ``"auto"`` (frozen blocks only, when their stored activations would exceed
#: :data:`AUTO_CHECKPOINT_BYTES`).
Checkpointing = bool | Literal["auto"]

#: Above this estimate of stored frozen-block activations, ``gradient_checkpointing="auto"``
#: recomputes the frozen blocks in backward. 2 GiB: full-size MedCLIPSeg (ViT-B/16 + BERT-base, 11
#: graph-recording blocks each) at 224 px stays below it up to batch 8 with released 256-token
#: padding (about 1.4 GiB) and batch 16 with ``"longest"`` padding; batch 32 goes above.
AUTO_CHECKPOINT_BYTES = 2 * 2**30

#: Values a pre-norm transformer block keeps for backward per residual-stream element (estimate).
SAVED_VALUES_PER_ELEMENT = 12


@dataclass
class TowerRun:
    """Result of :func:`run_towers`.

    Attributes:
        states: the final state of every tower (after block ``stop - 1``).
        kept: per tower, ``{block: TokenState}`` for the kept blocks, as the decoder should read them
            (after every hook's ``kept``), in increasing block order.
    """

    states: dict[str, TokenState]
    kept: dict[str, dict[int, TokenState]]


def check_layers(
    layers: Iterable[int], num_layers: int, *, name: str = "layers"
) -> tuple[int, ...]:
    """Validate block indices: distinct ints in ``[0, num_layers)``, returned sorted.

    Raises:
        ValueError: an index that is not an int, out of range, or repeated (the message names
            ``name``).
    """
    layers = tuple(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{name} must be ints in [0, {num_layers}), got {layers!r}")
    if any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"{name} must be block indices in [0, {num_layers}), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} must not repeat an index, got {layers!r}")
    return tuple(sorted(layers))


def embed_tower(
    name: str,
    tower: Tower,
    *inputs: object,
    hooks: Sequence[TowerHook] = (),
    ctx: RunContext | None = None,
    **kwargs: object,
) -> TokenState:
    """``tower.embed(*inputs, **kwargs)`` plus the embed-time arguments of the hooks on ``name``.

    Prompt learners insert their first prompts here (text context before the position embeddings,
    vision prompts before the pre-LayerNorm). Two hooks asking for the same argument is an error.
    """
    ctx = RunContext() if ctx is None else ctx
    extra: dict[str, object] = {}
    for hook in hooks:
        if name not in hook.towers:
            continue
        for key, value in hook.embed(name, ctx).items():
            if key in extra or key in kwargs:
                raise ValueError(
                    f"two hooks set the {name} tower's embed argument {key!r}; a tower takes one "
                    "set of input prompts"
                )
            extra[key] = value
    return tower.embed(*inputs, **kwargs, **extra)


def _per_tower(value: PerTower, names: Sequence[str], default: Mapping[str, int], what: str):
    if value is None:
        return dict(default)
    if isinstance(value, int) and not isinstance(value, bool):
        return dict.fromkeys(names, value)
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"{what} names towers {sorted(unknown)} that are not being run")
        return {n: int(value[n]) if n in value else default[n] for n in names}
    raise ValueError(f"{what} must be an int, a {{tower: int}} mapping or None, got {value!r}")


def _tower_trainable(tower: Tower) -> bool:
    return any(p.requires_grad for p in tower.parameters())


def _first_graph_block(
    name: str,
    state: TokenState,
    first: int,
    last: int,
    hooks: Sequence[TowerHook],
) -> int | None:
    """First block of a frozen tower that will record a graph (None: none will).

    A graph starts where the incoming tokens already need gradients, or at the first block where a
    trainable hook acts on this tower -- or, for a lockstep hook, on any of the towers it couples.
    """
    if state.tokens.requires_grad:
        return first
    starts = []
    for hook in hooks:
        if not hook.trainable():
            continue
        coupled = hook.towers if hook.lockstep and name in hook.towers else (name,)
        for tower in coupled:
            if tower in hook.towers:
                starts += [i for i in hook.layers(tower) if first <= i < last]
                if tower == name:
                    starts += [i for i in hook.tap_layers(tower) if first <= i < last]
    return min(starts, default=None)


def estimate_saved_bytes(
    towers: Mapping[str, Tower],
    states: Mapping[str, TokenState],
    *,
    hooks: Sequence[TowerHook] = (),
    start: PerTower = 0,
    stop: PerTower = None,
) -> int:
    """Bytes the frozen blocks of a :func:`run_towers` call would store for backward (estimate).

    ``sum over frozen towers of rows x tokens x width x graph-recording blocks x itemsize x``
    :data:`SAVED_VALUES_PER_ELEMENT`; trainable towers are not counted (``"auto"`` checkpointing
    leaves them alone). Arguments as in :func:`run_towers`; 0 when gradients are disabled.
    """
    if not torch.is_grad_enabled():
        return 0
    names = list(states)
    depth = {n: towers[n].num_layers for n in names}
    first = _per_tower(start, names, dict.fromkeys(names, 0), "start")
    last = _per_tower(stop, names, depth, "stop")
    total = 0
    for n in names:
        if _tower_trainable(towers[n]):
            continue
        graph_from = _first_graph_block(n, states[n], first[n], last[n], hooks)
        if graph_from is None:
            continue
        tokens = states[n].tokens
        total += tokens.numel() * tokens.element_size() * (last[n] - graph_from)
    return total * SAVED_VALUES_PER_ELEMENT


# Key of the taps in a branch module's forward-hook table (handles number hooks from 0 upwards).
_TAP_KEY = -1


@contextlib.contextmanager
def _tapped(tower: Tower, i: int, taps: Mapping[str, list[Tap]]):
    """Temporarily apply ``taps`` to the outputs of block ``i``'s branch modules.

    The taps enter each branch module's forward-hook table for the duration of the block (a copy of
    the table with the taps added, swapped in and back out) instead of ``register_forward_hook``,
    whose handle counter torch.compile cannot trace: the tapped block stays in the graph.
    """
    if not taps:
        yield
        return
    branches = tower.branch_modules(i)
    swapped: list[tuple[torch.nn.Module, OrderedDict]] = []
    try:
        for point, fns in taps.items():
            if point not in branches:
                raise ValueError(
                    f"{type(tower).__name__} has no in-block hook point {point!r}; it offers "
                    f"{sorted(branches)}"
                )

            def apply(_module, _args, output, fns=fns):
                first = output[0] if isinstance(output, tuple) else output
                for fn in fns:
                    first = fn(first)
                return (first, *output[1:]) if isinstance(output, tuple) else first

            module = branches[point]
            table = OrderedDict(module._forward_hooks)
            table[_TAP_KEY] = apply
            swapped.append((module, module._forward_hooks))
            module._forward_hooks = table
        yield
    finally:
        for module, table in reversed(swapped):
            module._forward_hooks = table


def _step(
    tower: Tower,
    i: int,
    state: TokenState,
    taps: Mapping[str, list[Tap]],
    *,
    trainable: bool,
    gradient_checkpointing: bool,
) -> TokenState:
    # A frozen block needs a graph only if something upstream of it (or inside it) needs gradients.
    graph = torch.is_grad_enabled() and (state.tokens.requires_grad or trainable or bool(taps))
    with torch.set_grad_enabled(graph):
        if graph and gradient_checkpointing:

            def run(tokens: Tensor) -> Tensor:
                with _tapped(tower, i, taps):
                    return tower.block(i, state.with_tokens(tokens)).tokens

            return state.with_tokens(checkpoint(run, state.tokens, use_reentrant=False))
        with _tapped(tower, i, taps):
            return tower.block(i, state)


def _checked(result: object, expected: Mapping[str, TokenState], hook: TowerHook, i: int):
    if not isinstance(result, Mapping) or set(result) != set(expected):
        raise ValueError(
            f"{type(hook).__name__} must return the states it was given ({sorted(expected)}) "
            f"before block {i}, got {type(result).__name__}"
        )
    for name, state in result.items():
        if not isinstance(state, TokenState):
            raise ValueError(
                f"{type(hook).__name__} returned a {type(state).__name__} for the {name} tower "
                f"before block {i}, not a TokenState"
            )
        if state.batch_size != expected[name].batch_size:
            raise ValueError(
                f"{type(hook).__name__} changed the {name} batch size before block {i}: "
                f"expected B={expected[name].batch_size}, got {state.batch_size}"
            )
    return result


def run_towers(
    towers: Mapping[str, Tower],
    states: Mapping[str, TokenState],
    *,
    hooks: Sequence[TowerHook] = (),
    ctx: RunContext | None = None,
    start: PerTower = 0,
    stop: PerTower = None,
    keep: Mapping[str, Iterable[int]] | None = None,
    gradient_checkpointing: Checkpointing = False,
) -> TowerRun:
    """Step the towers in ``states`` through blocks ``[start, stop)``, calling ``hooks`` on the way.

    Args:
        towers: ``{name: Tower}``; must contain every name of ``states``.
        states: ``{name: TokenState}`` to run, from ``tower.embed`` (see :func:`embed_tower`) or
            from an earlier run that ended at ``start``. Batch sizes may differ between towers.
        hooks: :class:`~vlsegkit.encoders.TowerHook` s, applied in order at each block.
        ctx: the forward pass's :class:`~vlsegkit.encoders.RunContext` (a fresh one by default);
            ``ctx.kept`` receives the kept states.
        start: first block, for every tower (int) or per tower (``{name: int}``).
        stop: one past the last block, likewise; None runs every tower to its end. A model stops a
            tower once the last block anyone needs has run.
        keep: per tower, blocks whose outputs to keep (as the decoder should read them).
        gradient_checkpointing: recompute the activations of blocks that record a graph in backward
            instead of storing them (hooks between blocks are not recomputed). ``"auto"``: only the
            frozen towers' blocks, and only when :func:`estimate_saved_bytes` exceeds
            :data:`AUTO_CHECKPOINT_BYTES`. Outputs and gradients are the same either way.

    Returns:
        :class:`TowerRun` with the final states and the kept ones.

    Raises:
        ValueError: a bad range or keep index, an unknown tower, a lockstep hook whose towers are
            not all running at one of its blocks, or a hook returning the wrong states.
    """
    names = list(states)
    unknown = [n for n in names if n not in towers]
    if unknown:
        raise ValueError(f"states name towers {unknown} that are not in towers {sorted(towers)}")
    depth = {n: towers[n].num_layers for n in names}
    first = _per_tower(start, names, dict.fromkeys(names, 0), "start")
    last = _per_tower(stop, names, depth, "stop")
    for n in names:
        if not 0 <= first[n] <= last[n] <= depth[n]:
            raise ValueError(
                f"{n} tower: need 0 <= start <= stop <= {depth[n]}, got start={first[n]}, "
                f"stop={last[n]}"
            )
    keep_sets: dict[str, tuple[int, ...]] = {}
    for n, layers in (keep or {}).items():
        if n not in depth:
            raise ValueError(f"keep names the {n} tower, which is not being run")
        keep_sets[n] = check_layers(layers, depth[n], name=f"keep[{n!r}]")
        outside = [i for i in keep_sets[n] if not first[n] <= i < last[n]]
        if outside:
            raise ValueError(
                f"keep[{n!r}] asks for blocks {outside} outside the run [{first[n]}, {last[n]})"
            )
    ctx = RunContext() if ctx is None else ctx
    hooks = tuple(hooks)
    for hook in hooks:
        if not isinstance(hook, TowerHook):
            raise TypeError(f"hooks must be TowerHook instances, got {type(hook).__name__}")
    if gradient_checkpointing not in (False, True, "auto"):
        raise ValueError(
            f"gradient_checkpointing must be True, False or 'auto', got {gradient_checkpointing!r}"
        )
    before = {(id(h), n): frozenset(h.layers(n)) for h in hooks for n in names if n in h.towers}
    inside = {(id(h), n): frozenset(h.tap_layers(n)) for h in hooks for n in names if n in h.towers}
    trainable = {n: _tower_trainable(towers[n]) for n in names}
    checkpointed = dict.fromkeys(names, gradient_checkpointing is True)
    if gradient_checkpointing == "auto":
        saved = estimate_saved_bytes(towers, states, hooks=hooks, start=first, stop=last)
        checkpointed = {n: not trainable[n] and saved > AUTO_CHECKPOINT_BYTES for n in names}
    current = dict(states)
    kept: dict[str, dict[int, TokenState]] = {n: {} for n in keep_sets}
    for i in range(min(first.values(), default=0), max(last.values(), default=0)):
        active = [n for n in names if first[n] <= i < last[n]]
        for hook in hooks:
            acting = [n for n in active if i in before.get((id(hook), n), ())]
            if not acting:
                continue
            if hook.lockstep and set(acting) != set(hook.towers):
                raise ValueError(
                    f"{type(hook).__name__} acts on the {', '.join(hook.towers)} towers together, "
                    f"but only {', '.join(acting)} run(s) block {i} here; the model must step them "
                    "in lockstep"
                )
            given = {n: current[n] for n in acting}
            current.update(_checked(hook(i, given, ctx), given, hook, i))
        for n in active:
            taps: dict[str, list[Tap]] = {}
            for hook in hooks:
                if i in inside.get((id(hook), n), ()):
                    for point, fn in hook.taps(n, i, ctx).items():
                        taps.setdefault(point, []).append(fn)
            current[n] = _step(
                towers[n],
                i,
                current[n],
                taps,
                trainable=trainable[n],
                gradient_checkpointing=checkpointed[n],
            )
            if i in keep_sets.get(n, ()):
                state = current[n]
                for hook in hooks:
                    if n in hook.towers:
                        state = hook.kept(n, i, state, ctx)
                kept[n][i] = state
                ctx.kept.setdefault(n, {})[i] = state
    return TowerRun(states=current, kept=kept)
