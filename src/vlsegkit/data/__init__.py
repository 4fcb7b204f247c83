"""Datasets and batching helpers."""

from .synthetic import (
    ComponentAttributes,
    SyntheticLesions,
    attribute_prompt,
    collate_prompts,
    connected_components,
    mask_attributes,
)

__all__ = [
    "ComponentAttributes",
    "SyntheticLesions",
    "attribute_prompt",
    "collate_prompts",
    "connected_components",
    "mask_attributes",
]
