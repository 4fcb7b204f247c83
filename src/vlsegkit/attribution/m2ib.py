"""M2IB: saliency maps from a text prompt through a multi-modal information bottleneck.

Wang, Rudner & Wilson, "Visual Explanations of Image-Text Representations via Multi-Modal
Information Bottleneck Attribution" (NeurIPS 2023; code ``YingWANGG/M2IB``), as used by
Koleilat et al., "MedCLIP-SAMv2: Towards universal text-driven medical image segmentation"
(Medical Image Analysis 2025, Eq. 16; code ``HealthX-Lab/MedCLIP-SAMv2``, which vendors M2IB).

A stochastic mask ``λ = sigmoid(α)``, one value per token and channel, is placed after block
``layer`` of the vision tower. With ``x`` the block's output and ``ε ~ N(0, I)``::

    t = λ ⊙ x + (1 - λ) ⊙ ε                        # what the next block receives
    KL = -½ (1 + log σ² - μ² - σ²),   μ = λ ⊙ x,  σ² = (1 - λ)²   # capacity per element
    L(α) = β · mean_{n,d} KL - mean_s cos(E_text(prompt), E_img(t_s))     # S noise copies t_s

The cosine replaces MI(Z_img, Z_text) and the KL to N(0, I) bounds MI(Z_img, I) (Eq. 16, with
β the paper's γ). ``α`` starts at ``alpha_init`` and takes Adam steps at ``lr``; the saliency map
is the channel-summed capacity of the patch tokens (the class token dropped), on the patch grid,
bilinearly resized and min-max normalised.

What this implementation does beyond a transcription of the released code:

* **batched**: many images at once, each with its own ``α`` -- one ``(B, N, D)`` tensor under one
  Adam optimiser. Adam is elementwise and the per-image losses are **summed** (never averaged), so
  image ``b``'s ``α`` sees exactly the gradients of its own loss: the maps equal those of one image
  at a time up to float rounding.
* the blocks up to ``layer`` do not depend on ``α``: they run once per call (no graph), and only the
  blocks after the bottleneck are stepped ``steps - 1`` times with the noise copies. The released
  loop runs ``steps`` full forward passes, but its map is the capacity stored by the *last* forward,
  i.e. computed from ``α`` after ``steps - 1`` updates (its last update is never used). The map here
  is computed from exactly that ``α``, so the same map costs one suffix pass less.
* ``1 - λ`` is evaluated as ``sigmoid(-α)`` and ``log σ²`` as ``2 logsigmoid(-α)``: the released
  ``1 - sigmoid(α)`` cancels catastrophically in float32 once ``α`` passes ~15 and makes the
  capacity infinite at ~17; the two agree to rounding where the released form is finite.

Left out: the released code builds a per-channel noise "variance" estimator (``vvar`` /
``get_compression_estimator``, inherited from IBA) that is never read by the bottleneck's forward
pass -- dead code (MedCLIP-SAMv2 spec §2.3); the features are never normalised and the noise is
``N(0, 1)``, which is what is implemented here.

The text-side bottleneck of the M2IB code (``text_heatmap_iba``: the same bottleneck after a text
block, the vision tower clean) is :meth:`M2IBAttributor.text_attribution`. MedCLIP-SAMv2 parses its
options but never calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..encoders.base import TokenState, Tower
from ..encoders.hooks import RunContext, TowerHook
from ..encoders.runner import embed_tower, run_towers
from ..models.base import check_pixels, eval_mode

__all__ = ["M2IBAttributor", "M2IBBottleneck", "TextAttribution", "m2ib_capacity"]

#: ``ctx.extras`` key under which the attributor hands the bottleneck its per-call inputs.
EXTRAS_KEY = "m2ib"
#: ``nn.CosineSimilarity(eps=1e-6)`` of the released code.
_COS_EPS = 1e-6


def m2ib_capacity(x: Tensor, alpha: Tensor) -> Tensor:
    """Per-element capacity ``KL(N(λx, (1-λ)²) || N(0, 1))`` with ``λ = sigmoid(α)``.

    ``-½ (1 + log σ² - μ² - σ²)`` with ``μ = λ ⊙ x`` and ``σ = 1 - λ``, evaluated stably
    (``σ = sigmoid(-α)``, ``log σ² = 2 logsigmoid(-α)``).

    Args:
        x: ``(B, N, D)`` clean features after the bottleneck's block.
        alpha: ``(B, N, D)`` mask logits (broadcastable to ``x``).

    Returns:
        ``(B, N, D)`` capacity in ``alpha``'s dtype (or ``x``'s, whichever is wider).
    """
    dtype = torch.promote_types(x.dtype, alpha.dtype)
    x, alpha = x.to(dtype), alpha.to(dtype)
    mu = torch.sigmoid(alpha) * x
    sigma = torch.sigmoid(-alpha)
    return -0.5 * (1 + 2 * F.logsigmoid(-alpha) - mu.square() - sigma.square())


class M2IBBottleneck(TowerHook):
    """The M2IB bottleneck as a tower hook: acts on one tower's tokens after block ``layer``.

    A hook acts *before* a block, so the bottleneck after block ``layer`` is the hook before block
    ``layer + 1``; ``layer`` must therefore leave at least one block after it (after the last
    block only the pooled token reaches the embedding, and a patch map would carry no relevance).

    Per call it reads ``ctx.extras["m2ib"]``: ``alpha`` ``(B, N, D)`` (one mask per image),
    ``samples`` S and ``noise`` ``(B * S, N, D)``; the state it acts on holds ``B * S`` rows, the
    copies of image ``b`` at ``b * S .. b * S + S - 1``. It replaces the tokens ``x`` by
    ``sigmoid(α) ⊙ x + sigmoid(-α) ⊙ ε``.

    It is owned by :class:`M2IBAttributor` for the duration of one attribution and is never part
    of a saved model, so it is not in the hook registry (``towers`` is set per instance).

    Args:
        layer: 0-based block after which the bottleneck sits.
        tower: ``"vision"`` (saliency maps) or ``"text"`` (per-token saliency).
    """

    towers: ClassVar[tuple[str, ...]] = ()  # per instance: not a registered, saveable family

    def __init__(self, *, layer: int, tower: str = "vision") -> None:
        super().__init__()
        if tower not in ("vision", "text"):
            raise ValueError(f"tower must be 'vision' or 'text', got {tower!r}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        self.layer = layer
        self.tower = tower
        self.towers = (tower,)

    def layers(self, tower: str) -> tuple[int, ...]:
        return (self.layer + 1,) if tower == self.tower else ()

    def forward(
        self, i: int, states: dict[str, TokenState], ctx: RunContext
    ) -> dict[str, TokenState]:
        inputs = ctx.extras.get(EXTRAS_KEY)
        if inputs is None:
            raise ValueError(
                f"M2IBBottleneck needs ctx.extras[{EXTRAS_KEY!r}] with 'alpha', 'samples' and "
                "'noise' (run it through M2IBAttributor)"
            )
        state = states[self.tower]
        alpha, samples, noise = inputs["alpha"], inputs["samples"], inputs["noise"]
        x = state.tokens
        expected = (alpha.shape[0] * samples, *alpha.shape[1:])
        if tuple(x.shape) != expected or tuple(noise.shape) != expected:
            raise ValueError(
                f"M2IBBottleneck expects tokens and noise of shape (B*S, N, D)={expected}, got "
                f"tokens {tuple(x.shape)} and noise {tuple(noise.shape)}"
            )
        keep = torch.sigmoid(alpha).repeat_interleave(samples, dim=0)
        drop = torch.sigmoid(-alpha).repeat_interleave(samples, dim=0)
        t = keep * x.to(alpha.dtype) + drop * noise.to(alpha.dtype)
        return {self.tower: state.with_tokens(t.to(x.dtype))}


@dataclass
class TextAttribution:
    """Per-token saliency of the text-side bottleneck.

    Attributes:
        scores: ``(B, L)`` in ``[0, 1]``: channel-summed capacity, min-max normalised over each
            row's real tokens (start and end tokens included, as the M2IB code does); padding is 0.
        input_ids: ``(B, L)`` the token ids scored.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding.
    """

    scores: Tensor
    input_ids: Tensor
    attention_mask: Tensor


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: Any, *, low: float | None = None, open_low: bool = False):
    """A finite float, ``> low`` (``open_low``) or ``>= low`` when ``low`` is given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if open_low else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def _minmax(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """Min-max normalise each row of ``(B, ...)`` to ``[0, 1]`` (a constant row gives zeros).

    With ``valid`` (same shape, bool) only those entries set the range and the rest become 0.
    """
    flat = values.flatten(1)
    mask = None if valid is None else valid.flatten(1)
    inf = torch.finfo(flat.dtype).max
    lo = (flat if mask is None else flat.masked_fill(~mask, inf)).amin(1, keepdim=True)
    hi = (flat if mask is None else flat.masked_fill(~mask, -inf)).amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    if mask is not None:
        out = out.masked_fill(~mask, 0.0)
    return out.view_as(values)


class M2IBAttributor(nn.Module):
    """Text-conditioned saliency maps of CLIP-family towers with the M2IB bottleneck.

    See the module docstring for the objective. The towers are run in eval mode and never receive
    gradients (their train / eval mode is restored afterwards).

    Args:
        vision: a vision :class:`~vlsegkit.encoders.Tower` (e.g. from
            :func:`vlsegkit.encoders.from_clip_model`, or BiomedCLIP's
            :class:`~vlsegkit.encoders.TimmViTTower`).
        text: the matching text tower.
        layer: 0-based vision block after which the bottleneck sits (``layer=9`` is after the tenth
            block; MedCLIP-SAMv2's reproduce scripts use 9, its CLI default is 7). At most
            ``vision.num_layers - 2``.
        beta: weight of the compression term (the paper's γ; M2IB's default 0.1,
            MedCLIP-SAMv2 uses 1.0 for breast ultrasound and 2.0 for brain MRI).
        steps: Adam steps of the released loop (the map uses ``α`` after ``steps - 1`` updates,
            as the released code's does).
        samples: noise copies per step (the released batch of 10).
        lr: Adam learning rate.
        alpha_init: initial mask logit (``sigmoid(5) ≈ 0.993``: almost everything passes).
        tokenizer: turns prompt strings into a :class:`~vlsegkit.tokenizers.TextBatch` (e.g.
            :class:`~vlsegkit.tokenizers.CLIPTokenizer`); needed only for string prompts.
        text_layer: text block of :meth:`text_attribution`'s bottleneck (default ``layer``,
            checked when :meth:`text_attribution` runs).
        text_beta: its compression weight (default ``beta``).
    """

    def __init__(
        self,
        vision: Tower,
        text: Tower,
        *,
        layer: int,
        beta: float = 0.1,
        steps: int = 10,
        samples: int = 10,
        lr: float = 1.0,
        alpha_init: float = 5.0,
        tokenizer: Any = None,
        text_layer: int | None = None,
        text_beta: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(vision, Tower) or vision.modality != "vision":
            raise TypeError(f"vision must be a vision Tower, got {type(vision).__name__}")
        if not isinstance(text, Tower) or text.modality != "text":
            raise TypeError(f"text must be a text Tower, got {type(text).__name__}")
        self.vision = vision
        self.text = text
        self.layer = self._check_layer("layer", layer, vision)
        # checked where it is used when it defaults to ``layer`` (the towers' depths may differ)
        self.text_layer = (
            None if text_layer is None else self._check_layer("text_layer", text_layer, text)
        )
        self.beta = _check_float("beta", beta, low=0.0)
        self.text_beta = (
            self.beta if text_beta is None else _check_float("text_beta", text_beta, low=0.0)
        )
        self.steps = _check_int("steps", steps, 1)
        self.samples = _check_int("samples", samples, 1)
        self.lr = _check_float("lr", lr, low=0.0, open_low=True)
        self.alpha_init = _check_float("alpha_init", alpha_init)
        self.tokenizer = tokenizer

    @staticmethod
    def _check_layer(name: str, layer: Any, tower: Tower) -> int:
        top = tower.num_layers - 2
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= top:
            raise ValueError(
                f"{name} must be an int in [0, {top}] (a block of the {tower.modality} tower with "
                f"at least one block after it; the tower has {tower.num_layers}), got {layer!r}"
            )
        return layer

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, beta={self.beta}, steps={self.steps}, samples={self.samples}, "
            f"lr={self.lr}, alpha_init={self.alpha_init}"
        )

    # ------------------------------------------------------------------ text
    def _device(self) -> torch.device:
        first = next(self.vision.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _tokenize(self, texts: Any) -> tuple[Tensor, Tensor | None]:
        """``(input_ids (T, L), attention_mask (T, L) or None)`` of strings, ids or a TextBatch."""
        ids = getattr(texts, "input_ids", None)
        if isinstance(ids, Tensor):  # a TextBatch / BatchEncoding
            return ids, getattr(texts, "attention_mask", None)
        if isinstance(texts, Tensor):
            if texts.is_floating_point() or texts.dtype == torch.bool or texts.dim() not in (1, 2):
                raise ValueError(
                    "token ids must be an integer tensor (L,) or (T, L), got "
                    f"{texts.dtype} {tuple(texts.shape)}"
                )
            return (texts[None] if texts.dim() == 1 else texts), None
        if isinstance(texts, str) or (
            isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts)
        ):
            if self.tokenizer is None:
                raise ValueError(
                    "string prompts need a tokenizer: M2IBAttributor(..., tokenizer=...); or pass "
                    "token ids / text embeddings"
                )
            batch = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
            return batch.input_ids, batch.attention_mask
        raise ValueError(
            "texts must be a string, a non-empty list of strings, a TextBatch, integer token ids "
            f"(L,) / (T, L) or float text embeddings (E,) / (T, E), got {type(texts).__name__}"
        )

    @torch.no_grad()
    def encode_text(self, texts: Any) -> Tensor:
        """``(T, E)`` text embeddings (the projected, pooled text features) of prompts or ids.

        A prompt ensemble (MedCLIP-SAMv2's P4-P9) is ``encode_text(prompts).mean(0)``, which can be
        passed to :meth:`forward` in place of a prompt.
        """
        ids, mask = self._tokenize(texts)
        device = self._device()
        with eval_mode(self.text):
            return self.text(ids.to(device), None if mask is None else mask.to(device)).pooled

    def _targets(self, texts: Any, batch: int) -> Tensor:
        """``(B, E)`` text embeddings paired with the B images."""
        if isinstance(texts, Tensor) and texts.is_floating_point():
            emb = texts[None] if texts.dim() == 1 else texts
            if emb.dim() != 2 or emb.shape[-1] != self.text.embed_dim:
                raise ValueError(
                    f"text embeddings must have shape (E={self.text.embed_dim},) or "
                    f"(T, {self.text.embed_dim}), got {tuple(texts.shape)}"
                )
            emb = emb.to(self._device())
        else:
            emb = self.encode_text(texts)
        return self._pair(emb, batch, "texts")

    @staticmethod
    def _pair(rows: Tensor, batch: int, name: str) -> Tensor:
        if rows.shape[0] == batch:
            return rows
        if rows.shape[0] == 1:
            return rows.expand(batch, *rows.shape[1:])
        raise ValueError(
            f"{name} must give one prompt for all {batch} images or one per image, got "
            f"{rows.shape[0]}"
        )

    # ------------------------------------------------------------------ noise
    def _noise_source(self, noise: Any, generator: Any, batch: int, shape: tuple[int, int]):
        """A function ``k -> (B * S, N, D)`` giving the noise of optimisation step ``k``."""
        if noise is not None and generator is not None:
            raise ValueError("pass noise= or generator=, not both")
        s = self.samples
        expected = (batch, self.steps, s, *shape)
        if noise is not None:
            if not isinstance(noise, Tensor) or tuple(noise.shape) != expected:
                got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(
                    f"noise must have shape (B, steps, samples, N, D)={expected}, got {got}"
                )
            return lambda k, dtype, device: (
                noise[:, k].reshape(batch * s, *shape).to(device=device, dtype=dtype)
            )
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch or not all(
                isinstance(g, torch.Generator) for g in generator
            ):
                raise ValueError(
                    f"generator must be a torch.Generator or a list of {batch} (one per image), "
                    f"got a list of {len(generator)}"
                )
            gens = list(generator)
        elif generator is None or isinstance(generator, torch.Generator):
            gens = None
        else:
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")

        def draw(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
            if gens is None:
                return torch.randn(
                    (batch * s, *shape), generator=generator, dtype=dtype, device=device
                )
            return torch.cat(
                [torch.randn((s, *shape), generator=g, dtype=dtype, device=device) for g in gens]
            )

        return draw

    # ------------------------------------------------------------------ optimisation
    def _fit_alpha(
        self,
        side: str,
        layer: int,
        state: TokenState,
        targets: Tensor,
        beta: float,
        valid: Tensor,
        draw,
    ) -> tuple[Tensor, Tensor]:
        """Optimise one ``α`` per row of ``state``; return ``(α, clean x)`` after ``steps-1`` steps.

        Args:
            state: ``(B, N, D)`` tokens after block ``layer`` of the ``side`` tower (no graph).
            targets: ``(B, E)`` embeddings of the other modality (fixed).
            valid: ``(B, N)`` bool, tokens counted in the capacity mean.
            draw: the noise source of :meth:`_noise_source`.
        """
        tower = self.vision if side == "vision" else self.text
        b = state.batch_size
        s = self.samples
        x = state.tokens.detach()
        dtype = torch.promote_types(x.dtype, torch.float32)
        alpha = torch.full(
            x.shape, self.alpha_init, dtype=dtype, device=x.device, requires_grad=True
        )
        # one optimiser for all images: Adam is elementwise, so image b's alpha only ever sees the
        # gradient of image b's loss (the losses are summed below, never averaged)
        optimizer = torch.optim.Adam([alpha], lr=self.lr)
        hook = M2IBBottleneck(layer=layer, tower=side)
        copies = state.take(torch.arange(b, device=x.device).repeat_interleave(s))
        target_rows = targets.to(dtype).repeat_interleave(s, dim=0)
        weights = valid.to(dtype)[..., None]
        counts = valid.sum(1).to(dtype) * x.shape[-1]
        for k in range(self.steps - 1):
            eps = draw(k, dtype, x.device)
            ctx = RunContext(extras={EXTRAS_KEY: {"alpha": alpha, "samples": s, "noise": eps}})
            run = run_towers({side: tower}, {side: copies}, hooks=[hook], ctx=ctx, start=layer + 1)
            pooled = tower.pool(run.states[side]).to(dtype)
            fit = F.cosine_similarity(pooled, target_rows, dim=-1, eps=_COS_EPS).view(b, s).mean(1)
            compression = (m2ib_capacity(x, alpha) * weights).sum((1, 2)) / counts
            loss = (beta * compression - fit).sum()
            (grad,) = torch.autograd.grad(loss, alpha)
            alpha.grad = grad
            optimizer.step()
        return alpha.detach(), x

    def _prefix(self, side: str, layer: int, *inputs: Any) -> TokenState:
        """Embed and run blocks ``0 .. layer`` once, without a graph."""
        tower = self.vision if side == "vision" else self.text
        with torch.no_grad():
            state = embed_tower(side, tower, *inputs)
            return run_towers({side: tower}, {side: state}, stop=layer + 1).states[side]

    # ------------------------------------------------------------------ public
    def forward(
        self,
        pixel_values: Tensor,
        texts: Any,
        *,
        size: int | tuple[int, int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Saliency maps of ``texts`` on ``pixel_values``.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images (sides multiples of the patch size).
            texts: one prompt for all images or one per image: a string or list of strings (with a
                ``tokenizer``), a :class:`~vlsegkit.tokenizers.TextBatch`, integer token ids
                ``(L,)`` / ``(T, L)``, or float text embeddings ``(E,)`` / ``(T, E)`` (e.g. the mean
                embedding of a prompt ensemble, :meth:`encode_text`).
            size: output ``(H, W)`` (or a side); default the input's ``(H, W)`` (the released code
                always uses 224).
            generator: draws the noise: one ``torch.Generator`` for the batch, or a list of B (one
                stream per image, so a batch gives exactly the maps of its images run alone with
                their own streams). Default: the global RNG.
            noise: replay exact draws instead: ``(B, steps, samples, N, D)`` standard-normal noise,
                ``N`` the tokens after block ``layer`` (class token included) and ``D`` the width;
                step ``k`` uses ``noise[:, k]`` (the last step's draw only completes the released
                shape: that forward's noise never reaches the map).

        Returns:
            ``(B, H, W)`` saliency in ``[0, 1]`` (float32, or float64 for float64 towers).
        """
        pixel_values = check_pixels(pixel_values, getattr(self.vision, "num_channels", 3))
        b = pixel_values.shape[0]
        out_size = self._size(size, pixel_values.shape[-2:])
        device = self._device()
        pixel_values = pixel_values.to(device)
        with eval_mode(self.vision), eval_mode(self.text), torch.enable_grad():
            targets = self._targets(texts, b)
            state = self._prefix("vision", self.layer, pixel_values)
            n, d = state.tokens.shape[1:]
            draw = self._noise_source(noise, generator, b, (n, d))
            valid = torch.ones(b, n, dtype=torch.bool, device=device)
            alpha, x = self._fit_alpha("vision", self.layer, state, targets, self.beta, valid, draw)
        with torch.no_grad():
            per_token = torch.nansum(m2ib_capacity(x, alpha), dim=-1)  # (B, N)
            h, w = state.grid
            grid = rearrange(per_token[:, state.content_start :], "b (h w) -> b 1 h w", h=h, w=w)
            up = F.interpolate(grid, size=out_size, mode="bilinear", align_corners=False)
            return _minmax(up[:, 0])

    def text_attribution(
        self,
        pixel_values: Tensor,
        texts: Any,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: Tensor | None = None,
    ) -> TextAttribution:
        """Per-token saliency of ``texts`` given the images: the bottleneck after text block
        ``text_layer``, the vision tower clean (M2IB's ``text_heatmap_iba``).

        The objective is the module's with the roles swapped: ``β_text · mean KL`` over each
        prompt's real tokens minus the mean cosine between the perturbed text embedding and the
        clean image embedding. Arguments are as in :meth:`forward` (``texts`` must be strings, a
        TextBatch or token ids; ``noise`` has shape ``(B, steps, samples, L, D_text)``).

        Returns:
            :class:`TextAttribution` with ``(B, L)`` scores.
        """
        pixel_values = check_pixels(pixel_values, getattr(self.vision, "num_channels", 3))
        b = pixel_values.shape[0]
        device = self._device()
        ids, mask = self._tokenize(texts)
        ids = self._pair(ids.to(device), b, "texts")
        mask = torch.ones_like(ids) if mask is None else self._pair(mask.to(device), b, "texts")
        with eval_mode(self.vision), eval_mode(self.text), torch.enable_grad():
            with torch.no_grad():
                targets = self.vision(pixel_values.to(device)).pooled
            layer = self.text_layer
            if layer is None:
                layer = self._check_layer("text_layer (default: layer)", self.layer, self.text)
            state = self._prefix("text", layer, ids, mask)
            if state.num_prompts or state.tokens.shape[1] != ids.shape[1]:
                raise ValueError("text_attribution expects plain prompts (no inserted context)")
            n, d = state.tokens.shape[1:]
            draw = self._noise_source(noise, generator, b, (n, d))
            valid = mask.bool()
            alpha, x = self._fit_alpha("text", layer, state, targets, self.text_beta, valid, draw)
        with torch.no_grad():
            per_token = torch.nansum(m2ib_capacity(x, alpha), dim=-1)
            scores = _minmax(per_token, valid)
        return TextAttribution(scores=scores, input_ids=ids, attention_mask=mask.long())

    @staticmethod
    def _size(size: Any, default: Sequence[int]) -> tuple[int, int]:
        if size is None:
            return int(default[0]), int(default[1])
        pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        ok = (
            isinstance(pair, Sequence)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
        )
        if not ok:
            raise ValueError(f"size must be a positive int or an (H, W) pair, got {size!r}")
        return int(pair[0]), int(pair[1])
