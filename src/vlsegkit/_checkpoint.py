"""Training checkpoints on disk: crash-safe writes, verified reads, and RNG state capture.

Layout of ``checkpoint_dir``::

    last.json                       {"checkpoint": "last-step00000012-3fa2c1", "step": 12, ...}
    best.json                       the same for the best epoch so far
    last-step00000012-3fa2c1/
        model.safetensors           the model's state dict
        trainer_state.pt            optimiser, scheduler, scaler, RNG, data position, history
        manifest.json               format tag and the sha256 of both files

A checkpoint folder is written under a temporary name and renamed into place only once complete,
then the small pointer file is replaced atomically (``vlsegkit.hub.write_json``), and only then is
the previous folder deleted. Whenever the process dies, the pointer names a complete folder. Reads
verify both hashes before anything is deserialised, and ``trainer_state.pt`` is read with
``torch.load(weights_only=True)``, so a truncated, corrupted or tampered checkpoint raises
``CheckpointError`` instead of being loaded.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .hub import (
    CheckpointError,
    atomic_write,
    load_checkpoint_file,
    read_json,
    save_safetensors,
    write_json,
)

__all__ = [
    "KINDS",
    "capture_rng",
    "find_checkpoint",
    "read_checkpoint",
    "remove_stale",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "vlsegkit-training-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
KINDS = ("last", "best")
_TMP_PREFIX = ".tmp-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def save_checkpoint(
    root: str | os.PathLike,
    kind: str,
    *,
    model_state: Mapping[str, Tensor],
    trainer_state: dict[str, Any],
    info: dict[str, Any],
    model_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write one complete checkpoint folder under ``root`` and point ``{kind}.json`` at it.

    Args:
        root: the checkpoint directory (created if needed).
        kind: ``"last"`` or ``"best"``.
        model_state: the model's state dict (saved as safetensors).
        trainer_state: everything else; must only hold tensors and plain Python containers and
            scalars, so that ``torch.load(weights_only=True)`` can read it back.
        info: small JSON-serialisable facts (``step``, ``epoch``, ...) copied into the manifest and
            the pointer file; ``info["step"]`` names the folder.
        model_config: a vlsegkit model's ``config.json`` content; written next to the weights so
            the folder also loads with ``VLSM.from_pretrained``.

    Returns:
        The new checkpoint folder.
    """
    _check_kind(kind)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    previous = _pointed_name(root, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{kind}-", dir=root))
    try:
        save_safetensors(model_state, tmp / MODEL_FILE, metadata={"format": FORMAT})
        if model_config is not None:
            write_json(tmp / "config.json", model_config)
        atomic_write(tmp / STATE_FILE, lambda p: torch.save(trainer_state, p))
        hashes = {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        manifest = {"format": FORMAT, "version": VERSION, "kind": kind, **info, "sha256": hashes}
        write_json(tmp / MANIFEST_FILE, manifest)
        final = root / f"{kind}-step{int(info['step']):08d}-{secrets.token_hex(3)}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(root / f"{kind}.json", {"checkpoint": final.name, **info})
    if previous is not None and previous != final.name:
        shutil.rmtree(root / previous, ignore_errors=True)
    return final


def remove_stale(root: str | os.PathLike) -> None:
    """Delete temporary folders left by writes that were killed (call on the writing rank only)."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def _pointed_name(root: Path, kind: str) -> str | None:
    try:
        name = read_json(root / f"{kind}.json").get("checkpoint")
    except (OSError, CheckpointError):
        return None
    return name if isinstance(name, str) else None


def find_checkpoint(checkpoint_dir: str | os.PathLike, which: str = "last") -> Path | None:
    """The folder of the ``"last"`` or ``"best"`` checkpoint that ``fit`` wrote to ``checkpoint_dir``.

    Args:
        checkpoint_dir: the ``checkpoint_dir`` given to ``vlsegkit.train.fit``.
        which: ``"last"`` (most recent, used by ``resume=True``) or ``"best"`` (best monitored
            epoch).

    Returns:
        The checkpoint folder (holding ``model.safetensors``), or None when none was written yet.

    Raises:
        CheckpointError: the pointer file ``{which}.json`` is unreadable or names a missing folder.
    """
    _check_kind(which)
    root = Path(checkpoint_dir)
    pointer = root / f"{which}.json"
    if not pointer.is_file():
        return None
    name = read_json(pointer).get("checkpoint")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith(which):
        raise CheckpointError(f"{pointer} does not name a checkpoint folder: {name!r}")
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which does not exist in {root}")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verify and load a training checkpoint written by ``vlsegkit.train.fit``.

    Both files are checked against the sha256 recorded in ``manifest.json`` before being
    deserialised; the trainer state is read with ``torch.load(weights_only=True)``.

    Args:
        path: a checkpoint folder, or a ``checkpoint_dir`` (its ``"last"`` checkpoint is read).

    Returns:
        ``(model_state_dict, trainer_state)``; load the first into a model with
        ``vlsegkit.hub.load_state_dict_strict``.

    Raises:
        CheckpointError: no checkpoint at ``path``, or it is incomplete, corrupt or not readable
            with ``weights_only=True``.
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        folder = path
    else:
        found = find_checkpoint(path, "last") if path.is_dir() else None
        if found is None:
            raise CheckpointError(
                f"no training checkpoint at {path} (expected a folder with {MANIFEST_FILE}, or a "
                "checkpoint_dir with last.json)"
            )
        folder = found
    manifest = read_json(folder / MANIFEST_FILE) if (folder / MANIFEST_FILE).is_file() else {}
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{folder} is not a {FORMAT} version {VERSION} checkpoint (manifest: "
            f"format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    hashes = manifest.get("sha256")
    for name in (MODEL_FILE, STATE_FILE):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"incomplete checkpoint {folder}: {name} is missing")
        expected = hashes.get(name) if isinstance(hashes, dict) else None
        if expected != _sha256(file):
            raise CheckpointError(
                f"corrupt checkpoint {folder}: the sha256 of {name} does not match its manifest"
            )
    model_state = load_checkpoint_file(folder / MODEL_FILE)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for corrupt or unsafe pickles
        raise CheckpointError(
            f"{folder / STATE_FILE} could not be loaded with weights_only=True: {e}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / STATE_FILE} must hold a dict, found {type(state)}")
    return model_state, state


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states, as ``weights_only``-loadable objects."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
