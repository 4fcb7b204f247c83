"""Train a tiny MedCLIPSeg briefly and save its Monte Carlo prediction next to its uncertainty map.

MedCLIPSeg (Koleilat et al., CVPR 2026) samples the values of its probabilistic PVL adapters in every
forward pass; averaging ``--samples`` stochastic passes gives the segmentation probability, and the
binary entropy of that mean is the uncertainty map (section 3.2). This script

1. builds the random ``medclipseg-tiny`` (offline: open_clip towers, bundled CLIP tokenizer) -- or
   loads a saved vlsegkit MedCLIPSeg folder with ``--model``;
2. trains its adapters and head for ``--steps`` steps on ``SyntheticLesions`` with
   :func:`vlsegkit.train.fit`, whose default task for MedCLIPSeg is the paper's loss
   ``0.5 Dice + 0.5 BCE + 0.1 L_SoftCon`` (the towers stay frozen; they are random here, so the
   adapters and head carry all the learning);
3. runs ``predict_with_uncertainty`` on held-out images and writes, per image, one PNG with
   image | ground truth | mean probability | predicted mask | uncertainty (nipy_spectral, min-max
   normalised as in the paper's figures) | epistemic part.

Run: ``python examples/medclipseg_uncertainty.py --out medclipseg_out`` (about a minute on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vlsegkit
from vlsegkit.data import SyntheticLesions
from vlsegkit.models import MedCLIPSeg
from vlsegkit.train import fit
from vlsegkit.viz import apply_colormap, panel, save_image


def _dice(prob: torch.Tensor, mask: torch.Tensor) -> float:
    pred = prob > 0.5
    inter = (pred & mask).sum().item()
    total = pred.sum().item() + mask.sum().item()
    return 1.0 if total == 0 else 2 * inter / total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclipseg-tiny", help="registry name or folder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--samples", type=int, default=30, help="Monte Carlo passes")
    parser.add_argument("--images", type=int, default=4, help="held-out images to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="medclipseg_out")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.model in vlsegkit.list_models():
        model = vlsegkit.create_model(args.model, image_size=args.image_size)
    else:
        model = vlsegkit.VLSM.from_pretrained(args.model)
    if not isinstance(model, MedCLIPSeg):
        raise SystemExit(f"{args.model} is a {type(model).__name__}, not a MedCLIPSeg")
    size = model.image_size
    print(f"{args.model}: {model.num_parameters(trainable_only=True):,} trainable parameters")

    train = SyntheticLesions(length=args.train_size, image_size=size, seed=args.seed,
                             mean=model.image_mean, std=model.image_std)  # fmt: skip
    history = fit(
        model,
        train,
        max_steps=args.steps,
        epochs=args.steps,  # max_steps ends the run
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.0,
        seed=args.seed,
        log_fn=lambda r: (
            print(f"step {r['step']:4d}  loss {r['loss']:.4f}")
            if "lr" in r and (r["step"] % 50 == 1 or r["step"] == args.steps)
            else None
        ),
    )
    loss = history.train_terms[-1]

    test = SyntheticLesions(length=args.images, image_size=size, seed=args.seed + 1)
    items = [test[i] for i in range(args.images)]
    images = [item["image"] for item in items]  # raw [0, 1]; predict normalises
    prompts = [item["prompt"] for item in items]
    per_image = [[p] for p in prompts]  # each image with its own prompt
    result = model.predict_with_uncertainty(images, per_image, args.samples, seed=args.seed)

    out = Path(args.out)
    paths, dices = [], []
    for i, item in enumerate(items):
        mean, unc, epi = result.mean[i][0], result.entropy[i][0], result.epistemic[i][0]
        mask = item["mask"][0] > 0.5
        dices.append(_dice(mean, mask))
        row = panel(
            [
                item["image"],
                mask,
                apply_colormap(mean, cmap="viridis", vmin=0.0, vmax=1.0),
                mean > 0.5,
                apply_colormap(unc, cmap="nipy_spectral"),
                apply_colormap(epi, cmap="nipy_spectral"),
            ],
            caption=f"{prompts[i]} | Dice {dices[-1]:.2f}",
        )
        paths.append(save_image(row, out / f"medclipseg_uncertainty_{i}.png"))
    mean_dice = sum(dices) / len(dices)
    print(f"{args.samples}-sample MC Dice on {args.images} held-out images: {mean_dice:.3f}")
    print("columns: image | ground truth | mean probability | mask | uncertainty | epistemic")
    print("\n".join(str(p) for p in paths))
    print("last epoch's loss terms: " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    return {"dice": mean_dice, "paths": paths, "loss": loss["loss"]}


if __name__ == "__main__":
    main()
