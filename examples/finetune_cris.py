"""Fine-tune CRIS end to end (medvlsm's recipe), or prompt-tune a frozen CRIS with CoOp / CoCoOp.

CRIS (Wang et al., CVPR 2022) on CLIP RN50: the medvlsm study (Poudel et al., MIDL 2024) fine-tunes
every part with Adam, 1e-5 for the decoder and 1e-6 for the encoders, on ``Dice + 0.2 BCE``; TuneVLSeg
(Adhikari et al., ACCV 2024) freezes it and trains only textual context vectors.

By default this runs on the tiny random ``cris-tiny`` so it finishes offline in a minute. With the
community RefCOCO checkpoint (``cris_best.pth``, see docs/cris.md) fine-tune the real model::

    python examples/finetune_cris.py --released cris_best.pth --image-size 416 --lr 1e-5

Run: ``python examples/finetune_cris.py --epochs 3`` or ``... --learner coop --depth 1``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vlsegkit
from vlsegkit import CRIS, CoCoOp, CoOp
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.train import evaluate, fit, seed_everything


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cris-tiny", help="registry name (random weights)")
    parser.add_argument("--released", default=None, help="a CRIS.pytorch checkpoint to start from")
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of 32 (CRIS: 416)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="decoder lr (encoders: x0.1)")
    parser.add_argument("--learner", choices=["none", "coop", "cocoop"], default="none")
    parser.add_argument("--depth", type=int, default=1, help="prompt depth J of the learner")
    parser.add_argument(
        "--first-context-twice",
        action="store_true",
        help="TuneVLSeg's released CRIS schedule (J + 1 prompted blocks)",
    )
    parser.add_argument("--out", default=None, help="save the trained model here")
    args = parser.parse_args(argv)

    seed_everything(0)
    size = dict(image_size=args.image_size)
    if args.released:
        model = CRIS.from_released(args.released, **size)
    else:
        model = vlsegkit.create_model(args.model, **size)

    if args.learner == "none":
        trained = model  # medvlsm: every part trains, the backbone 10x slower
        optimizer = torch.optim.Adam(model.param_groups(args.lr, backbone_lr_mult=0.1))
    else:
        if args.out:
            # a tuned model stores only the context plus its base's path: save the base first
            model.save_pretrained(Path(args.out) / "base")
            model = vlsegkit.VLSM.from_pretrained(Path(args.out) / "base")
        learner_cls = CoOp if args.learner == "coop" else CoCoOp
        learner = learner_cls(depth=args.depth, first_context_twice=args.first_context_twice)
        trained = learner.attach(model)  # frozen CRIS in eval mode: BatchNorm statistics kept
        optimizer = torch.optim.AdamW(trained.trainable_parameters(), lr=args.lr)
    print(f"{type(trained).__name__}: {trained.num_parameters(trainable_only=True):,} trainable")

    norm = dict(image_size=model.image_size, mean=model.image_mean, std=model.image_std)
    train = SyntheticLesions(length=args.train_size, seed=0, **norm)
    val = SyntheticLesions(length=16, seed=1, **norm)
    train_loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_prompts)
    val_loader = DataLoader(val, batch_size=8, collate_fn=collate_prompts)

    task = model.default_task()  # Dice + 0.2 BCE, threshold 0.35 (medvlsm)
    before = evaluate(trained, val_loader, task=task, progress=False)
    history = fit(
        trained, train_loader, epochs=args.epochs, optimizer=optimizer, task=task, progress=False
    )
    after = evaluate(trained, val_loader, task=task, progress=False)
    print(
        f"train loss {history.train_terms[0]['loss']:.3f} -> {history.train_terms[-1]['loss']:.3f}"
    )
    print(f"validation Dice {before['dice']:.3f} -> {after['dice']:.3f}")

    item = val[0]
    with torch.no_grad():
        out = trained.eval()(item["image"][None], item["prompt"])
    print(f"logits {tuple(out.logits.shape)}, stride-4 logits {tuple(out.stride4_logits.shape)}")
    if args.out:
        trained.save_pretrained(args.out)
        print(f"saved to {args.out}; reload with vlsegkit.VLSM.from_pretrained({args.out!r})")
    return {"before": before, "after": after, "history": history}


if __name__ == "__main__":
    main()
