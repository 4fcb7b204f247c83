"""Checkpoint files: resolving Hub ids or folders, safe loading, strict state dicts, atomic writes.

Everything here reads through ``huggingface_hub`` (so the Hub cache, ``HF_HUB_OFFLINE`` and
``local_files_only`` behave as users expect) and ``safetensors``. Pickle checkpoints are only read with
``torch.load(weights_only=True)``. Files are written to a temporary name and renamed into place, so an
interrupted save never leaves a truncated checkpoint behind.

Loading holds one copy of the weights: ``from_pretrained`` builds the model inside
:func:`empty_weights` (parameters on the meta device, no memory), reads the checkpoint memory-mapped
(safetensors, and zip-format pickles through ``torch.load(mmap=True)``), renames keys without touching
the tensors, checks everything (:func:`check_state_dict`) and then *assigns* the file's tensors to the
model (:func:`load_state_dict_strict` with ``assign=True``). The file's pages are read when a weight is
first used, as with ``transformers``; the finiteness check of safetensors files streams through the file
in small chunks instead of through the mapping, so it does not keep the whole file resident.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._loading import assign_state_dict, empty_weights, remember_file_regions, start_finite_check
from ._loading import non_finite as _non_finite

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_state_dict",
    "empty_weights",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "read_json",
    "resolve_file",
    "save_safetensors",
    "torch_load_weights_only",
    "write_json",
]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing/unexpected keys, wrong shapes, corrupt files."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temporary file to ``path``.

    The temporary file lives in the destination folder so the rename never crosses file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # fsync the data before the rename so a power loss cannot leave a renamed, empty file.
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, *, metadata: dict | None = None
) -> Path:
    """Save a state dict as safetensors, atomically. Tensors are made contiguous CPU copies."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    seen: dict[tuple[int, int], str] = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:  # safetensors refuses aliases; store an independent copy
            tensors[k] = v.clone()
        seen[key] = k
    meta = {"format": "pt", **(metadata or {})}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_checkpoint_file(
    path: str | os.PathLike, *, check_in_background: bool = False
) -> dict[str, Tensor]:
    """Load a ``.safetensors`` file, or a pickle through ``torch.load(weights_only=True)``.

    Nothing is copied: safetensors files are memory-mapped by ``safetensors``, zip-format pickles
    (what ``torch.save`` writes since PyTorch 1.6) are read with ``torch.load(mmap=True)``; legacy
    pickles are read into memory. The mappings are private (copy-on-write): changing a tensor never
    changes the file. A tensor's pages are read when it is first used.

    Args:
        path: the checkpoint file.
        check_in_background: start checking the floating-point tensors for NaN / inf in a
            background thread now (reading the file, not the tensors' pages), so that the check of
            a later :func:`check_state_dict` / :func:`load_state_dict_strict` overlaps building the
            model.

    Raises:
        CheckpointError: the file is truncated, corrupt, or not a flat name → tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        remember_file_regions(path, tensors)
    else:
        tensors = torch_load_weights_only(path)
        if (
            isinstance(tensors, dict)
            and "state_dict" in tensors
            and isinstance(tensors["state_dict"], dict)
        ):
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict) or not all(
            isinstance(v, Tensor) for v in tensors.values()
        ):
            raise CheckpointError(f"{path} does not hold a flat mapping of names to tensors")
    if check_in_background:
        start_finite_check(tensors.values())
    return tensors


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped when the file allows it.

    Zip-format files (``torch.save``'s default) are mapped (``mmap=True``): tensors are read from the
    page cache when first used and never copied; legacy (pre-1.6) pickles are read into memory.

    Raises:
        CheckpointError: the file is corrupt, truncated, or holds anything but tensors and plain
            Python containers / scalars (``weights_only``).
    """
    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several unrelated types for corrupt pickles
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
    if mmap:
        remember_file_regions(path, obj)
    return obj


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str = "",
    assign: bool = False,
):
    """Load ``state_dict`` into ``module``, failing on any missing/unexpected key or shape mismatch.

    Everything is checked (:func:`check_state_dict`) before the first tensor is copied or assigned,
    so a failed load leaves the module untouched. The error message names every offending key (up to
    20 of each kind) and the checkpoint source.

    Args:
        module: the module to load into.
        state_dict: name -> tensor, with exactly ``module.state_dict()``'s keys and shapes.
        source: where the tensors come from, for error messages.
        assign: give ``module`` the tensors themselves instead of copying them into its own
            (``nn.Module.load_state_dict(assign=True)``): one copy of the weights in memory, and the
            way to fill a module built inside :func:`empty_weights`. A tensor whose dtype, device or
            memory layout differs from the module's is converted first (what copying would do), tied
            parameters stay tied, and tensors that share memory in the checkpoint but not in the module
            get their own memory. ``module`` then owns the tensors: pass freshly read ones (e.g.
            from :func:`load_checkpoint_file`), not another live model's.

    Raises:
        CheckpointError: the state dict does not fit (see :func:`check_state_dict`).
        RuntimeError: with ``assign``, a tensor of ``module`` is still on the meta device after
            loading (one its constructor neither computed nor finds in the checkpoint).
    """
    check_state_dict(module, state_dict, source=source)
    if not assign:
        module.load_state_dict(state_dict, strict=True)
        return
    assign_state_dict(module, state_dict)


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = ""
) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly ``module``'s keys and shapes, and
    only finite floating-point values where the module has floating-point tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = ", ".join(items[:20]) + (
                f", ... ({len(items)} in all)" if len(items) > 20 else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        where = f" from {source}" if source else ""
        raise CheckpointError(
            f"cannot load checkpoint{where} into {type(module).__name__}; " + "; ".join(problems)
        )
    where = f" from {source}" if source else ""
    wrong_dtype = [
        f"{k} ({state_dict[k].dtype} for {own[k].dtype})"
        for k in own
        if own[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    _raise_listed(module, where, "integer tensors for floating-point weights", wrong_dtype)
    try:
        # tensors mapped from a file are checked by reading the file (see vlsegkit._loading)
        non_finite = _non_finite(
            {k: state_dict[k] for k in own if state_dict[k].is_floating_point()}
        )
    except OSError as e:  # the file of mapped tensors went away or shrank
        raise CheckpointError(f"cannot check the values of the checkpoint{where}: {e}") from e
    _raise_listed(module, where, "non-finite values (NaN / inf)", non_finite)


def _raise_listed(module: nn.Module, where: str, label: str, items: list[str]) -> None:
    if items:
        shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
        raise CheckpointError(
            f"cannot load checkpoint{where} into {type(module).__name__}: {label}: {shown}"
        )


def _looks_like_a_path(text: str) -> bool:
    """A string meant as a local path rather than a Hub repo id (``org/name`` or ``name``)."""
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).is_absolute()
        or Path(text).suffix in (".json", ".safetensors", ".bin", ".pth", ".pt")
    )


def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint cannot be reached right now (DNS / TCP, a few seconds at most)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = (
        url.hostname or "huggingface.co",
        url.port or (443 if url.scheme == "https" else 80),
    )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} is unreachable ({e})"


def resolve_file(
    id_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    required: bool = True,
) -> Path | None:
    """Path of ``filename`` inside a local folder or a Hub repository (downloaded or cached).

    A string that names no folder is tried as a Hub repo id: from the Hub cache first, then -- unless
    ``local_files_only`` or ``HF_HUB_OFFLINE=1`` -- from the Hub, failing within seconds (not after
    retries) when the Hub cannot be reached.

    Args:
        id_or_path: a local directory or a Hub repo id such as ``"CIDAS/clipseg-rd64-refined"``.
        filename: file inside the folder / repository.
        revision, cache_dir, local_files_only, token: as in ``huggingface_hub.hf_hub_download``.
        required: raise when the file does not exist; otherwise return None.

    Raises:
        CheckpointError: ``id_or_path`` is a file, names no folder and is no Hub repo id, the repo
            is not cached while offline, or the Hub is unreachable; or ``filename`` is missing.
    """
    local = Path(id_or_path).expanduser()
    if local.is_dir():
        path = local / filename
        if path.is_file():
            return path
        if required:
            raise CheckpointError(f"{filename} not found in the folder {local}")
        return None
    text = str(id_or_path)
    if local.is_file():
        raise CheckpointError(
            f"{text} is a file; give the folder that holds {filename} (written by save_pretrained)"
        )
    if _looks_like_a_path(text):
        raise CheckpointError(
            f"no such folder: {text} (resolved to {local.resolve()}); a Hub repo id looks like "
            "'org/name'"
        )
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kw = dict(revision=revision, cache_dir=cache_dir, token=token)
    try:
        return Path(hf_hub_download(text, filename, local_files_only=True, **kw))
    except HFValidationError as e:
        raise CheckpointError(
            f"{text} is neither a local folder nor a valid Hub repo id ('org/name'): {e}"
        ) from None
    except (LocalEntryNotFoundError, EntryNotFoundError):
        pass  # not cached: the Hub may have it
    offline = local_files_only or constants.HF_HUB_OFFLINE
    if offline:
        if not required:
            return None
        raise CheckpointError(
            f"{filename} of {text} is not in the Hub cache and downloads are off "
            f"({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'}); "
            f"no local folder {local.resolve()} exists either. Download it once with network "
            "access, point cache_dir= at a warm cache, or give a local folder"
        )
    reason = _hub_unreachable_reason()
    if reason is not None:
        if not required:
            return None
        raise CheckpointError(
            f"cannot fetch {filename} of {text}: the Hub ({reason}); no local folder "
            f"{local.resolve()} exists and the Hub cache has no copy. Give a local folder, or set "
            "HF_HUB_OFFLINE=1 with a warm cache"
        )
    try:
        return Path(hf_hub_download(text, filename, **kw))
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{filename} not found in the Hub repo {text}") from None
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(
            f"no Hub repo {text} (revision {revision or 'main'}), and no local folder of that "
            f"name: {e}"
        ) from None
    except LocalEntryNotFoundError as e:
        if required:
            raise CheckpointError(f"cannot fetch {filename} of {text} from the Hub: {e}") from None
        return None
