"""VLSM-Adapter's bottleneck adapters, shallow and dense, as one hook family.

Dhakal et al., "VLSM-Adapter: Finetuning Vision-Language Segmentation Efficiently with Lightweight
Blocks" (MICCAI 2024; code ``naamiinepal/vlsm-adapter``), after Houlsby et al., "Parameter-Efficient
Transfer Learning for NLP" (ICML 2019). Each adapter is a residual bottleneck::

    A(x) = x + W_up act(W_down x + b_down) + b_up            (act: ReLU, or GELU)

Two placements on a model with frozen towers:

* **shallow** (the paper's "SA"): on the vision activations the decoder reads (the kept blocks; the
  residual stream itself is untouched), on the text hidden states at the same blocks -- pooled at the
  EOS / [CLS] position, adapted and *added* to the conditional embedding -- and on the conditional
  embedding itself. Width 512 (the condition adapter: 256).
* **dense** (the paper's "DA"): inside every block up to the last kept one, on the attention branch
  and on the MLP branch just before each residual add, in both towers (in-block hook points, no fork
  of the blocks), plus the conditional-embedding adapter. Width 64.

``vision`` / ``text`` / ``condition`` switch the three groups (the paper's V, VL and VLC variants).
The released code differs in two places, reproduced by ``released=True``: it applies the activation
after the up-projection too (``x + act(W_up act(W_down x))``), and its dense adapters cover blocks
``0 .. max(kept) - 1`` (the last block the decoder reads gets none).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders.base import TokenState
from ..encoders.hooks import HookSlots, RunContext, Tap, TowerHook
from ..encoders.runner import check_layers

__all__ = ["BottleneckAdapter", "BottleneckAdapters"]

Variant = Literal["shallow", "dense"]
_DEFAULT_WIDTH = {"shallow": 512, "dense": 64}


def _kept(slots: HookSlots) -> tuple[int, ...]:
    """The vision blocks the decoder reads (the last block run when the model names none)."""
    return tuple(slots.kept.get("vision", ())) or (slots.depth("vision") - 1,)


class BottleneckAdapter(nn.Module):
    """Residual bottleneck ``x + fc2(act(fc1(x)))`` (Houlsby et al. 2019).

    Args:
        dim: input and output width.
        hidden: bottleneck width.
        activation: ``"relu"`` (VLSM-Adapter) or ``"gelu"``.
        final_activation: also apply the activation after ``fc2`` (VLSM-Adapter's released code).

    Both linear layers keep PyTorch's default initialisation, as released (the adapter is not the
    identity at initialisation).

    Shapes:
        ``(..., dim) -> (..., dim)``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: Literal["relu", "gelu"] = "relu",
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation
        self.final_activation = bool(final_activation)

    def _act(self, x: Tensor) -> Tensor:
        return F.relu(x) if self.activation == "relu" else F.gelu(x)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.fc1.in_features:
            raise ValueError(
                f"adapter input must have shape (..., {self.fc1.in_features}), got {tuple(x.shape)}"
            )
        h = self.fc2(self._act(self.fc1(x.to(self.fc1.weight.dtype))))
        if self.final_activation:
            h = self._act(h)
        return x + h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, final_activation={self.final_activation}"


class BottleneckAdapters(TowerHook):
    """VLSM-Adapter's shallow or dense bottleneck adapters on any model with hook slots.

    Args:
        variant: ``"shallow"`` or ``"dense"`` (see the module docstring).
        width: adapter bottleneck width (default 512 shallow, 64 dense).
        condition_width: width of the conditional-embedding adapter (256, as released).
        vision: adapt the vision tower (V).
        text: adapt the text tower (L).
        condition: adapt the conditional embedding (C).
        layers: dense variant: blocks that get in-block adapters (default ``0 .. max(kept)``, or
            ``0 .. max(kept) - 1`` with ``released``).
        activation: ``"relu"`` (as released) or ``"gelu"``.
        text_features: shallow variant: what the text adapters read at the kept blocks --
            ``"hidden"`` (the EOS / [CLS] hidden state before the final norm, as released; needs the
            text width to equal the condition width), ``"projected"`` (pooled through the text
            tower's final norm and projection), or None (``"hidden"`` when the widths match).
        released: reproduce the released code (activation after ``fc2`` too, dense layers up to
            ``max(kept) - 1``).
    """

    towers = ("vision", "text")

    def __init__(
        self,
        variant: Variant = "shallow",
        *,
        width: int | None = None,
        condition_width: int = 256,
        vision: bool = True,
        text: bool = True,
        condition: bool = True,
        layers: Collection[int] | None = None,
        activation: Literal["relu", "gelu"] = "relu",
        text_features: Literal["hidden", "projected"] | None = None,
        released: bool = False,
    ) -> None:
        super().__init__()
        if variant not in _DEFAULT_WIDTH:
            raise ValueError(f"variant must be 'shallow' or 'dense', got {variant!r}")
        if text_features not in (None, "hidden", "projected"):
            raise ValueError(
                f"text_features must be 'hidden', 'projected' or None, got {text_features!r}"
            )
        if not (vision or text or condition):
            raise ValueError("enable at least one of vision, text and condition")
        self.variant = variant
        self.width = _DEFAULT_WIDTH[variant] if width is None else width
        self.condition_width = condition_width
        self.use_vision, self.use_text, self.use_condition = (
            bool(vision),
            bool(text),
            bool(condition),
        )
        self._layers = None if layers is None else tuple(layers)
        self.activation = activation
        self.text_features = text_features
        self.released = bool(released)
        self.kept_layers: tuple[int, ...] = ()
        self.tap_blocks: tuple[int, ...] = ()
        self._pooling: str | None = None
        self._text_tower: Any = None
        self._bound_layout: dict[str, Any] = {}
        self.bound = False

    def _adapter(self, dim: int, hidden: int) -> BottleneckAdapter:
        return BottleneckAdapter(
            dim, hidden, activation=self.activation, final_activation=self.released
        )

    def _stack(self, dim: int, count: int) -> nn.ModuleList:
        return nn.ModuleList(self._adapter(dim, self.width) for _ in range(count))

    def _layout(self, slots: HookSlots) -> dict[str, Any]:
        """Where the adapters go on the model of ``slots`` and their widths (validated): what
        the parameters are built from, so two models with equal layouts take the same adapters."""
        vision, text = slots.towers["vision"], slots.towers["text"]
        kept = _kept(slots)
        # shallow adapters sit at the kept blocks; dense ones at tap_blocks (derived below)
        layout: dict[str, Any] = {"kept_layers": kept} if self.variant == "shallow" else {}
        if self.use_vision:
            layout["vision_width"] = vision.width
        if self.use_text:
            layout["text_width"] = text.width
        if self.use_condition or (self.variant == "shallow" and self.use_text):
            layout["condition_dim"] = slots.condition_dim
        if self.use_condition and slots.condition_dim is None:
            raise ValueError(
                "this model has no conditioning vector; use condition=False for its adapters"
            )
        if self.variant == "shallow" and self.use_text:
            if slots.condition_dim is None:
                raise ValueError(
                    "shallow text adapters add to the conditioning vector, which this model "
                    "does not have; use text=False"
                )
            pooling = self.text_features
            if pooling is None:
                pooling = "hidden" if text.width == slots.condition_dim else "projected"
            if pooling == "hidden" and text.width != slots.condition_dim:
                raise ValueError(
                    f"text_features='hidden' adds {text.width}-wide text states to the "
                    f"{slots.condition_dim}-wide condition; use text_features='projected'"
                )
            layout["pooling"] = pooling
        if self.variant == "dense":
            last = max(kept)
            default = range(last) if self.released else range(last + 1)
            blocks = default if self._layers is None else self._layers
            depth = min(slots.depth("vision"), slots.depth("text"))
            layout["tap_blocks"] = check_layers(blocks, depth, name="BottleneckAdapters layers")
        return layout

    def bind(self, slots: HookSlots) -> BottleneckAdapters:
        """Create the adapters for the model's kept blocks, tower widths and condition width.

        Binding again to a model with the same layout (e.g. when a saved tuned model is loaded) keeps
        the trained adapters.

        Raises:
            ValueError: the model has no conditioning vector for the enabled groups, or the hook is
                already bound to a model with a different layout (its adapters have that model's
                blocks and widths: use a new ``BottleneckAdapters`` for this one).
        """
        layout = self._layout(slots)
        if self.bound:
            if layout != self._bound_layout:
                diff = ", ".join(
                    f"{k} {self._bound_layout.get(k)!r} (this model: {layout.get(k)!r})"
                    for k in sorted({*layout, *self._bound_layout})
                    if layout.get(k) != self._bound_layout.get(k)
                )
                raise ValueError(
                    f"BottleneckAdapters is bound to a model with a different layout: {diff}; "
                    "create a new BottleneckAdapters for this model"
                )
            # the same layout: keep the trained adapters, pool with this model's text tower
            self._text_tower = [slots.towers["text"]]
            return self
        self._bound_layout = layout
        vision, text = slots.towers["vision"], slots.towers["text"]
        self.kept_layers = kept = _kept(slots)
        self._text_tower = [text]  # a list: not a submodule (the model owns it)
        if self.use_condition:
            self.cond_adapter = self._adapter(slots.condition_dim, self.condition_width)
        if self.variant == "shallow":
            if self.use_vision:
                self.vision_extract_adapters = self._stack(vision.width, len(kept))
            if self.use_text:
                self._pooling = layout["pooling"]
                width = text.width if self._pooling == "hidden" else slots.condition_dim
                self.text_extract_adapters = self._stack(width, len(kept))
        else:
            self.tap_blocks = layout["tap_blocks"]
            n = len(self.tap_blocks)
            if self.use_vision:
                self.v_attn_adapters = self._stack(vision.width, n)
                self.v_out_adapters = self._stack(vision.width, n)
            if self.use_text:
                self.l_attn_adapters = self._stack(text.width, n)
                self.l_out_adapters = self._stack(text.width, n)
        self.bound = True
        return self

    def _check_bound(self) -> None:
        if not self.bound:
            raise RuntimeError("BottleneckAdapters has no parameters yet: attach it to a model")

    def acts_on(self, target: str) -> bool:
        """The switched-on groups: ``"vision"`` / ``"text"`` adapters, and ``"condition"`` (the
        condition adapter, and the shallow text adapters, which add to the condition)."""
        if target == "condition":
            return self.use_condition or (self.variant == "shallow" and self.use_text)
        return {"vision": self.use_vision, "text": self.use_text}.get(target, False)

    # ------------------------------------------------------------------ shallow
    def keep_layers(self, tower: str) -> Collection[int]:
        if self.variant == "shallow" and tower == "text" and self.use_text:
            return self.kept_layers
        return ()

    def kept(self, tower: str, i: int, state: TokenState, ctx: RunContext) -> TokenState:
        if self.variant != "shallow" or tower != "vision" or not self.use_vision:
            return state
        if i not in self.kept_layers:
            return state
        adapter = self.vision_extract_adapters[self.kept_layers.index(i)]
        return state.with_tokens(adapter(state.tokens))

    def _text_feature(self, state: TokenState) -> Tensor:
        if self._pooling == "projected":
            return self._text_tower[0].pool(state)
        index = state.pool_index
        rows = torch.arange(state.batch_size, device=state.tokens.device)
        return state.tokens[rows, 0 if index is None else index]

    def condition(self, cond: Tensor, ctx: RunContext) -> Tensor:
        self._check_bound()
        if self.use_condition:
            cond = self.cond_adapter(cond)
        if self.variant == "shallow" and self.use_text:
            kept = ctx.kept.get("text", {})
            missing = [i for i in self.kept_layers if i not in kept]
            if missing:
                raise ValueError(
                    f"BottleneckAdapters needs the text states of blocks {missing}; this model "
                    "call did not run the text tower (text conditions are required)"
                )
            for n, i in enumerate(self.kept_layers):
                feature = self.text_extract_adapters[n](self._text_feature(kept[i]))
                if feature.shape != cond.shape:
                    raise ValueError(
                        f"text features {tuple(feature.shape)} do not match the conditions "
                        f"{tuple(cond.shape)} row for row"
                    )
                cond = cond + feature.to(cond.dtype)
        return cond

    # ------------------------------------------------------------------ dense
    def tap_layers(self, tower: str) -> Collection[int]:
        if self.variant != "dense":
            return ()
        if (tower == "vision" and self.use_vision) or (tower == "text" and self.use_text):
            return self.tap_blocks
        return ()

    def taps(self, tower: str, i: int, ctx: RunContext) -> Mapping[str, Tap]:
        n = self.tap_blocks.index(i)
        if tower == "vision":
            return {"attn": self.v_attn_adapters[n], "mlp": self.v_out_adapters[n]}
        return {"attn": self.l_attn_adapters[n], "mlp": self.l_out_adapters[n]}

    def extra_repr(self) -> str:
        parts = [c for c, on in (("V", self.use_vision), ("L", self.use_text),
                                 ("C", self.use_condition)) if on]  # fmt: skip
        return f"variant={self.variant!r}, width={self.width}, groups={''.join(parts)}"
