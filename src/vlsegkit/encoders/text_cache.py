"""Text rows encoded once: duplicate token rows folded, and an optional cache across steps.

Many images of a batch share a prompt (the same class name, the same attribute template), and a
frozen text tower with no hook acting on it gives the same result for the same tokens at every step.
Two helpers avoid the repeated work:

* :func:`unique_token_rows` folds identical ``(input_ids, attention_mask)`` rows of one batch (string
  prompts are already folded by :func:`vlsegkit.models.parse_text_prompts`);
* :class:`TextCache`, an optional bounded LRU cache of per-prompt results across calls, keyed by the
  prompt's token ids. It serves a tower only when its result cannot change: no gradient has to reach
  its weights, no dropout is active in it (eval mode, or no dropout at all), and its parameters are
  the ones the entries were computed with -- every parameter's and buffer's identity, version
  counter (bumped by in-place updates: an optimizer step, ``load_state_dict``), dtype and device are
  checked on each call, and the tower's entries are dropped when they changed.

Models take a cache through their ``text_cache`` attribute (off by default)::

    model.text_cache = TextCache(max_rows=4096)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import TokenState

__all__ = ["TextCache", "unique_token_rows"]


def unique_token_rows(
    input_ids: Tensor, attention_mask: Tensor | None, index: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Fold identical token rows so that each distinct prompt is encoded once.

    Args:
        input_ids: ``(T, L)`` token ids.
        attention_mask: ``(T, L)`` mask or None.
        index: ``(B, C)`` long, the row of ``input_ids`` each output channel reads.

    Returns:
        ``(ids (U, L), mask (U, L) or None, index (B, C))`` with ``U <= T`` distinct rows, kept in
        order of first appearance, and the index remapped onto them. Under ``torch.compile`` the
        rows are returned unchanged: comparing them reads the ids back to the host, which would
        break the graph.
    """
    if torch.compiler.is_compiling():
        return input_ids, attention_mask, index
    rows = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask.long()], 1)
    keys = [tuple(r) for r in rows.tolist()]
    first: dict[tuple, int] = {}
    for n, key in enumerate(keys):
        first.setdefault(key, n)
    if len(first) == len(keys):
        return input_ids, attention_mask, index
    keep = list(first.values())
    position = {key: u for u, key in enumerate(first)}
    remap = torch.tensor([position[key] for key in keys], dtype=torch.long)
    kept = torch.tensor(keep, dtype=torch.long, device=input_ids.device)
    mask = None if attention_mask is None else attention_mask[kept]
    return input_ids[kept], mask, remap.to(index.device)[index]


@dataclass(frozen=True)
class _Meta:
    """The TokenState fields shared by all rows (so a full hit needs no computation)."""

    num_prefix: int
    num_prompts: int
    causal: bool
    masked: bool


Value = Tensor | TokenState


# float attributes through which upstream attention modules apply dropout without an nn.Dropout
_DROPOUT_ATTRS = ("dropout", "dropout_prob", "attention_dropout", "drop_prob")


def _dropout_active(module: nn.Module) -> bool:
    """Whether any submodule in train mode applies dropout (``nn.Dropout*``, timm ``DropPath``, or
    a float probability attribute as in ``nn.MultiheadAttention`` / transformers attention)."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.p > 0:
                return True
            continue
        for name in _DROPOUT_ATTRS:
            value = getattr(m, name, None)
            if isinstance(value, float) and value > 0:
                return True
    return False


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None: rows computed under bf16 / fp16
    autocast are rounded, so the precision is part of a row's key."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (AttributeError, TypeError):  # torch < 2.4: per-device functions
        if kind == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _row_count(value: Value) -> int:
    return value.batch_size if isinstance(value, TokenState) else value.shape[0]


def _rows_of(value: Value) -> list:
    if isinstance(value, Tensor):
        return [v.detach() for v in value]
    mask, pool = value.attention_mask, value.pool_index
    return [
        (
            value.tokens[j].detach(),
            None if mask is None else mask[j],
            None if pool is None else pool[j],
        )
        for j in range(value.batch_size)
    ]


def _join(rows: list, meta: _Meta | None) -> Value:
    if meta is None:
        return torch.stack(rows)
    tokens = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows]) if meta.masked else None
    pool = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
    return TokenState(
        tokens=tokens,
        attention_mask=mask,
        pool_index=pool,
        num_prefix=meta.num_prefix,
        num_prompts=meta.num_prompts,
        causal=meta.causal,
    )


class TextCache:
    """Bounded LRU cache of a frozen text tower's per-prompt results, keyed by token ids.

    A result is one row of whatever the caller computes from token rows: a pooled embedding ``(E,)``
    (CLIPSeg's conditional embedding) or a text ``TokenState`` row after some blocks (MedCLIPSeg's
    sampling-independent prefix). The key is the row's real tokens (padding stripped, by the mask),
    the autocast dtype in force (a row computed under bf16 autocast is never served to a float32
    pass) and the caller's ``tag`` (what was computed: e.g. the number of blocks run and the padded
    length when the result keeps every position).

    Args:
        max_rows: entries kept; the least recently used is dropped first.

    Attributes:
        hits, misses: rows served from the cache / computed, since creation or :meth:`clear`.
    """

    def __init__(self, max_rows: int = 1024) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        self.max_rows = max_rows
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._meta: dict[Hashable, _Meta | None] = {}
        self._fingerprints: dict[int, tuple] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._entries.clear()
        self._meta.clear()
        self._fingerprints.clear()
        self.hits = self.misses = 0

    @staticmethod
    def usable(tower: nn.Module) -> bool:
        """Whether results of ``tower`` may be served from a cache now.

        Not when gradients must reach the tower's weights (a trainable tower in a training step),
        and not when the tower is in train mode with dropout active in it (a cached row would reuse
        one dropout sample). A frozen tower kept in eval mode, or without dropout, is served.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters()):
            return False
        return not (tower.training and _dropout_active(tower))

    @staticmethod
    def _fingerprint(tower: nn.Module) -> tuple:
        tensors = [*tower.parameters(), *tower.buffers()]
        return tuple((id(t), t._version, t.dtype, t.device) for t in tensors)

    def _check_weights(self, tower: nn.Module) -> None:
        fingerprint = self._fingerprint(tower)
        known = self._fingerprints.get(id(tower))
        if known is not None and known != fingerprint:
            # weights changed (an optimizer step, load_state_dict, a dtype / device move)
            stale = [k for k in self._entries if k[0] == id(tower)]
            for key in stale:
                del self._entries[key]
        self._fingerprints[id(tower)] = fingerprint

    def rows(
        self,
        tower: nn.Module,
        tag: Hashable,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        compute: Callable[[Tensor], Value],
    ) -> Value:
        """Per-row results for ``input_ids`` ``(T, L)``: cached rows reused, the rest computed.

        Args:
            tower: the text tower the results come from (checked with :meth:`usable`).
            tag: what ``compute`` computes (part of the key).
            input_ids, attention_mask: the token rows (mask 1 / True for real tokens).
            compute: ``compute(rows)`` -> the results of the rows ``rows`` (a long tensor of row
                indices): a ``(len(rows), ...)`` tensor or a ``TokenState`` of ``len(rows)`` rows.

        Returns:
            The results of all ``T`` rows, as ``compute(arange(T))`` would return them (to float
            rounding: a row may have been computed in another batch).
        """
        t = input_ids.shape[0]
        device = input_ids.device
        if not self.usable(tower):
            return compute(torch.arange(t, device=device))
        self._check_weights(tower)
        ids = input_ids.tolist()
        mask = None if attention_mask is None else attention_mask.bool().tolist()
        precision = _autocast_dtype(device)
        keys = [
            (
                id(tower),
                tag,
                precision,
                tuple(i for i, m in zip(ids[r], mask[r]) if m) if mask else tuple(ids[r]),
            )
            for r in range(t)
        ]
        missing = list(dict.fromkeys(k for k in keys if k not in self._entries))
        found: dict[Hashable, object] = {}
        if missing:
            first = {k: keys.index(k) for k in missing}
            todo = torch.tensor([first[k] for k in missing], dtype=torch.long, device=device)
            value = compute(todo)
            if _row_count(value) != len(missing):
                raise ValueError(
                    f"compute returned {_row_count(value)} rows for {len(missing)} requested rows"
                )
            meta = None
            if isinstance(value, TokenState):
                meta = _Meta(
                    value.num_prefix,
                    value.num_prompts,
                    value.causal,
                    value.attention_mask is not None,
                )
            self._meta[(id(tower), tag)] = meta
            for key, row in zip(missing, _rows_of(value)):
                found[key] = row
                self._entries[key] = row
        computed = set(missing)
        self.misses += len(missing)
        self.hits += sum(1 for k in keys if k not in computed)
        rows = []
        for key in keys:
            row = found.get(key)
            if row is None:
                row = self._entries[key]
                self._entries.move_to_end(key)
            rows.append(row)
        while len(self._entries) > self.max_rows:
            self._entries.popitem(last=False)
        return _join(rows, self._meta[(id(tower), tag)])
