"""A registry of named model configurations: ``create_model`` / ``list_models``.

In the spirit of timm's registry: each entry is a small builder function decorated with
:func:`register_model`; ``create_model(name)`` builds it with random weights (no download), and
``create_model(name, pretrained=True)`` loads the entry's Hub checkpoint through
``VLSM.from_pretrained``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelEntry", "create_model", "list_models", "model_entry", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered configuration.

    Attributes:
        name: registry name, e.g. ``"clipseg-rd64-refined"``.
        builder: callable returning the model with random weights; keyword arguments override defaults.
        hub_id: Hub repository of the matching pretrained weights, if any.
        description: one line for ``list_models`` / the command line.
    """

    name: str
    builder: Callable[..., Any]
    hub_id: str | None = None
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, hub_id: str | None = None, description: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a builder function under ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, hub_id, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Sorted registered names matching a shell-style ``pattern``.

    Args:
        pattern: e.g. ``"clipseg*"``.
        pretrained: only names with a Hub checkpoint.
    """
    _import_models()
    return sorted(
        n
        for n, e in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern) and (e.hub_id or not pretrained)
    )


def model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` for ``name`` (``KeyError`` listing close names otherwise)."""
    _import_models()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (see vlsegkit.list_models())")
    return _REGISTRY[name]


def create_model(name: str, *, pretrained: bool = False, **kwargs: Any):
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the entry's Hub checkpoint (network or Hub cache) instead of random weights.
        **kwargs: constructor overrides (random-weight builds) or ``from_pretrained`` options
            (``revision``, ``cache_dir``, ``local_files_only``, ``token``) when ``pretrained``.
    """
    entry = model_entry(name)
    if pretrained:
        if entry.hub_id is None:
            raise ValueError(f"model {name!r} has no pretrained checkpoint")
        from .models.base import VLSM

        return VLSM.from_pretrained(entry.hub_id, **kwargs)
    return entry.builder(**kwargs)


def _import_models() -> None:
    # Registration happens when model modules are imported.
    from . import models  # noqa: F401
