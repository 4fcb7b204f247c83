"""Benchmark: layout traps in each tower backend, one frozen block in a training step.

A frozen block after a trainable hook (an adapter, a deep prompt) runs with an input that needs
gradients, so PyTorch's fused inference paths are off. If a block then feeds a transposed,
non-contiguous tensor to a linear layer, the product runs as a matmul batched over one axis with
the weight expanded -- for ``nn.MultiheadAttention(batch_first=True)``, whose forward transposes
its batch-first input, a batch of N = 197 small products for ViT-B/16 at 224 px. This script steps
block 0 of every backend at full width (ViT-B/16 vision at 224 px, 8 images; text at 32 tokens)
through ``tower.block`` forward and backward, in train and in eval mode, and reports:

* ``seq-batched matmuls``: ``aten::bmm`` calls whose batch is the sequence length (the trap);
* the time of forward + backward (best of ``--repeats``; interleaved).

The open_clip towers are measured as vlsegkit steps them (sequence-first, see
:func:`vlsegkit.encoders.open_clip.use_sequence_first`) and in open_clip's default batch-first layout;
outputs of the two layouts are compared.

Usage::

    python benchmarks/tower_layouts.py [--threads 2] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MatmulOps(TorchDispatchMode):
    """Records the shapes of the first argument of every ``aten::bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.bmm: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.bmm:
            self.bmm.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _towers(batch_first: bool):
    """``{name: tower}`` for every backend (one block each, full width); open_clip only when
    ``batch_first`` (its other layout)."""
    import open_clip
    import transformers

    from vlsegkit.encoders import create_towers, tower_spec_from_dict
    from vlsegkit.encoders.hf_clip import from_clip_model
    from vlsegkit.encoders.open_clip import OpenCLIPTextTower, OpenCLIPVisionTower

    torch.manual_seed(0)  # the same open_clip weights for both layouts
    clip = open_clip.CLIP(
        embed_dim=512, quick_gelu=True,
        vision_cfg=dict(layers=1, width=768, head_width=64, patch_size=16, image_size=224),
        text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=1),
    )  # fmt: skip
    layout = {"sequence_first": not batch_first}
    towers = {
        "open_clip ViT": OpenCLIPVisionTower(copy.deepcopy(clip.visual), **layout),
        "open_clip text": OpenCLIPTextTower(copy.deepcopy(clip), **layout),
    }
    if batch_first:  # only open_clip has two layouts
        return towers
    hf = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=dict(num_hidden_layers=1, max_position_embeddings=77),
            vision_config=dict(num_hidden_layers=1, image_size=224, patch_size=16),
            projection_dim=512,
        )
    )
    biomed = tower_spec_from_dict(
        {
            "kind": "open_clip",
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "bert_config": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 1,
                            "num_attention_heads": 12, "intermediate_size": 3072,
                            "max_position_embeddings": 512},
            "text_proj": "mlp",
            "text_pooler": "cls_last_hidden_state_pooler",
        }
    )  # fmt: skip
    hf_vision, hf_text = from_clip_model(hf)
    timm_bert = create_towers(biomed)
    return {
        **towers,
        "transformers CLIP vision": hf_vision,
        "transformers CLIP text": hf_text,
        "timm ViT (BiomedCLIP)": timm_bert.vision,
        "HF BERT (BiomedCLIP)": timm_bert.text,
    }


def _state(tower, batch: int, tokens: int):
    g = torch.Generator().manual_seed(1)
    if tower.modality == "vision":
        return tower.embed(torch.randn(batch, 3, 224, 224, generator=g))
    ids = torch.randint(5, 400, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[: batch // 2, tokens // 2 :] = 0  # half the rows padded
    return tower.embed(ids, mask)


def _step(tower, state):
    x = state.tokens.detach().requires_grad_(True)  # as after a trainable hook
    out = tower.block(0, state.with_tokens(x)).tokens
    out.square().mean().backward()
    return out.detach(), x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch_first in (False, True):
        for name, tower in _towers(batch_first).items():
            if batch_first and not name.startswith("open_clip"):
                continue  # only open_clip has two layouts
            tower.requires_grad_(False)
            label = f"{name} ({'batch-first' if batch_first else 'as vlsegkit steps it'})"
            for mode in ("train", "eval"):
                tower.train(mode == "train")
                state = _state(tower, args.batch, args.text_tokens)
                with _MatmulOps() as ops:
                    out, grad = _step(tower, state)
                n = state.tokens.shape[1]
                trap = [s for s in ops.bmm if s[0] == n]
                rows.append(dict(label=label, mode=mode, tower=tower, state=state, trap=trap,
                                 out=out, grad=grad, times=[]))  # fmt: skip
    for _ in range(args.repeats):  # interleaved
        for row in rows:
            row["tower"].train(row["mode"] == "train")
            t0 = time.perf_counter()
            _step(row["tower"], row["state"])
            row["times"].append(time.perf_counter() - t0)
    print(
        f"one frozen block, forward + backward with an input that needs gradients; batch "
        f"{args.batch}, ViT-B/16 at 224 px, text {args.text_tokens} tokens, threads={args.threads}, "
        f"best of {args.repeats}"
    )
    header = f"{'tower':<52}{'mode':<7}{'ms':>9}{'seq-batched matmuls':>22}"
    print(header)
    print("-" * len(header))
    for row in rows:
        trap = f"{len(row['trap'])} x {row['trap'][0]}" if row["trap"] else "none"
        print(f"{row['label']:<52}{row['mode']:<7}{min(row['times']) * 1e3:>9.1f}{trap:>22}")
    for name in ("open_clip ViT", "open_clip text"):
        for mode in ("train", "eval"):
            a, b = (
                next(r for r in rows if r["label"].startswith(name + " (") and r["mode"] == mode
                     and ("batch-first" in r["label"]) == bf)
                for bf in (False, True)
            )  # fmt: skip
            print(
                f"{name}, {mode}: sequence-first / batch-first time "
                f"{min(a['times']) / min(b['times']):.2f}; max |output diff| "
                f"{(a['out'] - b['out']).abs().max().item():.1e}, max |input grad diff| "
                f"{(a['grad'] - b['grad']).abs().max().item():.1e}"
            )


if __name__ == "__main__":
    main()
