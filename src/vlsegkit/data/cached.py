"""A dataset rendered once into memory (for procedural data whose items cost more than a step)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["CachedDataset"]


class CachedDataset(Dataset):
    """Every item of ``dataset`` computed once, at construction, and served from memory.

    ``SyntheticLesions`` items take longer to generate than a tiny model's training step; caching
    them makes short demo / test runs fast. Items are returned as stored (no copy): do not modify
    them in place.

    Args:
        dataset: any map-style dataset with ``len()``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]
