"""Configs recorded from constructor arguments, once, for models and hooks.

A class deriving from :class:`RecordsConfig` remembers the keyword arguments its outermost
``__init__`` was called with (defaults filled in). ``obj.config_args`` returns them as JSON-ready
values, so ``type(obj)(**obj.config_args)`` rebuilds the object without weights -- no hand-written
``config`` property can drift from the constructor.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["RecordsConfig", "json_value"]


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
