"""Checkpoint files: resolving Hub ids or folders, safe loading, strict state dicts, atomic writes.

Everything here reads through ``huggingface_hub`` (so the Hub cache, ``HF_HUB_OFFLINE`` and
``local_files_only`` behave as users expect) and ``safetensors``. Pickle checkpoints are only read with
``torch.load(weights_only=True)``. Files are written to a temporary name and renamed into place, so an
interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_state_dict",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "read_json",
    "resolve_file",
    "save_safetensors",
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


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a ``.safetensors`` file, or a pickle through ``torch.load(weights_only=True)``.

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
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for corrupt pickles
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat mapping of names to tensors")
    return obj


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = ""
):
    """Load ``state_dict`` into ``module``, failing on any missing/unexpected key or shape mismatch.

    Everything is checked (:func:`check_state_dict`) before the first tensor is copied, so a failed
    load leaves the module untouched. The error message names every offending key (up to 20 of each
    kind) and the checkpoint source.
    """
    check_state_dict(module, state_dict, source=source)
    module.load_state_dict(state_dict, strict=True)


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
    wrong_dtype = [
        f"{k} ({state_dict[k].dtype} for {own[k].dtype})"
        for k in own
        if own[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    non_finite = [
        k
        for k in own
        if state_dict[k].is_floating_point() and not bool(torch.isfinite(state_dict[k]).all())
    ]
    for label, items in (("integer tensors for floating-point weights", wrong_dtype),
                         ("non-finite values (NaN / inf)", non_finite)):  # fmt: skip
        if items:
            where = f" from {source}" if source else ""
            shown = ", ".join(items[:10]) + (
                f", ... ({len(items)} in all)" if len(items) > 10 else ""
            )
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
