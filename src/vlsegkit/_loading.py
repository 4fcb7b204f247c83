"""One copy of the weights: building without them, checking files without reading them in, assigning.

What :mod:`vlsegkit.hub` uses to make ``from_pretrained`` hold a single copy of a model's weights:

* :func:`empty_weights` -- build a model whose parameters live on the meta device (no memory, no
  random initialisation), while buffers and plain tensor attributes (position ids, causal masks,
  ...) are computed as usual;
* :func:`remember_file_regions` / :func:`start_finite_check` / :func:`non_finite` -- the finiteness
  check of strict loading for tensors that are memory-mapped from a checkpoint file, reading the file
  through short-lived windows (optionally in a background thread while the model is being built)
  instead of faulting the tensors' own pages in: the model's mapping stays cold until a weight is
  first used, as with ``transformers``;
* :func:`assign_state_dict` -- ``load_state_dict(assign=True)`` that keeps tied parameters tied,
  gives the module the dtype / device / memory layout copying would have given, separates tensors
  that share memory in the file but not in the module, and refuses to leave meta tensors behind.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "assign_state_dict",
    "empty_weights",
    "non_finite",
    "remember_file_regions",
    "start_finite_check",
]


# ================================================================== where tensors live on disk
@dataclass
class _Region:
    """The bytes of one tensor in a checkpoint file, while the tensor is unchanged."""

    ref: weakref.ref
    path: str
    offset: int
    length: int
    version: int
    check: _FiniteCheck | None = None


# id(tensor) -> its region; an entry leaves with its tensor
_REGIONS: dict[int, _Region] = {}
# dtypes the file check understands (the rest is checked in memory)
_NUMPY_FLOATS = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16"}
# sign-less exponent masks: a 16-bit value is NaN / inf exactly when all its exponent bits are set
_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_CHECKABLE = {*_NUMPY_FLOATS, *_EXPONENT_BITS}


def _tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)


def _mappings_of(path: str) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of this process's memory maps of ``path`` (Linux; else [])."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == path:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append((start, end, int(fields[2], 16)))
    except OSError:
        pass
    return found


def remember_file_regions(path: str | os.PathLike, obj: Any) -> None:
    """Record where in ``path`` the tensors of ``obj`` (a tensor or nested dicts / lists of them)
    that are memory-mapped from it keep their bytes.

    ``safetensors`` and ``torch.load(mmap=True)`` map the whole file; a tensor whose memory lies in
    such a mapping is the file's bytes at the same offset for as long as it is not changed in place
    (PyTorch's version counter says so), so its values can be checked by reading the file instead
    of the mapping. Tensors that are not mapped (or on systems without ``/proc/self/maps``) are left
    out and checked in memory.
    """
    real = os.path.realpath(path)
    tensors = [
        t
        for t in _tensors_in(obj)
        if t.device.type == "cpu" and t.dtype in _CHECKABLE and t.is_contiguous() and t.numel()
    ]
    maps = _mappings_of(real) if tensors else []
    for tensor in tensors:
        start = tensor.data_ptr()
        length = tensor.numel() * tensor.element_size()
        for low, high, offset in maps:
            if low <= start and start + length <= high:
                key = id(tensor)
                ref = weakref.ref(tensor, lambda _, key=key: _REGIONS.pop(key, None))
                _REGIONS[key] = _Region(ref, real, offset + start - low, length, tensor._version)
                break


def _region(tensor: Tensor) -> _Region | None:
    region = _REGIONS.get(id(tensor))
    if region is None or region.ref() is not tensor or region.version != tensor._version:
        return None  # not from a file, or changed in place since it was read
    return region


# ================================================================== finiteness
def _array_is_finite(array: Any, dtype: torch.dtype) -> bool:
    """Whether every value of a 1-D numpy ``array`` holding ``dtype`` values is finite.

    numpy's one-pass reductions are several times faster than torch's on the CPU here.
    """
    import numpy as np

    with np.errstate(all="ignore"):
        if dtype in (torch.float32, torch.float64):
            # a dot product is finite only if every term is (NaN and inf propagate); an overflowing
            # one (huge but finite values) falls through to the exact test
            if np.isfinite(np.dot(array, array)):
                return True
            return bool(np.isfinite(array).all())
        bits = _EXPONENT_BITS[dtype]
        words = array.view(np.uint16)
        return not bool(((words & bits) == bits).any())


def is_finite(tensor: Tensor) -> bool:
    """Whether every value of a floating-point tensor (in memory) is finite."""
    if tensor.device.type == "cpu" and tensor.dtype in _CHECKABLE and tensor.numel():
        flat = tensor.detach().reshape(-1)
        array = (flat.view(torch.int16) if tensor.dtype == torch.bfloat16 else flat).numpy()
        return _array_is_finite(array, tensor.dtype)
    return bool(torch.isfinite(tensor).all())


_WINDOW_BYTES = 4 << 20


class _FileWindows:
    """Read-only views of a file through short-lived memory maps of at most ``_WINDOW_BYTES``.

    Faulting in the pages of a mapping is cheaper than copying them out with ``read``, and unmapping
    each window before the next keeps the resident set of a check of any file at one window.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._size = os.fstat(self._file.fileno()).st_size
        self._map: mmap.mmap | None = None
        self._start = self._end = 0

    def array(self, offset: int, length: int, dtype: torch.dtype) -> Any:
        import numpy as np

        if offset + length > self._size:
            raise OSError(f"{self._file.name} is shorter than the tensors read from it")
        if self._map is None or offset < self._start or offset + length > self._end:
            self._close_map()
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            end = min(self._size, max(offset + length, start + _WINDOW_BYTES))
            self._map = mmap.mmap(
                self._file.fileno(), end - start, offset=start, access=mmap.ACCESS_READ
            )
            self._start, self._end = start, end
        kind = _NUMPY_FLOATS.get(dtype, "uint16")  # bfloat16 is checked through its bits
        return np.frombuffer(
            self._map, dtype=kind, count=length // dtype.itemsize, offset=offset - self._start
        )

    def _close_map(self) -> None:
        if self._map is not None:
            self._map.close()  # the arrays of the window are gone by now
            self._map = None

    def close(self) -> None:
        self._close_map()
        self._file.close()


def _bad_regions(path: str, items: Iterable[tuple[int, int, torch.dtype, Any]]) -> set:
    """Keys of the ``(offset, length, dtype, key)`` regions of ``path`` holding NaN or inf."""
    bad = set()
    windows = _FileWindows(path)
    try:
        for offset, length, dtype, key in sorted(items, key=lambda item: item[0]):
            piece = _WINDOW_BYTES - _WINDOW_BYTES % dtype.itemsize  # element boundaries
            for begin in range(offset, offset + length, piece):
                n = min(piece, offset + length - begin)
                if not _array_is_finite(windows.array(begin, n, dtype), dtype):
                    bad.add(key)
                    break
    finally:
        windows.close()
    return bad


@dataclass
class _FiniteCheck:
    """The finiteness of some regions of one file, computed in a daemon thread (numpy releases the
    GIL, so it runs while the main thread builds the model)."""

    path: str
    items: list[tuple[int, int, torch.dtype, int]]
    _bad: set = field(default_factory=set)
    _error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> _FiniteCheck:
        threading.Thread(target=self._run, name="vlsegkit-finite-check", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            self._bad = _bad_regions(self.path, self.items)
        except BaseException as e:  # reported to the thread that asks
            self._error = e
        finally:
            self._done.set()

    def bad(self) -> set:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._bad


def start_finite_check(tensors: Iterable[Tensor]) -> None:
    """Start checking, in the background, the file-backed ``tensors`` for NaN / inf.

    :func:`non_finite` picks the results up (waiting for them if needed); tensors changed in place
    meanwhile are checked again in memory. Call it right after reading a checkpoint, before building
    the model, so the check overlaps the build.
    """
    by_file: dict[str, list] = {}
    for tensor in tensors:
        region = _region(tensor) if isinstance(tensor, Tensor) else None
        if region is not None and region.check is None:
            by_file.setdefault(region.path, []).append((region, tensor.dtype))
    for path, regions in by_file.items():
        items = [(r.offset, r.length, dtype, id(r)) for r, dtype in regions]
        check = _FiniteCheck(path, items).start()
        for region, _ in regions:
            region.check = check


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point ``tensors`` that hold NaN or inf, in their order.

    Tensors memory-mapped from a file (:func:`remember_file_regions`) and unchanged since are checked
    by reading the file through short-lived windows (or by the background check already running for
    them), so the check neither copies them nor keeps their pages resident; others in memory.
    """
    bad: list[str] = []
    from_files: dict[str, list] = {}
    waiting: list[tuple[str, _Region]] = []
    for name, tensor in tensors.items():
        region = _region(tensor)
        if region is None:
            if not is_finite(tensor):
                bad.append(name)
        elif region.check is not None:
            waiting.append((name, region))
        else:
            from_files.setdefault(region.path, []).append(
                (region.offset, region.length, tensor.dtype, name)
            )
    for path, items in from_files.items():
        bad.extend(_bad_regions(path, items))
    bad.extend(name for name, region in waiting if id(region) in region.check.bad())
    order = {name: i for i, name in enumerate(tensors)}
    return sorted(bad, key=order.__getitem__)


# ================================================================== assigning
def assign_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``module.load_state_dict(state_dict, strict=True, assign=True)``, done right.

    * Tied tensors (one parameter under several names) stay one parameter, holding the value of the
      last of its names -- what copying in state-dict order leaves in it.
    * Each tensor gets the module's dtype, device (unless the module's tensor is on meta) and memory
      layout: what copying would have given, converted only where it differs.
    * Tensors that overlap in memory (a checkpoint that saved tied or sliced weights) but are separate
      in the module get their own memory, or training one would change the other.
    * Attributes set on the module's parameters (``param.__dict__``) move to the new ones.

    Raises:
        RuntimeError: a parameter, buffer or tensor attribute is still on the meta device afterwards.
    """
    own = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # keys naming one tensor of the module, in order
    for key, target in own.items():
        if isinstance(target, Tensor):
            groups.setdefault(id(target), []).append(key)
    prepared: dict[str, Any] = {k: v for k, v in state_dict.items() if k in own}
    for keys in groups.values():
        value = _fit(state_dict[keys[-1]], own[keys[0]])
        for key in keys:
            prepared[key] = value
    _separate_aliases(prepared, groups)
    attributes = {
        k: dict(t.__dict__) for k, t in own.items() if isinstance(t, nn.Parameter) and t.__dict__
    }
    module.load_state_dict(prepared, strict=True, assign=True)
    for keys in groups.values():
        if len(keys) > 1:
            tensor = _get_tensor(module, keys[0])
            for key in keys[1:]:
                _set_tensor(module, key, tensor)
    for key, attrs in attributes.items():  # flags set on parameters by their constructors
        _get_tensor(module, key).__dict__.update(attrs)
    left = _meta_tensors(module)
    if left:
        shown = ", ".join(left[:20]) + (f", ... ({len(left)} in all)" if len(left) > 20 else "")
        raise RuntimeError(
            f"{type(module).__name__} still has tensors on the meta device after loading: {shown}. "
            "They are neither in the checkpoint nor computed by the constructor (build the module "
            "that owns them outside vlsegkit.hub.empty_weights)"
        )


def _fit(value: Tensor, target: Tensor) -> Tensor:
    """``value`` with ``target``'s dtype, device (unless ``target`` is on meta) and memory layout:
    what ``target.copy_(value)`` would have given, copied only when something differs."""
    value = value.detach()
    device = value.device if target.is_meta else target.device
    if value.dtype != target.dtype or value.device != device:
        value = value.to(device=device, dtype=target.dtype)
    if target.is_contiguous():
        return value.contiguous()
    if value.stride() != target.stride():
        layout = torch.empty_strided(
            target.shape, target.stride(), dtype=target.dtype, device=device
        )
        value = layout.copy_(value)
    return value


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def _separate_aliases(prepared: dict[str, Any], groups: dict[int, list[str]]) -> None:
    """Clone the tensors whose memory overlaps an earlier one's when the module keeps them apart."""
    spans = []
    for keys in groups.values():
        value = prepared[keys[0]]
        if isinstance(value, Tensor) and value.numel() and value.device.type == "cpu":
            spans.append((*_byte_span(value), keys))
    end = None
    for start, stop, keys in sorted(spans, key=lambda span: span[0]):
        if end is not None and start < end:
            clone = prepared[keys[0]].clone()
            for key in keys:
                prepared[key] = clone
        end = stop if end is None else max(end, stop)


def _split_key(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), name


def _get_tensor(module: nn.Module, key: str) -> Tensor:
    owner, name = _split_key(module, key)
    return owner._parameters[name] if name in owner._parameters else owner._buffers[name]


def _set_tensor(module: nn.Module, key: str, tensor: Tensor) -> None:
    owner, name = _split_key(module, key)
    if name in owner._parameters:
        owner._parameters[name] = tensor
    else:
        owner._buffers[name] = tensor


def _meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters, buffers and tensor attributes (also in lists) still on meta."""
    found = []
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        for name, value in (*sub._parameters.items(), *sub._buffers.items()):
            if value is not None and value.is_meta:
                found.append(prefix + name)
        for name, value in vars(sub).items():
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, Tensor) and v.is_meta for v in items):
                found.append(prefix + name)
    return found


# ================================================================== building without weights
_EMPTY = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_SAVED_REGISTER_PARAMETER: Callable | None = None


def _register_parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """``nn.Module.register_parameter`` that, inside :func:`empty_weights` (this thread only),
    replaces the registered parameter by a meta-device one of the same shape, dtype, class,
    ``requires_grad`` and attributes. One parameter registered twice (tied) stays one."""
    assert _SAVED_REGISTER_PARAMETER is not None
    _SAVED_REGISTER_PARAMETER(self, name, param)
    if param is None or not getattr(_EMPTY, "depth", 0):
        return
    registered = self._parameters[name]
    if registered is None or registered.is_meta or nn.parameter.is_lazy(registered):
        return
    seen = _EMPTY.seen
    entry = seen.get(id(registered))
    if entry is not None and entry[0]() is registered:
        self._parameters[name] = entry[1]
        return
    data = registered.detach().to("meta")
    try:
        meta = type(registered)(data, requires_grad=registered.requires_grad)
    except TypeError:  # a Parameter subclass with another constructor
        meta = nn.Parameter(data, requires_grad=registered.requires_grad)
    meta.__dict__.update(registered.__dict__)
    seen[id(registered)] = (weakref.ref(registered), meta)
    self._parameters[name] = meta


# In-place operations that only change values: on a meta tensor they have nothing to do, and
# PyTorch runs them through slow Python reference implementations (the random initialisation of a
# ViT-B/16 on meta takes longer than building it).
_VALUE_ONLY_INPLACE = frozenset((
    # Tensor methods
    "normal_", "uniform_", "fill_", "zero_", "copy_", "erfinv_", "mul_", "add_", "sub_", "div_",
    "clamp_", "clamp_min_", "clamp_max_", "exponential_", "bernoulli_", "random_", "log_normal_",
    "cauchy_", "geometric_", "sqrt_", "neg_", "abs_", "exp_", "log_", "pow_", "tanh_", "sigmoid_",
    "fmod_", "remainder_", "addcmul_", "addcdiv_", "lerp_", "masked_fill_", "index_fill_",
    "fill_diagonal_", "tril_", "triu_", "__iadd__", "__isub__", "__imul__", "__itruediv__",
    # torch.nn.init functions (they dispatch as a whole, with the tensor as first argument)
    "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
))  # fmt: skip


class _SkipMetaValueOps(TorchFunctionMode):
    """Return a meta tensor unchanged from in-place value operations (its initialisation)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE:
            # the changed tensor: the first positional argument (torch.nn.init passes it by name)
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules without allocating their parameters: they are created on the meta device.

    Inside the block every parameter a module registers (``self.weight = nn.Parameter(...)``) is
    replaced by a meta tensor of the same shape, dtype and ``requires_grad``, so a model of any size
    costs no memory and its random initialisation no time (in-place value operations on meta tensors
    -- ``normal_``, ``uniform_``, ``copy_``, ... -- return at once). Everything else is built as
    usual: buffers (position ids, causal masks, ...) -- including the non-persistent ones no
    checkpoint holds -- and plain tensor attributes get their real values, on the CPU. Fill the
    parameters with :func:`vlsegkit.hub.load_state_dict_strict` (``assign=True``), which refuses to
    return a module that still has meta tensors. The same idea as
    ``accelerate.init_empty_weights(include_buffers=False)``; it acts only in the thread that entered
    it.

    Example:
        >>> with empty_weights():
        ...     model = CLIPSeg(**config)  # no weight memory
        >>> load_state_dict_strict(model, load_checkpoint_file(path), assign=True)
    """
    global _PATCH_USERS, _SAVED_REGISTER_PARAMETER
    with _PATCH_LOCK:
        if _PATCH_USERS == 0 and nn.Module.register_parameter is not _register_parameter_on_meta:
            _SAVED_REGISTER_PARAMETER = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
        _PATCH_USERS += 1
    depth = getattr(_EMPTY, "depth", 0)
    if depth == 0:
        _EMPTY.seen = {}
    _EMPTY.depth = depth + 1
    try:
        with _SkipMetaValueOps():
            yield
    finally:
        _EMPTY.depth = depth
        if depth == 0:
            _EMPTY.seen = {}
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0 and nn.Module.register_parameter is _register_parameter_on_meta:
                nn.Module.register_parameter = _SAVED_REGISTER_PARAMETER  # type: ignore[method-assign]
