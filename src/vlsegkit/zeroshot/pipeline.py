"""``MedCLIPSAM``: text prompt -> M2IB saliency -> coarse mask -> SAM mask, zero-shot.

Koleilat et al., "MedCLIP-SAMv2: Towards universal text-driven medical image segmentation"
(Medical Image Analysis 2025), §3.2: a CLIP-family model (the paper: BiomedCLIP fine-tuned with
DHN-NCE) gives a saliency map of the prompt through the multi-modal information bottleneck
(:class:`~vlsegkit.attribution.M2IBAttributor`); the map is thresholded and filtered into a coarse
mask and box / point prompts (:class:`~vlsegkit.zeroshot.SaliencyPrompter`); SAM
(:class:`~vlsegkit.zeroshot.SAMRefiner`) turns the prompts into the zero-shot mask, at the
original image size.

Preprocessing follows the paper: the whole image is resized to the CLIP input size (the released
code center-crops non-square images through the BiomedCLIP processor, then stretches the map back
over the full image; that mismatch is not reproduced).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attribution import M2IBAttributor
from ..data.images import to_image_tensor
from ..encoders.factory import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..uncertainty import derive_generators
from .postprocess import SaliencyPrompter, SaliencyPrompts
from .sam import PromptType, SAMRefiner

__all__ = ["MedCLIPSAM", "ZeroShotResult"]


@dataclass
class ZeroShotResult:
    """What :meth:`MedCLIPSAM.segment` returns for one image, all at its original size.

    Attributes:
        saliency: ``(H, W)`` float32 M2IB saliency in ``[0, 1]``.
        coarse: ``(H, W)`` bool coarse mask (post-processed saliency).
        mask: ``(H, W)`` bool zero-shot SAM mask.
        prompts: the :class:`~vlsegkit.zeroshot.SaliencyPrompts` given to SAM (boxes, points).
    """

    saliency: Tensor
    coarse: Tensor
    mask: Tensor
    prompts: SaliencyPrompts


def _pair(size: Any, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    ok = isinstance(pair, Sequence) and len(pair) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    if not ok:
        raise ValueError(f"{name} must be a positive int or an (H, W) pair, got {size!r}")
    return int(pair[0]), int(pair[1])


class MedCLIPSAM(nn.Module):
    """Zero-shot text-prompted segmentation: CLIP towers + M2IB + post-processing + SAM.

    Args:
        attributor: the :class:`~vlsegkit.attribution.M2IBAttributor` over the CLIP towers (with a
            tokenizer for string prompts).
        sam: a :class:`~vlsegkit.zeroshot.SAMRefiner`.
        image_size: CLIP input ``(H, W)`` (or a side); default the vision tower's ``image_size``.
        image_mean, image_std: CLIP's normalisation (OpenAI's by default; BiomedCLIP uses the same).
        prompter: saliency -> prompts; default ``SaliencyPrompter()`` (the paper's path).
        prompt_type: ``"boxes"`` (the paper's best in general), ``"points"`` (best for chest X-ray
            in its Table 6) or ``"both"``.
    """

    def __init__(
        self,
        attributor: M2IBAttributor,
        sam: SAMRefiner,
        *,
        image_size: int | tuple[int, int] | None = None,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        prompter: SaliencyPrompter | None = None,
        prompt_type: PromptType = "boxes",
    ) -> None:
        super().__init__()
        if not isinstance(attributor, M2IBAttributor):
            raise TypeError(
                f"attributor must be an M2IBAttributor, got {type(attributor).__name__}"
            )
        if not isinstance(sam, SAMRefiner):
            raise TypeError(f"sam must be a SAMRefiner, got {type(sam).__name__}")
        if prompt_type not in ("boxes", "points", "both"):
            raise ValueError(
                f"prompt_type must be 'boxes', 'points' or 'both', got {prompt_type!r}"
            )
        if prompter is not None and not isinstance(prompter, SaliencyPrompter):
            raise TypeError(f"prompter must be a SaliencyPrompter, got {type(prompter).__name__}")
        default = getattr(attributor.vision, "image_size", 224)
        self.image_size = _pair(default if image_size is None else image_size, "image_size")
        for name, v in (("image_mean", image_mean), ("image_std", image_std)):
            if len(v) != 3 or (name == "image_std" and min(v) <= 0):
                raise ValueError(f"{name} must hold 3 numbers (std > 0), got {v!r}")
        self.attributor = attributor
        self.sam = sam
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.prompter = SaliencyPrompter() if prompter is None else prompter
        self.prompt_type = prompt_type

    @classmethod
    def from_pretrained(
        cls,
        clip: str | os.PathLike,
        sam: str | os.PathLike,
        *,
        layer: int = 9,
        beta: float = 0.1,
        steps: int = 10,
        samples: int = 10,
        lr: float = 1.0,
        alpha_init: float = 5.0,
        prompter: SaliencyPrompter | None = None,
        prompt_type: PromptType = "boxes",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MedCLIPSAM:
        """Build the pipeline from a CLIP and a transformers SAM (Hub ids or folders).

        Args:
            clip: a ``CLIPModel`` repository or folder with its tokenizer (e.g.
                ``openai/clip-vit-base-patch16``, the paper's CLIP baseline), or a vlsegkit
                :class:`~vlsegkit.models.dual_encoder.DualEncoder` saved with ``save_pretrained``
                (e.g. the ``model/`` folder of ``vlsegkit train dual-encoder-...``: the paper's
                DHN-NCE fine-tuned model; see :meth:`from_dual_encoder`). For BiomedCLIP (open_clip)
                build the towers with :func:`vlsegkit.encoders.towers_from_open_clip` and use the
                constructor, or load it as a dual encoder.
            sam: a ``SamModel`` repository or folder with its processor (``facebook/sam-vit-huge``,
                ``facebook/sam-vit-base``, ...).
            layer, beta, steps, samples, lr, alpha_init: :class:`M2IBAttributor` settings.
            prompter, prompt_type: as in the constructor.
            revision, cache_dir, local_files_only, token: Hub options for both (``revision`` applies
                to the CLIP repository only).
        """
        from transformers import CLIPModel

        from ..encoders import from_clip_model
        from ..hub import read_json, resolve_file
        from ..tokenizers import load_tokenizer

        hub = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        settings = dict(
            layer=layer, beta=beta, steps=steps, samples=samples, lr=lr, alpha_init=alpha_init,
            prompter=prompter, prompt_type=prompt_type,
        )  # fmt: skip
        config = resolve_file(clip, "config.json", revision=revision, required=False, **hub)
        if config is not None and "vlsegkit_format_version" in read_json(config):
            return cls.from_dual_encoder(clip, sam, revision=revision, **settings, **hub)
        model = CLIPModel.from_pretrained(str(clip), revision=revision, **hub)
        vision, text = from_clip_model(model)
        tokenizer = load_tokenizer(str(clip), revision=revision, **hub)
        attributor = M2IBAttributor(
            vision, text, layer=layer, beta=beta, steps=steps, samples=samples, lr=lr,
            alpha_init=alpha_init, tokenizer=tokenizer,
        )  # fmt: skip
        norm = {}
        config = resolve_file(clip, "preprocessor_config.json", revision=revision, required=False,
                              **hub)  # fmt: skip
        if config is not None:
            pre = read_json(config)
            if "image_mean" in pre and "image_std" in pre:
                norm = {"image_mean": pre["image_mean"], "image_std": pre["image_std"]}
        refiner = SAMRefiner.from_pretrained(sam, **hub)
        return cls(
            attributor, refiner, image_size=vision.image_size, prompter=prompter,
            prompt_type=prompt_type, **norm,
        )  # fmt: skip

    @classmethod
    def from_dual_encoder(
        cls,
        dual: Any,
        sam: SAMRefiner | str | os.PathLike,
        *,
        layer: int = 9,
        beta: float = 0.1,
        steps: int = 10,
        samples: int = 10,
        lr: float = 1.0,
        alpha_init: float = 5.0,
        prompter: SaliencyPrompter | None = None,
        prompt_type: PromptType = "boxes",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MedCLIPSAM:
        """MedCLIP-SAMv2 end to end: the saliency comes from a (fine-tuned) dual encoder.

        The paper fine-tunes BiomedCLIP on image-text pairs with DHN-NCE (§3.1: a
        :class:`~vlsegkit.models.dual_encoder.DualEncoder` trained by ``fit`` with its default
        :class:`~vlsegkit.contrastive.ContrastiveTask`, or ``vlsegkit train dual-encoder-...``)
        and runs M2IB on the fine-tuned model (§3.2). The attributor shares the dual encoder's
        towers (no copy), and the pipeline takes its tokenizer (same context length), input size
        and normalisation, so the saliency is that of the model as fine-tuned.

        Args:
            dual: a ``DualEncoder``, or a folder / Hub id written by its ``save_pretrained``.
            sam: a :class:`~vlsegkit.zeroshot.SAMRefiner`, or a ``SamModel`` repository / folder.
            layer, beta, steps, samples, lr, alpha_init: :class:`M2IBAttributor` settings.
            prompter, prompt_type: as in the constructor.
            revision, cache_dir, local_files_only, token: Hub options (``revision`` applies to
                ``dual`` only).

        Raises:
            TypeError: ``dual`` is not a dual encoder (e.g. a segmentation model's folder).
            ValueError: ``dual`` owns hooks (prompt learners, adapters): M2IB runs the bare towers,
                so its saliency would not be that of the tuned model.
        """
        from ..models.base import VLSM
        from ..models.dual_encoder import DualEncoder

        hub = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        if isinstance(dual, (str, os.PathLike)):
            dual = VLSM.from_pretrained(dual, revision=revision, **hub)
        if not isinstance(dual, DualEncoder):
            raise TypeError(
                f"dual must be a DualEncoder (image-text towers in one joint space), got "
                f"{type(dual).__name__}"
            )
        if len(dual.hooks):
            names = ", ".join(type(h).__name__ for h in dual.hooks)
            raise ValueError(
                f"the dual encoder owns hooks ({names}) that M2IB would not run: its saliency "
                "would be that of the untuned towers; fine-tune the towers themselves for "
                "MedCLIP-SAMv2"
            )
        attributor = M2IBAttributor(
            dual.vision_tower, dual.text_tower, layer=layer, beta=beta, steps=steps,
            samples=samples, lr=lr, alpha_init=alpha_init, tokenizer=dual._maybe_tokenizer(),
        )  # fmt: skip
        refiner = sam if isinstance(sam, SAMRefiner) else SAMRefiner.from_pretrained(sam, **hub)
        return cls(
            attributor, refiner, image_size=dual.image_size, image_mean=dual.image_mean,
            image_std=dual.image_std, prompter=prompter, prompt_type=prompt_type,
        )  # fmt: skip

    def _device(self) -> torch.device:
        return self.attributor._device()

    def preprocess(self, images: Sequence[Tensor]) -> Tensor:
        """``(B, 3, H, W)`` CLIP inputs: each ``(3, h, w)`` image in ``[0, 1]`` resized (bilinear,
        antialiased) to ``image_size`` and normalised."""
        device = self._device()
        mean = torch.tensor(self.image_mean, device=device)[:, None, None]
        std = torch.tensor(self.image_std, device=device)[:, None, None]
        batch = [
            F.interpolate(
                im[None].to(device), size=self.image_size, mode="bilinear", align_corners=False,
                antialias=True,
            )[0]
            for im in images
        ]  # fmt: skip
        return (torch.stack(batch) - mean) / std

    def _text_rows(self, prompts: Any, count: int) -> list[Any]:
        """One prompt (a string, or a list of strings: an ensemble) per image."""

        def strings(p: Any) -> bool:
            return (
                isinstance(p, Sequence)
                and not isinstance(p, str)
                and len(p) > 0
                and all(isinstance(q, str) for q in p)
            )

        if isinstance(prompts, str):
            return [prompts] * count
        if strings(prompts):
            if len(prompts) == count > 1:
                # elsewhere in vlsegkit B strings pair one prompt with each image: say which
                # reading this is, since both are plausible and the maps differ
                warnings.warn(
                    f"{count} prompts for {count} images are read as one prompt ensemble (their "
                    "mean text embedding) for every image; for one prompt per image pass "
                    "[[p] for p in prompts]",
                    UserWarning,
                    stacklevel=3,
                )
            return [list(prompts)] * count
        if isinstance(prompts, Sequence) and len(prompts) == count and all(map(strings, prompts)):
            return [list(p) for p in prompts]
        raise ValueError(
            "prompts must be a string, a non-empty list of strings (a prompt ensemble for every "
            f"image) or one non-empty list of strings per image ({count} images)"
        )

    def _embed_prompts(self, rows: list[Any]) -> Tensor:
        """``(B, E)``: a prompt's embedding, or the mean embedding of an ensemble."""
        cache: dict[tuple[str, ...], Tensor] = {}
        out = []
        for p in rows:
            key = (p,) if isinstance(p, str) else tuple(p)
            if key not in cache:
                cache[key] = self.attributor.encode_text(list(key)).mean(0)
            out.append(cache[key])
        return torch.stack(out)

    def segment(
        self,
        images: Any,
        prompts: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        batch_size: int = 8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> ZeroShotResult | list[ZeroShotResult]:
        """Zero-shot masks of ``prompts`` on ``images``.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)`` in
                ``[0, 1]``), any size.
            prompts: one prompt for every image; a list of strings, whose mean text embedding is
                used for every image (a prompt ensemble, the paper's P4-P9); or one list of strings
                per image.
            batch_size: images per M2IB / SAM batch.
            seed: seeds the M2IB noise and the point draws; image ``i`` uses its own streams
                (``derive_generators``), so results do not depend on ``batch_size``.
            generator: the base stream instead of ``seed``.
            progress: show a progress bar over the images.

        Returns:
            A :class:`ZeroShotResult` per image (a single one for a single image).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        many = isinstance(images, (list, tuple)) or (
            isinstance(images, Tensor) and images.dim() == 4
        )
        items = [to_image_tensor(im) for im in (images if many else [images])]
        if not items:
            raise ValueError("images must hold at least one image")
        rows = self._text_rows(prompts, len(items))
        base = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        device = self._device()
        noise_streams = derive_generators(base, len(items), device)
        point_streams = derive_generators(base, len(items), "cpu")
        results: list[ZeroShotResult] = []
        bar = tqdm(total=len(items), desc="zero-shot", unit="image", disable=not progress)
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                stop = start + len(chunk)
                targets = self._embed_prompts(rows[start:stop])
                maps = self.attributor(
                    self.preprocess(chunk), targets, generator=noise_streams[start:stop]
                )
                embedded = self.sam.embed(chunk)
                for j, image in enumerate(chunk):
                    p = self.prompter(
                        maps[j].float().cpu(), size=tuple(image.shape[-2:]),
                        generator=point_streams[start + j],
                    )  # fmt: skip
                    mask = self.sam.refine(embedded, j, p, prompt_type=self.prompt_type)
                    results.append(ZeroShotResult(p.saliency, p.coarse, mask, p))
                bar.update(len(chunk))
        finally:
            bar.close()
        return results if many else results[0]

    def forward(self, images: Any, prompts: Any, **kwargs: Any):
        """Same as :meth:`segment`."""
        return self.segment(images, prompts, **kwargs)
