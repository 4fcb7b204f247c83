"""The ``vlsegkit`` command line (also ``python -m vlsegkit``).

Commands::

    vlsegkit models [PATTERN] [--pretrained] [--json]
    vlsegkit train MODEL [--data synthetic|PATH] [--epochs N] [--lr LR] ... [--config FILE] [--out DIR]
    vlsegkit evaluate MODEL [--data synthetic|PATH] [--threshold T] [--json FILE|-]
    vlsegkit predict MODEL IMAGE [IMAGE ...] [--prompt TEXT ...] [--out DIR]
    vlsegkit demo [--out DIR] [--epochs N]
    vlsegkit zeroshot IMAGE [IMAGE ...] --prompt TEXT [--clip ID|DIR] [--sam ID|DIR] [--out DIR]

``MODEL`` is a registry name (``vlsegkit models``; random weights unless ``--pretrained``), a folder
written by ``save_pretrained`` (e.g. ``train``'s ``OUT/model``) or a Hub repository id
(``org/name``; ``--offline`` resolves it from the Hub cache only). ``--data synthetic`` uses
``vlsegkit.data.SyntheticLesions``; a path uses ``vlsegkit.data.ImageMaskPromptDataset``.
``train`` and ``evaluate`` also read their options from a JSON (or, with PyYAML, YAML) file given
with ``--config``: keys are the long option names (``batch_size`` or ``batch-size``), plus ``model``
and ``model_kwargs`` (constructor overrides for registry names); options on the command line win.

Exit status: 0 on success, 2 for bad arguments (with a message naming the option), 1 when the work
itself fails (e.g. a corrupt checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .viz import COLORMAPS

__all__ = ["CLIError", "build_parser", "main"]

_SYNTHETIC = "synthetic"
_AUTOCAST = ("none", "bf16", "fp16")
_LN2 = math.log(2.0)


class CLIError(Exception):
    """A bad argument: reported as ``vlsegkit <command>: error: <message>``, exit status 2."""


class _RunError(Exception):
    """The command's work failed (not the user's arguments): exit status 1."""


# --------------------------------------------------------------------------- option tables
@dataclass(frozen=True)
class _Opt:
    """One ``--long-option``: its type drives argparse, config-file validation and the default."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


_MODEL_OPTS = (
    _Opt("pretrained", bool, False, "registry names: load the entry's Hub checkpoint"),
    _Opt("revision", str, None, "Hub revision (branch, tag or commit) of a Hub id"),
    _Opt("offline", bool, False, "resolve Hub ids from the local Hub cache only"),
    _Opt("device", str, None, "torch device, e.g. cpu or cuda:0 (default: cpu)"),
)
_DATA_OPTS = (
    _Opt(
        "data",
        str,
        _SYNTHETIC,
        "'synthetic' (SyntheticLesions) or a dataset folder / JSON file",
        metavar="synthetic|PATH",
    ),
    _Opt("image-size", int, None, "square input size (default: the model's image size)"),
    _Opt("val-size", int, 64, "synthetic validation / evaluation images"),
    _Opt("seed", int, 0, "random seed (synthetic validation data uses seed + 10000)"),
    _Opt("prompt-style", str, "attributes", "synthetic prompts", ("attributes", "class")),
    _Opt("negative-fraction", float, 0.0, "synthetic lesion-free fraction"),
    _Opt("prompt-key", str, "p1", "datasets on disk: prompt key ('p1', ..., or 'random')"),
    _Opt("mask-suffix", str, "", "images/ + masks/ folders: mask name = image stem + suffix"),
    _Opt(
        "mask-threshold",
        float,
        None,
        "datasets on disk: foreground = mask pixel above this value (default: detect the encoding)",
    ),
    _Opt(
        "mask-values",
        str,
        None,
        "datasets on disk: comma-separated pixel values that are foreground, e.g. 255 or 1,2",
        metavar="V[,V...]",
    ),
    _Opt("num-workers", int, 0, "DataLoader worker processes"),
    _Opt("autocast", str, "none", "mixed precision", _AUTOCAST),
    _Opt("progress", bool, None, "progress bars (default: when stderr is a terminal)"),
)
_TRAIN_OPTS = (
    *_MODEL_OPTS,
    *_DATA_OPTS,
    _Opt(
        "val-data",
        str,
        None,
        "validation dataset path (with a dataset path for --data)",
        metavar="PATH",
    ),
    _Opt(
        "val-fraction",
        float,
        0.0,
        "hold out this fraction of a dataset without a validation split (seeded by --seed)",
    ),
    _Opt("train-size", int, 256, "synthetic training images"),
    _Opt("epochs", int, 10, "passes over the training data"),
    _Opt("batch-size", int, 16, "images per batch"),
    _Opt("lr", float, 1e-3, "AdamW learning rate"),
    _Opt("weight-decay", float, 1e-4, "AdamW weight decay"),
    _Opt("grad-accum-steps", int, 1, "batches per optimiser step"),
    _Opt("max-grad-norm", float, None, "clip the gradient norm to this value"),
    _Opt("max-steps", int, None, "stop after this many optimiser steps"),
    _Opt("scheduler", str, "none", "learning-rate schedule", ("none", "cosine", "plateau")),
    _Opt("warmup-steps", int, 0, "optimiser steps of linear warmup (cosine or none)"),
    _Opt("min-lr-ratio", float, 0.0, "floor of the cosine schedule as a fraction of --lr"),
    _Opt(
        "monitor",
        str,
        None,
        "epoch metric picking the best checkpoint (default: val_dice)",
        metavar="METRIC",
    ),
    _Opt(
        "early-stopping",
        int,
        None,
        "stop after this many epochs without --monitor improving",
        metavar="PATIENCE",
    ),
    _Opt("checkpoints", bool, True, "write resumable checkpoints to OUT/checkpoints"),
    _Opt(
        "checkpoint-every",
        int,
        None,
        "also checkpoint every this many optimiser steps",
        metavar="STEPS",
    ),
    _Opt("resume", bool, False, "resume from OUT/checkpoints if a checkpoint is there"),
    _Opt("tensorboard", bool, False, "also log TensorBoard scalars to OUT"),
    _Opt("freeze-backbone", bool, None, "freeze / unfreeze the towers (default: model's own)"),
    _Opt(
        "out",
        str,
        "vlsegkit_run",
        "output folder: model/ (best epoch), last/, training_curves.png, history.json, ...",
        metavar="DIR",
    ),
)
_EVAL_OPTS = (
    *_MODEL_OPTS,
    *_DATA_OPTS,
    _Opt("split", str, "test", "medvlsm dataset roots: annotation split (anns/<split>.json)"),
    _Opt("batch-size", int, 32, "images per batch"),
    _Opt(
        "threshold",
        float,
        None,
        "probability threshold of the predicted mask (default: the model's task, 0.5; CRIS 0.35)",
    ),
    _Opt(
        "json",
        str,
        None,
        "also write the metrics as JSON to this file ('-': stdout only)",
        metavar="FILE",
    ),
)
_PREDICT_OPTS = (
    *_MODEL_OPTS,
    _Opt(
        "out",
        str,
        "vlsegkit_predictions",
        "output folder for the PNGs and predictions.json",
        metavar="DIR",
    ),
    _Opt(
        "threshold",
        float,
        None,
        "probability threshold of the mask (default: the model's task, 0.5; CRIS 0.35)",
    ),
    _Opt("alpha", float, 0.45, "overlay opacity in [0, 1]"),
    _Opt("samples", int, None, "Monte Carlo samples of probabilistic models (default: model's)"),
    _Opt("uncertainty", bool, True, "uncertainty maps for models with predict_with_uncertainty"),
    _Opt("cmap", str, "nipy_spectral", "colour map of the uncertainty maps", COLORMAPS),
    _Opt("seed", int, 0, "random seed (Monte Carlo sampling)"),
    _Opt("progress", bool, None, "a progress bar over the images (default: on a terminal)"),
)
_POSITIVE = {
    "epochs": 0, "batch_size": 1, "grad_accum_steps": 1, "train_size": 1, "val_size": 0,
    "max_steps": 1, "warmup_steps": 0, "early_stopping": 0, "checkpoint_every": 1,
    "num_workers": 0, "samples": 1,
}  # fmt: skip
_INF = math.inf
#: option -> (low, high, low open, high open)
_RANGES = {
    "lr": (0.0, _INF, True, True),
    "weight_decay": (0.0, _INF, False, True),
    "max_grad_norm": (0.0, _INF, True, True),
    "min_lr_ratio": (0.0, 1.0, False, False),
    "negative_fraction": (0.0, 1.0, False, False),
    "threshold": (0.0, 1.0, True, True),
    "mask_threshold": (0.0, _INF, False, True),
    "val_fraction": (0.0, 1.0, False, True),
    "alpha": (0.0, 1.0, False, False),
}


def _add_options(parser: argparse.ArgumentParser, opts: Sequence[_Opt]) -> None:
    # Defaults are SUPPRESSed so the namespace holds only what was typed; config files and the
    # table defaults are merged underneath it in _resolve.
    for o in opts:
        flag = f"--{o.name}"
        shown = "" if o.default in (None, False) else f" (default: {o.default})"
        if o.type is bool:
            action = argparse.BooleanOptionalAction if o.default is not False else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=o.help + shown)
        else:
            parser.add_argument(
                flag,
                type=o.type,
                choices=o.choices,
                default=argparse.SUPPRESS,
                metavar=None if o.choices else (o.metavar or o.name.split("-")[-1].upper()),
                help=o.help + shown,
            )


def _check_value(o: _Opt, value: Any, source: str) -> Any:
    where = f"{source} {o.name!r}"
    if value is None and o.default is None:
        return None
    if o.type is bool:
        ok = isinstance(value, bool)
    elif o.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif o.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise CLIError(f"{where} must be {o.type.__name__}, got {value!r}")
    if o.choices is not None and value not in o.choices:
        raise CLIError(f"{where} must be one of {', '.join(o.choices)}, got {value!r}")
    return value


def _load_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--config: no such file {path!r}")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise CLIError(
                f"--config {path}: YAML files need PyYAML (pip install pyyaml); or write JSON"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"--config {path} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"--config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CLIError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _resolve(args: argparse.Namespace, opts: Sequence[_Opt]) -> argparse.Namespace:
    """Table defaults < ``--config`` file < options typed on the command line."""
    typed = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    config = _load_config(typed.pop("config")) if "config" in typed else {}
    by_dest = {o.dest: o for o in opts}
    known = {*by_dest, "model", "model_kwargs"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CLIError(
            f"--config: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    merged: dict[str, Any] = {o.dest: o.default for o in opts}
    merged.update(model=None, model_kwargs={})
    for key, value in config.items():
        if key == "model":
            if not isinstance(value, str):
                raise CLIError(f"--config 'model' must be a string, got {value!r}")
        elif key == "model_kwargs":
            if not isinstance(value, dict):
                raise CLIError(f"--config 'model_kwargs' must be a mapping, got {value!r}")
        else:
            value = _check_value(by_dest[key], value, "--config")
        merged[key] = value
    merged.update(typed)
    if merged["model"] is None:
        raise CLIError(
            "MODEL is required (a registry name, a folder or a Hub id; or 'model' in --config)"
        )
    for key, low in _POSITIVE.items():
        if merged.get(key) is not None and merged[key] < low:
            raise CLIError(f"--{key.replace('_', '-')} must be >= {low}, got {merged[key]}")
    for key, (low, high, open_low, open_high) in _RANGES.items():
        value = merged.get(key)
        if value is None:
            continue
        ok = math.isfinite(value) and (value > low if open_low else value >= low)
        ok = ok and (value < high if open_high else value <= high)
        if not ok:
            interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            raise CLIError(f"--{key.replace('_', '-')} must be in {interval}, got {value}")
    if merged.get("scheduler") == "plateau" and merged.get("warmup_steps"):
        raise CLIError(
            f"--warmup-steps {merged['warmup_steps']} needs --scheduler cosine or none: "
            "--scheduler plateau has no warmup"
        )
    if merged.get("image_size") is not None and merged["image_size"] < 8:
        raise CLIError(f"--image-size must be >= 8, got {merged['image_size']}")
    if merged.get("device") is not None:
        _check_device(merged["device"])
    out = merged.get("out")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CLIError(f"--out {out!r} is an existing file; give a folder")
    return argparse.Namespace(**merged)


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")


# --------------------------------------------------------------------------- shared helpers
_RUN_FOLDERS = {"model": "the best epoch", "last": "the last epoch"}


def _load_model(opts: argparse.Namespace, *, image_size: int | None = None):
    """Registry name, ``save_pretrained`` folder or Hub id → ``(model, note on its weights)``.

    ``model_kwargs`` (from a config file) go to the registry builder; they are refused for saved,
    Hub and ``--pretrained`` models, whose architecture is fixed. ``image_size`` is the square size
    ``predict`` / the data loaders use: a builder argument for random registry builds, else set on
    the loaded model.
    """
    from .hub import CheckpointError
    from .models.base import VLSM
    from .registry import create_model, list_models, model_entry

    name = opts.model
    overrides = dict(opts.model_kwargs)
    hub = dict(revision=opts.revision, local_files_only=opts.offline)
    local = Path(name)
    registered = name in list_models() and not local.is_dir()
    if overrides and not (registered and not opts.pretrained):
        raise CLIError(
            f"model_kwargs {sorted(overrides)} only apply to registry names built with random "
            f"weights, not to {name!r}"
        )
    if registered and opts.pretrained and model_entry(name).hub_id is None:
        raise CLIError(f"--pretrained: {name!r} has no Hub checkpoint (see 'vlsegkit models')")
    built = registered and not opts.pretrained
    if built and image_size is not None:
        overrides["image_size"] = image_size
    if not registered and not local.is_dir():
        if local.exists():
            raise CLIError(f"MODEL {name!r} is a file; give the folder written by save_pretrained")
        if name.startswith((".", "/", "~")):
            raise CLIError(f"MODEL: no such folder {name!r}")
        if "/" not in name:
            from .registry import _unknown

            raise CLIError(
                f"MODEL: {_unknown('model', name, list_models()).args[0]}; it is not a folder or an "
                "'org/name' Hub id either ('vlsegkit models' lists the names)"
            )
    if local.is_dir() and not (local / "config.json").is_file():
        inside = [d for d in ("model", "last") if (local / d / "config.json").is_file()]
        if inside:
            raise CLIError(
                f"MODEL {name!r} is a 'vlsegkit train' output folder; give the model inside it: "
                + " or ".join(f"{local / d} ({_RUN_FOLDERS[d]})" for d in inside)
            )
    try:
        if local.is_dir():
            model, note = VLSM.from_pretrained(local), f"loaded from {local}"
        elif registered and opts.pretrained:
            model = create_model(name, pretrained=True, **hub)
            note = f"pretrained weights of {model_entry(name).hub_id}"
        elif registered:
            try:
                model, note = create_model(name, **overrides), "random weights"
            except TypeError as e:  # the builder refused an override
                raise CLIError(f"cannot build {name!r} with {overrides}: {e}") from e
        else:
            model, note = VLSM.from_pretrained(name, **hub), f"loaded from the Hub repo {name}"
    except (CheckpointError, OSError, ValueError) as e:
        raise _RunError(f"could not load model {name!r}: {e}") from e
    if image_size is not None and not built:
        model.image_size = (image_size, image_size)
    if opts.device is not None:
        model.to(opts.device)
    return model, note


def _autocast_dtype(name: str):
    import torch

    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _progress(opts: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if opts.progress is None else opts.progress


def _dataset(opts: argparse.Namespace, model, path: str, *, length: int, seed: int, split: str):
    """The dataset ``--data`` / ``--val-data`` names, resized and normalised for ``model``.

    ``'synthetic'``: ``vlsegkit.data.SyntheticLesions`` (``length`` items, ``seed``). A path:
    ``vlsegkit.data.ImageMaskPromptDataset`` read from a medvlsm annotation ``.json`` file, a
    medvlsm / TuneVLSeg root (``anns/<split>.json``) or a plain ``images/`` + ``masks/`` folder.
    """
    norm = dict(mean=model.image_mean, std=model.image_std)
    if path == _SYNTHETIC:
        from .data import SyntheticLesions

        return SyntheticLesions(
            length=length, image_size=model.image_size, seed=seed, prompt_style=opts.prompt_style,
            negative_fraction=opts.negative_fraction, **norm,
        )  # fmt: skip
    root = Path(path)
    if not root.exists():
        raise CLIError(f"--data: no such file or folder {path!r} (or use --data synthetic)")
    try:
        from .data import ImageMaskPromptDataset as Dataset
    except ImportError as e:
        raise CLIError(
            f"--data {path}: datasets on disk need vlsegkit.data.ImageMaskPromptDataset, which this "
            "vlsegkit installation does not provide; use --data synthetic"
        ) from e
    # Seeded: prompt draws of --prompt-key random are a function of (seed, epoch, item); fit calls
    # the training set's set_epoch, so training draws anew every epoch while a validation or
    # evaluation set (seed + 10000, never set_epoch'ed) keeps one draw, comparable across epochs.
    kwargs = dict(image_size=model.image_size, prompt_key=opts.prompt_key, seed=seed, **norm)
    if opts.mask_threshold is not None:
        kwargs["mask_threshold"] = opts.mask_threshold
    if opts.mask_values is not None:
        kwargs["mask_values"] = _mask_values(opts.mask_values)
    try:
        if root.is_file():
            return Dataset.from_json(root, **kwargs)
        if (root / "anns").is_dir():
            return Dataset.from_medvlsm(root, split, **kwargs)
        if (root / "images").is_dir():
            return Dataset.from_folder(root, mask_suffix=opts.mask_suffix, **kwargs)
    except (OSError, ValueError) as e:
        raise CLIError(f"--data {path}: {e}") from e
    raise CLIError(
        f"--data {path}: expected a medvlsm annotation .json file, a folder with "
        "anns/<split>.json (medvlsm / TuneVLSeg layout) or a folder with images/ and masks/"
    )


def _split(dataset, fraction: float, seed: int):
    """A seeded random ``(train, val)`` split of ``dataset`` with ``fraction`` of it for validation."""
    import torch
    from torch.utils.data import Subset

    n = len(dataset)
    n_val = round(n * fraction)
    if n_val < 1 or n_val >= n:
        raise CLIError(
            f"--val-fraction {fraction} of {n} samples leaves no training or no validation sample"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    # A copy for the held-out items: fit's per-epoch set_epoch on the training Subset must not
    # redraw their prompts (with --prompt-key random) between validations.
    return Subset(dataset, order[n_val:]), Subset(copy.copy(dataset), order[:n_val])


def _mask_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise CLIError(f"--mask-values must be comma-separated ints, got {text!r}") from e
    if not values or any(v < 0 for v in values):
        raise CLIError(f"--mask-values must be ints >= 0, got {text!r}")
    return values


def _loader(dataset, opts: argparse.Namespace, *, shuffle: bool):
    import torch
    from torch.utils.data import DataLoader

    from .data import collate_prompts

    return DataLoader(
        dataset, batch_size=opts.batch_size, shuffle=shuffle, collate_fn=collate_prompts,
        num_workers=opts.num_workers, generator=torch.Generator().manual_seed(opts.seed),
    )  # fmt: skip


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _jsonable(opts: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(opts).items() if not k.startswith("_")}


# --------------------------------------------------------------------------- commands
def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import list_models, model_entry

    rows = [model_entry(n) for n in list_models(args.pattern, pretrained=args.pretrained)]
    if args.json:
        print(json.dumps([{"name": e.name, "hub_id": e.hub_id, "description": e.description}
                          for e in rows], indent=2))  # fmt: skip
        return 0
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    table = [("name", "pretrained", "description")] + [
        (e.name, e.hub_id or "-", e.description) for e in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    for r in table:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    return 0


def _cmd_train(opts: argparse.Namespace) -> int:
    from .train import ResumeMismatchError, fit, seed_everything

    seed_everything(opts.seed)
    model, note = _load_model(opts, image_size=opts.image_size)
    if opts.freeze_backbone is not None:
        if not callable(getattr(model, "freeze_backbone", None)):
            raise CLIError(f"--freeze-backbone: {type(model).__name__} has no freeze_backbone()")
        model.freeze_backbone(opts.freeze_backbone)
    train_set = _dataset(
        opts, model, opts.data, length=opts.train_size, seed=opts.seed, split="train"
    )
    val_kw = dict(length=opts.val_size, seed=opts.seed + 10_000, split="val")
    val_path = opts.val_data
    if val_path is None and opts.data == _SYNTHETIC and opts.val_size > 0:
        val_path = _SYNTHETIC
    elif val_path is None and (Path(opts.data) / "anns" / "val.json").is_file():
        val_path = opts.data
    val_set = None if val_path is None else _dataset(opts, model, val_path, **val_kw)
    if opts.val_fraction > 0:
        if val_set is not None:
            raise CLIError(
                "--val-fraction splits a dataset that has no validation set; this one has one "
                f"({val_path})"
            )
        train_set, val_set = _split(train_set, opts.val_fraction, opts.seed)
    if val_set is None:
        print(
            "no validation data: the best epoch is chosen by the training loss "
            "(give --val-data or --val-fraction)"
        )
    n_train = model.num_parameters(trainable_only=True) if hasattr(model, "num_parameters") else 0
    print(
        f"vlsegkit train: {opts.model} ({note}, {n_train / 1e6:.2f}M trainable parameters), "
        f"{len(train_set)} training / {0 if val_set is None else len(val_set)} validation images "
        f"at {model.image_size[0]}x{model.image_size[1]}"
    )

    try:
        history = fit(model, _loader(train_set, opts, shuffle=True), **_fit_options(opts, val_set))
    except ResumeMismatchError as e:
        raise CLIError(_resume_conflict(e, opts)) from e
    except (ValueError, FloatingPointError) as e:
        raise _RunError(f"training failed: {e}") from e
    out = Path(opts.out)
    model.save_pretrained(out / "last")
    best = None
    if opts.checkpoints:
        from ._checkpoint import MODEL_FILE, find_checkpoint
        from .hub import load_checkpoint_file, load_state_dict_strict

        best = find_checkpoint(out / "checkpoints", "best")
        if best is not None:  # OUT/model is the best epoch by the monitored metric
            load_state_dict_strict(model, load_checkpoint_file(best / MODEL_FILE), source=str(best))
    model.save_pretrained(out / "model")
    _write_json(out / "history.json", dataclasses.asdict(history))
    # the options as used: the monitored metric as fit resolved it (None on the command line means
    # its default, val_dice or train_loss)
    used = argparse.Namespace(**{**vars(opts), "monitor": history.monitor or opts.monitor})
    _write_json(out / "train_config.json", _jsonable(used))
    which = (
        f"best epoch {history.best_epoch + 1} by {history.monitor} = {history.best_value:.4f}"
        if best is not None and history.best_epoch is not None
        else "the last epoch"
    )
    print(f"saved the model to {(out / 'model').resolve()} ({which}; {history.steps} steps)")
    print(f"the last epoch's model is in {(out / 'last').resolve()}")
    print(f"training curves: {(out / 'training_curves.png').resolve()}")
    return 0


def _resume_conflict(error: Any, opts: argparse.Namespace) -> str:
    """The CLI's words for a ``ResumeMismatchError``: the options as flags, what to do."""
    flags = {
        "schedule_steps": "--epochs/--max-steps (the length of --scheduler cosine, in steps)",
        "optimizer": "optimizer",
        "shuffle": "shuffle",
    }

    from .train import _MISSING

    def show(name: str, value: Any) -> str:
        if value is _MISSING:  # an option that one of the two runs does not have
            return "(not set)"
        return "none" if name == "scheduler" and value is None else str(value)

    changes = "; ".join(
        f"{flags.get(name, '--' + name.replace('_', '-'))}: {show(name, old)} in the checkpoint's "
        f"run, {show(name, new)} now"
        for name, (old, new) in error.changes.items()
    )
    extend = (
        " To train a --scheduler cosine run longer, start a new run from its weights (MODEL = "
        f"{Path(opts.out) / 'last'}) with a new --out, or use --scheduler none / plateau, whose "
        "runs can be extended with a larger --epochs and --resume."
        if "schedule_steps" in error.changes
        else ""
    )
    return (
        f"--resume: {error.source} was written with other values of options that its saved "
        f"optimiser / scheduler / data state fixes: {changes}. Resume with the checkpoint's "
        f"values, or train into a new --out to use the new ones.{extend}"
    )


def _fit_options(opts: argparse.Namespace, val_set) -> dict[str, Any]:
    """``fit`` keyword arguments from the options (the model's own task: its paper's loss)."""
    from . import train

    out = Path(opts.out)
    wanted: dict[str, Any] = dict(
        val_loader=None if val_set is None else _loader(val_set, opts, shuffle=False),
        epochs=opts.epochs, lr=opts.lr, weight_decay=opts.weight_decay,
        grad_accum_steps=opts.grad_accum_steps, autocast_dtype=_autocast_dtype(opts.autocast),
        max_grad_norm=opts.max_grad_norm, device=opts.device, progress=_progress(opts),
        log_fn=_epoch_printer(opts.epochs), max_steps=opts.max_steps, seed=opts.seed,
        scheduler=None if opts.scheduler == "none" else opts.scheduler,
        warmup_steps=opts.warmup_steps, min_lr_ratio=opts.min_lr_ratio, monitor=opts.monitor,
        checkpoint_dir=out / "checkpoints" if opts.checkpoints else None,
        checkpoint_every=opts.checkpoint_every, resume=opts.resume, log_dir=out,
        tensorboard=opts.tensorboard, curves=out / "training_curves.png",
    )  # fmt: skip
    if opts.early_stopping is not None:
        metric = opts.monitor or ("dice" if val_set is not None else "train_loss")
        wanted["early_stopping"] = train.EarlyStopping(metric=metric, patience=opts.early_stopping)
    if opts.resume and not opts.checkpoints:
        raise CLIError("--resume needs checkpoints (drop --no-checkpoints)")
    return wanted


def _epoch_printer(epochs: int) -> Callable[[dict[str, float]], None]:
    def log(record: dict[str, float]) -> None:
        if "train_loss" not in record:  # per-step records
            return
        terms = "".join(
            f"  {k[6:]} {v:.4f}"
            for k, v in record.items()
            if k.startswith("train_") and k != "train_loss"
        )
        val = "".join(f"  {k[4:]} {record[k]:.4f}" for k in ("val_dice", "val_iou") if k in record)
        print(f"epoch {int(record['epoch']) + 1}/{epochs}: train loss "
              f"{record['train_loss']:.4f}{terms}{val}", flush=True)  # fmt: skip

    return log


def _cmd_evaluate(opts: argparse.Namespace) -> int:
    from .train import evaluate, seed_everything

    seed_everything(opts.seed)
    model, note = _load_model(opts, image_size=opts.image_size)
    if note == "random weights":
        print(f"warning: evaluating {opts.model} with random weights", file=sys.stderr)
    task = _model_task(model, opts)
    threshold = getattr(task, "threshold", None)
    dataset = _dataset(
        opts, model, opts.data, length=opts.val_size, seed=opts.seed + 10_000, split=opts.split
    )
    try:
        metrics = evaluate(
            model, _loader(dataset, opts, shuffle=False), task=task, device=opts.device,
            autocast_dtype=_autocast_dtype(opts.autocast), progress=_progress(opts),
        )  # fmt: skip
    except ValueError as e:
        raise _RunError(f"evaluation failed: {e}") from e
    report = {"model": opts.model, "data": opts.data, "threshold": threshold, **metrics}
    if opts.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in [*rows, ("metric", "")])
    at = "" if threshold is None else f", threshold {threshold}"
    print(f"{opts.model} on {opts.data} ({len(dataset)} images{at})")
    print(f"{'metric':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if opts.json is not None:
        _write_json(Path(opts.json), report)
    return 0


def _model_task(model: Any, opts: argparse.Namespace):
    """The model's own task, with ``--threshold`` if one was given (tasks that binarise only)."""
    from .train import _task_for

    task = _task_for(model, None, None)
    if opts.threshold is None:
        return task
    try:
        return task.with_threshold(opts.threshold)
    except ValueError as e:
        raise CLIError(f"--threshold: {opts.model}: {e}") from e


def _read_images(paths: Sequence[str]) -> list:
    """The image files as PIL images, each checked by ``vlsegkit.data.to_image_tensor`` (16-bit
    files keep their full range: ``predict`` and the datasets convert them the same way)."""
    from PIL import Image, UnidentifiedImageError

    from .data.images import to_image_tensor

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError as e:
            raise CLIError(f"IMAGE: no such file {p!r}") from e
        except (UnidentifiedImageError, IsADirectoryError) as e:
            raise CLIError(f"IMAGE: {p!r} is not an image file (PNG or JPEG expected)") from e
        try:
            to_image_tensor(image)
        except ValueError as e:
            raise CLIError(f"IMAGE {p!r}: {e}") from e
        images.append(image)
    return images


def _stems(paths: Sequence[str]) -> list[str]:
    """File stems, made unique with ``-2``, ``-3`` ... so outputs never overwrite each other."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def _field(result: Any, names: Sequence[str]):
    for name in names:
        value = result.get(name) if isinstance(result, dict) else getattr(result, name, None)
        if value is not None:
            return value
    return None


def _uncertainty_maps(result: Any, n_prompts: int) -> tuple[Any, Any]:
    """``(mean (C, H, W), entropy (C, H, W))`` from a ``predict_with_uncertainty`` result."""
    mean = _field(result, ("mean", "probs", "probabilities"))
    entropy = _field(result, ("entropy", "uncertainty"))
    if mean is None or entropy is None:
        raise _RunError(
            "predict_with_uncertainty must return 'mean' and 'entropy' maps (as keys or attributes),"
            f" got {type(result).__name__}"
        )
    mean, entropy = _chw(mean, "mean", n_prompts), _chw(entropy, "entropy", n_prompts)
    if mean.shape != entropy.shape:
        raise _RunError(f"mean {tuple(mean.shape)} and entropy {tuple(entropy.shape)} differ")
    return mean, entropy


def _chw(x: Any, name: str, n_prompts: int):
    """One image's ``(C, H, W)`` map as a float CPU tensor (a leading batch axis of 1 is dropped)."""
    import torch

    t = torch.as_tensor(x).detach().float().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != n_prompts:
        raise _RunError(f"{name} must be (C={n_prompts}, H, W) for one image, got {tuple(t.shape)}")
    return t


def _predict_maps(model, images: list, prompts: list[str], opts: argparse.Namespace):
    """Per image: ``(probabilities (C, H, W), entropy (C, H, W) or None)`` at the image's size."""
    from .models.capabilities import SupportsTextFree, SupportsUncertainty

    stochastic = isinstance(model, SupportsUncertainty)
    if opts.samples is not None and (not stochastic or not opts.uncertainty):
        why = "it is not probabilistic" if not stochastic else "--no-uncertainty was given"
        raise CLIError(f"--samples: {opts.model} draws no Monte Carlo samples ({why})")
    progress = _progress(opts)
    if isinstance(model, SupportsTextFree):
        probs = model.predict(images, progress=progress)
        return [(_chw(p, "probabilities", p.shape[0]), None) for p in probs]
    if not stochastic or not opts.uncertainty:
        probs = model.predict(images, prompts, progress=progress)
        return [(_chw(p, "probabilities", len(prompts)), None) for p in probs]
    from tqdm.auto import tqdm

    kwargs: dict[str, Any] = {"seed": opts.seed}
    if opts.samples is not None:
        kwargs["samples"] = opts.samples
    # one image per call keeps each image's noise fixed by --seed whatever the other images are
    bar = tqdm(images, unit="image", disable=None if progress is None else not progress)
    return [
        _uncertainty_maps(model.predict_with_uncertainty(im, prompts, **kwargs), len(prompts))
        for im in bar
    ]


def _predict_targets(model: Any, prompts: list[str], opts: argparse.Namespace) -> list:
    """What each output channel answers: the prompts, or ``None`` for a text-free model (which
    segments from the image alone). Refuses models that predict no masks."""
    from .models.capabilities import SupportsRetrieval, SupportsTextFree

    if isinstance(model, SupportsRetrieval):
        raise CLIError(
            f"{opts.model} is a dual encoder: it scores image-text similarity and predicts no "
            "masks; 'vlsegkit zeroshot' segments with CLIP-family towers (M2IB + SAM)"
        )
    if isinstance(model, SupportsTextFree):
        if prompts:
            raise CLIError(
                f"--prompt: {opts.model} segments from the image alone (text conditions its "
                "training only); drop --prompt"
            )
        return [None]
    if not prompts:
        raise CLIError(f"--prompt is required: {opts.model} is text-prompted")
    return prompts


def _channel_masks(probs: Any, prompts: list, threshold: float) -> list[tuple[Any, Any, Any]]:
    """``(prompt, class index or None, probability map, bool mask)`` per output map of one image.

    Sigmoid heads are thresholded per channel; a text-free multi-class head (background + K
    classes, softmax) gives class ``k``'s mask as the pixels whose argmax is ``k``.
    """
    if prompts == [None] and probs.shape[0] > 1:
        label = probs.argmax(0)
        return [(None, k, probs[k], label == k) for k in range(1, probs.shape[0])]
    cls = None if prompts != [None] else 1
    return [(p, cls, probs[k], probs[k] > threshold) for k, p in enumerate(prompts)]


def _cmd_predict(opts: argparse.Namespace) -> int:
    import torch

    from . import viz

    prompts = list(opts.prompt or ())
    images = _read_images(opts.images)
    torch.manual_seed(opts.seed)
    model, note = _load_model(opts)
    prompts = _predict_targets(model, prompts, opts)
    threshold = getattr(_model_task(model, opts), "threshold", 0.5)
    if note == "random weights":
        print(f"warning: predicting with random weights ({opts.model})", file=sys.stderr)
    try:
        maps = _predict_maps(model, images, prompts, opts)
    except ValueError as e:
        raise _RunError(f"prediction failed: {e}") from e
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    from .data.images import to_image_tensor

    for path, stem, image, (probs, entropy) in zip(opts.images, _stems(opts.images), images, maps):
        rgb = (to_image_tensor(image).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        channels = _channel_masks(probs, prompts, threshold)
        for k, (prompt, cls, prob, mask) in enumerate(channels):
            mask = mask.numpy()
            prefix = (
                stem if len(channels) == 1 else f"{stem}_p{k}" if cls is None else f"{stem}_c{cls}"
            )
            record = {
                "image": str(path), "prompt": prompt,
                **({} if cls is None else {"class": cls}),
                "mask": viz.save_image(mask, out / f"{prefix}_mask.png").name,
                "overlay": viz.save_image(
                    viz.overlay_mask(rgb, mask, alpha=opts.alpha), out / f"{prefix}_overlay.png"
                ).name,
                "foreground_fraction": float(mask.mean()),
                "mean_probability": float(prob.mean()),
            }  # fmt: skip
            if entropy is not None:
                # A fixed [0, ln 2] scale (binary entropy's range) keeps maps comparable.
                heat = viz.apply_colormap(entropy[k], cmap=opts.cmap, vmin=0.0, vmax=_LN2)
                record["uncertainty"] = viz.save_image(heat, out / f"{prefix}_uncertainty.png").name
                record["mean_entropy"] = float(entropy[k].mean())
            records.append(record)
            what = repr(prompt) if cls is None else f"class {cls} (text-free)"
            print(f"{path} | {what}: {100 * record['foreground_fraction']:.1f}% foreground "
                  f"-> {out / record['mask']}")  # fmt: skip
    _write_json(out / "predictions.json", records)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for name in ("epochs", "image_size", "train_size", "val_size", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size % 8:  # clipseg-tiny's patch size
        raise CLIError(
            f"--image-size must be a multiple of 8 (the patch size), got {args.image_size}"
        )
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is an existing file; give a folder")
    run_demo(
        args.out, epochs=args.epochs, image_size=args.image_size, seed=args.seed,
        train_size=args.train_size, val_size=args.val_size, batch_size=args.batch_size,
        progress=args.progress, uncertainty=args.uncertainty,
    )  # fmt: skip
    return 0


# --------------------------------------------------------------------------- parser
def _with_options(
    func: Callable[[argparse.Namespace], int], opts: Sequence[_Opt]
) -> Callable[[argparse.Namespace], int]:
    return lambda args: func(_resolve(args, opts))


def build_parser() -> argparse.ArgumentParser:
    """The ``vlsegkit`` argument parser (one sub-parser per command)."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="vlsegkit",
        description="Text-driven (vision-language) medical image segmentation.",
        epilog="Run 'vlsegkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vlsegkit {__version__}")
    sub = parser.add_subparsers(dest="_command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the registered model configurations")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'clipseg*'")
    p.add_argument("--pretrained", action="store_true", help="only names with Hub weights")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(_func=_cmd_models, _parser=p)

    model_help = "registry name, save_pretrained folder or Hub repo id"
    p = sub.add_parser("train", help="train or fine-tune a model")
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, help=model_help)
    p.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE", help="JSON / YAML file of options"
    )
    _add_options(p, _TRAIN_OPTS)
    p.set_defaults(_func=_with_options(_cmd_train, _TRAIN_OPTS), _parser=p)

    p = sub.add_parser("evaluate", help="Dice / IoU / loss of a model on a dataset")
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, help=model_help)
    p.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE", help="JSON / YAML file of options"
    )
    _add_options(p, _EVAL_OPTS)
    p.set_defaults(_func=_with_options(_cmd_evaluate, _EVAL_OPTS), _parser=p)

    p = sub.add_parser("predict", help="mask, overlay (and uncertainty) PNGs for image files")
    p.add_argument("model", help=model_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG / JPEG files")
    p.add_argument(
        "--prompt", action="append", default=None, metavar="TEXT",
        help="text prompt; repeat for several prompts per image (text-prompted models; "
        "text-free models such as CoTexNet take none)",
    )  # fmt: skip
    _add_options(p, _PREDICT_OPTS)
    p.set_defaults(_func=_with_options(_cmd_predict, _PREDICT_OPTS), _parser=p)

    p = sub.add_parser(
        "demo", help="train clipseg-tiny on synthetic lesions, write an overlay sheet and curves"
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    for name, default, what in (
        ("epochs", 14, "passes over the training images"),
        ("image-size", 128, "side of the square synthetic images, a multiple of 8"),
        ("seed", 0, "seed of the images, the initialisation and the batch order"),
        ("train-size", 512, "number of synthetic training images"),
        ("val-size", 64, "number of synthetic validation images (metrics and the sheet)"),
        ("batch-size", 16, "images per optimisation step"),
    ):
        p.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default: {default})")
    p.add_argument("--progress", action="store_true", help="per-step progress bars")
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also train medclipseg-tiny briefly and draw its uncertainty maps",
    )
    p.set_defaults(_func=_cmd_demo, _parser=p)

    # MedCLIP-SAMv2 zero-shot masks (implemented in vlsegkit._zeroshot_cli)
    from ._zeroshot_cli import add_zeroshot_parser, cmd_zeroshot

    add_zeroshot_parser(sub, run=lambda args: cmd_zeroshot(args, error=CLIError, failure=_RunError))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Args:
        argv: arguments without the program name, e.g. ``["models", "--json"]``.

    Returns:
        0 on success, 1 when the work failed, 2 for bad arguments (argparse's own errors exit with
        ``SystemExit(2)`` after printing the usage).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = args._parser.prog
    try:
        return args._func(args)
    except CLIError as e:
        print(f"{prog}: error: {e}\n(see '{prog} --help')", file=sys.stderr)
        return 2
    except _RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
