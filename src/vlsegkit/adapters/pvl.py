"""MedCLIPSeg's PVL adapters as a hook: bidirectional probabilistic fusion between the towers.

Koleilat et al., "MedCLIPSeg" (CVPR 2026), section 3.2: one :class:`~vlsegkit.layers.PVLAdapter`
between layers ``k`` and ``k + 1`` of *both* encoders (eqs. 3, 14-17), so the hook acts on the vision
and the text stream of the same (image, prompt) pair at the same depth (``lockstep``). Values are
sampled (eq. 10) in training and eval alike unless ``deterministic``; Monte Carlo copies get their
noise from ``ctx.generators`` (one generator per copy).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

from ..encoders.base import TokenState
from ..encoders.hooks import HookSlots, RunContext, TowerHook
from ..encoders.runner import check_layers
from ..layers.pvl import PVLAdapter

__all__ = ["IDENTICAL_COPIES", "PVLAdapters"]

#: ``RunContext.extras`` key: ``(block, copies)`` -- before ``block`` the rows are ``copies``
#: identical copy-major repeats (Monte Carlo copies of one input), so the adapter there computes its
#: sampling-independent part once (set by :meth:`vlsegkit.models.MedCLIPSeg.forward_from_prefix`).
IDENTICAL_COPIES = "pvl_identical_copies"


class PVLAdapters(TowerHook):
    """A stack of :class:`~vlsegkit.layers.PVLAdapter` s, one before each of ``layers``.

    Before block ``i`` (``i`` in ``layers``)::

        V, T = PVLAdapter_n(V, T)        # vision (R, N, D_v) and text (R, M, D_t), row r = a pair

    The adapters are the hook's children ``"0"``, ``"1"``, ... (state-dict keys
    ``<prefix>.0.proj_vis_down.weight``, as in MedCLIPSeg's released checkpoints).

    Args:
        layers: blocks (0-indexed) preceded by an adapter; default ``1 .. D-2`` with ``D`` the
            shallower of the two towers' run depths (1..10 for ViT-B/12 + BERT-12, as released).
            ``()`` gives no adapter.
        dim: shared adapter width ``D_s`` (256).
        num_heads: PVL attention heads (1 as released).
        beta: confidence penalty ``beta`` of eq. 8 (2.35).
        kv_norm: LayerNorm on the key / value means (released checkpoints; not in the paper).
        var_eps: floor added to the softplus variances (1e-6 as released).
        gate_init: initial gate logit (0 -> g = 0.5).
        deterministic: use the value means unless a call asks to sample (``ctx.sample``).
        mask_text_padding: mask padded text keys (from the text state's attention mask); False
            attends to the padding, as the released model does with 256-token padding.
    """

    towers = ("vision", "text")
    lockstep = True
    pairs_text_with_images = True

    def __init__(
        self,
        *,
        layers: Sequence[int] | None = None,
        dim: int = 256,
        num_heads: int = 1,
        beta: float = 2.35,
        kv_norm: bool = False,
        var_eps: float = 1e-6,
        gate_init: float = 0.0,
        deterministic: bool = False,
        mask_text_padding: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._layers = None if layers is None else tuple(layers)
        self._attn = dict(
            num_heads=num_heads,
            beta=float(beta),
            kv_norm=bool(kv_norm),
            var_eps=float(var_eps),
            gate_init=float(gate_init),
            deterministic=bool(deterministic),
        )
        self.dim = dim
        self.deterministic = bool(deterministic)
        self.mask_text_padding = bool(mask_text_padding)
        self.slot: dict[int, int] = {}

    def bind(self, slots: HookSlots) -> PVLAdapters:
        """Create one adapter per layer from the towers' widths (once)."""
        vision, text = slots.towers["vision"], slots.towers["text"]
        depth = min(slots.depth("vision"), slots.depth("text"))
        layers = range(1, depth - 1) if self._layers is None else self._layers
        layers = check_layers(layers, depth, name="PVLAdapters layers")
        widths = (vision.width, text.width)
        if self.slot:
            if tuple(self.slot) != layers:
                raise ValueError(f"PVLAdapters is bound to layers {tuple(self.slot)}, not {layers}")
            bound = (self[0].vision_dim, self[0].text_dim)
            if bound != widths:
                raise ValueError(
                    f"PVLAdapters is bound to towers of widths (vision, text) {bound}, not "
                    f"{widths}; create a new PVLAdapters for this model"
                )
            return self
        self.slot = {layer: n for n, layer in enumerate(layers)}
        for n in range(len(layers)):
            self.add_module(
                str(n),
                PVLAdapter(
                    vision_dim=vision.width, text_dim=text.width, dim=self.dim, **self._attn
                ),
            )
        return self

    def __getitem__(self, n: int) -> PVLAdapter:
        return self._modules[str(n)]

    def __len__(self) -> int:
        return len(self.slot)

    def __iter__(self) -> Iterator[PVLAdapter]:
        return (self[n] for n in range(len(self.slot)))

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        """Blocks preceded by an adapter (after ``bind``)."""
        return tuple(self.slot)

    def layers(self, tower: str) -> Collection[int]:
        return tuple(self.slot)

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        """Apply adapter ``slot[i]`` to the vision and text rows of each (image, prompt) pair.

        When ``ctx.extras[IDENTICAL_COPIES] == (i, S)`` (set by MedCLIPSeg's Monte Carlo pass), the
        rows are ``S`` identical copy-major copies: the adapter runs on the first copy with
        ``copies=S``, so the work that does not depend on the noise is done once.
        """
        vision, text = states["vision"], states["text"]
        sample = (not self.deterministic) if ctx.sample is None else ctx.sample
        key_mask = text.attention_mask if self.mask_text_padding else None
        v_in, t_in = vision.tokens, text.tokens
        copies = 1
        shared = ctx.extras.get(IDENTICAL_COPIES)
        if shared is not None and shared[0] == i and shared[1] > 1:
            copies = shared[1]
            if v_in.shape[0] % copies:
                raise ValueError(f"{v_in.shape[0]} rows are not {copies} equal copies")
            rows = v_in.shape[0] // copies
            v_in, t_in = v_in[:rows], t_in[:rows]
            key_mask = None if key_mask is None else key_mask[:rows]
        v, t = self[self.slot[i]](
            v_in,
            t_in,
            text_padding_mask=None if key_mask is None else key_mask.bool(),
            generator=ctx.generators,
            sample=sample,
            copies=copies,
        )
        return {"vision": vision.with_tokens(v), "text": text.with_tokens(t)}

    @property
    def config(self) -> dict[str, Any]:
        args = dict(self.config_args)
        if self.slot:
            args["layers"] = list(self.slot)
        return {"name": type(self).__name__, "args": args}

    def extra_repr(self) -> str:
        return (
            f"layers={tuple(self.slot)}, dim={self.dim}, mask_text_padding={self.mask_text_padding}"
        )
