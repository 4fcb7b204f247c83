"""``make demo`` / ``python -m vlsegkit.demo``: train a small CLIPSeg on SyntheticLesions.

Builds the registry's ``clipseg-tiny`` model (random weights: no download), trains it with ``fit`` for
a fixed number of epochs on the built-in synthetic, text-prompted lesion dataset, prints validation
Dice / IoU before, during and after, and writes pictures a person can read:

* ``overlay_sheet.png`` -- validation examples chosen across the score range (best, median, worst
  and between), each row image | ground truth | prediction with the prompt and its Dice;
* ``training_curves.png`` -- the training loss and the validation Dice / IoU per epoch;
* with ``--uncertainty``, ``uncertainty_sheet.png`` -- a briefly trained ``medclipseg-tiny``'s Monte
  Carlo mean, entropy, aleatoric and epistemic maps for one validation image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import viz
from .data import CachedDataset, SyntheticLesions, collate_prompts
from .registry import create_model
from .train import evaluate, fit, seed_everything

__all__ = ["main", "run_demo"]


def _epoch_printer(epochs: int, start: float):
    def log(record: dict) -> None:
        if "train_loss" not in record:  # a step record
            return
        print(
            f"epoch {record['epoch'] + 1:2d}/{epochs}: train loss {record['train_loss']:.4f}  "
            f"val Dice {record['val_dice']:.3f}  IoU {record['val_iou']:.3f}  "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    return log


@torch.no_grad()
def _predict(model, dataset, batch_size: int = 32) -> torch.Tensor:
    model.eval()
    probs = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_prompts(
            [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        )
        probs.append(model(batch["image"], batch["prompt"]).logits.sigmoid())
    return torch.cat(probs)


def _uncertainty_sheet(out_dir: Path, *, image_size: int, seed: int, steps: int) -> Path:
    """Train medclipseg-tiny briefly (its paper loss, through fit) and draw one image's MC maps."""
    model = create_model("medclipseg-tiny", image_size=image_size)
    norm = dict(mean=model.image_mean, std=model.image_std)
    train = CachedDataset(SyntheticLesions(length=128, image_size=image_size, seed=seed, **norm))
    fit(model, train, max_steps=steps, epochs=steps, batch_size=16, lr=3e-3, weight_decay=0.0,
        seed=seed, progress=False)  # fmt: skip
    item = SyntheticLesions(length=8, image_size=image_size, seed=seed + 10_000)[3]
    result = model.predict_with_uncertainty([item["image"]], [[item["prompt"]]], 16, seed=seed)
    sheet = viz.uncertainty_sheet(
        item["image"], result.mean[0], result.entropy[0], result.aleatoric[0],
        result.epistemic[0], prompt=item["prompt"], mask=item["mask"],
        title=f"medclipseg-tiny, 16 Monte Carlo samples ({steps} training steps)",
    )  # fmt: skip
    return viz.save_image(sheet, out_dir / "uncertainty_sheet.png")


def run_demo(
    out: str | Path = "demo_out",
    *,
    epochs: int = 14,
    image_size: int = 128,
    seed: int = 0,
    train_size: int = 512,
    val_size: int = 64,
    batch_size: int = 16,
    lr: float = 1e-3,
    progress: bool = False,
    uncertainty: bool = False,
    uncertainty_steps: int = 60,
    sheet_rows: int = 6,
) -> dict:
    """Run the demo; returns the metrics before and after training and the pictures' paths."""
    seed_everything(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = create_model("clipseg-tiny", image_size=image_size, freeze_backbone=False)
    norm = dict(mean=model.image_mean, std=model.image_std)
    train_set = CachedDataset(
        SyntheticLesions(length=train_size, image_size=image_size, seed=seed, **norm)
    )
    val_kw = dict(length=val_size, image_size=image_size, seed=seed + 10_000)
    val_set = CachedDataset(SyntheticLesions(**val_kw, **norm))
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, collate_fn=collate_prompts,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=32, collate_fn=collate_prompts)

    n_params = model.num_parameters(trainable_only=True)
    print(f"vlsegkit demo: clipseg-tiny, {n_params / 1e6:.2f}M trainable parameters, "
          f"{image_size}px, {len(train_set)} training / {len(val_set)} validation images")  # fmt: skip
    before = evaluate(model, val_loader, progress=False)
    print(f"before training: Dice {before['dice']:.3f}  IoU {before['iou']:.3f}")

    out_dir = Path(out)
    start = time.perf_counter()
    records: list[dict] = []

    def log(record: dict) -> None:
        records.append(record)
        printer(record)

    printer = _epoch_printer(epochs, start)
    # One run with a cosine schedule over a fixed number of epochs keeps the demo reproducible.
    fit(
        model, train_loader, val_loader=val_loader, epochs=epochs, lr=lr, weight_decay=1e-4,
        scheduler="cosine", min_lr_ratio=0.05, log_fn=log, progress=progress, seed=seed,
    )  # fmt: skip
    after = evaluate(model, val_loader, progress=False)
    elapsed = time.perf_counter() - start
    print(
        f"after {epochs} epochs ({elapsed:.0f}s): Dice {after['dice']:.3f}  IoU {after['iou']:.3f}"
    )

    # pictures: the raw [0, 1] images of the same validation items (same seed, no normalisation)
    raw = SyntheticLesions(**val_kw)
    images = [raw[i]["image"] for i in range(len(raw))]
    probs = _predict(model, val_set)
    masks = torch.stack([val_set[i]["mask"] for i in range(len(val_set))])
    prompts = [val_set[i]["prompt"] for i in range(len(val_set))]
    pictures = {
        "overlay_sheet": viz.save_overlay_sheet(
            out_dir / "overlay_sheet.png",
            images,
            masks,
            probs,
            prompts,
            n=sheet_rows,
            title=f"clipseg-tiny after {epochs} epochs on SyntheticLesions",
        ),
        "training_curves": viz.plot_training_curves(records, out_dir / "training_curves.png"),
    }
    if uncertainty:
        pictures["uncertainty_sheet"] = _uncertainty_sheet(
            out_dir, image_size=min(image_size, 64), seed=seed, steps=uncertainty_steps
        )
    model.save_pretrained(out_dir / "model")

    what = {
        "overlay_sheet": "validation examples from best to worst Dice: image | ground truth | "
        "prediction, with each prompt",
        "training_curves": "training loss and validation Dice / IoU per epoch",
        "uncertainty_sheet": "medclipseg-tiny's Monte Carlo mean, entropy, aleatoric and "
        "epistemic maps for one image",
    }
    print("pictures:")
    for name, path in pictures.items():
        print(f"  {Path(path).resolve()}\n    {what[name]}")
    print(f"saved the trained model to {(out_dir / 'model').resolve()}")
    return {"before": before, "after": after, "epochs": epochs, "pictures": pictures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (pictures, model)")
    parser.add_argument("--epochs", type=int, default=14, help="training epochs (~8 s each here)")
    parser.add_argument("--image-size", type=int, default=128, help="square input size")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--progress", action="store_true", help="show per-step progress bars")
    parser.add_argument(
        "--uncertainty",
        action="store_true",
        help="also train medclipseg-tiny briefly and draw its Monte Carlo uncertainty maps",
    )
    args = parser.parse_args(argv)
    run_demo(
        args.out, epochs=args.epochs, image_size=args.image_size, seed=args.seed,
        progress=args.progress, uncertainty=args.uncertainty,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
