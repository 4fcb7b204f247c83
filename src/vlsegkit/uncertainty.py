"""Monte Carlo uncertainty: aggregation, entropy and its aleatoric / epistemic split.

Shared by every stochastic model (MedCLIPSeg's sampled PVL values today) and by ensembles of
checkpoints: predictions ``p_s`` from S stochastic passes (or S models) are folded into running sums
at each image's original size, so memory does not grow with S. With the binary entropy
``H(p) = -p log p - (1-p) log(1-p)`` (natural log):

    mean        p̄ = mean_s p_s
    entropy     H(p̄)                       total predictive uncertainty (MedCLIPSeg's map)
    aleatoric   mean_s H(p_s)               expected entropy
    epistemic   H(p̄) - mean_s H(p_s) >= 0   mutual information (Jensen; clamped against rounding)
    variance    mean_s p_s² - p̄²

(Depeweg et al. 2018, "Decomposition of Uncertainty in Bayesian Deep Learning"; Gal 2016.)

:func:`monte_carlo_predict` runs the sampling loop for any model that splits its forward pass into
a deterministic prefix and a stochastic remainder (:class:`SupportsMonteCarlo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MonteCarloMoments",
    "SupportsMonteCarlo",
    "UncertaintyOutput",
    "binary_entropy",
    "binary_entropy_from_logits",
    "derive_generators",
    "monte_carlo_predict",
    "pair_generators",
]

# (image, prompt) rows per Monte Carlo forward pass when batch_samples is not given
_CPU_ROWS_PER_PASS = 8
_ROWS_PER_PASS = 32


def binary_entropy(p: Tensor) -> Tensor:
    """``H(p) = -p log p - (1 - p) log(1 - p)`` elementwise (0 at p in {0, 1})."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """``H(sigmoid(l))`` computed as ``p·softplus(-l) + (1-p)·softplus(l)``: exact for saturated
    logits, where ``1 - p`` rounds to 0."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


@dataclass
class UncertaintyOutput:
    """Monte Carlo statistics (see the module docstring for the equations).

    Attributes:
        mean: ``p̄`` (the segmentation probability; threshold 0.5 for the mask).
        entropy: ``H(p̄)``.
        aleatoric: ``mean_s H(p_s)``.
        epistemic: ``H(p̄) - mean_s H(p_s)``.
        variance: ``mean_s p_s² - p̄²``.
        samples: number of stochastic passes aggregated (1 when sampling is off).

    Each map is ``(C, H, W)`` at the image's original size, or a list of them for a list of images.
    """

    mean: Tensor | list[Tensor]
    entropy: Tensor | list[Tensor]
    aleatoric: Tensor | list[Tensor]
    epistemic: Tensor | list[Tensor]
    variance: Tensor | list[Tensor]
    samples: int


class MonteCarloMoments:
    """Running float64 sums of ``p``, ``p²`` and ``H(p)`` over samples, at one output size.

    Args:
        channels: ``C``.
        size: ``(H, W)`` the samples' logits are resized to (bilinearly, before the sigmoid).
        device: where the sums live.
    """

    def __init__(self, channels: int, size: tuple[int, int], device: torch.device | str) -> None:
        shape = (channels, *size)
        self.size = tuple(size)
        self.sum_p = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_p2 = torch.zeros_like(self.sum_p)
        self.sum_h = torch.zeros_like(self.sum_p)
        self.count = 0

    def add_logits(self, logits: Tensor) -> None:
        """Fold in ``(S, C, h, w)`` logits of S samples."""
        logits = logits.to(torch.float64)
        if tuple(logits.shape[-2:]) != self.size:
            logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)
        self._add(torch.sigmoid(logits), binary_entropy_from_logits(logits))

    def add_probs(self, probs: Tensor) -> None:
        """Fold in ``(S, C, h, w)`` probabilities of S samples (e.g. an ensemble's members)."""
        probs = probs.to(torch.float64)
        if tuple(probs.shape[-2:]) != self.size:
            probs = F.interpolate(probs, size=self.size, mode="bilinear", align_corners=False)
        self._add(probs, binary_entropy(probs))

    def _add(self, p: Tensor, h: Tensor) -> None:
        self.sum_p += p.sum(0)
        self.sum_p2 += p.square().sum(0)
        self.sum_h += h.sum(0)
        self.count += p.shape[0]

    def result(self) -> dict[str, Tensor]:
        """``{"mean", "entropy", "aleatoric", "epistemic", "variance"}`` maps ``(C, H, W)`` (fp32)."""
        if self.count == 0:
            raise ValueError("no samples were added")
        n = self.count
        mean = self.sum_p / n
        entropy = binary_entropy(mean)
        if n == 1:  # one pass: no spread at all (not merely rounding-level spread)
            zeros = torch.zeros_like(mean)
            out = {"aleatoric": entropy, "epistemic": zeros, "variance": zeros}
        else:
            aleatoric = self.sum_h / n
            out = {
                "aleatoric": aleatoric,
                "epistemic": (entropy - aleatoric).clamp_min(0),
                "variance": (self.sum_p2 / n - mean.square()).clamp_min(0),
            }
        out.update(mean=mean, entropy=entropy)
        return {k: v.float().cpu() for k, v in out.items()}


def derive_generators(
    base: torch.Generator | None, samples: int, device: torch.device | str | None
) -> list[torch.Generator]:
    """``samples`` generators on ``device`` seeded from ``base`` (the global RNG when None)."""
    where = base.device if base is not None else "cpu"
    seeds = torch.randint(0, 2**62, (samples,), generator=base, device=where).tolist()
    device = torch.device("cpu" if device is None else device)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def pair_generators(
    base: torch.Generator | None,
    samples: int,
    num_images: int,
    num_prompts: int,
    device: torch.device | str | None,
) -> list[list[list[torch.Generator]]]:
    """Noise generators ``[s][i][k]`` of sample ``s`` for image ``i`` with prompt ``k``.

    Sample ``s``'s stream is ``derive_generators(base, samples)[s]``; image ``i``'s seed is the
    ``i``-th draw of that stream, and prompt ``k``'s seed the ``k``-th draw of a generator seeded
    with it. A pair's noise therefore depends on ``(base, s, i, k)`` only: not on ``batch_size``,
    ``batch_samples``, nor on the images and prompts that come after it.
    """
    streams = derive_generators(base, samples, "cpu")
    device = torch.device("cpu" if device is None else device)
    out = []
    for stream in streams:
        image_seeds = torch.randint(0, 2**62, (num_images,), generator=stream).tolist()
        rows = []
        for seed in image_seeds:
            g = torch.Generator().manual_seed(int(seed))
            prompt_seeds = torch.randint(0, 2**62, (num_prompts,), generator=g).tolist()
            rows.append([torch.Generator(device=device).manual_seed(int(p)) for p in prompt_seeds])
        out.append(rows)
    return out


@runtime_checkable
class SupportsMonteCarlo(Protocol):
    """A model whose forward pass splits into a deterministic prefix and a stochastic remainder.

    ``encode_prefix(pixel_values, prompts)`` runs the sampling-independent part once and returns an
    object with ``index`` (the ``(B, C)`` pairing); ``forward_from_prefix(prefix,
    row_generators=..., sample=...)`` runs ``copies`` noise copies of the rest as one batch
    (copy-major, logits ``(copies * B, C, H, W)``), each (copy, image, prompt) row drawing its noise
    from its own generator; ``is_sampling(sample)`` says whether values are sampled.
    """

    def encode_prefix(self, pixel_values: Tensor, prompts: Any) -> Any: ...

    def forward_from_prefix(self, prefix: Any, **kwargs: Any) -> Any: ...

    def is_sampling(self, sample: bool | None) -> bool: ...


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def monte_carlo_predict(
    model: Any,
    images: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[str]],
    samples: int = 30,
    *,
    batch_samples: int | None = None,
    batch_size: int = 8,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    sample: bool | None = None,
    progress: bool | None = False,
) -> UncertaintyOutput:
    """Monte Carlo segmentation with uncertainty maps for a :class:`SupportsMonteCarlo` model.

    Each chunk of ``batch_size`` images is preprocessed and encoded once up to the stochastic part
    (``encode_prefix``); then ``batch_samples`` noise copies at a time run the rest as one batch, and
    their logits are resized to each image's original size and folded into running moments.

    Args:
        model: a :class:`~vlsegkit.VLSM` implementing :class:`SupportsMonteCarlo`.
        images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``), any size.
        prompts: as in ``predict``: one prompt, C prompts applied to every image, or one list of C
            prompts per image.
        samples: stochastic passes ``S``.
        batch_samples: copies run together in one batch; default ``8 // (B * C)`` on CPU (bigger
            batches fall out of cache there) and ``32 // (B * C)`` elsewhere, at least 1.
        batch_size: images per chunk.
        seed: seeds the noise: sample ``s`` of image ``i`` (its position in ``images``) with
            prompt ``k`` draws from ``pair_generators(Generator().manual_seed(seed), samples,
            len(images), C, device)[s][i][k]``, so a result does not depend on ``batch_size``,
            ``batch_samples``, or on the images and prompts after it in the call.
        generator: base stream instead of ``seed``.
        sample: sample the values; False runs one deterministic pass (epistemic = 0).
        progress: a progress bar over the images (None: only when stderr is a terminal).

    Returns:
        :class:`UncertaintyOutput` (maps ``(C, H, W)``, or lists for a list of images). The model's
        train / eval mode is restored afterwards.
    """
    from .models.base import _as_image_list, eval_mode, prompts_per_image

    samples = _positive_int(samples, "samples")
    if batch_samples is not None:
        batch_samples = _positive_int(batch_samples, "batch_samples")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    single, items = _as_image_list(images)
    per_image = prompts_per_image(prompts, len(items))
    sampling = model.is_sampling(sample)
    passes = samples if sampling else 1
    base = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
    streams = None
    moments: list[MonteCarloMoments] = []
    # inference mode skips autograd bookkeeping on every op; the maps are finalised outside it, so
    # callers get ordinary tensors they may modify in place
    with eval_mode(model), torch.inference_mode():
        for start, pixels, sizes in model.image_chunks(items, batch_size, progress=progress):
            b = len(sizes)
            prefix = model.encode_prefix(pixels, per_image[start : start + b])
            c = prefix.index.shape[1]
            budget = _CPU_ROWS_PER_PASS if pixels.device.type == "cpu" else _ROWS_PER_PASS
            per_pass = batch_samples or max(1, budget // (b * c))
            if sampling and streams is None:  # C is known once the first chunk is encoded
                streams = pair_generators(base, passes, len(items), c, pixels.device)
            chunk = [MonteCarloMoments(c, size, pixels.device) for size in sizes]
            moments.extend(chunk)
            for s in range(0, passes, per_pass):
                n = min(per_pass, passes - s)
                rows = None
                if streams is not None:  # copy-major, then image, then prompt
                    rows = [g for copy in streams[s : s + n] for image in copy[start : start + b]
                            for g in image]  # fmt: skip
                out = model.forward_from_prefix(
                    prefix, row_generators=rows, copies=n, sample=sampling
                )
                logits = out.logits.view(n, b, c, *out.logits.shape[-2:])
                for j, acc in enumerate(chunk):
                    acc.add_logits(logits[:, j])
    stats = [acc.result() for acc in moments]
    fields = {k: [s[k] for s in stats] for k in stats[0]}
    if single:
        fields = {k: v[0] for k, v in fields.items()}
    return UncertaintyOutput(samples=passes, **fields)
