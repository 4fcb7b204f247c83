"""Benchmark: fused ``probabilistic_attention`` vs a plain explicit-matmul reference (forward + backward).

The reference is the textbook computation of MedCLIPSeg eqs. 7-9 in the same dtype::

    s = q k_mu^T / sqrt(d) - beta * sqrt(clamp((q*q) k_var^T / d, 0));  out = softmax(s) v

Each (implementation, size) pair runs in a fresh subprocess so peak memory is not polluted by the
others. Peak memory is the growth of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` where the kernel allows it, else ``getrusage`` max RSS) during one
forward + backward pass (after a full-size warm-up pass), with glibc's mmap threshold pinned so freed tensors go back to the OS and the
RSS follows the live tensors. Time is the best of ``--repeats`` passes, the implementations interleaved in one process.

Usage::

    python benchmarks/probabilistic_attention.py [--repeats 5] [--threads 1] [--chunk-size 256]

One thread by default: on a small shared machine, OpenMP threads that wait for a descheduled peer make
multi-threaded timings of small kernels meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

SIZES = {
    # B, heads, N (image queries), M (text keys), d = dv = D_s
    "paper (N=197, M=256)": (8, 1, 197, 256, 256),
    "high-res (N=4096, M=256)": (8, 1, 4096, 256, 256),
}
BETA = 2.35


def _reference(q, k_mu, k_var, v, beta: float):
    d = q.shape[-1]
    s_mu = q @ k_mu.transpose(-1, -2) / d**0.5
    s_var = (q * q) @ k_var.transpose(-1, -2) / d
    return (s_mu - beta * s_var.clamp(min=0).sqrt()).softmax(dim=-1) @ v


IMPLS = ("reference", "fused", "fused-chunked")


def _setup(size: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    b, h, n, m, d = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=gen).requires_grad_()
    k_mu = torch.randn(b, h, m, d, generator=gen).requires_grad_()
    k_var = torch.rand(b, h, m, d, generator=gen).add_(0.1).requires_grad_()
    v = torch.randn(b, h, m, d, generator=gen).requires_grad_()
    grad_out = torch.randn(b, h, n, d, generator=gen)
    return (q, k_mu, k_var, v), grad_out


def _step_fn(impl: str, inputs, grad_out, chunk_size: int, backward: bool = True):
    import torch

    from vlsegkit.ops import probabilistic_attention

    cs = chunk_size if impl == "fused-chunked" else None

    def forward():
        if impl == "reference":
            return _reference(*inputs, BETA)
        return probabilistic_attention(*inputs, beta=BETA, chunk_size=cs)

    def step():
        for t in inputs:
            t.grad = None
        forward().backward(grad_out)

    def infer():
        with torch.no_grad():
            forward()

    return step if backward else infer


def _memory_worker(impl: str, size: str, chunk_size: int, threads: int) -> None:
    inputs, grad_out = _setup(size, threads)
    step = _step_fn(impl, inputs, grad_out, chunk_size)
    step()  # warm-up at full size: thread pools, BLAS buffers, autograd engine
    for t in inputs:
        t.grad = None
    with PeakRSS() as mem:
        step()
    print(json.dumps({"peak_mb": mem.growth / 2**20}))


def _time_worker(size: str, repeats: int, chunk_size: int, threads: int) -> None:
    inputs, grad_out = _setup(size, threads)
    steps = {
        (impl, backward): _step_fn(impl, inputs, grad_out, chunk_size, backward)
        for impl in IMPLS
        for backward in (True, False)
    }
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in steps}
    for step in steps.values():
        step()  # warm-up
    # interleaved so that a change in machine load hits every implementation alike
    for _ in range(repeats):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    best = {
        f"{impl}/{'train' if bwd else 'infer'}": 1e3 * min(ts) for (impl, bwd), ts in times.items()
    }
    print(json.dumps(best))


def _run(args: argparse.Namespace, *extra: str, pin_mmap: bool) -> dict:
    env = dict(os.environ)
    if pin_mmap:
        # fixed mmap threshold: large frees return to the OS, so RSS tracks live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    common = ["--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size)]
    common += ["--threads", str(args.threads)]
    cmd = [sys.executable, os.path.abspath(__file__), *common, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--memory-worker", choices=IMPLS)
    parser.add_argument("--time-worker", action="store_true")
    parser.add_argument("--size", choices=list(SIZES))
    args = parser.parse_args()
    if args.memory_worker:
        _memory_worker(args.memory_worker, args.size, args.chunk_size, args.threads)
        return
    if args.time_worker:
        _time_worker(args.size, args.repeats, args.chunk_size, args.threads)
        return

    print(
        f"probabilistic attention, fp32 forward+backward, beta={BETA}, threads={args.threads}, "
        f"chunk_size={args.chunk_size}, best of {args.repeats} (interleaved); peak MB = peak RSS "
        "growth during one forward+backward"
    )
    header = (
        f"{'size':<26}{'impl':<15}{'fwd+bwd ms':>11}{'peak MB':>9}{'time/ref':>9}{'mem/ref':>8}"
        f"{'no-grad fwd ms':>16}{'time/ref':>9}"
    )
    print(header)
    print("-" * len(header))
    for size in SIZES:
        times = _run(args, "--time-worker", "--size", size, pin_mmap=False)
        mems = {
            impl: _run(args, "--memory-worker", impl, "--size", size, pin_mmap=True)["peak_mb"]
            for impl in IMPLS
        }
        for impl in IMPLS:
            train, infer = times[f"{impl}/train"], times[f"{impl}/infer"]
            print(
                f"{size:<26}{impl:<15}{train:>11.1f}{mems[impl]:>9.1f}"
                f"{train / times['reference/train']:>9.2f}"
                f"{mems[impl] / max(mems['reference'], 1e-9):>8.2f}"
                f"{infer:>16.1f}{infer / times['reference/infer']:>9.2f}"
            )


if __name__ == "__main__":
    main()
