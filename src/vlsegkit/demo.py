"""``make demo`` / ``python -m vlsegkit.demo``: train a small CLIPSeg on SyntheticLesions.

Builds the registry's ``clipseg-tiny`` model (random weights: no download), trains it for a fixed number
of epochs on the built-in synthetic, text-prompted lesion dataset, prints validation Dice / IoU before and
after, and writes PNG overlays (image | ground truth | prediction) to the output folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import SyntheticLesions, collate_prompts
from .registry import create_model
from .train import evaluate, fit, seed_everything

__all__ = ["main", "overlay", "run_demo"]


class _Materialized(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def overlay(image: np.ndarray, mask: np.ndarray, *, color=(255, 64, 64), alpha: float = 0.45):
    """Blend a binary ``(H, W)`` mask onto an ``(H, W, 3)`` uint8 image and draw its outline."""
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = color
    return out.clip(0, 255).astype(np.uint8)


def _to_uint8(image: torch.Tensor, mean, std) -> np.ndarray:
    x = image.cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def write_overlays(model, dataset, out_dir: Path, *, count: int = 6) -> list[Path]:
    """Save ``count`` panels (image | ground truth | prediction) captioned with the prompt."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        with torch.no_grad():
            prob = model(item["image"][None], item["prompt"]).logits.sigmoid()[0, 0]
        img = _to_uint8(item["image"], model.image_mean, model.image_std)
        gt = overlay(img, item["mask"][0].numpy() > 0.5, color=(64, 220, 64))
        pred = overlay(img, prob.numpy() > 0.5, color=(255, 64, 64))
        panel = Image.fromarray(np.concatenate([img, gt, pred], axis=1))
        canvas = Image.new("RGB", (panel.width, panel.height + 18), "white")
        canvas.paste(panel, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), item["prompt"][:90], fill="black")
        path = out_dir / f"overlay_{i:02d}.png"
        canvas.save(path)
        paths.append(path)
    return paths


def run_demo(
    out: str | Path = "demo_out",
    *,
    epochs: int = 14,
    image_size: int = 128,
    seed: int = 0,
    train_size: int = 512,
    val_size: int = 64,
    batch_size: int = 16,
    lr: float = 1e-3,
    progress: bool = False,
) -> dict:
    """Run the demo; returns the metrics before and after training and the overlay paths."""
    seed_everything(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = create_model("clipseg-tiny", image_size=image_size, freeze_backbone=False)
    norm = dict(mean=model.image_mean, std=model.image_std)
    # Render the training images once: generation costs more than a tiny model's training step.
    train_set = _Materialized(
        SyntheticLesions(length=train_size, image_size=image_size, seed=seed, **norm)
    )
    val_set = SyntheticLesions(length=val_size, image_size=image_size, seed=seed + 10_000, **norm)
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, collate_fn=collate_prompts,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=32, collate_fn=collate_prompts)

    n_params = model.num_parameters(trainable_only=True)
    print(f"vlsegkit demo: clipseg-tiny, {n_params / 1e6:.2f}M trainable parameters, "
          f"{image_size}px, {len(train_set)} training / {len(val_set)} validation images")  # fmt: skip
    before = evaluate(model, val_loader)
    print(f"before training: Dice {before['dice']:.3f}  IoU {before['iou']:.3f}")

    # One optimiser for the whole run, cosine-decayed per epoch; a fixed epoch count keeps the
    # demo reproducible (about two minutes on two CPU cores).
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=lr / 20)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        history = fit(model, train_loader, epochs=1, optimizer=optimizer, progress=progress)
        schedule.step()
        print(f"epoch {epoch:2d}/{epochs}: train loss {history.train_loss[-1]:.4f} "
              f"({time.perf_counter() - start:.0f}s)")  # fmt: skip
    after = evaluate(model, val_loader)
    elapsed = time.perf_counter() - start
    print(
        f"after {epochs} epochs ({elapsed:.0f}s): Dice {after['dice']:.3f}  IoU {after['iou']:.3f}"
    )

    out_dir = Path(out)
    paths = write_overlays(model, val_set, out_dir)
    model.save_pretrained(out_dir / "model")
    print(f"wrote {len(paths)} overlays (image | ground truth | prediction) to {out_dir.resolve()}")
    print(f"saved the trained model to {(out_dir / 'model').resolve()}")
    return {"before": before, "after": after, "epochs": epochs, "overlays": paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (overlays, model)")
    parser.add_argument("--epochs", type=int, default=14, help="training epochs (~8 s each here)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show per-step progress bars")
    args = parser.parse_args(argv)
    run_demo(
        args.out, epochs=args.epochs, image_size=args.image_size, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
