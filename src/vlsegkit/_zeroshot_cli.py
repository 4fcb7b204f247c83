"""``vlsegkit zeroshot``: MedCLIP-SAMv2 zero-shot masks for image files (see ``vlsegkit.cli``).

Kept out of ``vlsegkit.cli`` so that module only registers the sub-command; nothing heavy is imported
until the command runs (``vlsegkit zeroshot --help`` needs no torch).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_zeroshot_parser", "cmd_zeroshot"]

_DEFAULT_CLIP = "openai/clip-vit-base-patch16"
_DEFAULT_SAM = "facebook/sam-vit-huge"


def add_zeroshot_parser(sub: Any, *, run: Any) -> argparse.ArgumentParser:
    """Add the ``zeroshot`` sub-command to ``sub`` (``run`` calls :func:`cmd_zeroshot`)."""
    p = sub.add_parser(
        "zeroshot",
        help="MedCLIP-SAMv2 zero-shot masks: M2IB saliency -> coarse mask -> SAM",
        description=(
            "Text-prompted zero-shot segmentation (Koleilat et al., MedCLIP-SAMv2): a CLIP model's "
            "M2IB saliency map of the prompt is post-processed into a coarse mask and box / point "
            "prompts for SAM. Writes, per image, STEM_mask.png (SAM), STEM_coarse.png, "
            "STEM_saliency.png (8-bit) and STEM_overlay.png (image | saliency | coarse + prompts "
            "| SAM), plus zeroshot.json."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG / JPEG files")
    p.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT",
        help="text prompt; repeat it for a prompt ensemble (mean text embedding, the paper's P4-P9)",
    )  # fmt: skip
    p.add_argument("--clip", default=_DEFAULT_CLIP, metavar="ID|DIR",
                   help="transformers CLIP repository or folder, or a vlsegkit dual encoder's "
                        "folder (e.g. 'vlsegkit train dual-encoder-...' output's model/: the "
                        f"paper's DHN-NCE fine-tuned model) (default: {_DEFAULT_CLIP})")  # fmt: skip
    p.add_argument("--sam", default=_DEFAULT_SAM, metavar="ID|DIR",
                   help=f"transformers SAM repository or folder (default: {_DEFAULT_SAM})")  # fmt: skip
    p.add_argument("--out", default="vlsegkit_zeroshot", metavar="DIR", help="output folder")
    m2ib = p.add_argument_group("M2IB saliency")
    m2ib.add_argument("--layer", type=int, default=9, help="vision block of the bottleneck (9)")
    m2ib.add_argument("--beta", type=float, default=0.1, help="compression weight (0.1)")
    m2ib.add_argument("--steps", type=int, default=10, help="Adam steps (10)")
    m2ib.add_argument("--samples", type=int, default=10, help="noise copies per step (10)")
    m2ib.add_argument("--lr", type=float, default=1.0, help="Adam learning rate (1.0)")
    post = p.add_argument_group("post-processing and SAM prompts")
    post.add_argument("--postprocess", choices=("paper", "released"), default="paper",
                      help="paper: Otsu + component confidence; released: 2-means + largest "
                      "components (default: paper)")  # fmt: skip
    post.add_argument("--prompt-type", choices=("boxes", "points", "both"), default="boxes",
                      help="SAM prompts (default: boxes)")  # fmt: skip
    post.add_argument("--confidence", type=float, default=0.5,
                      help="paper: keep components with mean saliency above this (0.5)")  # fmt: skip
    post.add_argument("--num-points", type=int, default=10, help="positive points per prompt (10)")
    post.add_argument("--num-components", type=int, default=1,
                      help="released: components kept (1; 2 for lungs)")  # fmt: skip
    post.add_argument("--multicontour", action="store_true",
                      help="released: one box per component instead of one around all")  # fmt: skip
    run_opts = p.add_argument_group("running")
    run_opts.add_argument("--batch-size", type=int, default=4, help="images per batch (4)")
    run_opts.add_argument("--seed", type=int, default=0, help="seeds the M2IB noise and points")
    run_opts.add_argument("--device", default=None, help="torch device (default: cpu)")
    run_opts.add_argument("--offline", action="store_true",
                          help="resolve Hub ids from the local Hub cache only")  # fmt: skip
    run_opts.add_argument("--revision", default=None, help="Hub revision of --clip")
    run_opts.add_argument("--alpha", type=float, default=0.45, help="overlay opacity (0.45)")
    run_opts.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="progress bar (default: when stderr is a terminal)")  # fmt: skip
    p.set_defaults(_func=run, _parser=p)
    return p


def _check(args: argparse.Namespace, error: type[Exception]) -> None:
    for name, low in (("layer", 0), ("steps", 1), ("samples", 1), ("num_points", 1),
                      ("num_components", 1), ("batch_size", 1)):  # fmt: skip
        if getattr(args, name) < low:
            raise error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name, lo, hi, open_lo in (("beta", 0.0, math.inf, False), ("lr", 0.0, math.inf, True),
                                  ("confidence", 0.0, 1.0, False), ("alpha", 0.0, 1.0, False)):  # fmt: skip
        v = getattr(args, name)
        ok = math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v <= hi)
        if name == "confidence":
            ok = ok and v < 1.0
        if not ok:
            raise error(f"--{name} is out of range, got {v}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise error(f"--out {args.out!r} is an existing file; give a folder")


def cmd_zeroshot(args: argparse.Namespace, *, error: type[Exception], failure: type[Exception]):
    """Run the command; bad arguments raise ``error``, failed work ``failure``."""
    _check(args, error)
    from .cli import _check_device, _read_images, _stems, _write_json

    if args.device is not None:
        _check_device(args.device)
    for flag in ("clip", "sam"):
        where = getattr(args, flag)
        # a path (not an 'org/name' Hub id) that is missing would otherwise be sent to the Hub
        if str(where).startswith((".", "/", "~")) and not Path(where).expanduser().is_dir():
            raise error(f"--{flag}: no such folder {where!r}")
    images = _read_images(args.images)

    import torch

    from . import viz
    from .data.images import to_image_tensor
    from .zeroshot import MedCLIPSAM, SaliencyPrompter

    prompter = SaliencyPrompter(
        mode=args.postprocess, confidence=args.confidence, num_points=args.num_points,
        num_components=args.num_components, multicontour=args.multicontour,
    )  # fmt: skip
    try:
        pipe = MedCLIPSAM.from_pretrained(
            args.clip, args.sam, layer=args.layer, beta=args.beta, steps=args.steps,
            samples=args.samples, lr=args.lr, prompter=prompter, prompt_type=args.prompt_type,
            revision=args.revision, local_files_only=args.offline,
        )  # fmt: skip
    except ValueError as e:
        raise error(str(e)) from e
    except OSError as e:
        raise failure(f"could not load --clip {args.clip!r} / --sam {args.sam!r}: {e}") from e
    if args.device is not None:
        pipe.to(args.device)
    # repeated --prompt is an ensemble for every image: given per image, so it is never read as
    # one prompt per image when there are as many prompts as images
    prompts = args.prompt[0] if len(args.prompt) == 1 else [list(args.prompt)] * len(images)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        results = pipe.segment(
            images, prompts, batch_size=args.batch_size, seed=args.seed, progress=progress
        )
    except ValueError as e:
        raise failure(f"zero-shot segmentation failed: {e}") from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, stem, image, r in zip(args.images, _stems(args.images), images, results):
        rgb = viz.to_rgb_uint8(to_image_tensor(image))
        tile = viz.zeroshot_panel(
            rgb, r.saliency, r.coarse, r.mask, boxes=r.prompts.boxes, points=r.prompts.points,
            point_labels=r.prompts.point_labels, alpha=args.alpha,
        )  # fmt: skip
        saliency8 = (r.saliency.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        record = {
            "image": str(path),
            "prompt": args.prompt,
            "mask": viz.save_image(r.mask.numpy(), out / f"{stem}_mask.png").name,
            "coarse": viz.save_image(r.coarse.numpy(), out / f"{stem}_coarse.png").name,
            "saliency": viz.save_image(saliency8, out / f"{stem}_saliency.png").name,
            "overlay": viz.save_image(tile, out / f"{stem}_overlay.png").name,
            "boxes": r.prompts.boxes.tolist(),
            "confidence": r.prompts.confidence.tolist(),
            "foreground_fraction": float(r.mask.float().mean()),
            "coarse_fraction": float(r.coarse.float().mean()),
        }
        records.append(record)
        print(f"{path}: {100 * record['foreground_fraction']:.1f}% foreground, "
              f"{len(record['boxes'])} box(es) -> {out / record['mask']}")  # fmt: skip
    _write_json(out / "zeroshot.json", records)
    return 0
