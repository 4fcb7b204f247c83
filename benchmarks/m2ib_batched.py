"""Benchmark: M2IB saliency for a batch of images, batched vs one image at a time.

Three ways to compute the same maps (MedCLIP-SAMv2's settings: bottleneck after block ``--layer``
= 9, 10 Adam steps at lr 1, 10 noise copies, β = 1), fp32 on CPU:

* ``released``: what ``saliency_maps/scripts/iba.py`` does, restated on the upstream transformers
  ``CLIPModel`` -- per image, the encoder block wrapped by the bottleneck, a fresh ``(1, N, D)``
  alpha and Adam, ``steps`` full forward passes of both towers over ``samples`` copies (the model's
  parameters require gradients, as in the release, so backward runs through every block);
* ``single``: :class:`vlsegkit.attribution.M2IBAttributor` called once per image (blocks up to the
  bottleneck run once, ``steps - 1`` suffix passes, no parameter gradients);
* ``batched``: the attributor called once on the whole batch (one alpha and Adam state per image).

The model is a transformers CLIP with a ViT-Ti/16-shaped vision tower (width 192, 12 blocks, 224
px -> 197 tokens; ``--width`` / ``--blocks`` change it, e.g. ``--width 768`` for ViT-B/16) and a
12-block text tower of width 256 with CLIP's 49408-token vocabulary, random weights. Times are one run each after a warm-up (``--repeats`` for the best of several, the three
interleaved); peak memory is the growth of the peak resident set during one run after a warm-up, each
implementation in a fresh subprocess (``VmHWM`` reset through ``/proc/self/clear_refs``). The maps of
the three agree (noise replayed) to the printed max |diff|.

Usage::

    python benchmarks/m2ib_batched.py [--batch 8] [--threads 2] [--repeats 1] [--width 192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

IMPLS = ("released", "single", "batched")


def _setup(args: argparse.Namespace):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from vlsegkit.attribution import M2IBAttributor
    from vlsegkit.encoders import from_clip_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = args.width // 64
    vision = dict(hidden_size=args.width, intermediate_size=4 * args.width, image_size=224,
                  num_hidden_layers=args.blocks, num_attention_heads=heads, patch_size=16)  # fmt: skip
    text = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                num_attention_heads=4, vocab_size=49408, max_position_embeddings=77)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=256)).eval()
    attributor = M2IBAttributor(
        *from_clip_model(model), layer=args.layer, beta=1.0, steps=args.steps,
        samples=args.samples,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen)
    ids = torch.tensor([[49406, 320, 1845, 6378, 49407]])  # <start> a breast tumor <end>
    return model, attributor, images, ids


def _released(model, layer, ids, image, *, steps, samples, noise=None):
    """The released IBAInterpreter loop for one image (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.alpha = nn.Parameter(torch.full((1, *shape), 5.0))
            self.calls, self.buffer_capacity = 0, None

        def forward(self, x):
            lamb = torch.sigmoid(self.alpha).expand(x.shape[0], x.shape[1], -1)
            mu, var = x * lamb, (1 - lamb) ** 2
            self.buffer_capacity = -0.5 * (1 + torch.log(var) - mu**2 - var)
            eps = torch.randn_like(mu) if noise is None else noise[self.calls]
            self.calls += 1
            return mu + var.sqrt() * eps

    class Sequential(nn.Module):
        def __init__(self, block, bottleneck):
            super().__init__()
            self.block, self.bottleneck = block, bottleneck

        def forward(self, *a, **k):
            out = self.block(*a, **k)
            first = out[0] if isinstance(out, tuple) else out
            y = self.bottleneck(first)
            return (y, *out[1:]) if isinstance(out, tuple) else y

    blocks = model.vision_model.encoder.layers
    original = blocks[layer]
    n = (image.shape[-1] // 16) ** 2 + 1
    bottleneck = Bottleneck((n, model.config.vision_config.hidden_size))
    blocks[layer] = Sequential(original, bottleneck)
    try:
        optimizer = torch.optim.Adam(bottleneck.parameters(), lr=1.0)
        cos = nn.CosineSimilarity(eps=1e-6)
        for _ in range(steps):
            optimizer.zero_grad()
            t = model.get_text_features(input_ids=ids.expand(samples, -1))
            i = model.get_image_features(image.expand(samples, -1, -1, -1))
            t, i = getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)
            loss = 1.0 * bottleneck.buffer_capacity.mean() - cos(t, i).mean()
            loss.backward()
            optimizer.step()
    finally:
        blocks[layer] = original
    sal = torch.nansum(bottleneck.buffer_capacity.mean(0), -1)[1:]
    side = int(sal.numel() ** 0.5)
    up = F.interpolate(sal.reshape(1, 1, side, side), size=224, mode="bilinear")[0, 0]
    return ((up - up.min()) / (up.max() - up.min())).detach()


def _run_fn(impl: str, model, attributor, images, ids, args, noise=None):
    import torch

    def gens():
        return [torch.Generator().manual_seed(100 + b) for b in range(len(images))]

    def released():
        out = []
        for b in range(len(images)):
            if noise is None:
                torch.manual_seed(100 + b)
            nb = None if noise is None else noise[b]
            out.append(_released(model, args.layer, ids, images[b : b + 1], steps=args.steps,
                                 samples=args.samples, noise=nb))  # fmt: skip
        return torch.stack(out)

    def single():
        g = gens()
        return torch.cat(
            [attributor(images[b : b + 1], ids, generator=None if noise is not None else [g[b]],
                        noise=None if noise is None else noise[b : b + 1])
             for b in range(len(images))]
        )  # fmt: skip

    def batched():
        return attributor(images, ids, generator=None if noise is not None else gens(), noise=noise)

    return {"released": released, "single": single, "batched": batched}[impl]


def _memory_worker(impl: str, args: argparse.Namespace) -> None:
    model, attributor, images, ids = _setup(args)
    run = _run_fn(impl, model, attributor, images, ids, args)
    run()  # warm-up
    with PeakRSS() as mem:
        run()
    print(json.dumps({"peak_mb": mem.growth / 2**20}))


def _time_worker(args: argparse.Namespace) -> None:
    import torch

    model, attributor, images, ids = _setup(args)
    n = (224 // 16) ** 2 + 1
    noise = torch.randn(args.batch, args.steps, args.samples, n, args.width,
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
    maps = {impl: _run_fn(impl, model, attributor, images, ids, args, noise)() for impl in IMPLS}
    diffs = {impl: float((maps[impl] - maps["released"]).abs().max()) for impl in IMPLS}
    del noise, maps
    runs = {impl: _run_fn(impl, model, attributor, images, ids, args) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(args.repeats):
        for impl, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - t0)
    print(json.dumps({"time": {k: min(v) for k, v in times.items()}, "diff": diffs}))


def _run(args: argparse.Namespace, *extra: str, pin_mmap: bool) -> dict:
    env = dict(os.environ)
    if pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    common = []
    for name in ("batch", "threads", "repeats", "width", "blocks", "layer", "steps", "samples"):
        common += [f"--{name}", str(getattr(args, name))]
    cmd = [sys.executable, os.path.abspath(__file__), *common, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--memory-worker")
    parser.add_argument("--time-worker", action="store_true")
    args = parser.parse_args()
    if args.memory_worker:
        _memory_worker(args.memory_worker, args)
        return
    if args.time_worker:
        _time_worker(args)
        return

    res = _run(args, "--time-worker", pin_mmap=False)
    times, diffs = res["time"], res["diff"]
    mems = {impl: _run(args, "--memory-worker", impl, pin_mmap=True)["peak_mb"] for impl in IMPLS}
    print(
        f"M2IB saliency, fp32 CPU, batch {args.batch}, ViT width {args.width} x {args.blocks} "
        f"blocks at 224 px, bottleneck after block {args.layer}, {args.steps} steps x "
        f"{args.samples} copies, threads={args.threads}, best of {args.repeats}; peak MB = peak "
        "RSS growth during one run"
    )
    header = (
        f"{'impl':<10}{'time s':>9}{'img/s':>8}{'peak MB':>9}{'vs single':>11}"
        f"{'vs released':>13}{'max|diff| vs released':>23}"
    )
    print(header)
    print("-" * len(header))
    for impl in IMPLS:
        print(
            f"{impl:<10}{times[impl]:>9.2f}{args.batch / times[impl]:>8.3f}{mems[impl]:>9.1f}"
            f"{times['single'] / times[impl]:>10.2f}x{times['released'] / times[impl]:>12.2f}x"
            f"{diffs[impl]:>23.1e}"
        )


if __name__ == "__main__":
    main()
