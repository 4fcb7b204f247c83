"""Train a model compiled with ``torch.compile(fullgraph=True)``: token batches, one graph per step.

A model's forward pass from prompt *strings* cannot be one graph (tokenising is Python string
work), so the data loader tokenises instead: ``model.tokenize`` gives the ``input_ids`` /
``attention_mask`` the model would make itself, and :class:`~vlsegkit.tasks.SegmentationTask` calls
``model(image, input_ids=..., attention_mask=...)`` when a batch carries them. ``model.compile``
compiles the module in place (its state-dict keys, checkpoints and ``fit`` are unchanged), and
``fullgraph=True`` makes any graph break an error.

On a GPU keep the default backend (``inductor``, which generates fused Triton kernels); on a CPU
without a C++ compiler use ``--backend aot_eager`` (the graphs run with eager kernels: correct, not
faster). Prompt lengths vary between batches, so the first batches compile again until dynamo marks
the text length dynamic; pad to a fixed length on a GPU to compile once.

Run: ``python examples/compile_training.py --backend aot_eager --steps 20``
"""

from __future__ import annotations

import argparse

import torch

import vlsegkit
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.train import evaluate, fit, seed_everything


class TokenCollate:
    """``collate_prompts``, then the prompt strings replaced by the model's token ids."""

    def __init__(self, model: vlsegkit.VLSM) -> None:
        self.model = model

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_prompts(items)
        ids, mask = self.model.tokenize(batch.pop("prompt"))
        batch["input_ids"], batch["attention_mask"] = ids.cpu(), mask.cpu()
        return batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipseg-tiny", help="a registry name (*-tiny: offline)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-size", type=int, default=8, help="0 skips the evaluation")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    seed_everything(0)
    model = vlsegkit.create_model(args.model)
    model.freeze_backbone(False)  # random tiny towers carry no features worth keeping frozen
    data = SyntheticLesions(
        length=args.steps * args.batch_size, image_size=model.image_size, seed=0,
        mean=model.image_mean, std=model.image_std,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, collate_fn=TokenCollate(model)
    )
    model.compile(backend=args.backend, fullgraph=True)  # in place; a break would raise
    history = fit(model, loader, max_steps=args.steps, lr=args.lr, progress=False)
    losses = [terms["loss"] for terms in history.train_terms]
    print(f"compiled ({args.backend}) training loss per epoch: {[f'{v:.3f}' for v in losses]}")
    result = {"history": history}
    if args.val_size:
        val = SyntheticLesions(
            length=args.val_size, image_size=model.image_size, seed=1,
            mean=model.image_mean, std=model.image_std,
        )  # fmt: skip
        val_loader = torch.utils.data.DataLoader(
            val, batch_size=args.batch_size, collate_fn=TokenCollate(model)
        )
        result["scores"] = evaluate(model, val_loader, progress=False)
        print(f"validation dice {result['scores']['dice']:.3f}")
    return result


if __name__ == "__main__":
    main()
