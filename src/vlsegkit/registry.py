"""vlsegkit's one registry: named model configurations, model types and hook families.

In the spirit of timm's registry. Three tables live here, filled by the modules that define the
entries when they are imported (this module imports none of them, so there is no import cycle):

* **models** -- ``@register_model("clipseg-tiny")`` on a builder function; ``create_model(name)``
  builds it with random weights (no download), ``create_model(name, pretrained=True)`` loads the
  entry's Hub checkpoint through ``VLSM.from_pretrained``; ``list_models("*-tiny")``.
* **model types** -- the ``model_type`` written to ``config.json`` -> the model class
  (``VLSM`` subclasses register themselves).
* **hooks** -- hook class name -> class (``TowerHook`` subclasses register themselves), so a saved
  config ``{"name": "CoOp", "args": {...}}`` rebuilds the hook (:func:`hook_from_config`).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ModelEntry",
    "create_model",
    "hook_class",
    "hook_from_config",
    "list_hooks",
    "list_models",
    "model_class",
    "model_entry",
    "register_hook",
    "register_model",
    "register_model_type",
]

#: Modules whose import registers the built-in models, model types and hooks.
_BUILTIN_MODULES = (
    "vlsegkit.models.clipseg",
    "vlsegkit.models.biomedclipseg",
    "vlsegkit.models.cris",
    "vlsegkit.models.medclipseg",
    "vlsegkit.models.cotexnet",
    "vlsegkit.models.dual_encoder",
    "vlsegkit.models.tuned",
    "vlsegkit.prompts.text",
    "vlsegkit.prompts.visual",
    "vlsegkit.prompts.multimodal",
    "vlsegkit.adapters.pvl",
    "vlsegkit.adapters.bottleneck",
    "vlsegkit.adapters.roi_tokens",
)


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


_MODELS: dict[str, ModelEntry] = {}
_MODEL_TYPES: dict[str, type] = {}
_HOOKS: dict[str, type] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def _unknown(kind: str, name: str, known) -> KeyError:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return KeyError(f"unknown {kind} {name!r}{hint} (known: {', '.join(sorted(known))})")


# ------------------------------------------------------------------------------ models
def register_model(
    name: str, *, hub_id: str | None = None, description: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a builder function under ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _MODELS and _MODELS[name].builder is not fn:
            raise ValueError(f"model name {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, fn, hub_id, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Sorted registered names matching a shell-style ``pattern``.

    Args:
        pattern: e.g. ``"clipseg*"`` or ``"*-tiny"``.
        pretrained: only names with a Hub checkpoint.
    """
    _load_builtins()
    return sorted(
        n
        for n, e in _MODELS.items()
        if fnmatch.fnmatch(n, pattern) and (e.hub_id or not pretrained)
    )


def model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` for ``name`` (``KeyError`` listing close names otherwise)."""
    _load_builtins()
    if name not in _MODELS:
        error = _unknown("model", name, _MODELS)
        raise KeyError(f"{error.args[0]}; see vlsegkit.list_models() or `vlsegkit models`")
    return _MODELS[name]


def create_model(name: str, *, pretrained: bool = False, **kwargs: Any):
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the entry's Hub checkpoint (network or Hub cache) instead of random weights.
        **kwargs: constructor overrides (random-weight builds, e.g. ``hooks=[CoOp()]``) or
            ``from_pretrained`` options (``revision``, ``cache_dir``, ``local_files_only``, ``token``)
            when ``pretrained``.
    """
    entry = model_entry(name)
    if pretrained:
        if entry.hub_id is None:
            raise ValueError(f"model {name!r} has no pretrained checkpoint")
        return model_class("").from_pretrained(entry.hub_id, **kwargs)
    return entry.builder(**kwargs)


# ------------------------------------------------------------------------------ model types
def register_model_type(model_type: str, cls: type) -> None:
    """Register the class that ``config.json``'s ``model_type`` names (done by ``VLSM`` itself)."""
    _MODEL_TYPES[model_type] = cls


def model_class(model_type: str) -> type:
    """The model class of ``model_type``; ``""`` gives the ``VLSM`` base class."""
    if model_type == "":
        from .models.base import VLSM

        return VLSM
    _load_builtins()
    if model_type not in _MODEL_TYPES:
        raise _unknown("model_type", model_type, _MODEL_TYPES)
    return _MODEL_TYPES[model_type]


def model_types() -> dict[str, type]:
    """Every registered ``model_type`` -> class."""
    _load_builtins()
    return dict(_MODEL_TYPES)


# ------------------------------------------------------------------------------ hooks
def register_hook(cls: type) -> type:
    """Register a hook class under its class name (done by ``TowerHook`` subclasses)."""
    existing = _HOOKS.get(cls.__name__)
    if existing is not None and existing is not cls and existing.__module__ != cls.__module__:
        raise ValueError(f"hook name {cls.__name__!r} is already registered by {existing}")
    _HOOKS[cls.__name__] = cls
    return cls


def list_hooks() -> list[str]:
    """Names of the registered hook families (prompt learners, adapters, ...)."""
    _load_builtins()
    return sorted(_HOOKS)


def hook_class(name: str) -> type:
    """The hook class registered as ``name``."""
    _load_builtins()
    if name not in _HOOKS:
        raise _unknown("hook", name, _HOOKS)
    return _HOOKS[name]


def hook_from_config(config: dict[str, Any]):
    """Rebuild a hook from its ``config`` (``{"name": "CoOp", "args": {...}}``)."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"a hook config must be a dict with 'name' and 'args', got {config!r}")
    args = config.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"hook config 'args' must be a dict, got {args!r}")
    try:
        cls = hook_class(config["name"])
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return cls(**args)
