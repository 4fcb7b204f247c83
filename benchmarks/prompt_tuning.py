"""Benchmark: TuneVLSeg's context learners vs decoder-only and full fine-tuning of CLIPSeg.

For every method, on one configuration (default: the CLIPSeg ViT-B/16 rd64 architecture with random
weights -- no download -- at 224 px, batch 4, one prompt per image, prompt depth 3, learnable
upsampler on), the table gives

* trainable parameters;
* time per training step (forward + backward + AdamW step), best of ``--repeats`` steps after a
  warm-up step (the minimum is the statistic least disturbed by other load on a shared machine);
* peak memory of one training step: growth of the process's peak resident set (``VmHWM``, reset
  through ``/proc/self/clear_refs``; ``getrusage`` otherwise) over the resident set before the
  step, after a warm-up step has allocated the optimizer state -- i.e. activations kept for
  backward, gradients and temporaries. glibc's mmap threshold is pinned so freed tensors return to
  the OS and the resident set follows the live tensors. On CUDA (``--device cuda``) it is
  ``torch.cuda.max_memory_allocated`` growth instead;
* the same with gradient checkpointing (``TunedModel(gradient_checkpointing=True)`` /
  ``CLIPSeg.gradient_checkpointing``): frozen tower blocks are recomputed in backward instead of
  storing their activations, which matters whenever gradients must flow through the towers to
  the prompts (every learner here, and full fine-tuning). Decoder-only training needs no graph
  through the towers, so checkpointing does not apply.

Each (method, checkpointing) pair runs in a fresh subprocess so neither memory nor thread pools leak
between rows.

Usage::

    python benchmarks/prompt_tuning.py [--model clipseg-rd64] [--image-size 224] [--batch-size 4]
        [--depth 3] [--repeats 3] [--threads 1] [--methods coop vpt ...]

Quick smoke run: ``--model clipseg-tiny --image-size 128 --depth 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

METHODS = (
    "decoder-only",
    "full",
    "coop",
    "cocoop",
    "vpt",
    "maple",
    "shared-separate",
    "shared-attention",
)
NO_CHECKPOINTING = ("decoder-only",)


# ---------------------------------------------------------------------------- one row
def _build(method: str, args: argparse.Namespace, checkpointing: bool):
    import torch

    import vlsegkit
    from vlsegkit.prompts import VPT, CoCoOp, CoOp, MaPLe, SharedAttention, SharedSeparate

    torch.manual_seed(0)
    base = vlsegkit.create_model(args.model, image_size=args.image_size)
    if method == "decoder-only":
        return base.freeze_backbone(True)
    if method == "full":
        base.freeze_backbone(False)
        base.gradient_checkpointing = checkpointing
        return base
    learner = {
        "coop": CoOp,
        "cocoop": CoCoOp,
        "vpt": VPT,
        "maple": MaPLe,
        "shared-separate": SharedSeparate,
        "shared-attention": SharedAttention,
    }[method](depth=args.depth)
    return learner.attach(base, upsampler=True, gradient_checkpointing=checkpointing)


def _worker(method: str, checkpointing: bool, args: argparse.Namespace) -> None:
    import torch

    from vlsegkit.data import SyntheticLesions, collate_prompts
    from vlsegkit.losses import DiceBCELoss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(method, args, checkpointing).to(device).train()
    data = SyntheticLesions(
        length=args.batch_size, image_size=args.image_size, seed=0,
        mean=model.image_mean, std=model.image_std,
    )  # fmt: skip
    batch = collate_prompts([data[i] for i in range(len(data))])
    images, masks, prompts = batch["image"].to(device), batch["mask"].to(device), batch["prompt"]
    params = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = DiceBCELoss()

    def step() -> None:
        loss = loss_fn(model(images, prompts).logits, masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: optimizer state, thread pools, allocator
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
        process_peak = torch.cuda.max_memory_allocated()
    else:
        with PeakRSS() as mem:
            step()
        peak, process_peak = mem.growth, mem.peak
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "trainable": sum(p.numel() for p in params),
                "total": sum(p.numel() for p in model.parameters()),
                "step_ms": 1e3 * min(times),
                "peak_mb": peak / 2**20,
                "process_peak_mb": process_peak / 2**20,
            }
        )
    )


def _run(method: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large frees go back to the OS: RSS tracks tensors
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method]
    cmd += ["--model", args.model, "--image-size", str(args.image_size)]
    cmd += ["--batch-size", str(args.batch_size), "--depth", str(args.depth)]
    cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--device", args.device]
    if checkpointing:
        cmd.append("--checkpointing")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{method} (checkpointing={checkpointing}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipseg-rd64", help="registry name (random weights)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3, help="prompt depth J of every learner")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.checkpointing, args)
        return

    print(
        f"{args.model} (random weights), {args.image_size} px, batch {args.batch_size}, one prompt "
        f"per image, prompt depth {args.depth}, learnable upsampler, fp32, {args.device}, "
        f"{args.threads} threads; step = forward + backward + AdamW; best of {args.repeats}"
    )
    header = (
        f"{'method':<18}{'trainable':>12}{'% params':>10}{'ms/step':>9}{'peak MB':>9}"
        f"{'+ckpt ms':>10}{'+ckpt MB':>10}{'saved':>8}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for method in args.methods:
        plain = _run(method, False, args)
        ckpt = None if method in NO_CHECKPOINTING else _run(method, True, args)
        results[method] = (plain, ckpt)
        share = 100 * plain["trainable"] / plain["total"]
        line = (
            f"{method:<18}{plain['trainable']:>12,}{share:>9.3f}%{plain['step_ms']:>9.0f}"
            f"{plain['peak_mb']:>9.0f}"
        )
        if ckpt is None:
            line += f"{'n/a':>10}{'n/a':>10}{'':>8}"
        else:
            saved = 100 * (1 - ckpt["peak_mb"] / max(plain["peak_mb"], 1e-9))
            line += f"{ckpt['step_ms']:>10.0f}{ckpt['peak_mb']:>10.0f}{saved:>7.0f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
