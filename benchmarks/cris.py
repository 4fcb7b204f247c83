"""Benchmark: CRIS-R50 forward and training step, vlsegkit vs a CRIS.pytorch-structured reference.

Configuration (default): CRIS on CLIP RN50 with random weights (no download) at 416 px, batch 4, one
prompt of 9 tokens per image, fp32, eval-mode forward under ``torch.no_grad`` and a train-mode step
(forward + backward + Adam) with Dice + 0.2 BCE.

Rows, each in a fresh subprocess (so neither memory nor thread pools leak between rows):

* ``forward``: ``model(images, input_ids=...)`` -- vlsegkit, and the reference of
  ``tests/_cris_reference.py`` (nn.MultiheadAttention sequence-first, one projector convolution per
  sample, the text encoder without a padding mask, as released) with the same weights;
* ``train frozen`` / ``train unfrozen``: one training step with the backbone (both towers and the
  attention pool's ``connect`` branch) frozen or trained. Frozen towers record no autograd graph and
  keep their BatchNorm statistics (eval mode); the reference runs the same step with
  ``requires_grad_(False)`` on its backbone.

Time is the best of ``--repeats`` after a warm-up, the two implementations alternating step by step
in one process so that both feel the same background load (the minimum is the statistic least
disturbed by other load on a shared machine); memory is the growth of the peak resident set over
the resident set before the measured call, each implementation alone in its own process
(``benchmarks/_memory.py``), or ``torch.cuda.max_memory_allocated`` growth on CUDA. Ratios are
vlsegkit / reference.

Usage::

    python benchmarks/cris.py [--model cris-rn50] [--image-size 416] [--batch-size 4]
        [--repeats 2] [--threads 1] [--device cpu]

Quick smoke run: ``--model cris-tiny --image-size 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

ROWS = ("forward", "train frozen", "train unfrozen")
IMPLS = ("vlsegkit", "reference")
TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")


def _reference_from(model):
    """A reference CRIS (CRIS.pytorch's structure) holding ``model``'s weights under their names."""
    sys.path.insert(0, TESTS)
    from _cris_reference import RefCRIS

    cfg = model.config
    bb = cfg["backbone"]
    ref = RefCRIS(
        layers=tuple(bb["vision_cfg"]["layers"]), width=bb["vision_cfg"]["width"],
        embed=bb["embed_dim"], text_width=bb["text_cfg"]["width"],
        text_layers=bb["text_cfg"]["layers"], fpn_out=tuple(cfg["fpn_out"]),
        dec_layers=cfg["num_layers"], heads=cfg["num_head"], ffn=cfg["dim_ffn"],
        side=bb["vision_cfg"]["image_size"] // 32, head_width=bb["vision_cfg"]["head_width"],
        text_heads=bb["text_cfg"]["heads"],
    )  # fmt: skip
    ours = model.state_dict()
    state = {}
    for key in ref.state_dict():
        if key.startswith("backbone.visual.attnpool.connect."):
            state[key] = ours["connect." + key.split("connect.", 1)[1]]
        elif key.startswith("backbone.visual."):
            state[key] = ours["vision_tower." + key[len("backbone.") :]]
        elif key.startswith("backbone."):
            state[key] = ours.get("text_tower.text." + key[len("backbone.") :])
        else:
            state[key] = ours[key]
    state = {k: v for k, v in state.items() if v is not None}  # logit_scale stays as built
    ref.load_state_dict(state, strict=False)
    ref.decoder.loops = False  # position tables computed with tensor operations, as CRIS.pytorch
    return ref


def _setup(row: str, args: argparse.Namespace):
    """``{impl: call}`` for both implementations (same weights), and the max logit difference."""
    import torch

    import vlsegkit
    from vlsegkit.losses import DiceBCELoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = vlsegkit.create_model(args.model, image_size=args.image_size, dropout=0.0)
    ref = _reference_from(model).to(device)
    model = model.to(device)
    b, size = args.batch_size, args.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    ids = torch.zeros(b, 17, dtype=torch.long)
    ids[:, 0], ids[:, 8] = 49406, 49407
    ids[:, 1:8] = torch.randint(300, 40000, (b, 7), generator=g)
    ids = ids.to(device)
    masks = (torch.rand(b, 1, size, size, generator=g) > 0.7).float().to(device)
    frozen = row == "train frozen"
    model.freeze_backbone(frozen)
    ref.backbone.requires_grad_(not frozen)
    runs = {
        "vlsegkit": (model, lambda: model(images, input_ids=ids).logits),
        "reference": (ref, lambda: ref(images, ids)),
    }
    diff = None
    if row == "forward":
        model.eval(), ref.eval()
        with torch.no_grad():  # the reference computes the same function
            diff = (runs["vlsegkit"][1]() - runs["reference"][1]()).abs().max().item()
    loss_fn = DiceBCELoss(dice_weight=1.0, bce_weight=0.2)
    calls, trainable = {}, {}
    for impl, (net, run) in runs.items():
        trainable[impl] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        if row == "forward":

            def call(run=run) -> None:
                with torch.no_grad():
                    run()

        else:
            net.train()
            if impl == "reference" and frozen:
                for m in net.backbone.modules():  # the frozen-BN semantics vlsegkit applies
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-5)

            def call(run=run, optimizer=optimizer) -> None:
                loss_fn(run(), masks).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        calls[impl] = call
    return calls, trainable, diff, device


def _worker(row: str, mode: str, args: argparse.Namespace) -> None:
    """``mode`` ``"time"``: both implementations, alternating, best of ``repeats`` each (both feel
    the same background load); ``mode`` = an implementation: its peak-memory growth alone."""
    import torch

    calls, trainable, diff, device = _setup(row, args)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if mode == "time":
        times: dict[str, list[float]] = {impl: [] for impl in calls}
        for call in calls.values():
            call()  # warm-up: optimizer state, thread pools, allocator
        sync()
        for _ in range(args.repeats):
            for impl, call in calls.items():
                t0 = time.perf_counter()
                call()
                sync()
                times[impl].append(time.perf_counter() - t0)
        result = {f"{impl}_ms": 1e3 * min(t) for impl, t in times.items()}
        print(json.dumps({**result, "trainable": trainable["vlsegkit"], "max_diff": diff}))
        return
    call = calls[mode]
    del calls  # the other implementation's step is never run here
    call()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with PeakRSS() as mem:
            call()
        peak = mem.growth
    print(json.dumps({"peak_mb": peak / 2**20}))


def _run(row: str, mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large frees go back to the OS: RSS tracks tensors
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--mode", mode]
    cmd += ["--model", args.model, "--image-size", str(args.image_size)]
    cmd += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{row} / {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cris-rn50", help="registry name (random weights)")
    parser.add_argument("--image-size", type=int, default=416)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("time", *IMPLS), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.mode, args)
        return
    print(
        f"{args.model} (random weights), {args.image_size} px, batch {args.batch_size}, one 9-token "
        f"prompt per image, fp32, {args.device}, {args.threads} threads; time: best of "
        f"{args.repeats}, the two implementations alternating in one process"
    )
    header = (
        f"{'row':<16}{'trainable':>12}{'ms':>9}{'ref ms':>9}{'ratio':>7}"
        f"{'MB':>8}{'ref MB':>8}{'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in args.rows:
        t = _run(row, "time", args)
        ours, ref = _run(row, "vlsegkit", args)["peak_mb"], _run(row, "reference", args)["peak_mb"]
        print(
            f"{row:<16}{t['trainable']:>12,}{t['vlsegkit_ms']:>9.0f}{t['reference_ms']:>9.0f}"
            f"{t['vlsegkit_ms'] / t['reference_ms']:>7.2f}{ours:>8.0f}{ref:>8.0f}"
            + (f"{ours / ref:>7.2f}" if ref >= 1 else f"{'-':>7}")
        )
        if t["max_diff"] is not None:
            print(f"{'':<16}(forward: max |logits - reference logits| = {t['max_diff']:.1e})")


if __name__ == "__main__":
    main()
