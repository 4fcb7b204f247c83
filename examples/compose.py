"""Compose models from parts: hooks on any model with hook slots, trained with ``fit``.

The same prompt learners and adapters act on every model built from towers. This script builds
three combinations from tiny random models (offline, a minute on a CPU), trains each briefly on
``SyntheticLesions`` with its base model's task, and saves / reloads the tuned ones:

1. MaPLe (multimodal prompts, Khattak et al. 2023) on MedCLIPSeg -- jointly with MedCLIPSeg's own PVL
   adapters and head (``hooks=[...]`` at construction: the hook is part of the model);
2. VLSM-Adapter's dense bottleneck adapters (Dhakal et al. 2024) on a frozen CLIPSeg
   (``.attach``: only the adapters train and are saved);
3. MedCLIPSeg's probabilistic PVL adapters on a frozen CLIPSeg, with Monte Carlo-free inference.

Run: ``python examples/compose.py [--steps 30]``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import vlsegkit
from vlsegkit import BottleneckAdapters, MaPLe, PVLAdapters
from vlsegkit.data import SyntheticLesions
from vlsegkit.train import evaluate, fit


def _data(model, length: int, seed: int) -> SyntheticLesions:
    return SyntheticLesions(length=length, image_size=model.image_size, seed=seed,
                            mean=model.image_mean, std=model.image_std)  # fmt: skip


def _train(name: str, model, steps: int, seed: int) -> dict[str, float]:
    train, val = _data(model, 64, seed), _data(model, 16, seed + 1)
    before = evaluate(model, val, progress=False)["dice"]
    history = fit(model, train, max_steps=steps, epochs=steps, batch_size=8, lr=3e-3,
                  seed=seed, progress=False)  # fmt: skip
    after = evaluate(model, val, progress=False)["dice"]
    terms = ", ".join(f"{k} {v:.3f}" for k, v in history.train_terms[-1].items())
    trainable = model.num_parameters(trainable_only=True)
    print(f"{name}: {trainable:,} trainable; Dice {before:.3f} -> {after:.3f}; last epoch: {terms}")
    return {"before": before, "after": after}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    results = {}

    # 1. MaPLe inside MedCLIPSeg: trained with the adapters and the head (paper loss incl. SoftCon)
    model = vlsegkit.create_model("medclipseg-tiny", hooks=[MaPLe(depth=2, init=None)])
    results["maple+medclipseg"] = _train("MaPLe on MedCLIPSeg", model, args.steps, args.seed)

    # 2. dense bottleneck adapters on a frozen CLIPSeg: only the adapters train and are saved.
    # The base is loaded from a folder (as from the Hub), so the tuned folder records where it is.
    with tempfile.TemporaryDirectory() as root:
        vlsegkit.create_model("clipseg-tiny").save_pretrained(f"{root}/base")
        base = vlsegkit.VLSM.from_pretrained(f"{root}/base")
        tuned = BottleneckAdapters("dense").attach(base)
        results["dense-adapters+clipseg"] = _train("dense adapters on CLIPSeg", tuned, args.steps,
                                                   args.seed)  # fmt: skip
        tuned.save_pretrained(
            f"{root}/tuned"
        )  # the adapters only, plus the base's id and fingerprint
        again = vlsegkit.VLSM.from_pretrained(f"{root}/tuned")  # finds and checks the base itself
        x = torch.randn(1, 3, *base.image_size)
        with torch.no_grad():
            assert torch.equal(again(x, "a polyp").logits, tuned.eval()(x, "a polyp").logits)

    # 3. PVL adapters on a frozen CLIPSeg (the towers run in lockstep, one pass per pair)
    tuned = PVLAdapters(dim=32).attach(vlsegkit.create_model("clipseg-tiny"))
    results["pvl+clipseg"] = _train("PVL adapters on CLIPSeg", tuned, args.steps, args.seed)
    return results


if __name__ == "__main__":
    main()
