"""Prompt-tune a frozen CLIPSeg on SyntheticLesions with one of TuneVLSeg's context learners.

Only the learner (and the learnable residual upsampler) train; the saved tuned model is the learner's
weights plus the base model's id, revision and fingerprint, so it is a few kilobytes where the base is
hundreds of megabytes.

By default the base is the tiny random ``clipseg-tiny`` (saved to ``<out>/base`` first, so the tuned
model can find it again) and the run takes about a minute on a CPU. With network access or a
warm Hub cache, tune the real checkpoint TuneVLSeg used::

    python examples/prompt_tune_clipseg.py --base CIDAS/clipseg-rd64 --image-size 352 \\
        --learner maple --depth 9 --epochs 5

Run: ``python examples/prompt_tune_clipseg.py --learner vpt --depth 3 --out tuned-vpt``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vlsegkit
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.prompts import VPT, CoCoOp, CoOp, MaPLe, SharedAttention, SharedSeparate, TunedModel
from vlsegkit.train import evaluate, fit, seed_everything

LEARNERS = {
    "coop": lambda depth: CoOp(depth=depth),
    "cocoop": lambda depth: CoCoOp(depth=depth),
    "vpt": lambda depth: VPT(depth=depth),
    "maple": lambda depth: MaPLe(depth=depth),
    "shared-separate": lambda depth: SharedSeparate(depth=depth),
    "shared-attention": lambda depth: SharedAttention(depth=depth),
}


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="clipseg-tiny", help="registry name or Hub id / folder")
    parser.add_argument("--learner", choices=sorted(LEARNERS), default="maple")
    parser.add_argument("--depth", type=int, default=2, help="prompt depth J")
    parser.add_argument("--no-upsampler", action="store_true")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="TuneVLSeg: ~1e-3 is a good start")
    parser.add_argument("--out", default=None, help="folder for the tuned model (default: temp)")
    args = parser.parse_args(argv)

    seed_everything(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="prompt-tuned-"))
    if args.base in vlsegkit.list_models():
        # a registry build has random weights and no Hub id: save it so the tuned model can refer
        # to it, then load it back the way a pretrained base is loaded
        vlsegkit.create_model(args.base, image_size=args.image_size).save_pretrained(out / "base")
        base = vlsegkit.VLSM.from_pretrained(out / "base")
    else:
        base = vlsegkit.VLSM.from_pretrained(args.base)
        base.image_size = (args.image_size, args.image_size)

    tuned = LEARNERS[args.learner](args.depth).attach(base, upsampler=not args.no_upsampler)
    print(
        f"{type(tuned.learner).__name__} (depth {args.depth}) on {args.base}: "
        f"{tuned.num_parameters(trainable_only=True):,} trainable of "
        f"{tuned.num_parameters():,} parameters"
    )

    norm = dict(image_size=args.image_size, mean=base.image_mean, std=base.image_std)
    train = SyntheticLesions(length=args.train_size, seed=0, **norm)
    val = SyntheticLesions(length=32, seed=1, **norm)
    train_loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate_prompts)
    val_loader = DataLoader(val, batch_size=16, collate_fn=collate_prompts)

    before = evaluate(tuned, val_loader)
    fit(tuned, train_loader, epochs=args.epochs, lr=args.lr, progress=False)
    after = evaluate(tuned, val_loader)
    print(
        f"validation loss {before['loss']:.4f} -> {after['loss']:.4f}, "
        f"Dice {before['dice']:.3f} -> {after['dice']:.3f}"
    )

    tuned.save_pretrained(out / "tuned")
    reloaded = TunedModel.from_pretrained(out / "tuned")  # finds the base by its recorded id
    batch = next(iter(val_loader))
    with torch.no_grad():
        same = torch.equal(
            reloaded(batch["image"], batch["prompt"]).logits,
            tuned.eval()(batch["image"], batch["prompt"]).logits,
        )
    print(
        f"saved {out / 'tuned'} ({_folder_size(out / 'tuned') / 1024:.1f} KiB; the base holds "
        f"{base.num_parameters() * 4 / 2**20:.1f} MiB of fp32 weights); reloaded identical: {same}"
    )
    # several classes share the learned context, each with its own name after it
    image = batch["image"][0] * torch.tensor(base.image_std)[:, None, None]
    image = (image + torch.tensor(base.image_mean)[:, None, None]).clamp(0, 1)
    probs = reloaded.predict(image, ["lesion", "polyp", "skin lesion"])
    print(f"predict: {tuple(probs.shape)} probabilities for 3 class prompts")
    return {"before": before, "after": after, "reloaded_identical": same}


if __name__ == "__main__":
    main()
