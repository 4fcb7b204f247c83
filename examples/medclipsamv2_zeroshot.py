"""MedCLIP-SAMv2 end to end on SyntheticLesions: zero-shot masks, then weak supervision.

The pipeline of Koleilat et al., "MedCLIP-SAMv2" (Medical Image Analysis 2025), with tiny random
models built offline (so the numbers say nothing about the method -- they show that every stage
runs and what it produces):

1. a tiny transformers CLIP and a tiny transformers SAM are written to ``OUT/models`` in their
   Hub layouts (``vlsegkit.testing.save_tiny_clip`` / ``save_tiny_sam``); the CLIP is loaded as a
   ``DualEncoder`` (``VLSM.from_pretrained``, as for ``openai/clip-vit-base-patch16``; BiomedCLIP
   loads with ``DualEncoder.from_open_clip``) and fine-tuned on the image-prompt pairs with DHN-NCE
   (its default task, the paper's §3.1), then saved; ``MedCLIPSAM.from_pretrained`` takes that
   folder and the SAM folder (``facebook/sam-vit-huge`` for real work);
2. zero-shot: for the prompt, an M2IB saliency map per training image, the paper's
   post-processing (Otsu, components with mean saliency > 0.5, one box each), SAM's masks;
3. the masks become pseudo-labels: exported in nnU-Net v2's raw layout (``OUT/nnUNet_raw``) and
   used to train ``clipseg-tiny`` with the cyclic schedule, keeping the last checkpoints of every
   cycle (``fit_checkpoint_ensemble``);
4. the checkpoint ensemble predicts held-out images: mean probability and entropy;
5. ``OUT/pipeline.png``: image | saliency | coarse mask + prompts | SAM mask for a few images
   (``vlsegkit.viz.zeroshot_sheet``; ``--figure`` writes it elsewhere too).

Run: ``python examples/medclipsamv2_zeroshot.py --out medclipsamv2_out`` (a minute or two on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vlsegkit
from vlsegkit import viz
from vlsegkit.data import SyntheticLesions
from vlsegkit.testing import save_tiny_clip, save_tiny_sam
from vlsegkit.train import fit
from vlsegkit.weak import CyclicSchedule, export_nnunet_raw, fit_checkpoint_ensemble
from vlsegkit.zeroshot import MedCLIPSAM


def _dice(pred: torch.Tensor, mask: torch.Tensor) -> float:
    total = int(pred.sum()) + int(mask.sum())
    return 1.0 if total == 0 else 2 * int((pred & mask).sum()) / total


class _PseudoLabels(torch.utils.data.Dataset):
    """Images normalised for the segmenter, with the zero-shot masks as their labels."""

    def __init__(self, images, masks, *, size, mean, std, prompt):
        mean = torch.tensor(mean)[:, None, None]
        std = torch.tensor(std)[:, None, None]
        resize = lambda x, mode: torch.nn.functional.interpolate(x[None], size=size, mode=mode)[0]  # noqa: E731
        self.items = [
            {"image": (resize(im, "bilinear") - mean) / std,
             "mask": resize(m[None].float(), "nearest"), "prompt": prompt}
            for im, m in zip(images, masks)
        ]  # fmt: skip

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="medclipsamv2_out")
    parser.add_argument("--prompt", default="a lesion")
    parser.add_argument("--train-size", type=int, default=24, help="images given pseudo-labels")
    parser.add_argument("--test-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="SyntheticLesions side")
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=2,
        help="DHN-NCE epochs on the image-prompt pairs (0: the CLIP as it is)",
    )
    parser.add_argument("--steps", type=int, default=10, help="M2IB Adam steps")
    parser.add_argument("--samples", type=int, default=10, help="M2IB noise copies")
    parser.add_argument("--epochs", type=int, default=6, help="weak supervision epochs")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept per cycle")
    parser.add_argument("--rows", type=int, default=3, help="images in the pipeline figure")
    parser.add_argument("--figure", default=None, help="also write the pipeline figure here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)

    # 1. tiny random CLIP and SAM, saved like Hub checkpoints; the CLIP fine-tuned with DHN-NCE
    clip = save_tiny_clip(out / "models" / "clip", seed=args.seed)
    sam = save_tiny_sam(out / "models" / "sam", seed=args.seed)
    train = SyntheticLesions(length=args.train_size, image_size=args.image_size, seed=args.seed)
    dual = vlsegkit.VLSM.from_pretrained(clip)
    if args.finetune_epochs:
        pairs = SyntheticLesions(length=args.train_size, image_size=dual.image_size,
                                 seed=args.seed, mean=dual.image_mean, std=dual.image_std)  # fmt: skip
        history = fit(dual, pairs, epochs=args.finetune_epochs, batch_size=8, lr=1e-4,
                      progress=False, seed=args.seed)  # fmt: skip
        print(f"DHN-NCE fine-tuning: {args.finetune_epochs} epochs, loss "
              f"{history.train_loss[0]:.4f} -> {history.train_loss[-1]:.4f}")  # fmt: skip
    tuned = dual.save_pretrained(out / "models" / "clip-dhn-nce")
    pipe = MedCLIPSAM.from_pretrained(tuned, sam, layer=1, steps=args.steps,
                                      samples=args.samples)  # fmt: skip

    # 2. zero-shot masks of the training images
    images = [train[i]["image"] for i in range(len(train))]
    truth = [train[i]["mask"][0] > 0 for i in range(len(train))]
    results = pipe.segment(images, args.prompt, seed=args.seed)
    zero_shot = [_dice(r.mask, m) for r, m in zip(results, truth)]
    coarse = [_dice(r.coarse, m) for r, m in zip(results, truth)]
    print(f"zero-shot on {len(images)} images: coarse Dice {sum(coarse) / len(coarse):.3f}, "
          f"SAM Dice {sum(zero_shot) / len(zero_shot):.3f} (random models)")  # fmt: skip

    # 3. pseudo-labels: nnU-Net raw layout, and a clipseg-tiny trained on them
    raw = export_nnunet_raw(out / "nnUNet_raw", images, [r.mask for r in results],
                            dataset_id=501, name="SyntheticLesionsPseudo", label="lesion")  # fmt: skip
    print(f"nnU-Net v2 raw dataset: {raw}")
    model = vlsegkit.create_model("clipseg-tiny", image_size=args.image_size)
    data = _PseudoLabels(images, [r.mask for r in results], size=model.image_size,
                         mean=model.image_mean, std=model.image_std, prompt=args.prompt)  # fmt: skip
    schedule = CyclicSchedule(epochs=args.epochs, cycles=args.cycles, keep=args.keep)
    ensemble = fit_checkpoint_ensemble(model, data, out_dir=out / "checkpoints", schedule=schedule,
                                       batch_size=8, progress=False, seed=args.seed)  # fmt: skip
    print(
        f"weak supervision: {schedule.epochs} epochs in {schedule.cycles} cycles, "
        f"{len(ensemble)} checkpoints kept, final loss {ensemble.history.train_loss[-1]:.4f}"
    )

    # 4. the checkpoint ensemble on held-out images
    test = SyntheticLesions(length=args.test_size, image_size=args.image_size, seed=args.seed + 1)
    test_images = [test[i]["image"] for i in range(len(test))]
    pred = ensemble.predict(test_images, args.prompt)
    weak = [_dice(p[0] > 0.5, test[i]["mask"][0] > 0) for i, p in enumerate(pred.mean)]
    entropy = sum(float(e.mean()) for e in pred.entropy) / len(pred.entropy)
    print(f"ensemble of {pred.samples} on {len(test_images)} held-out images: Dice "
          f"{sum(weak) / len(weak):.3f}, mean entropy {entropy:.3f} nats")  # fmt: skip

    # 5. the pipeline figure
    rows = [
        dict(image=images[i], saliency=r.saliency, coarse=r.coarse, mask=r.mask,
             boxes=r.prompts.boxes, points=r.prompts.points, point_labels=r.prompts.point_labels,
             target=truth[i], label=f"training image {i}")
        for i, r in enumerate(results[: args.rows])
    ]  # fmt: skip
    sheet = viz.zeroshot_sheet(
        rows, title=f"MedCLIP-SAMv2 zero-shot pipeline, prompt {args.prompt!r}",
        note="tiny random CLIP and SAM (offline): the stages, not the method's accuracy",
    )  # fmt: skip
    figures = [viz.save_image(sheet, out / "pipeline.png")]
    if args.figure:
        figures.append(viz.save_image(sheet, args.figure))
    print("wrote " + ", ".join(str(p) for p in figures))
    return {
        "zero_shot_dice": zero_shot,
        "coarse_dice": coarse,
        "weak_dice": weak,
        "checkpoints": [str(p) for p in ensemble.checkpoints],
        "nnunet_raw": str(raw),
        "figures": [str(p) for p in figures],
    }


if __name__ == "__main__":
    main()
