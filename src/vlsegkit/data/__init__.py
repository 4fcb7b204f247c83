"""Datasets, batching helpers and the image conversion shared with ``predict``.

``ImageMaskPromptDataset`` (which needs torchvision's transforms) is imported on first use, so
``predict`` and the models do not pay for torchvision.
"""

from typing import TYPE_CHECKING, Any

from .cached import CachedDataset
from .concepts import (
    CONCEPT_TEMPLATE,
    CONCEPTS,
    AttributeExtractor,
    ConceptualPrompts,
    MaskAttributeExtractor,
    conceptual_prompt,
    multiclass_conceptual_prompt,
    write_prompt_cache,
)
from .images import to_image_tensor
from .synthetic import (
    ComponentAttributes,
    SyntheticLesions,
    attribute_prompt,
    collate_prompts,
    connected_components,
    mask_attributes,
)
from .templates import (
    CAMUS_CLASSES,
    CHEXLOCALIZE_CLASSES,
    DATASET_TEMPLATES,
    PromptTemplates,
    get_templates,
    mask_prompt_fields,
    render_template,
)

__all__ = [
    "CAMUS_CLASSES",
    "CHEXLOCALIZE_CLASSES",
    "CONCEPTS",
    "CONCEPT_TEMPLATE",
    "DATASET_TEMPLATES",
    "AttributeExtractor",
    "CachedDataset",
    "ComponentAttributes",
    "ConceptualPrompts",
    "ImageMaskPromptDataset",
    "MaskAttributeExtractor",
    "PromptTemplates",
    "SegmentationSample",
    "SyntheticLesions",
    "attribute_prompt",
    "collate_prompts",
    "conceptual_prompt",
    "connected_components",
    "get_templates",
    "mask_attributes",
    "mask_prompt_fields",
    "multiclass_conceptual_prompt",
    "render_template",
    "to_image_tensor",
    "write_prompt_cache",
]


def __getattr__(name: str) -> Any:
    if name in ("ImageMaskPromptDataset", "SegmentationSample"):
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'vlsegkit.data' has no attribute {name!r}")


if TYPE_CHECKING:
    from .dataset import ImageMaskPromptDataset, SegmentationSample
