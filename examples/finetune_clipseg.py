"""Fine-tune CLIPSeg's decoder on SyntheticLesions and predict on new images.

By default this uses the tiny random ``clipseg-tiny`` so it runs offline in about a minute. With network
access (or a warm Hub cache), pass ``--model CIDAS/clipseg-rd64-refined --image-size 352`` to fine-tune the
real checkpoint the way the medvlsm study does (frozen CLIP towers, trainable decoder).

Run: ``python examples/finetune_clipseg.py --epochs 3 --out finetuned``
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

import vlsegkit
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.train import evaluate, fit, seed_everything


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipseg-tiny", help="registry name or Hub id / folder")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="save the fine-tuned model here")
    parser.add_argument(
        "--train-backbone",
        action="store_true",
        help="also train the CLIP towers (always on for the random clipseg-tiny, whose towers "
        "carry no pretrained features)",
    )
    args = parser.parse_args(argv)

    seed_everything(0)
    if args.model in vlsegkit.list_models():
        model = vlsegkit.create_model(args.model, image_size=args.image_size)
    else:
        model = vlsegkit.VLSM.from_pretrained(args.model)
        model.image_size = (args.image_size, args.image_size)
    if args.train_backbone or args.model == "clipseg-tiny":
        model.freeze_backbone(False)
    print(f"{args.model}: {model.num_parameters(trainable_only=True):,} trainable parameters")

    norm = dict(image_size=args.image_size, mean=model.image_mean, std=model.image_std)
    train = SyntheticLesions(length=args.train_size, seed=0, **norm)
    val = SyntheticLesions(length=32, seed=1, **norm)
    train_loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate_prompts)
    val_loader = DataLoader(val, batch_size=16, collate_fn=collate_prompts)

    before = evaluate(model, val_loader)
    fit(model, train_loader, epochs=args.epochs, lr=args.lr, progress=False)
    after = evaluate(model, val_loader)
    print(f"validation Dice {before['dice']:.3f} -> {after['dice']:.3f}")

    item = val[0]
    image = item["image"] * torch.tensor(model.image_std)[:, None, None]
    image = (image + torch.tensor(model.image_mean)[:, None, None]).clamp(0, 1)
    probs = model.predict(image, [item["prompt"], "lesion"])
    print(
        f"predict: {tuple(probs.shape)} probabilities for prompts {item['prompt']!r} and 'lesion'"
    )
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}; reload with vlsegkit.VLSM.from_pretrained({args.out!r})")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
