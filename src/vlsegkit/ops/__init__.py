"""Functional building blocks (pure functions on tensors, no parameters)."""

from vlsegkit.ops.probabilistic_attention import probabilistic_attention

__all__ = ["probabilistic_attention"]
