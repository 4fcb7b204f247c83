"""Regenerate the pictures in ``docs/images/`` from synthetic data, so that they stay true.

Everything runs offline on a CPU in a minute or two:

1. ``clipseg-tiny`` (random weights, 64 px) is trained for a few epochs with ``vlsegkit.train.fit`` on
   ``SyntheticLesions``; ``fit`` writes ``metrics.jsonl`` and ``plot_training_curves`` draws it
   (``training_curves.png``).
2. Its validation predictions go through ``overlay_sheet``, which picks the best, median and worst
   examples by per-image Dice (``overlay_sheet.png``).
3. ``medclipseg-tiny`` is trained briefly with its paper loss and ``predict_with_uncertainty``'s
   maps for one held-out image go through ``uncertainty_sheet`` (``uncertainty_sheet.png``).
4. With matplotlib installed (``vlsegkit[viz]``), the reliability diagram of step 2's predictions
   (``reliability.png``); without it, one line says it was skipped.
5. ``cotexnet-tiny`` is trained with its paper task on ``SyntheticLesions`` whose prompts come from
   the default attribute extractor; its training curves (``cotexnet_training_curves.png``) and,
   for held-out images, the prediction conditioned on the real text (with the ROI tokens of the
   ground truth) next to the text-free one from the image alone (``cotexnet_text_vs_textfree.png``).

The models are tiny and briefly trained: the pictures show what the functions draw, not what a real
model achieves. PNGs are written with Pillow's ``optimize`` so the committed files stay small.

Run from the repository root: ``python docs/make_figures.py`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

import vlsegkit
from vlsegkit import viz
from vlsegkit.data import CachedDataset, ConceptualPrompts, SyntheticLesions, collate_prompts
from vlsegkit.train import evaluate, fit, seed_everything

HERE = Path(__file__).resolve().parent


def _optimize_png(path: Path) -> Path:
    """Re-save a PNG with zlib's best effort (same pixels, smaller file)."""
    with Image.open(path) as img:
        img.load()
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, optimize=True)
    tmp.replace(path)
    return path


def segmentation_figures(out: Path, *, epochs: int, image_size: int, seed: int) -> list[Path]:
    """Train clipseg-tiny briefly; write its training curves, overlay sheet and reliability."""
    seed_everything(seed)
    model = vlsegkit.create_model("clipseg-tiny", image_size=image_size, freeze_backbone=False)
    norm = {"mean": model.image_mean, "std": model.image_std}
    train = CachedDataset(SyntheticLesions(length=192, image_size=image_size, seed=seed, **norm))
    val_kw = {"length": 33, "image_size": image_size, "seed": seed + 10_000}
    val = CachedDataset(SyntheticLesions(**val_kw, **norm))
    raw = SyntheticLesions(**val_kw)  # the same images in [0, 1], for drawing

    paths = []
    with tempfile.TemporaryDirectory() as log_dir:
        fit(
            model, train, val_loader=val, epochs=epochs, lr=3e-3, batch_size=16,
            scheduler="cosine", log_dir=log_dir, progress=False, seed=seed,
        )  # fmt: skip
        paths.append(
            viz.plot_training_curves(
                Path(log_dir) / "metrics.jsonl",
                out / "training_curves.png",
                title=f"clipseg-tiny on SyntheticLesions ({image_size} px), {epochs} epochs",
            )
        )

    model.eval()
    batch = collate_prompts(val.items)
    with torch.no_grad():
        probs = model(batch["image"], batch["prompt"]).logits.sigmoid()
    masks = batch["mask"]
    images = [raw[i]["image"] for i in range(len(raw))]
    paths.append(
        viz.save_overlay_sheet(
            out / "overlay_sheet.png", images, masks, probs, batch["prompt"], n=5, tile=192
        )
    )
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        reliability = viz.save_reliability_diagram(
            probs, masks, out / "reliability.png", title="clipseg-tiny, validation pixels"
        )
    for warning in skipped:  # no matplotlib: say so in one line and go on
        print(warning.message)
    if reliability is not None:
        paths.append(reliability)
    return paths


def uncertainty_figure(out: Path, *, steps: int, image_size: int, seed: int) -> Path:
    """Train medclipseg-tiny briefly and draw the MC uncertainty maps of one held-out image."""
    seed_everything(seed)
    model = vlsegkit.create_model("medclipseg-tiny", image_size=image_size)
    train = SyntheticLesions(
        length=64, image_size=image_size, seed=seed, mean=model.image_mean, std=model.image_std
    )
    # fit trains MedCLIPSeg with its paper's task: 0.5 Dice + 0.5 BCE + 0.1 SoftCon
    fit(model, train, max_steps=steps, epochs=steps, batch_size=8, lr=3e-3, weight_decay=0.0,
        seed=seed, progress=False)  # fmt: skip

    item = SyntheticLesions(length=4, image_size=image_size, seed=seed + 1)[1]
    result = model.predict_with_uncertainty([item["image"]], [[item["prompt"]]], 16, seed=seed)
    sheet = viz.uncertainty_sheet(
        item["image"],
        result.mean[0],
        result.entropy[0],
        result.aleatoric[0],
        result.epistemic[0],
        prompt=item["prompt"],
        mask=item["mask"],
        tile=192,
        title=f"medclipseg-tiny, 16 Monte Carlo samples ({steps} training steps)",
    )
    return viz.save_image(sheet, out / "uncertainty_sheet.png")


def _caption_strip(lines: list[str], width: int, *, columns: int = 0) -> Image.Image:
    """White strip with one text line per entry of ``lines`` (or, with ``columns``, the entries
    side by side at ``columns``-pixel steps)."""
    from PIL import ImageDraw

    rows = 1 if columns else len(lines)
    strip = Image.new("RGB", (width, 4 + 14 * rows), "white")
    draw = ImageDraw.Draw(strip)
    for k, line in enumerate(lines):
        xy = (4 + k * columns, 3) if columns else (4, 3 + 14 * k)
        draw.text(xy, line, fill="black")
    return strip


def cotexnet_figures(out: Path, *, epochs: int, image_size: int, seed: int) -> list[Path]:
    """Train cotexnet-tiny; write its curves and real-text vs text-free predictions."""
    import numpy as np

    from vlsegkit import CoTexNetTask
    from vlsegkit.metrics import soft_dice_score

    seed_everything(seed)
    model = vlsegkit.create_model("cotexnet-tiny", image_size=image_size)
    norm = {"mean": model.image_mean, "std": model.image_std}

    def data(length: int, offset: int) -> CachedDataset:
        lesions = SyntheticLesions(length=length, image_size=image_size, seed=seed + offset, **norm)
        return CachedDataset(ConceptualPrompts(lesions, keyword="lesion", **norm))

    train, val = data(96, 0), data(16, 10_000)
    paths = []
    with tempfile.TemporaryDirectory() as log_dir:
        # the paper's task: Dice + CE + KL; validation scores the text-free prediction (HD95 is
        # left out here so that the curves share one scale)
        task = CoTexNetTask(hd95=False)
        untrained = evaluate(model, val, task=task, progress=False)
        history = fit(model, train, val_loader=val, task=task, epochs=epochs, lr=1e-2,
                      batch_size=8, scheduler="cosine", log_dir=log_dir, progress=False,
                      seed=seed)  # fmt: skip
        print(
            f"cotexnet-tiny: training loss {history.train_loss[0]:.3f} -> "
            f"{history.train_loss[-1]:.3f}; text-free soft Dice {untrained['dice']:.3f} "
            f"(untrained) -> {history.val[-1]['dice']:.3f}, IoU {untrained['iou']:.3f} -> "
            f"{history.val[-1]['iou']:.3f}"
        )
        paths.append(
            viz.plot_training_curves(
                Path(log_dir) / "metrics.jsonl",
                out / "cotexnet_training_curves.png",
                title=f"cotexnet-tiny on SyntheticLesions ({image_size} px), {epochs} epochs; "
                "val = text-free",
            )
        )
    model.eval()
    batch = collate_prompts(val.items)
    with torch.no_grad():
        text = model(batch["image"], batch["prompt"], masks=batch["mask"], condition="text")
        free = model(batch["image"])
    p_text, p_free = text.logits.sigmoid(), free.logits.sigmoid()
    d_text = soft_dice_score(p_text, batch["mask"]).tolist()
    d_free = soft_dice_score(p_free, batch["mask"]).tolist()
    raw = SyntheticLesions(length=len(val), image_size=image_size, seed=seed + 10_000)
    order = np.argsort(d_free)[::-1]
    rows_idx = [int(order[k]) for k in np.linspace(0, len(order) - 1, 4).round().astype(int)]
    tile = 160
    header = ["image", "ground truth", "real text + ROI tokens", "text-free (image only)"]
    rows = []
    for i in rows_idx:
        image = raw[i]["image"]
        tiles = [
            viz.to_rgb_uint8(image),
            viz.overlay_mask(image, batch["mask"][i]),
            viz.overlay_prediction(image, p_text[i], batch["mask"][i]),
            viz.overlay_prediction(image, p_free[i], batch["mask"][i]),
        ]
        tiles = [np.asarray(Image.fromarray(t).resize((tile, tile), Image.NEAREST)) for t in tiles]
        row = Image.fromarray(viz.panel(tiles))
        caption = [
            f"#{i}  soft Dice: real text {d_text[i]:.2f}, text-free {d_free[i]:.2f}",
            batch["prompt"][i],
        ]
        rows += [_caption_strip(caption, row.width), row]
    width = rows[1].width
    head = _caption_strip(header, width, columns=tile + 2)
    title = _caption_strip(
        [
            f"cotexnet-tiny, {epochs} epochs: mean soft Dice over {len(val)} held-out images "
            f"real text {np.mean(d_text):.2f}, text-free {np.mean(d_free):.2f}",
            "green: true positive, red: false positive, blue: missed",
        ],
        width,
    )
    parts = [title, head, *rows]
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    paths.append(viz.save_image(sheet, out / "cotexnet_text_vs_textfree.png"))
    return paths


def demo_figure(out: Path, *, epochs: int, seed: int) -> Path:
    """``make demo``'s own overlay sheet (best, median, worst), shrunk to a palette PNG for the
    README."""
    from vlsegkit.demo import run_demo

    with tempfile.TemporaryDirectory() as folder:
        result = run_demo(folder, epochs=epochs, seed=seed, sheet_rows=3)
        with Image.open(result["pictures"]["overlay_sheet"]) as sheet:
            small = sheet.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_sheet.png"
    small.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images")
    parser.add_argument("--epochs", type=int, default=12, help="clipseg-tiny training epochs")
    parser.add_argument("--steps", type=int, default=40, help="medclipseg-tiny training steps")
    parser.add_argument(
        "--cotexnet-epochs", type=int, default=20, help="cotexnet-tiny training epochs"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--demo-epochs", type=int, default=0,
        help="also run make demo for this many epochs (14 = make demo) and save its sheet",
    )  # fmt: skip
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = segmentation_figures(
        args.out, epochs=args.epochs, image_size=args.image_size, seed=args.seed
    )
    paths.append(
        uncertainty_figure(args.out, steps=args.steps, image_size=args.image_size, seed=args.seed)
    )
    paths += cotexnet_figures(
        args.out, epochs=args.cotexnet_epochs, image_size=args.image_size, seed=args.seed
    )
    if args.demo_epochs:
        paths.append(demo_figure(args.out, epochs=args.demo_epochs, seed=args.seed))
    for path in paths:
        _optimize_png(path)
        size = path.stat().st_size / 1024
        print(f"{path}  {Image.open(path).size[0]}x{Image.open(path).size[1]}  {size:.0f} KB")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return paths


if __name__ == "__main__":
    main()
