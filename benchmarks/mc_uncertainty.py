"""Benchmark: MedCLIPSeg Monte Carlo uncertainty, batched streaming vs a loop of single passes.

Both compute the paper's 30-sample inference (Koleilat et al., CVPR 2026, section 3.2: mean sigmoid
probability and binary entropy of the mean) for the same images and prompt, in fp32 on CPU:

* ``loop``: what the official ``test.py`` does -- ``samples`` full forward passes (both towers, every
  adapter, nothing shared), the probability maps stacked ``(S, B, C, H, W)``, then reduced;
* ``batched-k``: :meth:`MedCLIPSeg.predict_with_uncertainty` with ``batch_samples=k`` -- images and
  prompts encoded once up to the first adapter, ``k`` noise copies per forward pass, running sums
  (memory does not grow with ``samples``). ``k = 1`` isolates the gain of sharing the
  sampling-independent prefix; larger ``k`` adds batching.

The model is a small-but-realistic MedCLIPSeg: a ViT-S/16-shaped vision tower (width 384, 12
blocks, 224 px -> 197 tokens), a 12-layer BERT text tower of width 384 with the released 256-token
max-length padding, 10 PVL adapters of width 256 and the 2-ScaleBlock head, random weights.

Time is the best of ``--repeats`` runs, the two implementations interleaved in one process. Peak
memory is the growth of the peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``,
else ``getrusage``) during one run after a warm-up run, each implementation in a fresh subprocess
with glibc's mmap threshold pinned so freed tensors go back to the OS.

Usage::

    python benchmarks/mc_uncertainty.py [--samples 30] [--batch-samples 1,8,15,30] [--images 1]
                                        [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _memory import PeakRSS

PROMPT = "one small irregular lesion at the top left of the image"


def _setup(args: argparse.Namespace):
    import torch

    from vlsegkit.models import MedCLIPSeg
    from vlsegkit.testing import write_bert_tokenizer_files

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = {
        "kind": "open_clip",
        "embed_dim": 256,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 384, "layers": 12,
                       "head_width": 64},
        "bert_config": {"vocab_size": 512, "hidden_size": 384, "num_hidden_layers": 12,
                        "num_attention_heads": 6, "intermediate_size": 1536,
                        "max_position_embeddings": 512},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mc_bench_tok_") as folder:
        model = MedCLIPSeg(
            backbone=backbone, adapter_dim=256, kv_norm=True, context_length=256,
            text_padding="max_length", tokenizer=str(write_bert_tokenizer_files(folder)),
            image_size=224,
        ).eval()  # fmt: skip
        model.tokenizer  # noqa: B018 - resolve the lazy tokenizer while its files exist
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 224, 224, generator=gen) for _ in range(args.images)]
    return model, images


def _impls(args: argparse.Namespace) -> list[str]:
    return ["loop", *(f"batched-{k}" for k in args.batch_samples)]


def _run_fn(impl: str, model, images, args: argparse.Namespace):
    import torch

    def loop():
        # the official test.py: S full passes, logits stacked, then reduced
        with torch.no_grad():
            pixels, _ = model.preprocess(images)
            gens = model.noise_generators(args.samples, pixels.shape[0], seed=0)
            rows = [[g for image in sample for g in image] for sample in gens]  # per-row streams
            probs = torch.stack([model(pixels, PROMPT, generator=r).logits for r in rows]).sigmoid()
            mean = probs.mean(0)
            entropy = -(mean * torch.log(mean + 1e-8) + (1 - mean) * torch.log(1 - mean + 1e-8))
        return mean, entropy

    def batched(k: int):
        out = model.predict_with_uncertainty(images, PROMPT, args.samples, batch_samples=k, seed=0)
        return torch.stack(out.mean), torch.stack(out.entropy)

    if impl == "loop":
        return loop
    k = int(impl.split("-")[1])
    return lambda: batched(k)


def _memory_worker(impl: str, args: argparse.Namespace) -> None:
    model, images = _setup(args)
    run = _run_fn(impl, model, images, args)
    run()  # warm-up: thread pools, allocator, lazy tokenizer
    with PeakRSS() as mem:
        run()
    print(json.dumps({"peak_mb": mem.growth / 2**20}))


def _time_worker(args: argparse.Namespace) -> None:
    model, images = _setup(args)
    runs = {impl: _run_fn(impl, model, images, args) for impl in _impls(args)}
    results = {impl: run() for impl, run in runs.items()}  # warm-up, and the agreement check
    ref = results["loop"]
    diffs = {
        impl: max((a - b).abs().max().item() for a, b in zip(ref, res))
        for impl, res in results.items()
    }
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    # interleaved so that a change in machine load hits every implementation alike
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
    ks = ",".join(str(k) for k in args.batch_samples)
    common = ["--samples", str(args.samples), "--batch-samples", ks]
    common += ["--images", str(args.images), "--threads", str(args.threads)]
    common += ["--repeats", str(args.repeats)]
    cmd = [sys.executable, os.path.abspath(__file__), *common, *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument(
        "--batch-samples",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[1, 8, 15, 30],
        help="comma-separated batch_samples values to compare",
    )
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
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
    mems = {
        impl: _run(args, "--memory-worker", impl, pin_mmap=True)["peak_mb"] for impl in _impls(args)
    }
    print(
        f"MedCLIPSeg MC uncertainty, fp32 CPU, {args.samples} samples, {args.images} image(s) x 1 "
        f"prompt, threads={args.threads}, best of {args.repeats} (interleaved); peak MB = peak "
        "RSS growth during one run"
    )
    header = (
        f"{'impl':<12}{'time s':>8}{'peak MB':>9}{'speed-up':>10}{'mem/loop':>10}"
        f"{'max|diff| vs loop':>19}"
    )
    print(header)
    print("-" * len(header))
    for impl in _impls(args):
        print(
            f"{impl:<12}{times[impl]:>8.2f}{mems[impl]:>9.1f}{times['loop'] / times[impl]:>10.2f}"
            f"{mems[impl] / max(mems['loop'], 1e-9):>10.2f}{diffs[impl]:>19.1e}"
        )


if __name__ == "__main__":
    main()
