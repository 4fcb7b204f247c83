"""Loading benchmark: peak memory and time of ``from_pretrained`` against the reference loaders.

Writes full-size checkpoints with RANDOM weights, offline (nothing is downloaded), then loads each one
in fresh subprocesses, one per cell, with the cells interleaved over ``--repeats`` rounds so machine
load affects them alike:

* ``clipseg-hf`` -- a transformers ``CLIPSegForImageSegmentation`` folder with the
  ``CIDAS/clipseg-rd64-refined`` architecture (transformers' ``CLIPSegConfig`` defaults plus that
  checkpoint's settings: ViT-B/16, ``reduce_dim=64``, ``use_complex_transposed_convolution=True``, CLIP
  token ids bos 0 / eos 2 / pad 1; 150.7M parameters), loaded by

  - ``vlsegkit``: ``vlsegkit.VLSM.from_pretrained(folder)`` (converted on load);
  - ``transformers``: ``transformers.CLIPSegForImageSegmentation.from_pretrained(folder)`` -- the target;
  - ``copy``: what vlsegkit did before (build with random weights, read the file, copy it in).

* ``clipseg-vlsegkit`` -- the same model saved by vlsegkit (``model.safetensors`` + ``config.json``):
  ``vlsegkit`` against ``reference`` (the plain PyTorch recipe: build the model, ``safetensors``
  ``load_file``, ``load_state_dict``).

* ``medclipseg-released`` -- a MedCLIPSeg checkpoint in the released layout
  (``{"model": CustomCLIP.state_dict(), "epoch", "optimizer", "scheduler", "best_loss"}`` with the
  official key names, UniMedCLIP ViT-B/16 + BiomedBERT towers, 10 PVL adapters, Adam moments of the
  trainable part: 215M parameters): ``MedCLIPSeg.from_released`` against ``reference``
  (``torch.load(weights_only=True)``, build, rename the keys, ``load_state_dict``).

Each cell reports the process's peak resident set (``VmHWM``: the interpreter, the imports and
the load) and its growth during the load call, the time of the load call alone (each library's model
classes and backend imported before it) and of the whole process (interpreter start, imports, load),
and, after reading every weight once (``sum`` over all parameters and buffers), the peak resident set
again: ``from_pretrained`` in both vlsegkit and transformers maps the file and reads a weight's pages
when it is first used, so the second figure shows that both end up with one copy. Times are the best
of the repeats, memory the median. The ``import`` rows give the cost of ``import torch`` and ``import
vlsegkit`` alone (``benchmarks/import_time.py`` times the imports in detail).

Usage::

    python benchmarks/load.py [--repeats 3] [--dir DIR] [--threads 2] [--small]

``--dir`` keeps the checkpoints (written once, reused by later runs); without it they go to a
temporary folder that is deleted at the end. ``--small`` uses tiny models (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CELLS = (
    ("import", "torch"),
    ("import", "vlsegkit"),
    ("clipseg-hf", "vlsegkit"),
    ("clipseg-hf", "transformers"),
    ("clipseg-hf", "copy"),
    ("clipseg-vlsegkit", "vlsegkit"),
    ("clipseg-vlsegkit", "reference"),
    ("medclipseg-released", "vlsegkit"),
    ("medclipseg-released", "reference"),
)
RELEASED_FILE = "MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
GIB = 1024**3


# ---------------------------------------------------------------------------- checkpoints
def hf_clipseg_config(small: bool = False):
    """transformers' ``CLIPSegConfig`` of ``CIDAS/clipseg-rd64-refined`` (or a tiny one)."""
    from transformers import CLIPSegConfig

    # the CIDAS checkpoints use the original CLIP token ids and ViT-B/16; the rest are defaults
    text = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(patch_size=16)
    extra = {}
    if small:
        text.update(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, image_size=64)  # fmt: skip
        extra = dict(projection_dim=24, extract_layers=[1, 2, 3], decoder_num_attention_heads=2,
                     decoder_intermediate_size=48)  # fmt: skip
    return CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        reduce_dim=16 if small else 64,
        use_complex_transposed_convolution=True,
        **extra,
    )


def medclipseg_config(small: bool = False) -> dict:
    """``MedCLIPSeg.released_config`` without a tokenizer download (or a tiny variant)."""
    from vlsegkit import MedCLIPSeg

    if not small:
        return MedCLIPSeg.released_config(tokenizer=None)
    backbone = {
        "kind": "open_clip", "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4,
                       "head_width": 16},
        "bert_config": {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 4,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 32},
        "text_proj": "mlp", "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip
    return MedCLIPSeg.released_config(
        backbone=backbone, layers=[1, 2], adapter_dim=8, context_length=24, image_size=[32, 32],
        tokenizer=None,
    )  # fmt: skip


def to_released_layout(state: dict) -> dict:
    """vlsegkit MedCLIPSeg keys -> the official ``CustomCLIP`` keys (the inverse of
    ``RELEASED_KEY_MAP``; ``tests/test_medclipseg.py`` pins the map to the official module
    structure), plus the ``logit_scale`` every released file carries."""
    import re

    import torch

    from vlsegkit.models.medclipseg_released import RELEASED_KEY_MAP

    out = {}
    for key, value in state.items():
        for released, ours in RELEASED_KEY_MAP.items():
            if key.startswith(ours):
                key = released + key[len(ours) :]
                break
        out[re.sub(r"^(pvl_adapters\.\d+\.proj_vis_down)\.", r"\1.0.", key)] = value
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def prepare(root: Path, *, small: bool = False) -> dict[str, Path]:
    """Write the three checkpoints under ``root`` (kept if already there); return their paths."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "clipseg-hf": root / "clipseg-hf",
        "clipseg-vlsegkit": root / "clipseg-vlsegkit",
        "medclipseg-released": root / "medclipseg-released" / RELEASED_FILE,
    }
    if not (paths["clipseg-hf"] / "model.safetensors").is_file():
        from transformers import CLIPSegForImageSegmentation

        torch.manual_seed(0)
        hf = CLIPSegForImageSegmentation(hf_clipseg_config(small))
        with torch.no_grad():  # random biases / norms too, so nothing sits at a trivial value
            for p in hf.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        hf.save_pretrained(paths["clipseg-hf"])
        del hf
    if not (paths["clipseg-vlsegkit"] / "model.safetensors").is_file():
        from vlsegkit import VLSM

        VLSM.from_pretrained(paths["clipseg-hf"]).save_pretrained(paths["clipseg-vlsegkit"])
    if not paths["medclipseg-released"].is_file():
        from vlsegkit import MedCLIPSeg

        torch.manual_seed(1)
        model = MedCLIPSeg(**medclipseg_config(small))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() <= 1:
                    p.add_(0.1 * torch.randn_like(p))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = {  # Adam moments of the trainable part, as the official train.py saves them
            "state": {
                i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p) * 1e-3,
                    "exp_avg_sq": torch.rand_like(p) * 1e-6}
                for i, p in enumerate(trainable)
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": 0.0, "params": list(range(len(trainable)))}],
        }  # fmt: skip
        paths["medclipseg-released"].parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": to_released_layout(model.state_dict()),
                "epoch": 100,
                "optimizer": optimizer,
                "scheduler": {"T_max": 100, "eta_min": 1e-6, "last_epoch": 100},
                "best_loss": 0.25,
            },
            paths["medclipseg-released"],
        )
        del model, optimizer
    return paths


# ---------------------------------------------------------------------------- one cell
def load(family: str, loader: str, path: Path, *, small: bool = False):
    """Load checkpoint ``path`` of ``family`` with ``loader``; returns the model (None: import)."""
    import torch

    if family == "import":
        if loader == "vlsegkit":
            import vlsegkit

            vlsegkit.VLSM  # noqa: B018 - the lazy package's model base class
        return None
    if loader == "transformers":
        from transformers import CLIPSegForImageSegmentation

        return CLIPSegForImageSegmentation.from_pretrained(path)
    if family == "medclipseg-released":
        from vlsegkit import MedCLIPSeg

        config = medclipseg_config(small)
        if loader == "vlsegkit":
            return MedCLIPSeg.from_released(path, config=config)
        from vlsegkit.models.medclipseg_released import convert_released_state_dict

        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        model = MedCLIPSeg(**config)
        model.load_state_dict(convert_released_state_dict(state), strict=True)
        return model.eval()
    from vlsegkit import VLSM

    if loader == "vlsegkit":
        return VLSM.from_pretrained(path)
    from safetensors.torch import load_file

    if family == "clipseg-vlsegkit":  # the plain recipe: build, read, load_state_dict
        config = json.loads((path / "config.json").read_text())
        model = VLSM.from_config(config)
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        return model.eval()
    # "copy": vlsegkit's loading before one-copy loading -- the model built with random weights,
    # the transformers state dict read, renamed and copied in (strict checks included)
    from vlsegkit.encoders.factory import TransformersCLIPSpec
    from vlsegkit.hub import load_state_dict_strict
    from vlsegkit.models.clipseg import CLIPSeg

    config = json.loads((path / "config.json").read_text())
    model = CLIPSeg(
        backbone=TransformersCLIPSpec.from_hf_config(config).to_dict(),
        extract_layers=tuple(config["extract_layers"]),
        reduce_dim=config["reduce_dim"],
        decoder_num_heads=config["decoder_num_attention_heads"],
        decoder_mlp_dim=config["decoder_intermediate_size"],
        conditional_layer=config["conditional_layer"],
        complex_upsampler=config["use_complex_transposed_convolution"],
    )
    state = model.convert_hf_state_dict(load_file(path / "model.safetensors"))
    load_state_dict_strict(model, state, source=str(path))
    return model.eval()


# Imported before the load call is timed (the process column includes them): each library's model
# classes and the backend they are built on -- transformers' CLIPSeg module, whose class the
# transformers cell imports too; open_clip and transformers' BERT for MedCLIPSeg. vlsegkit imports its
# backends lazily, on first use.
_CLIPSEG_BACKEND = "transformers.models.clipseg.modeling_clipseg"
_VLSEGKIT = ("vlsegkit", "vlsegkit.models")
_MEDCLIPSEG_BACKEND = ("open_clip", "transformers.models.bert.modeling_bert")
_PRE_IMPORTS = {
    ("clipseg-hf", "transformers"): (_CLIPSEG_BACKEND,),
    **{(f, how): (*_VLSEGKIT, _CLIPSEG_BACKEND) for f in ("clipseg-hf", "clipseg-vlsegkit")
       for how in ("vlsegkit", "copy", "reference")},
    **{("medclipseg-released", how): (*_VLSEGKIT, *_MEDCLIPSEG_BACKEND)
       for how in ("vlsegkit", "reference")},
}  # fmt: skip


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` (Linux; ``ru_maxrss`` would also count
    the pages of the parent that forked it) or ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(family: str, loader: str, path: str, threads: int, small: bool) -> None:
    import importlib

    start = float(os.environ["LOAD_BENCH_START"])
    import torch

    torch.set_num_threads(threads)
    for module in _PRE_IMPORTS.get((family, loader), ()):
        importlib.import_module(module)
    imported = time.perf_counter()
    rss_imported = peak_rss()
    model = load(family, loader, Path(path), small=small)
    loaded = time.perf_counter()
    peak = peak_rss()
    touched = peak
    if model is not None:
        with torch.no_grad():  # read every weight once: the pages of a mapped file come in here
            total = sum(float(t.float().sum()) for t in model.state_dict().values())
        touched = peak_rss()
        assert total == total, "NaN in the loaded weights"
    print(
        json.dumps(
            {
                "import_s": imported - start,
                "load_s": loaded - imported,
                "process_s": loaded - start,
                "peak": peak,
                "peak_after_import": rss_imported,
                "peak_touched": touched,
                "parameters": 0 if model is None else sum(p.numel() for p in model.parameters()),
            }
        )
    )


def _run_cell(family: str, loader: str, path: Path, threads: int, small: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", family, loader, str(path), str(threads)]
    cmd += ["--small"] if small else []
    start = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable across processes
    env = dict(os.environ, LOAD_BENCH_START=repr(start))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{family}/{loader} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- report
def _summary(runs: list[dict]) -> dict:
    best = {k: min(r[k] for r in runs) for k in ("import_s", "load_s", "process_s", "wall_s")}
    median = {
        k: statistics.median(r[k] for r in runs)
        for k in ("peak", "peak_after_import", "peak_touched")
    }
    return {**best, **median, "parameters": runs[0]["parameters"]}


def report(results: dict[tuple[str, str], dict]) -> dict[str, float]:
    print(
        f"{'checkpoint':<20} {'loader':<13} {'params':>8} {'peak RSS':>9} {'growth':>8} "
        f"{'import':>7} {'load':>7} {'process':>8} {'touched':>8}"
    )
    for (family, loader), r in results.items():
        params = f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "-"
        growth = (r["peak"] - r["peak_after_import"]) / 2**20
        print(
            f"{family:<20} {loader:<13} {params:>8} {r['peak'] / GIB:7.2f} G {growth:6.0f} M "
            f"{r['import_s']:6.2f}s {r['load_s']:6.2f}s {r['process_s']:7.2f}s "
            f"{r['peak_touched'] / GIB:6.2f} G"
        )
    ratios: dict[str, float] = {}
    print("\nratios vlsegkit / reference (target: peak RSS <= 1.0x, load time <= 1.0x)")
    for family, reference in (
        ("clipseg-hf", "transformers"),
        ("clipseg-hf", "copy"),
        ("clipseg-vlsegkit", "reference"),
        ("medclipseg-released", "reference"),
    ):
        ours, ref = results.get((family, "vlsegkit")), results.get((family, reference))
        if ours is None or ref is None:
            continue
        line = []
        for label, key in (
            ("peak RSS", "peak"),
            ("load", "load_s"),
            ("process", "process_s"),
            ("touched", "peak_touched"),
        ):
            ratios[f"{family}/{reference}/{key}"] = ours[key] / ref[key]
            line.append(f"{label} {ours[key] / ref[key]:.2f}x")
        print(f"  {family + ' vs ' + reference:<38} " + ", ".join(line))
    return ratios


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoints here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny models (smoke run)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, loader, path, threads = args.worker
        _worker(family, loader, path, int(threads), args.small)
        return {}
    root = args.dir or Path(tempfile.mkdtemp(prefix="vlsegkit-load-bench-"))
    try:
        start = time.perf_counter()
        paths = prepare(root, small=args.small)
        print(f"checkpoints in {root} ({time.perf_counter() - start:.0f} s to write)")
        for name, path in paths.items():
            p = Path(path)  # a checkpoint folder, or a single .pth file
            size = sum(
                f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()
            )
            print(f"  {name}: {size / GIB:.2f} GiB")
        runs: dict[tuple[str, str], list[dict]] = {cell: [] for cell in CELLS}
        for r in range(args.repeats):
            for family, loader in CELLS:
                path = paths.get(family, root)
                runs[(family, loader)].append(
                    _run_cell(family, loader, path, args.threads, args.small)
                )
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        print()
        return report({cell: _summary(r) for cell, r in runs.items()})
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
