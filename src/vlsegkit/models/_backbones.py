"""Backbone specs shared by several registry entries (plain dicts, as ``config.json`` stores them).

Each function returns a fresh dict, so a caller may change it. Sources: transformers'
``openai/clip-vit-base-patch16`` config (Radford et al. 2021); BiomedCLIP's ``open_clip_config.json``
(Zhang et al. 2023, ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).
"""

from __future__ import annotations

from typing import Any


def hf_clip_vit_b16(**vision_overrides: Any) -> dict[str, Any]:
    """transformers CLIP ViT-B/16 text / vision configs (77 tokens, QuickGELU, projection 512)."""
    return {
        "text_config": dict(
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        ),
        "vision_config": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            num_channels=3, image_size=224, patch_size=16, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, **vision_overrides,
        ),
        "projection_dim": 512,
    }  # fmt: skip


def biomedclip() -> dict[str, Any]:
    """open_clip BiomedCLIP: timm ViT-B/16 at 224 with a linear head, PubMedBERT (BERT-base, uncased
    30522 vocabulary) with an MLP projection on the last [CLS] state."""
    return {
        "kind": "open_clip",
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "linear", "image_size": 224,
        },
        "bert_config": dict(
            vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
            type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
        ),
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip


def tiny_open_clip() -> dict[str, Any]:
    """A tiny random open_clip CLIP (ViT width 64 at 64 px, 4 blocks; CLIP BPE text, width 64)."""
    return {
        "kind": "open_clip",
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 4,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                     "layers": 4},
    }  # fmt: skip
