"""The tower factory: build a vision and a text tower from a typed, JSON-serialisable spec.

Models never touch transformers or open_clip internals: they describe their backbone with a spec and
call :func:`create_towers`, which builds the upstream modules offline (random weights; real weights
come from a checkpoint) and wraps them in steppable towers. One spec class per backend:

* :class:`TransformersCLIPSpec` -- transformers ``CLIPModel`` / ``CLIPSegModel`` towers.
* :class:`OpenCLIPSpec` -- an open_clip model assembled from a vision part
  (:class:`OpenCLIPViT`, open_clip's built-in ViT; :class:`TimmViT`, a timm trunk as in
  BiomedCLIP; or :class:`OpenCLIPResNet`, CLIP's ResNet for CRIS) and a text part
  (:class:`OpenCLIPText`, the CLIP text transformer; or :class:`BertText`, open_clip's Hugging Face
  BERT encoder, as in BiomedCLIP / UniMedCLIP).

Each spec converts to and from a plain dict (``spec.to_dict()`` / :func:`tower_spec_from_dict`),
which is what ``config.json`` stores. The convolutional vision part (:class:`OpenCLIPResNet`) gives a
:class:`~vlsegkit.encoders.OpenCLIPResNetTower`: multi-scale feature maps and attention pooling
instead of a token sequence, so it is not stepped by the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from .base import Tower

__all__ = [
    "BertText",
    "OpenCLIPResNet",
    "OpenCLIPSpec",
    "OpenCLIPText",
    "OpenCLIPViT",
    "TimmViT",
    "TowerSpec",
    "Towers",
    "TransformersCLIPSpec",
    "create_towers",
    "tower_spec_from_dict",
]

#: Image normalisation of OpenAI's CLIP pretraining (also open_clip's default).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ImageNet statistics (CLIPSeg's preprocessor, MedCLIPSeg's released training).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_keys(spec: Mapping, allowed: set[str], required: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    missing = sorted(required - set(spec))
    if unknown or missing:
        raise ValueError(
            f"{where}: unknown keys {unknown}, missing keys {missing} (allowed: {sorted(allowed)})"
        )


def _plain(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(value).__name__}")
    return dict(value)


@dataclass
class Towers:
    """What :func:`create_towers` returns.

    Attributes:
        vision: the vision tower (an :class:`~vlsegkit.encoders.OpenCLIPResNetTower` for a
            :class:`OpenCLIPResNet` vision part: feature maps, not a token tower).
        text: the text tower.
        make_tokenizer: ``make_tokenizer(context_length) -> PromptTokenizer`` for the text tower, or
            None when the vocabulary must come from files (BERT: pass a tokenizer folder / Hub id).
        image_mean, image_std: the normalisation the towers were pretrained with.
        upstream_keys: the upstream model's state-dict keys -> tower-relative keys
            (``"vision.<...>"`` / ``"text.<...>"``), for converting upstream checkpoints.
    """

    vision: Tower | nn.Module
    text: Tower
    make_tokenizer: Callable[[int], Any] | None = None
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    upstream_keys: dict[str, str] = field(default_factory=dict)


class TowerSpec:
    """Base of the backbone specs (``kind`` names the backend in ``to_dict()``)."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self) -> Towers:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------ transformers
_HF_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id",
)  # fmt: skip
_HF_VISION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps",
)  # fmt: skip


@dataclass(frozen=True)
class TransformersCLIPSpec(TowerSpec):
    """transformers CLIP / CLIPSeg towers (Radford et al. 2021; Lüddecke & Ecker 2022).

    Args:
        text_config: ``CLIPTextConfig`` fields.
        vision_config: ``CLIPVisionConfig`` fields.
        projection_dim: joint embedding width ``E``.
        model: ``"clipseg"`` builds ``CLIPSegModel`` (CLIPSeg checkpoints' towers), ``"clip"``
            ``CLIPModel``.
    """

    kind: ClassVar[str] = "transformers_clip"
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    projection_dim: int
    model: Literal["clip", "clipseg"] = "clip"

    def __post_init__(self) -> None:
        if self.model not in ("clip", "clipseg"):
            raise ValueError(f"model must be 'clip' or 'clipseg', got {self.model!r}")
        config = self._hf_config()
        # canonical form: every field the towers depend on, so configs round-trip stably
        object.__setattr__(
            self, "text_config", {k: getattr(config.text_config, k) for k in _HF_TEXT_KEYS}
        )
        object.__setattr__(
            self, "vision_config", {k: getattr(config.vision_config, k) for k in _HF_VISION_KEYS}
        )
        object.__setattr__(self, "projection_dim", int(config.projection_dim))

    def _hf_config(self):
        from transformers import CLIPConfig, CLIPSegConfig

        config_cls = CLIPSegConfig if self.model == "clipseg" else CLIPConfig
        return config_cls(
            text_config=_plain(self.text_config, "text_config"),
            vision_config=_plain(self.vision_config, "vision_config"),
            projection_dim=int(self.projection_dim),
        )

    @property
    def layer_norm_eps(self) -> float:
        """The vision tower's LayerNorm epsilon (CLIPSeg's decoder uses it too)."""
        return float(self.vision_config["layer_norm_eps"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text_config": dict(self.text_config),
            "vision_config": dict(self.vision_config),
            "projection_dim": self.projection_dim,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> TransformersCLIPSpec:
        where = "backbone (kind 'transformers_clip')"
        _check_keys(
            spec,
            {"kind", "text_config", "vision_config", "projection_dim", "model"},
            {"text_config", "vision_config", "projection_dim"},
            where,
        )
        return cls(
            text_config=_plain(spec["text_config"], f"{where} text_config"),
            vision_config=_plain(spec["vision_config"], f"{where} vision_config"),
            projection_dim=int(spec["projection_dim"]),
            model=spec.get("model", "clip"),
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> TransformersCLIPSpec:
        """The towers of a transformers ``config.json`` (``CLIPModel`` or ``CLIPSeg*``)."""
        model = "clipseg" if config.get("model_type") == "clipseg" else "clip"
        return cls(
            text_config=dict(config.get("text_config") or {}),
            vision_config=dict(config.get("vision_config") or {}),
            projection_dim=int(config.get("projection_dim", 512)),
            model=model,
        )

    def build(self) -> Towers:
        from ..tokenizers import CLIPTokenizer
        from .hf_clip import from_clip_model

        # import only the model module in use (each costs about 0.1 s)
        if self.model == "clipseg":
            from transformers import CLIPSegModel as upstream_cls
        else:
            from transformers import CLIPModel as upstream_cls
        upstream = upstream_cls(self._hf_config())
        vision, text = from_clip_model(upstream)
        return Towers(
            vision=vision,
            text=text,
            make_tokenizer=lambda n: CLIPTokenizer.from_open_clip(context_length=n),
            upstream_keys=_keys_by_identity(upstream, vision, text),
        )


# ------------------------------------------------------------------------------ open_clip
#: ``BertConfig`` fields that define the architecture (what ``OpenCLIPSpec.from_open_clip_config``
#: keeps from a Hub ``config.json``).
_BERT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id", "position_embedding_type",
)  # fmt: skip


@dataclass(frozen=True)
class OpenCLIPViT:
    """open_clip's built-in ``VisionTransformer``: ``cfg`` holds ``CLIPVisionCfg`` fields."""

    cfg: dict[str, Any]


@dataclass(frozen=True)
class TimmViT:
    """A timm ViT trunk with open_clip's head (``TimmModel``), BiomedCLIP's image tower.

    ``cfg`` holds ``CLIPVisionCfg`` fields with ``timm_model_name`` (e.g.
    ``"vit_base_patch16_224"``), ``timm_pool`` and ``timm_proj``; ``timm_model_pretrained`` must be
    false (weights come from the checkpoint, nothing is downloaded).
    """

    cfg: dict[str, Any]


@dataclass(frozen=True)
class OpenCLIPResNet:
    """open_clip's CLIP ResNet (``ModifiedResNet``: RN50, RN101, ...), CRIS's image encoder.

    ``cfg`` holds ``CLIPVisionCfg`` fields: ``layers`` (four block counts, e.g. ``[3, 4, 6, 3]`` for
    RN50), ``width`` (stem width, 64), ``head_width`` (attention-pool head width, 64) and
    ``image_size`` (pretraining size, 224: the attention pool's position grid is ``image_size / 32``).
    Builds an :class:`~vlsegkit.encoders.OpenCLIPResNetTower`.
    """

    cfg: dict[str, Any]

    def __post_init__(self) -> None:
        layers = self.cfg.get("layers")
        if (
            not isinstance(layers, (list, tuple))
            or len(layers) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in layers)
        ):
            raise ValueError(f"vision_cfg.layers must be four positive ints, got {layers!r}")


@dataclass(frozen=True)
class OpenCLIPText:
    """open_clip's CLIP ``TextTransformer``: ``cfg`` holds ``CLIPTextCfg`` fields."""

    cfg: dict[str, Any]


@dataclass(frozen=True)
class BertText:
    """open_clip's ``HFTextEncoder`` over a transformers ``BertModel`` (BiomedCLIP, UniMedCLIP).

    Args:
        config: ``BertConfig`` fields.
        proj: open_clip projection type (``"mlp"``, ``"linear"``).
        pooler: open_clip pooler (``"cls_last_hidden_state_pooler"``, ``"cls_pooler"``,
            ``"mean_pooler"``).
    """

    config: dict[str, Any]
    proj: str = "mlp"
    pooler: str = "cls_last_hidden_state_pooler"


@dataclass(frozen=True)
class OpenCLIPSpec(TowerSpec):
    """An open_clip model's towers: a vision part and a text part sharing the joint width.

    Args:
        embed_dim: joint embedding width ``E``.
        vision: :class:`OpenCLIPViT`, :class:`TimmViT` or :class:`OpenCLIPResNet`.
        text: :class:`OpenCLIPText` or :class:`BertText`.
        quick_gelu: QuickGELU activations (OpenAI-trained weights).

    ``to_dict()`` gives the flat form stored in ``config.json``::

        {"kind": "open_clip", "embed_dim": 512, "quick_gelu": true,
         "vision_cfg": {...},                            # OpenCLIPViT / TimmViT / OpenCLIPResNet
         "text_cfg": {...}                               # OpenCLIPText, or
         "bert_config": {...}, "text_proj": "mlp", "text_pooler": "..."}   # BertText
    """

    kind: ClassVar[str] = "open_clip"
    embed_dim: int
    vision: OpenCLIPViT | TimmViT | OpenCLIPResNet
    text: OpenCLIPText | BertText
    quick_gelu: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.vision, (OpenCLIPViT, TimmViT, OpenCLIPResNet)):
            raise ValueError(
                f"vision must be OpenCLIPViT, TimmViT or OpenCLIPResNet, got {self.vision!r}"
            )
        if not isinstance(self.text, (OpenCLIPText, BertText)):
            raise ValueError(f"text must be OpenCLIPText or BertText, got {self.text!r}")
        if isinstance(self.vision, TimmViT) and self.vision.cfg.get("timm_model_pretrained"):
            raise ValueError(
                "vision_cfg.timm_model_pretrained must be false (towers are built offline; "
                "weights come from the checkpoint)"
            )
        if isinstance(self.text, OpenCLIPText) and self.text.cfg.get("hf_model_name"):
            raise ValueError("for a Hugging Face text encoder use BertText ('bert_config')")

    @property
    def has_bert_text(self) -> bool:
        return isinstance(self.text, BertText)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": dict(self.vision.cfg),
        }
        if isinstance(self.text, BertText):
            out.update(
                bert_config=dict(self.text.config),
                text_proj=self.text.proj,
                text_pooler=self.text.pooler,
            )
        else:
            out["text_cfg"] = dict(self.text.cfg)
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> OpenCLIPSpec:
        where = "backbone (kind 'open_clip')"
        _check_keys(
            spec,
            {"kind", "embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "bert_config",
             "text_proj", "text_pooler"},
            {"embed_dim", "vision_cfg"},
            where,
        )  # fmt: skip
        if ("text_cfg" in spec) == ("bert_config" in spec):
            raise ValueError(f"{where}: give exactly one of 'text_cfg' and 'bert_config'")
        vision_cfg = _plain(spec["vision_cfg"], f"{where} vision_cfg")
        vision: OpenCLIPViT | TimmViT | OpenCLIPResNet
        if vision_cfg.get("timm_model_name"):
            vision = TimmViT(vision_cfg)
        elif isinstance(vision_cfg.get("layers"), (list, tuple)):
            vision = OpenCLIPResNet(vision_cfg)  # four stage depths: a CLIP ResNet
        else:
            vision = OpenCLIPViT(vision_cfg)
        if "text_cfg" in spec:
            text: OpenCLIPText | BertText = OpenCLIPText(
                _plain(spec["text_cfg"], f"{where} text_cfg")
            )
        else:
            text = BertText(
                _plain(spec["bert_config"], f"{where} bert_config"),
                proj=spec.get("text_proj", "mlp"),
                pooler=spec.get("text_pooler", "cls_last_hidden_state_pooler"),
            )
        return cls(
            embed_dim=int(spec["embed_dim"]),
            vision=vision,
            text=text,
            quick_gelu=bool(spec.get("quick_gelu", False)),
        )

    @classmethod
    def from_open_clip_config(
        cls, model_cfg: Mapping[str, Any], *, bert_config: Mapping[str, Any] | None = None
    ) -> OpenCLIPSpec:
        """The towers of an open_clip ``open_clip_config.json``'s ``model_cfg`` (e.g. BiomedCLIP).

        Args:
            model_cfg: ``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?, ...}`` as open_clip
                writes it. A ``text_cfg`` with ``hf_model_name`` is a Hugging Face BERT encoder
                (:class:`BertText`, with ``hf_proj_type`` / ``hf_pooler_type``, open_clip's defaults
                ``"mlp"`` / ``"mean_pooler"``); otherwise open_clip's CLIP text transformer.
            bert_config: the ``config.json`` of ``hf_model_name`` (needed for a BERT text encoder);
                its architecture fields are kept.

        Raises:
            ValueError: a missing part, or an ``hf_model_name`` text encoder that is not BERT.
        """
        where = "open_clip model_cfg"
        if not isinstance(model_cfg, Mapping) or "embed_dim" not in model_cfg:
            raise ValueError(f"{where} must be a dict with 'embed_dim', 'vision_cfg', 'text_cfg'")
        vision_cfg = _plain(model_cfg.get("vision_cfg"), f"{where} vision_cfg")
        text_cfg = _plain(model_cfg.get("text_cfg"), f"{where} text_cfg")
        spec: dict[str, Any] = {
            "kind": cls.kind,
            "embed_dim": int(model_cfg["embed_dim"]),
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "vision_cfg": vision_cfg,
        }
        if text_cfg.get("hf_model_name"):
            if bert_config is None:
                raise ValueError(
                    f"{where}: the text encoder {text_cfg['hf_model_name']!r} is a Hugging Face "
                    "model; pass its config.json as bert_config"
                )
            bert = _plain(bert_config, "bert_config")
            if bert.get("model_type", "bert") != "bert":
                raise ValueError(
                    f"only BERT text encoders are supported, got model_type {bert['model_type']!r}"
                )
            spec.update(
                bert_config={k: bert[k] for k in _BERT_KEYS if k in bert},
                text_proj=text_cfg.get("hf_proj_type", "mlp"),
                text_pooler=text_cfg.get("hf_pooler_type", "mean_pooler"),
            )
        else:
            spec["text_cfg"] = text_cfg
        return cls.from_dict(spec)

    def build(self) -> Towers:
        from open_clip.model import _build_text_tower, _build_vision_tower
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel

        from ..tokenizers import CLIPTokenizer
        from .open_clip import OpenCLIPTextTower, OpenCLIPVisionTower, TimmViTTower

        visual = _build_vision_tower(self.embed_dim, dict(self.vision.cfg), self.quick_gelu)
        vision: Tower | nn.Module
        if isinstance(visual, ModifiedResNet):
            from .open_clip_resnet import OpenCLIPResNetTower

            vision = OpenCLIPResNetTower(visual)
        elif isinstance(visual, TimmModel):
            vision = TimmViTTower(visual)
        else:
            vision = OpenCLIPVisionTower(visual)
        make_tokenizer = None
        if isinstance(self.text, BertText):
            text_module = self._bert_encoder()
            from .open_clip import HFBertTextTower

            text: Tower = HFBertTextTower(text_module)
        else:
            text_module = _build_text_tower(self.embed_dim, dict(self.text.cfg), self.quick_gelu)
            text = OpenCLIPTextTower(text_module)
            make_tokenizer = lambda n: CLIPTokenizer.from_open_clip(context_length=n)  # noqa: E731
        container = nn.Module()
        container.visual, container.text = visual, text_module
        return Towers(
            vision=vision,
            text=text,
            make_tokenizer=make_tokenizer,
            upstream_keys=_keys_by_identity(container, vision, text),
        )

    def _bert_encoder(self) -> nn.Module:
        from open_clip.hf_model import HFTextEncoder
        from transformers import BertConfig

        assert isinstance(self.text, BertText)
        bert = BertConfig(**self.text.config)
        encoder = HFTextEncoder(
            bert.name_or_path or "bert",
            output_dim=self.embed_dim,
            config=bert,
            pooler_type=self.text.pooler,
            proj_type=self.text.proj,
        )
        if self.text.pooler != "cls_pooler":
            # open_clip's pretrained path builds BERT without its pooler unless cls_pooler uses it
            encoder.transformer.pooler = None
        return encoder


# ------------------------------------------------------------------------------ entry points
_SPECS: dict[str, type] = {
    TransformersCLIPSpec.kind: TransformersCLIPSpec,
    OpenCLIPSpec.kind: OpenCLIPSpec,
}


def tower_spec_from_dict(spec: Mapping[str, Any] | TowerSpec) -> TowerSpec:
    """The typed spec of a ``config.json`` backbone dict (a spec is returned as it is).

    Raises:
        ValueError: not a dict, an unknown ``kind``, or unknown / missing keys (named).
    """
    if isinstance(spec, TowerSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"backbone must be a dict spec, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _SPECS:
        raise ValueError(f"backbone['kind'] must be one of {sorted(_SPECS)}, got {kind!r}")
    return _SPECS[kind].from_dict(spec)


def create_towers(spec: TowerSpec | Mapping[str, Any]) -> Towers:
    """Build the vision and text towers of ``spec`` (random weights, offline).

    Args:
        spec: a :class:`TowerSpec` or its ``to_dict()`` form.

    Returns:
        :class:`Towers`: both towers, the tokenizer factory, the pretraining normalisation and the
        upstream key map.
    """
    return tower_spec_from_dict(spec).build()


def _keys_by_identity(upstream: nn.Module, vision: nn.Module, text: nn.Module) -> dict[str, str]:
    """Map every upstream parameter / buffer name to the tower-relative name of the same tensor."""
    ours: dict[int, str] = {}
    for prefix, tower in (("vision", vision), ("text", text)):
        for name, tensor in (*tower.named_parameters(), *tower.named_buffers()):
            ours.setdefault(id(tensor), f"{prefix}.{name}")
    return {
        name: ours[id(tensor)]
        for name, tensor in (*upstream.named_parameters(), *upstream.named_buffers())
        if id(tensor) in ours
    }
