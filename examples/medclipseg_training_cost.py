"""What MedCLIPSeg's training options cost: text padding, frozen towers, checkpointing, text cache.

MedCLIPSeg (Koleilat et al., CVPR 2026) trains only its PVL adapters and head; its towers are
frozen. vlsegkit keeps that cheap (see ``docs/performance.md``):

* ``text_padding="longest"`` (default) pads each batch to its longest prompt and masks the padding
  in the adapters; the released code pads every prompt to 256 tokens (``"max_length"``);
* ``frozen_towers="eval"`` (default) keeps the frozen towers in eval mode while the model trains --
  no dropout inside them (the released code lets BERT's dropout run: ``"train"``);
* the frozen blocks before the first adapter record no autograd graph; those after it do (the
  adapters need their gradients) and ``gradient_checkpointing`` recomputes them in backward instead
  of storing them -- ``"auto"`` (default) only above 2 GiB of estimated activations;
* ``model.text_cache = TextCache()`` reuses each prompt's text prefix across steps.

This script builds the random ``medclipseg-tiny`` (offline), runs one training step per setting on
a ``SyntheticLesions`` batch and prints the text positions per prompt, the bytes autograd saved for
backward and the time; then a few steps with the text cache and its hit count.

Run: ``python examples/medclipseg_training_cost.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

import vlsegkit
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.encoders import TextCache


def measure_step(model, batch, task) -> dict:
    """One training step: saved bytes, time, loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.training_step(model, batch)["loss"]
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"saved_kb": sum(sizes.values()) / 1024, "seconds": seconds, "loss": loss.item()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps of the text-cache run")
    args = parser.parse_args(argv)

    data = SyntheticLesions(length=args.batch_size, image_size=64, seed=0)
    batch = collate_prompts([data[i] for i in range(len(data))])
    settings = {
        "defaults": {},
        "released padding + train-mode towers": dict(
            text_padding="max_length", frozen_towers="train"
        ),
        "defaults + checkpointing": {},
    }
    results = {}
    print(f"{'setting':<38}{'text positions':>15}{'saved KiB':>11}{'step s':>8}")
    for name, kwargs in settings.items():
        torch.manual_seed(0)
        model = vlsegkit.create_model("medclipseg-tiny", **kwargs)
        if name.endswith("checkpointing"):
            model.gradient_checkpointing = True
        task = model.default_task()
        positions = model.tokenize(batch["prompt"])[0].shape[1]
        measure_step(model, batch, task)  # warm-up
        result = measure_step(model, batch, task)
        result["text_positions"] = positions
        results[name] = result
        print(f"{name:<38}{positions:>15}{result['saved_kb']:>11.0f}{result['seconds']:>8.3f}")

    torch.manual_seed(0)
    model = vlsegkit.create_model("medclipseg-tiny")
    model.text_cache = TextCache(max_rows=256)
    optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-3)
    task = model.default_task()
    for _ in range(args.steps):
        model.train()
        loss = task.training_step(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cache = model.text_cache
    print(
        f"text cache over {args.steps} steps: {cache.hits} prompt rows served, {cache.misses} "
        f"computed ({len(cache)} distinct prompts kept)"
    )
    results["cache"] = {"hits": cache.hits, "misses": cache.misses}
    return results


if __name__ == "__main__":
    main()
