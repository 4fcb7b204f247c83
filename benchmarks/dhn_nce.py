"""Benchmark: DHN-NCE (paper and released forms) against CLIP's cross-entropy loss, forward + backward.

The reference is the standard symmetric CLIP loss on the same ``(B, D)`` embeddings,
``CE(S) + CE(Sᵀ)`` with ``S = normalize(I) normalize(T)ᵀ / τ`` (``F.cross_entropy``), i.e. what
InfoNCE costs with PyTorch's fused kernels. vlsegkit's losses compute in log space from the same
``(B, B)`` similarity matrix (a few ``(B, B)`` temporaries, nothing ``(B, B, D)``), so their cost
should stay a small constant factor of the reference at every batch size.

Each (implementation, size) pair runs in a fresh subprocess for memory: peak memory is the growth of
the process's peak resident set (``VmHWM``) during one forward + backward pass after a warm-up pass,
with glibc's mmap threshold pinned so freed tensors go back to the OS. Time is the best of
``--repeats`` passes, the implementations interleaved in one process.

Usage::

    python benchmarks/dhn_nce.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

SIZES = {"B=256": (256, 512), "B=1024": (1024, 512), "B=4096": (4096, 512)}
IMPLS = ("clip-ce", "dhn-nce", "dhn-nce-released", "infonce")
TAU = 0.6


def _setup(size: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    b, d = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(b, d, generator=gen).requires_grad_()
    text = (image.detach() + torch.randn(b, d, generator=gen)).requires_grad_()
    return image, text


def _loss_fn(impl: str):
    import torch
    import torch.nn.functional as F

    from vlsegkit.losses import DHNNCELoss, InfoNCELoss

    if impl == "clip-ce":

        def clip(image, text):
            s = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / TAU
            target = torch.arange(s.shape[0])
            return F.cross_entropy(s, target, reduction="sum") + F.cross_entropy(
                s.T, target, reduction="sum"
            )

        return clip
    if impl == "dhn-nce":
        return DHNNCELoss(temperature=TAU)
    if impl == "dhn-nce-released":
        return DHNNCELoss(temperature=TAU, released=True)
    return InfoNCELoss(temperature=TAU)


def _step(impl: str, image, text):
    loss_fn = _loss_fn(impl)

    def step():
        image.grad = text.grad = None
        loss_fn(image, text).backward()

    return step


def _memory_worker(impl: str, size: str, threads: int) -> None:
    image, text = _setup(size, threads)
    step = _step(impl, image, text)
    step()  # warm-up at full size
    with PeakRSS() as mem:
        step()
    print(json.dumps({"peak_mb": mem.growth / 2**20}))


def _time_worker(size: str, repeats: int, threads: int) -> None:
    image, text = _setup(size, threads)
    steps = {impl: _step(impl, image, text) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for step in steps.values():
        step()
    for _ in range(repeats):  # interleaved: a change in machine load hits every implementation
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    print(json.dumps({impl: 1e3 * min(ts) for impl, ts in times.items()}))


def _run(args: argparse.Namespace, *extra: str, pin_mmap: bool) -> dict:
    env = dict(os.environ)
    if pin_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd = [sys.executable, os.path.abspath(__file__), *common, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-worker", choices=IMPLS)
    parser.add_argument("--time-worker", action="store_true")
    parser.add_argument("--size", choices=list(SIZES))
    args = parser.parse_args()
    if args.memory_worker:
        _memory_worker(args.memory_worker, args.size, args.threads)
        return
    if args.time_worker:
        _time_worker(args.size, args.repeats, args.threads)
        return
    print(
        f"contrastive losses on (B, 512) fp32 embeddings, forward+backward, tau={TAU}, "
        f"threads={args.threads}, best of {args.repeats} (interleaved); peak MB = peak RSS growth "
        "during one forward+backward; ratios against clip-ce (F.cross_entropy both ways)"
    )
    header = f"{'size':<9}{'impl':<19}{'ms':>9}{'peak MB':>9}{'time/ref':>9}{'mem/ref':>8}"
    print(header)
    print("-" * len(header))
    for size in SIZES:
        times = _run(args, "--time-worker", "--size", size, pin_mmap=False)
        mems = {
            impl: _run(args, "--memory-worker", impl, "--size", size, pin_mmap=True)["peak_mb"]
            for impl in IMPLS
        }
        for impl in IMPLS:
            print(
                f"{size:<9}{impl:<19}{times[impl]:>9.1f}{mems[impl]:>9.1f}"
                f"{times[impl] / times['clip-ce']:>9.2f}"
                f"{mems[impl] / max(mems['clip-ce'], 1e-9):>8.2f}"
            )


if __name__ == "__main__":
    main()
