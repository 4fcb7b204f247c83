"""Typed outputs of the model families (one dataclass per family, fields with their shapes)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["CLIPSegOutput", "MedCLIPSegOutput", "SegmentationOutput"]


@dataclass
class SegmentationOutput:
    """What every segmentation model's ``forward`` returns.

    Attributes:
        logits: ``(B, C, H, W)`` mask logits at input resolution, one channel per prompt.
        conditional_embeddings: ``(B, C, E)`` the conditions the decoder used, or None.
    """

    logits: Tensor
    conditional_embeddings: Tensor | None = None


@dataclass
class CLIPSegOutput(SegmentationOutput):
    """CLIPSeg's output.

    Attributes:
        decoder_features: ``(B, C, reduce_dim, h, w)`` the decoder's penultimate feature map (the
            input of its final transposed convolution), when ``output_decoder_features=True``
            (TuneVLSeg's learnable upsampler reads it).
    """

    decoder_features: Tensor | None = None


@dataclass
class MedCLIPSegOutput(SegmentationOutput):
    """MedCLIPSeg's output (what :class:`~vlsegkit.losses.MedCLIPSegLoss` needs).

    Attributes:
        patch_tokens: ``(B, C, h*w, E)`` final patch tokens in the joint space (``Z_v``), one set
            per (image, prompt) pair.
        text_embeddings: ``(B, C, E)`` global text tokens ``z_t`` (also ``conditional_embeddings``).
    """

    patch_tokens: Tensor | None = None
    text_embeddings: Tensor | None = None
