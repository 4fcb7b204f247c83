"""Benchmark: BiomedCLIPSeg forward (and decoder training step), vlsegkit vs medvlsm's forward.

Configuration (default): the ``biomedclipseg`` architecture (timm ViT-B/16 + BERT-base, CLIPSeg
rd64-refined decoder on blocks 4, 7, 10) with random weights (no download) at 224 px, batch 4, one
12-token prompt per image, fp32.

The reference is medvlsm's ``BiomedCLIPSeg.forward`` on the same module objects: the timm trunk run
block by block under ``torch.inference_mode`` keeping every block output (and, as medvlsm does,
finishing the trunk and its head), the open_clip BERT encoder (pooler + projection), and
transformers' ``CLIPSegDecoder`` holding vlsegkit's decoder weights (identical names). vlsegkit
steps the towers with the runner and stops the vision tower after the deepest tapped block.

Rows (each in a fresh subprocess): ``forward`` (eval, no grad) and ``train decoder`` (frozen towers,
forward + backward + AdamW on the decoder: medvlsm's recipe). Time is the best of ``--repeats``
after a warm-up; memory the growth of the peak resident set (``benchmarks/_memory.py``).

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


def _worker(row: str, impl: str, args: argparse.Namespace) -> None:
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
    if impl == "vlsegkit":
        decoder = model.decoder
        run = lambda: model(images, input_ids=ids, attention_mask=mask).logits  # noqa: E731
    else:
        decoder, forward = _medvlsm(model)
        run = lambda: forward(images, ids, mask)  # noqa: E731
    loss_fn = DiceBCELoss()
    if row == "forward":

        def call() -> None:
            with torch.no_grad():
                run()

    else:
        decoder.train()
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)

        def call() -> None:
            loss_fn(run(), masks).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    call()
    with PeakRSS() as mem:
        call()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    result = {"ms": 1e3 * min(times), "peak_mb": mem.growth / 2**20}
    if row == "forward" and impl == "medvlsm":
        with torch.no_grad():
            ours = model(images, input_ids=ids, attention_mask=mask).logits
            result["max_diff"] = (run() - ours).abs().max().item()
    print(json.dumps(result))


def _run(row: str, impl: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--impl", impl]
    cmd += ["--model", args.model, "--image-size", str(args.image_size)]
    cmd += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{row} / {impl} failed:\n{out.stderr}")
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
    parser.add_argument("--impl", choices=IMPLS, default="vlsegkit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.impl, args)
        return
    print(
        f"{args.model} (random weights), {args.image_size} px, batch {args.batch_size}, one "
        f"12-token prompt per image, fp32, cpu, {args.threads} threads; best of {args.repeats}"
    )
    header = f"{'row':<15}{'ms':>9}{'medvlsm':>9}{'ratio':>7}{'MB':>8}{'medvlsm':>9}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for row in args.rows:
        ours, ref = _run(row, "vlsegkit", args), _run(row, "medvlsm", args)
        print(
            f"{row:<15}{ours['ms']:>9.0f}{ref['ms']:>9.0f}{ours['ms'] / ref['ms']:>7.2f}"
            f"{ours['peak_mb']:>8.0f}{ref['peak_mb']:>9.0f}"
            f"{ours['peak_mb'] / max(ref['peak_mb'], 1e-9):>7.2f}"
        )
        if "max_diff" in ref:
            print(f"{'':<15}(forward: max |logits - medvlsm logits| = {ref['max_diff']:.1e})")


if __name__ == "__main__":
    main()
