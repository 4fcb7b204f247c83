"""What a model can do, as ``runtime_checkable`` protocols (checked with ``isinstance``).

Code that works with any model asks these questions instead of inspecting signatures::

    if isinstance(model, SupportsHooks): ...          # prompt learners / adapters attach
    if isinstance(model, SupportsUncertainty): ...    # Monte Carlo maps
    if isinstance(model, SupportsRetrieval): ...      # embeddings and (B, T) logits, no masks
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..encoders.hooks import HookSlots

__all__ = [
    "SupportsDecoderFeatures",
    "SupportsHooks",
    "SupportsRetrieval",
    "SupportsTextFree",
    "SupportsUncertainty",
]


@runtime_checkable
class SupportsHooks(Protocol):
    """Built from steppable towers: ``hook_slots()`` describes where hooks act, and ``forward``
    takes ``hooks=`` (prompt learners, adapters; :class:`~vlsegkit.encoders.TowerHook`)."""

    def hook_slots(self) -> HookSlots: ...


@runtime_checkable
class SupportsDecoderFeatures(Protocol):
    """``forward(..., output_decoder_features=True)`` returns ``decoder_features`` of
    ``decoder_feature_dim`` channels (for TuneVLSeg's learnable upsampler)."""

    decoder_feature_dim: int


@runtime_checkable
class SupportsUncertainty(Protocol):
    """Stochastic model with Monte Carlo inference: ``predict_with_uncertainty(images, prompts,
    samples)`` returns a :class:`~vlsegkit.uncertainty.UncertaintyOutput`."""

    def predict_with_uncertainty(self, images: Any, prompts: Any, samples: int = ...) -> Any: ...


@runtime_checkable
class SupportsTextFree(Protocol):
    """Segments without text: ``forward(pixel_values)`` and ``predict(images)`` take no prompt, and
    text (with masks) conditions training only (CoTexNet). ``image_condition(pixel_values)`` gives
    the conditioning vector the model predicts from the image alone."""

    def image_condition(self, pixel_values: Any) -> Any: ...


@runtime_checkable
class SupportsRetrieval(Protocol):
    """A dual encoder (:class:`~vlsegkit.models.dual_encoder.DualEncoder`): ``model(pixel_values,
    texts)`` returns image and text embeddings in one joint space and their ``(B, T)`` similarity
    ``logits`` instead of masks; ``similarity(image_embeds, text_embeds)`` scores any two sets
    (retrieval, zero-shot classification, contrastive fine-tuning)."""

    def similarity(self, image_embeds: Any, text_embeds: Any) -> Any: ...
