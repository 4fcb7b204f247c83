"""Configs recorded from constructor arguments, once, for models and hooks.

A class deriving from :class:`RecordsConfig` remembers the keyword arguments its outermost
``__init__`` was called with (defaults filled in). ``obj.config_args`` returns them as JSON-ready
values, so ``type(obj)(**obj.config_args)`` rebuilds the object without weights -- no hand-written
``config`` property can drift from the constructor.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["RecordsConfig", "check_config_types", "json_value"]


def json_value(value: Any, *, where: str = "config") -> Any:
    """``value`` as plain JSON data: tuples become lists, objects with ``.config`` their config.

    Raises:
        ValueError: a value that has no JSON form (a tensor, a function, a non-finite float...).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} holds the non-finite number {value!r}")
        return value
    if isinstance(value, (list, tuple, range)):
        return [json_value(v, where=where) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a non-string key {k!r}")
            out[k] = json_value(v, where=f"{where}.{k}")
        return out
    config = getattr(value, "config", None)
    if isinstance(config, Mapping):
        return json_value(config, where=where)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return json_value(to_dict(), where=where)
    raise ValueError(
        f"{where} holds a {type(value).__name__}, which cannot be written to config.json"
    )


class RecordsConfig:
    """Mixin recording the keyword arguments of the outermost ``__init__`` call."""

    _config_signature: inspect.Signature | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_config", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_config_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                recorded = dict(bound.arguments)
                recorded.pop(next(iter(signature.parameters)))  # self
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD and name in recorded:
                        recorded.update(recorded.pop(name))
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                        recorded.pop(name, None)
                object.__setattr__(self, "_config_args", recorded)
            init(self, *args, **kw)

        recording_init._records_config = True  # type: ignore[attr-defined]
        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def config_args(self) -> dict[str, Any]:
        """The constructor arguments as JSON data (``type(self)(**config_args)`` rebuilds it)."""
        args = self.__dict__.get("_config_args", {})
        return json_value(args, where=f"{type(self).__name__} config")

    def _set_config_arg(self, **changes: Any) -> None:
        """Record a change made after construction that a rebuild must repeat (e.g. freezing)."""
        args = self.__dict__.setdefault("_config_args", {})
        args.update(changes)


# ----------------------------------------------------------------------------- type checks
_UNKNOWN = object()


def _parameter_hints(target: Any) -> dict[str, Any]:
    """Evaluated annotations of ``target.__init__``'s parameters; ones that do not resolve (names
    imported only for type checkers) are left out."""
    init = inspect.unwrap(target.__init__)
    namespace = dict(getattr(init, "__globals__", {}))
    hints = {}
    for name, annotation in getattr(init, "__annotations__", {}).items():
        if name == "return":
            continue
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)
            except Exception:
                continue
        hints[name] = annotation
    return hints


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` fits the annotation ``hint``; unknown annotations fit anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (dict, Mapping, collections.abc.Mapping):
        return isinstance(value, dict)
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        element = args[0] if args else Any
        return all(_matches(v, element) for v in value)
    return True  # a class of ours (e.g. a hook given as its config dict): its builder checks it


def _describe(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "").replace("collections.abc.", "")


def check_config_types(target: Any, config: Mapping[str, Any], *, where: str = "config") -> None:
    """Check each field of ``config`` against the annotation of ``target``'s constructor argument.

    A config read from JSON can hold any JSON value in any field; this turns a wrong type into an
    error naming the field, instead of a ``TypeError`` deep inside the constructor.

    Raises:
        ValueError: a field whose value does not fit its annotation (the message names the field,
            the expected type and the value found).
    """
    hints = _parameter_hints(target)
    for name, value in config.items():
        hint = hints.get(name, _UNKNOWN)
        if hint is not _UNKNOWN and not _matches(value, hint):
            raise ValueError(f"{where} field {name!r} must be {_describe(hint)}, got {value!r}")
