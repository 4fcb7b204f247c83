"""Train CoTexNet with conceptual prompts and ROI tokens, then segment held-out images without text.

CoTexNet (He et al., *Engineering* 2026) learns from (image, mask, real-text prompt) triples and
predicts from the image alone. This script

1. builds the random ``cotexnet-tiny`` (offline; ``--clipseg`` initialises the towers and decoder from
   a CLIPSeg folder or Hub id instead, e.g. ``CIDAS/clipseg-rd64-refined`` for the full-size model);
2. describes every training mask with the default attribute extractor and the paper's template
   ("1 round small pink lesion area, located in the top left of the image.") --
   :class:`vlsegkit.data.ConceptualPrompts` over :class:`vlsegkit.data.SyntheticLesions`;
3. trains with :func:`vlsegkit.train.fit` and the paper's task (Dice + CE + KL, SAN-KD mixing the
   text embedding with the embedding predicted from the [CLS] token), or the release's settings
   with ``--recipe released`` (KL weight 10, the release's model options);
4. scores the text-free prediction on held-out images as the paper reports it (soft Dice, IoU and
   pixel accuracy at 0.5, HD95 in pixels) before and after training, and writes
   ``predictions.png``: image | ground truth | text-free prediction for a few of them.

Run: ``python examples/cotexnet_text_free.py --out cotexnet_out`` (a minute or two on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import vlsegkit
from vlsegkit import COTEXNET_RECIPES
from vlsegkit.data import CachedDataset, ConceptualPrompts, SyntheticLesions
from vlsegkit.train import evaluate, fit
from vlsegkit.viz import overlay_prediction, panel, save_image


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=96)
    parser.add_argument("--val-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--recipe", choices=sorted(COTEXNET_RECIPES), default="paper")
    parser.add_argument("--clipseg", default=None, help="CLIPSeg folder / Hub id to start from")
    parser.add_argument("--lr", type=float, default=1e-2, help="(the recipes use 3e-4 at 224 px)")
    parser.add_argument("--out", type=Path, default=Path("cotexnet_out"))
    args = parser.parse_args(argv)

    recipe = COTEXNET_RECIPES[args.recipe]
    torch.manual_seed(0)
    model = vlsegkit.create_model(
        "cotexnet-tiny", image_size=args.image_size, clipseg=args.clipseg, **recipe.model_options
    )
    norm = {"mean": model.image_mean, "std": model.image_std}
    size = {"image_size": args.image_size}
    train = CachedDataset(
        ConceptualPrompts(
            SyntheticLesions(length=args.train_size, seed=0, **size, **norm),
            keyword="lesion",
            **norm,
        )
    )
    val = CachedDataset(SyntheticLesions(length=args.val_size, seed=1, **size, **norm))
    print("a training prompt:", train[0]["prompt"])

    task = recipe.task()
    before = evaluate(model, val, task=task, progress=False)  # text-free: the set has no prompts
    # the recipe's optimiser, schedule and loss weights; budget and batch size fit a CPU
    history = fit(model, train, task=task, config=recipe.fit_config(
        epochs=args.epochs, lr=args.lr, batch_size=8, early_stopping=None, autocast_dtype=None,
        seed=0, progress=False))  # fmt: skip
    after = evaluate(model, val, task=task, progress=False)
    first, last = history.train_terms[0], history.train_terms[-1]
    print("train terms, first epoch:", {k: round(v, 4) for k, v in first.items()})
    print("train terms, last epoch: ", {k: round(v, 4) for k, v in last.items()})
    for name in ("dice", "iou", "accuracy", "hd95"):
        print(f"text-free {name:8s} before {before[name]:.3f}  after {after[name]:.3f}")
    print(f"learned alpha {float(model.sankd.alpha.detach()):.3f}")

    raw = SyntheticLesions(length=args.val_size, seed=1, **size)
    probs = model.predict([raw[i]["image"] for i in range(min(4, args.val_size))])  # no prompts
    rows = [
        panel(
            [
                raw[i]["image"],
                overlay_prediction(raw[i]["image"], raw[i]["mask"]),
                overlay_prediction(raw[i]["image"], p, raw[i]["mask"]),
            ],
            caption=f"#{i}",
        )
        for i, p in enumerate(probs)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_image(np.concatenate(rows), args.out / "predictions.png")
    print("wrote", path)
    return {"before": before, "after": after, "history": history, "picture": path}


if __name__ == "__main__":
    main()
