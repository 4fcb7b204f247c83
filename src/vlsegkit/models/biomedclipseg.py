"""BiomedCLIPSeg and BiomedCLIPSeg-D: BiomedCLIP's towers with CLIPSeg's FiLM decoder.

Poudel, Dhakal, Bhandari, Adhikari, Thapaliya and Khanal, "Exploring Transfer Learning in Medical
Image Segmentation using Vision-Language Models" (MIDL 2024, medvlsm), section 3.1: the pretrained
encoders of BiomedCLIP (Zhang et al. 2023; open_clip
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``: a timm ViT-B/16 and PubMedBERT
with 256 text tokens) combined with the decoder of CLIPSeg (Lüddecke & Ecker 2022):

* **BiomedCLIPSeg** -- the decoder trained from scratch (medvlsm ``rand_init_decoder=True``: the
  decoder built from ``CIDAS/clipseg-rd64-refined``'s config and initialised as transformers does);
* **BiomedCLIPSeg-D** -- the decoder initialised from a CLIPSeg checkpoint (medvlsm:
  ``CIDAS/clipseg-rd64-refined``), :meth:`BiomedCLIPSeg.load_clipseg_decoder`.

The model is :class:`~vlsegkit.CLIPSeg` on other towers: the same runner, hooks and decoder
(:class:`~vlsegkit.decoders.FiLMDecoder`). Tapped blocks are a config value: medvlsm's code reads
``hidden_states[i + 1]`` for CLIPSeg's ``extract_layers`` (3, 6, 9) from a list of block *outputs*
(no embedding entry), i.e. 0-indexed blocks **(4, 7, 10)** -- one block deeper than CLIPSeg -- and that
is the default here; ``extract_layers=(3, 6, 9)`` gives CLIPSeg's convention.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..encoders.factory import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BertText,
    OpenCLIPResNet,
    OpenCLIPSpec,
    TowerSpec,
    tower_spec_from_dict,
)
from ..encoders.hooks import TowerHook
from ..hub import CheckpointError, check_state_dict, load_checkpoint_file, read_json, resolve_file
from ..registry import register_model
from ._backbones import biomedclip
from .base import LazyTokenizer
from .clipseg import CLIPSeg

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["BIOMEDCLIP_ID", "BiomedCLIPSeg", "init_decoder_like_transformers"]

#: The BiomedCLIP checkpoint medvlsm builds on (open_clip ``hf-hub:`` id without the prefix).
BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
#: The CLIPSeg checkpoint medvlsm takes the decoder config (and, for -D, the weights) from.
CLIPSEG_DECODER_ID = "CIDAS/clipseg-rd64-refined"

DecoderInit = Literal["random", "clipseg"]
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# BERT config fields the towers depend on (the rest of a config.json is bookkeeping)
_BERT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "position_embedding_type",
)  # fmt: skip
# upstream tensors BiomedCLIPSeg has no use for: the contrastive temperature, persisted buffers
_DROPPED_SUFFIXES = ("logit_scale", "position_ids", "token_type_ids")


def init_decoder_like_transformers(decoder: nn.Module, *, num_hidden_layers: int = 12) -> None:
    """Initialise a :class:`~vlsegkit.decoders.FiLMDecoder` as medvlsm's random decoder was.

    medvlsm builds ``CLIPSegForImageSegmentation(config).decoder`` (transformers 4.35), whose
    ``_init_weights`` draws, for decoder width ``d`` (``reduce_dim``) and the vision config's
    ``num_hidden_layers`` ``n`` (12 for ViT-B/16)::

        q, k, v  ~ N(0, (d^-0.5 (2n)^-0.5)^2)      out_proj ~ N(0, (d^-0.5)^2)
        fc1      ~ N(0, ((2d)^-0.5)^2)            fc2      ~ N(0, (d^-0.5 (2n)^-0.5)^2)

    sets every Linear bias to 0 and LayerNorms to identity; the FiLM / reduce weights and the
    (transposed) convolutions keep PyTorch's defaults.
    """
    std_in = lambda d: d**-0.5 * (2 * num_hidden_layers) ** -0.5  # noqa: E731
    with torch.no_grad():
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            d = attn.q_proj.in_features
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.normal_(0.0, std_in(d))
            attn.out_proj.weight.normal_(0.0, d**-0.5)
            mlp.fc1.weight.normal_(0.0, (2 * d) ** -0.5)
            mlp.fc2.weight.normal_(0.0, std_in(d))
        for m in decoder.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


class BiomedCLIPSeg(LazyTokenizer, CLIPSeg):
    """CLIPSeg's FiLM decoder on BiomedCLIP's towers (or any other token towers).

    Forward pass as :class:`~vlsegkit.CLIPSeg` (FiLM with the pooled text embedding, post-norm decoder
    layers, refined transposed convolution); see the module docstring for the two variants.

    Args:
        backbone: tower spec (:class:`~vlsegkit.encoders.OpenCLIPSpec` dict; BiomedCLIP: timm
            ``vit_base_patch16_224`` + BERT, joint width 512). Token towers only (not a ResNet).
        extract_layers: vision blocks (0-indexed) the decoder reads, shallow to deep; medvlsm's
            ``(4, 7, 10)`` by default (CLIPSeg's convention is ``(3, 6, 9)``).
        reduce_dim, decoder_num_heads, decoder_mlp_dim, conditional_layer, complex_upsampler: the
            decoder; defaults = ``CIDAS/clipseg-rd64-refined`` (64, 4, 2048, 0, refined upsampler).
        decoder_init: ``"random"`` (BiomedCLIPSeg: transformers' CLIPSeg initialisation,
            :func:`init_decoder_like_transformers`) or ``"clipseg"`` (BiomedCLIPSeg-D: the decoder's
            weights are to come from a CLIPSeg checkpoint -- :meth:`from_biomedclip` /
            :meth:`load_clipseg_decoder` copy them; the constructor itself reads no file).
        context_length: text length (default ``min(256, max positions)`` for BERT -- BiomedCLIP's
            256 -- and the position table length, 77, for a CLIP text tower).
        tokenizer: tokenizer folder or Hub id (:func:`vlsegkit.tokenizers.load_tokenizer`), resolved on
            first use (e.g. :data:`BIOMEDCLIP_ID`). None: open_clip's bundled CLIP BPE for CLIP text
            towers; BERT towers then need ``input_ids`` (or assign ``model.tokenizer``).
        image_size: ``(H, W)`` (or one int) ``predict`` resizes to (224).
        image_mean, image_std: normalisation (CLIP's statistics, as medvlsm uses for BiomedCLIP).
        freeze_backbone: freeze both towers (medvlsm: only the decoder trains).
        hooks: hooks the model owns.

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts)`` -> ``logits (B, C, H, W)``.
    """

    model_type = "biomedclipseg"

    _tokenizer_hint = BIOMEDCLIP_ID

    def __init__(
        self,
        *,
        backbone: dict[str, Any] | TowerSpec,
        extract_layers: Sequence[int] = (4, 7, 10),
        reduce_dim: int = 64,
        decoder_num_heads: int = 4,
        decoder_mlp_dim: int = 2048,
        conditional_layer: int = 0,
        complex_upsampler: bool = True,
        decoder_init: DecoderInit = "random",
        context_length: int | None = None,
        tokenizer: str | None = None,
        image_size: int | Sequence[int] = 224,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        freeze_backbone: bool = True,
        hooks: Sequence[TowerHook | dict] = (),
    ) -> None:
        if decoder_init not in ("random", "clipseg"):
            raise ValueError(f"decoder_init must be 'random' or 'clipseg', got {decoder_init!r}")
        # read by the lazy tokenizer, which CLIPSeg's constructor may touch (hook binding)
        self._init_tokenizer(tokenizer)
        self._context_length = context_length
        super().__init__(
            backbone=backbone,
            extract_layers=extract_layers,
            reduce_dim=reduce_dim,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_dim=decoder_mlp_dim,
            conditional_layer=conditional_layer,
            complex_upsampler=complex_upsampler,
            image_size=image_size,
            image_mean=image_mean,
            image_std=image_std,
            freeze_backbone=freeze_backbone,
            hooks=(),
        )
        if self.text_tower.embed_dim != self.vision_tower.embed_dim:
            raise ValueError(
                f"the towers must share the joint width (FiLM reads the text embedding with the "
                f"vision projection's width), got vision {self.vision_tower.embed_dim} and text "
                f"{self.text_tower.embed_dim}"
            )
        max_positions = int(self.text_tower.max_positions)
        if context_length is None:
            context_length = min(256, max_positions) if self._bert else max_positions
        if not 2 <= int(context_length) <= max_positions:
            raise ValueError(
                f"context_length must be in [2, {max_positions}] (the text position table), got "
                f"{context_length}"
            )
        self.context_length = int(context_length)
        self.decoder_init: str = decoder_init
        # medvlsm's random decoder: built from a ViT-B/16 CLIPSeg config (12 vision layers)
        init_decoder_like_transformers(self.decoder, num_hidden_layers=12)
        self.hooks = self._bind_hooks(hooks)

    # ------------------------------------------------------------------ CLIPSeg specifics
    @classmethod
    def _backbone_spec(cls, backbone: Any) -> TowerSpec:
        spec = tower_spec_from_dict(backbone)
        if isinstance(spec, OpenCLIPSpec) and isinstance(spec.vision, OpenCLIPResNet):
            raise ValueError(
                "BiomedCLIPSeg's FiLM decoder reads token activations: the vision part must be a "
                "ViT (timm_model_name or an open_clip ViT), not a ResNet"
            )
        return spec

    @staticmethod
    def _decoder_eps(spec: TowerSpec) -> float:
        # the decoder config comes from CIDAS/clipseg-rd64-refined, whose LayerNorm eps is 1e-5
        return 1e-5

    @property
    def _bert(self) -> bool:
        return isinstance(self._spec, OpenCLIPSpec) and isinstance(self._spec.text, BertText)

    def _default_tokenizer(self) -> Any:
        return None  # resolved lazily by the property below

    def _tokenizer_length(self) -> int | None:
        return getattr(self, "context_length", None) or self._context_length

    def _slot_tokenizer(self) -> Any:
        # no tokenizer files (yet): hooks bind without one
        return self._maybe_tokenizer((ValueError, OSError))

    def _tokenize(self, texts: list[str], hooks: Sequence[TowerHook]) -> tuple[Tensor, Tensor]:
        reserve = sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        batch = self.tokenizer(texts, context_length=self.context_length, reserve=reserve)
        device = self.decoder.film_mul.weight.device
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return False  # transformers CLIPSeg folders are CLIPSeg's

    def default_task(
        self,
        *,
        dice_weight: float = 1.0,
        bce_weight: float = 0.2,
        smooth: float = 1e-5,
        threshold: float = 0.5,
    ) -> Task:
        """medvlsm's objective for every model it trains: ``Dice + 0.2 BCE`` on the logits.

        medvlsm configures ``monai.losses.DiceCELoss(lambda_dice=1, lambda_ce=0.2)`` (MONAI's Dice
        smoothing ``1e-5``) and thresholds BiomedCLIPSeg at 0.5.
        """
        from ..losses import DiceBCELoss
        from ..tasks import SegmentationTask

        loss = DiceBCELoss(dice_weight=dice_weight, bce_weight=bce_weight, smooth=smooth)
        return SegmentationTask(loss=loss, threshold=threshold)

    # ------------------------------------------------------------------ pretrained parts
    @classmethod
    def from_biomedclip(
        cls,
        biomedclip: str | os.PathLike = BIOMEDCLIP_ID,
        *,
        clipseg_decoder: str | os.PathLike | CLIPSeg | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> BiomedCLIPSeg:
        """BiomedCLIPSeg(-D) with BiomedCLIP's pretrained towers, as medvlsm assembles it.

        Args:
            biomedclip: an open_clip Hub repo id or folder with ``open_clip_config.json`` and
                ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` (a ``hf-hub:``
                prefix is accepted). The BERT config is read from the text config's
                ``hf_model_name`` (folder or Hub id), the tokenizer from the repo (see
                :func:`~vlsegkit.tokenizers.load_tokenizer`).
            clipseg_decoder: None (BiomedCLIPSeg: the decoder from scratch) or a transformers
                CLIPSeg folder / Hub id / :class:`~vlsegkit.CLIPSeg` whose decoder is copied
                (BiomedCLIPSeg-D, medvlsm: ``"CIDAS/clipseg-rd64-refined"``), widths adapted as
                :meth:`load_clipseg_decoder` describes.
            revision, cache_dir, local_files_only, token: Hub options (for every file read).
            **kwargs: further constructor arguments (``extract_layers``, ``freeze_backbone``, ...).

        Returns:
            The model in eval mode.

        Raises:
            CheckpointError: missing / unreadable files, or tower weights that do not fit.
        """
        hub = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        source = str(biomedclip).removeprefix("hf-hub:")
        config = read_json(resolve_file(source, "open_clip_config.json", **hub))
        model_cfg = config.get("model_cfg", config)
        text_cfg = dict(model_cfg.get("text_cfg") or {})
        vision_cfg = dict(model_cfg.get("vision_cfg") or {})
        vision_cfg["timm_model_pretrained"] = False  # weights come from the checkpoint
        hf_name = text_cfg.get("hf_model_name")
        if not hf_name:
            raise CheckpointError(
                f"{source}/open_clip_config.json has no text_cfg.hf_model_name: not a "
                "BiomedCLIP-style (BERT text) open_clip model"
            )
        hub_other = {k: v for k, v in hub.items() if k != "revision"}
        bert = read_json(resolve_file(hf_name, "config.json", **hub_other))
        spec = {
            "kind": "open_clip",
            "embed_dim": int(model_cfg["embed_dim"]),
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "vision_cfg": vision_cfg,
            "bert_config": {k: bert[k] for k in _BERT_KEYS if k in bert},
            "text_proj": text_cfg.get("hf_proj_type", "mlp"),
            "text_pooler": text_cfg.get("hf_pooler_type", "cls_last_hidden_state_pooler"),
        }
        defaults: dict[str, Any] = {
            "tokenizer": source,
            "image_size": vision_cfg.get("image_size", 224),
        }
        if isinstance(text_cfg.get("context_length"), int):
            defaults["context_length"] = text_cfg["context_length"]
        pre = config.get("preprocess_cfg") or {}
        if pre.get("mean") and pre.get("std"):
            defaults.update(image_mean=tuple(pre["mean"]), image_std=tuple(pre["std"]))
        if clipseg_decoder is not None:
            defaults["decoder_init"] = "clipseg"
        model = cls(backbone=spec, **{**defaults, **kwargs})
        weights = next(
            (p for name in _OPEN_CLIP_WEIGHTS
             if (p := resolve_file(source, name, required=False, **hub)) is not None),
            None,
        )  # fmt: skip
        if weights is None:
            raise CheckpointError(f"no weights in {source}: expected one of {_OPEN_CLIP_WEIGHTS}")
        model.load_open_clip_state_dict(load_checkpoint_file(weights), source=str(weights))
        if clipseg_decoder is not None:
            model.load_clipseg_decoder(clipseg_decoder, **hub)
        model._mark_source(source, revision)
        return model.eval()

    def load_open_clip_state_dict(self, state: dict[str, Tensor], *, source: str = "") -> None:
        """Load an open_clip ``CustomTextCLIP`` state dict (``visual.*``, ``text.*``) into the towers.

        ``logit_scale``, persisted ``position_ids`` / ``token_type_ids`` buffers and a BERT pooler the
        towers do not have are dropped; every other tensor must fit the towers exactly.
        """
        own = self.state_dict()
        towers: dict[str, Tensor] = {}
        for key, value in state.items():
            if key.endswith(_DROPPED_SUFFIXES):
                continue
            new = self._upstream_keys.get(key)
            if new is None and ".pooler." in key and key.startswith("text."):
                continue  # BERT's pooler: unused by the cls_last_hidden_state pooler
            towers[new or key] = value
        unexpected = sorted(k for k in towers if k not in own)
        if unexpected:
            raise CheckpointError(
                f"cannot load {source or 'the state dict'} into BiomedCLIPSeg's towers: "
                f"unexpected keys {unexpected[:20]}"
            )
        for name in ("vision_tower", "text_tower"):
            part = {k[len(name) + 1 :]: v for k, v in towers.items() if k.startswith(name + ".")}
            check_state_dict(getattr(self, name), part, source=source)
        self.load_state_dict(towers, strict=False)

    def load_clipseg_decoder(
        self, source: str | os.PathLike | CLIPSeg, **hub_kwargs: Any
    ) -> dict[str, list[str]]:
        """Initialise the decoder from a CLIPSeg checkpoint (BiomedCLIPSeg-D).

        ``source`` is a transformers CLIPSeg folder / Hub id (``config.json`` +
        ``model.safetensors`` / ``pytorch_model.bin``, e.g. ``"CIDAS/clipseg-rd64-refined"``) or a
        :class:`~vlsegkit.CLIPSeg`. Its decoder must have this decoder's structure: ``reduce_dim``,
        heads, MLP width, number of levels, ``conditional_layer`` and upsampler kind. Widths that
        depend on the towers are adapted: a module whose tensors all match is copied; a module with a
        tensor of another shape (``reduces.i`` when the vision widths differ, ``film_mul`` /
        ``film_add`` when the joint widths differ, the transposed convolution when the patch sizes
        differ) keeps its fresh initialisation. For BiomedCLIP (width 768, joint 512) and a ViT-B/16
        CLIPSeg everything is copied.

        Returns:
            ``{"copied": [module names], "reinitialised": [module names]}``.

        Raises:
            CheckpointError: another decoder structure, or no decoder weights.
        """
        theirs, hyper = self._clipseg_decoder_state(source, hub_kwargs)
        ours_hyper = {
            "reduce_dim": self.decoder.film_mul.out_features,
            "decoder_num_heads": self.decoder.layers[0].self_attn.num_heads,
            "decoder_mlp_dim": self.decoder.layers[0].mlp.fc1.out_features,
            "depth": self.decoder.depth,
            "conditional_layer": self.decoder.conditional_layer,
            "complex_upsampler": isinstance(self.decoder.transposed_convolution, nn.Sequential),
        }
        wrong = [f"{k}: checkpoint {hyper[k]!r}, model {v!r}" for k, v in ours_hyper.items()
                 if hyper.get(k) != v]  # fmt: skip
        if wrong:
            raise CheckpointError(
                "the CLIPSeg decoder does not have this decoder's structure: " + "; ".join(wrong)
            )
        own = self.decoder.state_dict()
        if set(theirs) != set(own):
            missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
            raise CheckpointError(
                f"CLIPSeg decoder keys differ: missing {missing[:10]}, unexpected {extra[:10]}"
            )
        modules: dict[str, list[str]] = {}
        for key in own:
            modules.setdefault(key.rsplit(".", 1)[0], []).append(key)
        copied, kept = [], []
        update: dict[str, Tensor] = {}
        for module, keys in modules.items():
            if all(theirs[k].shape == own[k].shape for k in keys):
                update.update({k: theirs[k] for k in keys})
                copied.append(module)
            else:
                kept.append(module)
        self.decoder.load_state_dict(update, strict=False)
        return {"copied": copied, "reinitialised": kept}

    @staticmethod
    def _clipseg_decoder_state(
        source: str | os.PathLike | CLIPSeg, hub_kwargs: dict[str, Any]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if isinstance(source, CLIPSeg):
            cfg = source.config
            state = source.decoder.state_dict()
            return state, {
                "reduce_dim": cfg["reduce_dim"],
                "decoder_num_heads": cfg["decoder_num_heads"],
                "decoder_mlp_dim": cfg["decoder_mlp_dim"],
                "depth": len(cfg["extract_layers"]),
                "conditional_layer": cfg["conditional_layer"],
                "complex_upsampler": cfg["complex_upsampler"],
            }
        config = read_json(resolve_file(source, "config.json", **hub_kwargs))
        if config.get("model_type") != "clipseg":
            raise CheckpointError(
                f"{source} is not a transformers CLIPSeg checkpoint (model_type "
                f"{config.get('model_type')!r})"
            )
        state, where = CLIPSeg._load_weights_file(source, **hub_kwargs)
        decoder = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
        if not decoder:
            raise CheckpointError(f"{where} has no decoder weights (decoder.*)")
        return decoder, {
            "reduce_dim": int(config.get("reduce_dim", 64)),
            "decoder_num_heads": int(config.get("decoder_num_attention_heads", 4)),
            "decoder_mlp_dim": int(config.get("decoder_intermediate_size", 2048)),
            "depth": len(config.get("extract_layers", (3, 6, 9))),
            "conditional_layer": int(config.get("conditional_layer", 0)),
            "complex_upsampler": bool(config.get("use_complex_transposed_convolution", False)),
        }


# ---------------------------------------------------------------------- registry
def _tiny_backbone() -> dict[str, Any]:
    # timm's test_vit (patch 16, width 64, 6 blocks) with a tiny 6-block CLIP text tower, so the tiny
    # models tokenize offline (a BERT tower needs vocabulary files)
    return {
        "kind": "open_clip",
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
            "timm_proj": "linear", "image_size": 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 6},
    }  # fmt: skip


@register_model(
    "biomedclipseg",
    description="BiomedCLIPSeg: BiomedCLIP ViT-B/16 + PubMedBERT, CLIPSeg decoder from scratch "
    "(weights: BiomedCLIPSeg.from_biomedclip)",
)
def biomedclipseg(**kwargs) -> BiomedCLIPSeg:
    defaults = dict(backbone=biomedclip(), context_length=256, tokenizer=BIOMEDCLIP_ID)
    return BiomedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "biomedclipseg-d",
    description="BiomedCLIPSeg-D: BiomedCLIPSeg with the decoder of CIDAS/clipseg-rd64-refined "
    "(weights: BiomedCLIPSeg.from_biomedclip(clipseg_decoder=...))",
)
def biomedclipseg_d(**kwargs) -> BiomedCLIPSeg:
    defaults = dict(
        backbone=biomedclip(), context_length=256, tokenizer=BIOMEDCLIP_ID,
        decoder_init="clipseg",
    )  # fmt: skip
    return BiomedCLIPSeg(**{**defaults, **kwargs})


def _tiny(**kwargs) -> BiomedCLIPSeg:
    defaults = dict(
        backbone=_tiny_backbone(), extract_layers=(2, 3, 4), reduce_dim=16, decoder_mlp_dim=64,
        image_size=64,
    )  # fmt: skip
    return BiomedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "biomedclipseg-tiny",
    description="A tiny random BiomedCLIPSeg (timm test_vit, CLIP BPE text) for tests and demos",
)
def biomedclipseg_tiny(**kwargs) -> BiomedCLIPSeg:
    return _tiny(**kwargs)


@register_model(
    "biomedclipseg-d-tiny",
    description="A tiny BiomedCLIPSeg-D whose decoder is copied from a random clipseg-tiny "
    "(widths adapted), for tests",
)
def biomedclipseg_d_tiny(**kwargs) -> BiomedCLIPSeg:

    model = _tiny(**{"decoder_init": "clipseg", **kwargs})
    if model.decoder_init == "clipseg":
        # a random tiny CLIPSeg with patch 16 (the refined upsampler) and other tower widths than
        # test_vit's: its decoder layers and upsampler are copied, reduces and FiLM re-initialised
        donor = CLIPSeg(
            backbone={
                "text_config": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=2),
                "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=2, image_size=64, patch_size=16),
                "projection_dim": 24,
            },
            extract_layers=(0, 1, 2), reduce_dim=model.decoder.film_mul.out_features,
            decoder_mlp_dim=model.decoder.layers[0].mlp.fc1.out_features,
            complex_upsampler=True, image_size=64,
        )  # fmt: skip
        model.load_clipseg_decoder(donor)
    return model
