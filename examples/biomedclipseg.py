"""Train BiomedCLIPSeg / BiomedCLIPSeg-D's decoder on SyntheticLesions (the medvlsm recipe).

BiomedCLIPSeg (Poudel et al., MIDL 2024, section 3.1) puts CLIPSeg's FiLM decoder on BiomedCLIP's
frozen towers and trains the decoder from scratch; BiomedCLIPSeg-D starts the decoder from
``CIDAS/clipseg-rd64-refined``. By default this uses the tiny random ``biomedclipseg-d-tiny``
(offline, about a minute). With network access or a warm Hub cache, assemble the real model::

    python examples/biomedclipseg.py --biomedclip microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \\
        --clipseg-decoder CIDAS/clipseg-rd64-refined --image-size 224 --lr 1e-3

Run: ``python examples/biomedclipseg.py --epochs 3 --out biomedclipseg``
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

import vlsegkit
from vlsegkit import BiomedCLIPSeg
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.train import evaluate, fit, seed_everything


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="biomedclipseg-d-tiny", help="registry name")
    parser.add_argument("--biomedclip", default=None, help="open_clip BiomedCLIP repo / folder")
    parser.add_argument("--clipseg-decoder", default=None, help="CLIPSeg repo / folder (-D)")
    parser.add_argument("--image-size", type=int, default=64, help="a multiple of 16")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="medvlsm: 1e-3 (1e-4 if unstable)")
    parser.add_argument("--out", default=None, help="save the trained model here")
    args = parser.parse_args(argv)

    seed_everything(0)
    if args.biomedclip:
        model = BiomedCLIPSeg.from_biomedclip(
            args.biomedclip, clipseg_decoder=args.clipseg_decoder, image_size=args.image_size
        )
    else:
        model = vlsegkit.create_model(args.model, image_size=args.image_size)
        model.freeze_backbone(False)  # random tiny towers carry no pretrained features
    print(
        f"{model.config['decoder_init']} decoder on blocks {model.extract_layers}: "
        f"{model.num_parameters(trainable_only=True):,} trainable parameters"
    )

    norm = dict(image_size=model.image_size, mean=model.image_mean, std=model.image_std)
    train = SyntheticLesions(length=args.train_size, seed=0, **norm)
    val = SyntheticLesions(length=16, seed=1, **norm)
    train_loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate_prompts)
    val_loader = DataLoader(val, batch_size=16, collate_fn=collate_prompts)

    before = evaluate(model, val_loader, progress=False)
    history = fit(model, train_loader, epochs=args.epochs, lr=args.lr, progress=False)
    after = evaluate(model, val_loader, progress=False)
    print(
        f"train loss {history.train_terms[0]['loss']:.3f} -> {history.train_terms[-1]['loss']:.3f}"
    )
    print(f"validation Dice {before['dice']:.3f} -> {after['dice']:.3f}")

    item = val[0]
    image = item["image"] * torch.tensor(model.image_std)[:, None, None]
    image = (image + torch.tensor(model.image_mean)[:, None, None]).clamp(0, 1)
    probs = model.predict(image, [item["prompt"], "lesion"])
    print(f"predict: {tuple(probs.shape)} probabilities")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}; reload with vlsegkit.VLSM.from_pretrained({args.out!r})")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
