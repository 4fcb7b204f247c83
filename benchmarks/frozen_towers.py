"""Benchmark: frozen towers without stored activations or repeated work (issue 15, section 2).

Two tables, random weights, fp32 CPU:

1. **Checkpointing frozen blocks.** One training step (forward, loss, backward, Adam step) of models
   whose frozen towers sit between trainable hooks -- CLIPSeg ViT-B/16 with MedCLIPSeg's PVL adapters
   or VLSM-Adapter's dense bottleneck adapters attached, and MedCLIPSeg (UniMedCLIP ViT-B/16 +
   BiomedBERT shape, ``"longest"`` padding) -- and, for contrast, CLIPSeg fine-tuned with frozen
   towers and no hook (its towers record no graph at all, so there is nothing to checkpoint). Each
   with ``gradient_checkpointing`` False and True (``"auto"``, the default, is False below
   :data:`~vlsegkit.encoders.runner.AUTO_CHECKPOINT_BYTES`; the estimate is printed). Time and the
   growth of the peak resident set during the step (``VmHWM`` reset before it, glibc's mmap threshold
   pinned so freed tensors return to the OS), each row in a fresh subprocess after a warm-up step.
2. **Text encoded once.** A CLIPSeg decoder-only training step (frozen towers, no hook) on a batch
   whose images share a few prompts: every image's prompt encoded (the rows unfolded, as before
   string folding), each distinct prompt once (the default), and with a
   :class:`~vlsegkit.encoders.text_cache.TextCache` across steps. Time per step, interleaved.

Monte Carlo inference (one prefix, copies batched, the first adapter's sampling-independent work
shared) is measured by ``benchmarks/mc_uncertainty.py`` and ``benchmarks/medclipseg_vs_official.py``.

Usage::

    python benchmarks/frozen_towers.py [--threads 2] [--repeats 2] [--batch 8] [--image-size 224]
        [--prompts 2]

``--smoke`` uses the tiny registry models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

ROWS = ("clipseg-frozen", "clipseg+pvl", "clipseg+dense", "medclipseg")
PROMPTS = (
    "one small round polyp at the left of the image",
    "a large irregular lesion in the center",
    "two small dark nodules at the top of the image",
    "an oval mass at the bottom right",
)


def _medclipseg_kwargs(args) -> dict:
    from vlsegkit.models import MedCLIPSeg

    config = MedCLIPSeg.released_config(text_padding="longest", frozen_towers="eval")
    config["tokenizer"] = args.tok_dir
    return config


def _build(row: str, args):
    import torch

    import vlsegkit
    from vlsegkit import BottleneckAdapters, PVLAdapters
    from vlsegkit.models import MedCLIPSeg

    torch.manual_seed(0)
    if row == "medclipseg":
        if args.smoke:
            return vlsegkit.create_model("medclipseg-tiny")
        return MedCLIPSeg(**_medclipseg_kwargs(args))
    name = "clipseg-tiny" if args.smoke else "clipseg-rd64"
    base = vlsegkit.create_model(name, image_size=args.image_size)
    if row == "clipseg-frozen":
        return base
    hook = PVLAdapters(dim=64 if args.smoke else 256) if row == "clipseg+pvl" else None
    hook = hook or BottleneckAdapters("dense")
    return hook.attach(base)


def _batch(model, args):
    import torch

    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    masks = (torch.rand(b, 1, s, s, generator=g) > 0.7).float()
    prompts = [PROMPTS[i % args.prompts] for i in range(b)]
    return {"image": images, "mask": masks, "prompt": prompts}


def _step_fn(model, args):
    import torch

    batch = _batch(model, args)
    task = model.default_task() if hasattr(model, "default_task") else None
    optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-4)

    def step():
        model.train()
        loss = task.training_step(model, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _estimate(model, args) -> int:
    """``estimate_saved_bytes`` of the model's graph-recording run (what ``"auto"`` compares)."""
    from unittest import mock

    import vlsegkit.encoders.runner as runner

    seen = []
    real = runner.estimate_saved_bytes

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    base = getattr(model, "base", model)
    previous = base.gradient_checkpointing
    base.gradient_checkpointing = "auto"
    with mock.patch.object(runner, "estimate_saved_bytes", spy):
        batch = _batch(model, args)
        model.train()
        model(batch["image"], batch["prompt"])
    base.gradient_checkpointing = previous
    return max(seen, default=0)


def _ckpt_worker(row: str, ckpt: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = _build(row, args)
    estimate = _estimate(model, args)
    getattr(model, "base", model).gradient_checkpointing = ckpt == "on"
    step = _step_fn(model, args)
    step()  # warm-up: optimizer state, thread pools
    times = []
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time": times[0], "peak_mb": mem.growth / 2**20, "estimate": estimate}))


def _text_worker(args) -> None:
    from unittest import mock

    import torch

    import vlsegkit.models.clipseg as clipseg_module
    from vlsegkit.encoders.text_cache import TextCache
    from vlsegkit.models.base import _pairing

    torch.set_num_threads(args.threads)
    model = _build("clipseg-frozen", args)
    step = _step_fn(model, args)

    def unfolded(prompts, batch):  # every image's prompt is its own row
        return list(prompts), _pairing(batch, len(prompts))

    modes = ("unfolded", "once", "cache")
    cache = TextCache()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats * 3 + 1):  # the first round is a warm-up
        for mode in modes:
            model.text_cache = cache if mode == "cache" else None
            t0 = time.perf_counter()
            if mode == "unfolded":
                with mock.patch.object(clipseg_module, "parse_text_prompts", unfolded):
                    step()
            else:
                step()
            if r:
                times[mode].append(time.perf_counter() - t0)
    print(json.dumps({"time": {m: min(t) for m, t in times.items()}, "hits": cache.hits}))


def _run(args, *extra: str, pin_mmap: bool) -> dict:
    env = dict(os.environ)
    if pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    common = ["--threads", str(args.threads), "--batch", str(args.batch)]
    common += ["--image-size", str(args.image_size), "--prompts", str(args.prompts)]
    common += ["--repeats", str(args.repeats), "--tok-dir", args.tok_dir]
    common += ["--smoke"] if args.smoke else []
    cmd = [sys.executable, os.path.abspath(__file__), *common, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {extra} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts in a batch")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tok-dir", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--text-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and args.image_size == 224:
        args.image_size = 64
    if args.ckpt_worker:
        _ckpt_worker(*args.ckpt_worker, args)
        return
    if args.text_worker:
        _text_worker(args)
        return

    from vlsegkit.testing import write_bert_tokenizer_files

    rows = [r for r in args.rows.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="frozen_towers_") as tmp:
        args.tok_dir = str(write_bert_tokenizer_files(tmp))
        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):
            for row in rows:
                for ckpt in ("off", "on"):
                    res = _run(args, "--ckpt-worker", row, ckpt, pin_mmap=True)
                    results.setdefault((row, ckpt), []).append(res)
        text = _run(args, "--text-worker", pin_mmap=False)

    print(
        f"training step with frozen towers, batch {args.batch}, {args.image_size} px, fp32 CPU, "
        f"threads={args.threads}, best of {args.repeats} fresh subprocesses; peak MB = growth of the "
        "peak resident set during the step"
    )
    header = (
        f"{'model':<16}{'auto estimate':>15}{'time off':>10}{'time on':>9}{'peak MB off':>13}"
        f"{'peak MB on':>12}{'memory saved':>14}{'time':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        off, on = (
            (
                min(r["time"] for r in results[(row, k)]),
                min(r["peak_mb"] for r in results[(row, k)]),
            )
            for k in ("off", "on")
        )
        estimate = results[(row, "off")][0]["estimate"] / 2**30
        saved = 1 - on[1] / off[1] if off[1] > 0 else 0.0
        print(
            f"{row:<16}{estimate:>11.2f} GiB{off[0]:>10.2f}{on[0]:>9.2f}{off[1]:>13.0f}"
            f"{on[1]:>12.0f}{saved:>13.0%}{on[0] / off[0]:>7.2f}x"
        )
    t = text["time"]
    print(
        f"\nCLIPSeg decoder-only step, {args.batch} images sharing {args.prompts} prompts (best of "
        f"{args.repeats * 3}, interleaved): every prompt encoded {t['unfolded']:.3f} s, each distinct "
        f"prompt once {t['once']:.3f} s ({t['unfolded'] / t['once']:.2f}x), with the text cache "
        f"{t['cache']:.3f} s ({t['unfolded'] / t['cache']:.2f}x; {text['hits']} rows served)"
    )


if __name__ == "__main__":
    main()
