"""Benchmark: BiomedCLIPSeg forward (and decoder training step), vlsegkit vs medvlsm's forward.

Configuration (default): the ``biomedclipseg`` architecture (timm ViT-B/16 + BERT-base, CLIPSeg
rd64-refined decoder on blocks 4, 7, 10) with random weights (no download) at 224 px, batch 4, one
12-token prompt per image, fp32.

The reference is medvlsm's ``BiomedCLIPSeg.forward`` on the same module objects: the timm trunk run
block by block under ``torch.inference_mode`` keeping every block output (and, as medvlsm does,
finishing the trunk and its head), the open_clip BERT encoder (pooler + projection), and
transformers' ``CLIPSegDecoder`` holding vlsegkit's decoder weights (identical names). vlsegkit
steps the towers with the runner and stops the vision tower after the deepest tapped block.

Rows: ``forward`` (eval, no grad) and ``train decoder`` (frozen towers, forward + backward + AdamW
on the decoder: medvlsm's recipe). Time is the best of ``--repeats`` after a warm-up, the two
implementations alternating in one process (both feel the same background load); memory is the
growth of the peak resident set of one call, each implementation in its own process
(``benchmarks/_memory.py``).

Usage::

    python benchmarks/biomedclipseg.py [--model biomedclipseg] [--image-size 224]
        [--batch-size 4] [--repeats 3] [--threads 1]

Quick smoke run: ``--batch-size 1 --repeats 1`` (at 224 px: the reference runs timm's fixed-size
patch embedding as medvlsm does; it also needs the BERT text tower, so the tiny models, which have a
CLIP text tower, do not apply).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

ROWS = ("forward", "train decoder")
IMPLS = ("vlsegkit", "medvlsm")


def _medvlsm(model):
    """medvlsm's forward over ``model``'s upstream modules and a transformers decoder copy."""
    import torch
    from transformers import CLIPSegConfig
    from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

    dec = model.decoder
    config = CLIPSegConfig(
        projection_dim=dec.cond_dim,
        reduce_dim=dec.film_mul.out_features,
        extract_layers=list(range(dec.depth)),
        decoder_num_attention_heads=dec.layers[0].self_attn.num_heads,
        decoder_intermediate_size=dec.layers[0].mlp.fc1.out_features,
        conditional_layer=dec.conditional_layer,
        use_complex_transposed_convolution=isinstance(
            dec.transposed_convolution, torch.nn.Sequential
        ),
        vision_config={
            "hidden_size": dec.vision_width,
            "patch_size": model.vision_tower.patch_size,
        },
    )
    hf_decoder = CLIPSegDecoder(config)
    hf_decoder.load_state_dict(dec.state_dict())
    trunk = model.vision_tower.visual.trunk
    head = model.vision_tower.visual.head
    bert = model.text_tower.text
    taps = [i - 1 for i in model.extract_layers]  # medvlsm: hidden[i + 1] of block outputs

    def forward(pixels, ids, mask):
        with torch.inference_mode():
            x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
            hidden = []
            for block in trunk.blocks:
                x = block(x)
                hidden.append(x)
            head(trunk.head(trunk.fc_norm(trunk.norm(x)[:, 0])))  # the unused pooled output
        # normal tensors again (inference tensors cannot be saved for the decoder's backward)
        activations = [hidden[i + 1].clone() for i in taps]
        cond = bert.proj(bert.pooler(bert.transformer(input_ids=ids, attention_mask=mask), mask))
        logits = hf_decoder(activations, cond).logits
        return logits.reshape(pixels.shape[0], 1, *pixels.shape[-2:])

    return hf_decoder, forward


def _setup(row: str, args: argparse.Namespace):
    """``{impl: call}`` over one model (the towers are shared, the decoders are copies)."""
    import torch

    import vlsegkit
    from vlsegkit.losses import DiceBCELoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vlsegkit.create_model(args.model, image_size=args.image_size).eval()
    model.freeze_backbone(True)
    b, size = args.batch_size, args.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.zeros(b, 16, dtype=torch.long)
    ids[:, 0], ids[:, 11] = 2, 3
    ids[:, 1:11] = torch.randint(5, 1000, (b, 10), generator=g)
    mask = (ids != 0).long()
    masks = (torch.rand(b, 1, size, size, generator=g) > 0.7).float()
    hf_decoder, medvlsm = _medvlsm(model)
    runs = {
        "vlsegkit": (
            model.decoder,
            lambda: model(images, input_ids=ids, attention_mask=mask).logits,
        ),
        "medvlsm": (hf_decoder, lambda: medvlsm(images, ids, mask)),
    }
    diff = None
    if row == "forward":
        with torch.no_grad():
            diff = (runs["vlsegkit"][1]() - runs["medvlsm"][1]()).abs().max().item()
    loss_fn = DiceBCELoss()
    calls = {}
    for impl, (decoder, run) in runs.items():
        if row == "forward":

            def call(run=run) -> None:
                with torch.no_grad():
                    run()

        else:
            decoder.train()
            optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)

            def call(run=run, optimizer=optimizer) -> None:
                loss_fn(run(), masks).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        calls[impl] = call
    return calls, diff


def _worker(row: str, mode: str, args: argparse.Namespace) -> None:
    """``"time"``: both implementations alternating, best of ``repeats`` each; an implementation's
    name: its peak-memory growth alone."""
    calls, diff = _setup(row, args)
    if mode == "time":
        times: dict[str, list[float]] = {impl: [] for impl in calls}
        for call in calls.values():
            call()
        for _ in range(args.repeats):
            for impl, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[impl].append(time.perf_counter() - t0)
        result = {f"{impl}_ms": 1e3 * min(t) for impl, t in times.items()}
        print(json.dumps({**result, "max_diff": diff}))
        return
    call = calls[mode]
    del calls
    call()
    with PeakRSS() as mem:
        call()
    print(json.dumps({"peak_mb": mem.growth / 2**20}))


def _run(row: str, mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--mode", mode]
    cmd += ["--model", args.model, "--image-size", str(args.image_size)]
    cmd += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{row} / {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="biomedclipseg", help="registry name (random weights)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("time", *IMPLS), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.mode, args)
        return
    print(
        f"{args.model} (random weights), {args.image_size} px, batch {args.batch_size}, one "
        f"12-token prompt per image, fp32, cpu, {args.threads} threads; time: best of "
        f"{args.repeats}, the two implementations alternating in one process"
    )
    header = f"{'row':<15}{'ms':>9}{'medvlsm':>9}{'ratio':>7}{'MB':>8}{'medvlsm':>9}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for row in args.rows:
        t = _run(row, "time", args)
        ours, ref = _run(row, "vlsegkit", args)["peak_mb"], _run(row, "medvlsm", args)["peak_mb"]
        print(
            f"{row:<15}{t['vlsegkit_ms']:>9.0f}{t['medvlsm_ms']:>9.0f}"
            f"{t['vlsegkit_ms'] / t['medvlsm_ms']:>7.2f}{ours:>8.0f}{ref:>9.0f}"
            + (f"{ours / ref:>7.2f}" if ref >= 1 else f"{'-':>7}")
        )
        if t["max_diff"] is not None:
            print(f"{'':<15}(forward: max |logits - medvlsm logits| = {t['max_diff']:.1e})")


if __name__ == "__main__":
    main()
