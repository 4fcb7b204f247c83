"""SAM refinement of coarse masks through transformers' ``SamModel`` / ``SamProcessor``.

Kirillov et al., "Segment Anything" (ICCV 2023). MedCLIP-SAMv2 prompts SAM with the boxes and / or
points derived from the saliency map (:mod:`vlsegkit.zeroshot.postprocess`): every prompt gives one
mask (``multimask_output=False``, the released default) and the masks of all prompts are united
(the released ``--multicontour`` rule; the paper's one box per component). Any SAM checkpoint in
the transformers layout works: ``facebook/sam-vit-huge`` (the paper's ViT-H), ``facebook/sam-vit-base``
or a local folder.

Images are embedded once per batch (``SamModel.get_image_embeddings``); the prompts of each image
are then decoded together, in the coordinates ``SamProcessor`` would give them (scaled by the
resized / original size), and the masks are post-processed back to the original size by the
processor's ``post_process_masks``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .postprocess import POINT_PAD_LABEL, SaliencyPrompts, keep_largest_components

__all__ = ["PromptType", "SAMImages", "SAMRefiner"]

PromptType = Literal["boxes", "points", "both"]


@dataclass
class SAMImages:
    """Embedded images, ready for prompts.

    Attributes:
        embeddings: ``(B, C, h, w)`` SAM image embeddings.
        original_sizes: ``(B, 2)`` long ``(H, W)`` of the images.
        reshaped_sizes: ``(B, 2)`` long size of each image after SAM's longest-side resize.
    """

    embeddings: Tensor
    original_sizes: Tensor
    reshaped_sizes: Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def _as_uint8_rgb(image: Any) -> np.ndarray:
    """``(H, W, 3)`` uint8 from anything ``vlsegkit.data.to_image_tensor`` accepts."""
    from ..data.images import to_image_tensor

    t = to_image_tensor(image)
    return (t.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class SAMRefiner(nn.Module):
    """Box / point prompts -> SAM masks at the original image size.

    Args:
        model: a transformers ``SamModel``.
        processor: its ``SamProcessor`` (resizing, normalisation, mask post-processing).
        multimask_output: ask SAM for its three masks per prompt and keep the one with the highest
            predicted IoU (default: one mask per prompt, as the released code).
        mask_threshold: logit threshold of ``post_process_masks`` (SAM's 0).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        multimask_output: bool = False,
        mask_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if not hasattr(model, "get_image_embeddings") or not hasattr(model, "prompt_encoder"):
            raise TypeError(f"model must be a transformers SamModel, got {type(model).__name__}")
        if not hasattr(processor, "image_processor"):
            raise TypeError(
                f"processor must be a transformers SamProcessor, got {type(processor).__name__}"
            )
        self.model = model.eval()
        self.processor = processor
        self.multimask_output = bool(multimask_output)
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> SAMRefiner:
        """Load ``SamModel`` and ``SamProcessor`` from a Hub id (``facebook/sam-vit-huge``, ...) or a
        folder written by their ``save_pretrained``; ``kwargs`` go to the constructor."""
        from transformers import SamModel, SamProcessor

        hub = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        model = SamModel.from_pretrained(str(id_or_path), **hub)
        processor = SamProcessor.from_pretrained(str(id_or_path), **hub)
        return cls(model, processor, **kwargs)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> SAMImages:
        """Preprocess (longest side to SAM's size, pad, normalise) and embed ``images``.

        Args:
            images: PIL images, ``(H, W[, 3])`` arrays or ``(3, H, W)`` tensors in ``[0, 1]``.
        """
        if not images:
            raise ValueError("images must hold at least one image")
        arrays = [_as_uint8_rgb(im) for im in images]
        enc = self.processor(images=arrays, return_tensors="pt")
        pixels = enc["pixel_values"].to(self._device(), next(self.model.parameters()).dtype)
        return SAMImages(
            embeddings=self.model.get_image_embeddings(pixels),
            original_sizes=torch.as_tensor(enc["original_sizes"]).long().cpu(),
            reshaped_sizes=torch.as_tensor(enc["reshaped_input_sizes"]).long().cpu(),
        )

    @torch.no_grad()
    def segment(
        self,
        images: SAMImages,
        index: int,
        *,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
    ) -> Tensor:
        """The union of SAM's masks for K prompts on image ``index`` of ``images``.

        Args:
            images: from :meth:`embed`.
            index: which image.
            boxes: ``(K, 4)`` ``(x0, y0, x1, y1)`` in original-image pixels.
            points: ``(K, P, 2)`` ``(x, y)`` in original-image pixels (with ``point_labels``).
            point_labels: ``(K, P)``: 1 positive, 0 negative, ``-10`` padding.

        Returns:
            ``(H, W)`` bool mask at the original size (all False without prompts).
        """
        n = images.embeddings.shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise ValueError(
                f"index must be an int in [0, {n}) (the embedded images), got {index!r}"
            )
        index %= n
        h, w = (int(v) for v in images.original_sizes[index])
        rh, rw = (int(v) for v in images.reshaped_sizes[index])
        scale = torch.tensor([rw / w, rh / h], dtype=torch.float32)
        device = self._device()
        kwargs: dict[str, Tensor] = {}
        count = None
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
            if boxes.shape[-1:] != (4,) or boxes.dim() not in (1, 2):
                raise ValueError(
                    f"boxes must have shape (K, 4) or (4,) as (x0, y0, x1, y1), got "
                    f"{tuple(boxes.shape)}"
                )
            boxes = boxes.reshape(-1, 4)
            count = boxes.shape[0]
            kwargs["input_boxes"] = (boxes * scale.repeat(2))[None].to(device)
        if points is not None:
            points = torch.as_tensor(points, dtype=torch.float32)
            if points.dim() != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must have shape (K, P, 2), got {tuple(points.shape)}")
            if point_labels is None or tuple(point_labels.shape) != tuple(points.shape[:2]):
                raise ValueError("point_labels must have shape (K, P) like points")
            if count is not None and points.shape[0] != count:
                raise ValueError(f"boxes and points give {count} and {points.shape[0]} prompts")
            count = points.shape[0]
            kwargs["input_points"] = (points * scale)[None].to(device)
            kwargs["input_labels"] = torch.as_tensor(point_labels).long()[None].to(device)
        if not count:
            return torch.zeros(h, w, dtype=torch.bool)
        emb = images.embeddings[index : index + 1]
        out = self.model(image_embeddings=emb, multimask_output=self.multimask_output, **kwargs)
        masks = out.pred_masks  # (1, K, M, h', w')
        if self.multimask_output:
            best = out.iou_scores.argmax(-1)  # (1, K)
            masks = masks.gather(
                2, best[..., None, None, None].expand(-1, -1, 1, *masks.shape[-2:])
            )
        full = self.processor.image_processor.post_process_masks(
            masks.float().cpu(),
            images.original_sizes[index : index + 1],
            images.reshaped_sizes[index : index + 1],
            mask_threshold=self.mask_threshold,
            binarize=True,
        )[0]  # (K, 1, H, W)
        return full.bool().any(dim=(0, 1))

    @torch.no_grad()
    def refine(
        self,
        images: SAMImages,
        index: int,
        prompts: SaliencyPrompts,
        *,
        prompt_type: PromptType = "boxes",
    ) -> Tensor:
        """SAM mask of one image from its :class:`SaliencyPrompts`.

        ``"boxes"``: one prompt per box. ``"points"``: one prompt per point group (the paper's path:
        each component's points; the released path: one group of all foreground points).
        ``"both"``: each box with its group's points (a single released group is repeated for every
        box, as ``prompt_sam.py`` does). The released path then keeps the
        ``prompts.keep_components`` largest components of the union.

        Returns:
            ``(H, W)`` bool mask at the original size (empty when no region survived).
        """
        if prompt_type not in ("boxes", "points", "both"):
            raise ValueError(
                f"prompt_type must be 'boxes', 'points' or 'both', got {prompt_type!r}"
            )
        n = images.embeddings.shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise ValueError(
                f"index must be an int in [0, {n}) (the embedded images), got {index!r}"
            )
        index %= n
        h, w = (int(v) for v in images.original_sizes[index])
        if tuple(prompts.coarse.shape) != (h, w):
            raise ValueError(
                f"prompts are for a {tuple(prompts.coarse.shape)} image, image {index} is {(h, w)}"
            )
        if prompts.empty:
            return torch.zeros(h, w, dtype=torch.bool)
        boxes = prompts.boxes if prompt_type != "points" else None
        points = labels = None
        if prompt_type != "boxes":
            points, labels = prompts.points, prompts.point_labels
            if prompt_type == "both" and points.shape[0] == 1 and boxes.shape[0] > 1:
                points = points.expand(boxes.shape[0], -1, -1)
                labels = labels.expand(boxes.shape[0], -1)
            keep = (labels != POINT_PAD_LABEL).any(0)  # drop columns that pad every group
            points, labels = points[:, keep], labels[:, keep]
        mask = self.segment(images, index, boxes=boxes, points=points, point_labels=labels)
        if prompts.keep_components is not None:
            mask = keep_largest_components(mask, prompts.keep_components)
        return mask
