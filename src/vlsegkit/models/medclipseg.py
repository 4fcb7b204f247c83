"""MedCLIPSeg: frozen CLIP towers fused by probabilistic PVL adapters, with MC uncertainty.

Koleilat, Asgariandehkordi, Nejati Manzari, Barile, Xiao and Rivaz, "MedCLIPSeg: Probabilistic
Vision-Language Adaptation for Data-Efficient and Generalizable Medical Image Segmentation" (CVPR 2026,
arXiv 2602.20423), section 3; official code ``HealthX-Lab/MedCLIPSeg`` (Apache-2.0). The model is a
short composition of vlsegkit parts:

* two frozen towers (:mod:`vlsegkit.encoders`) stepped together by
  :func:`vlsegkit.encoders.lockstep.run_lockstep`;
* one :class:`~vlsegkit.layers.PVLAdapter` before each configured block (eqs. 3-17; default blocks
  ``1 .. L-2`` 0-indexed, i.e. 1..10 of 12 -- between layers ``k`` and ``k + 1`` for ``k = 1..10``);
* :class:`~vlsegkit.layers.PixelTextHead` (eqs. 18-19);
* the loss ``0.5 Dice + 0.5 BCE + 0.1 L_SoftCon`` (eq. 23): :class:`MedCLIPSegLoss`;
* Monte Carlo inference (section 3.2 / Appendix G): :meth:`MedCLIPSeg.predict_with_uncertainty`.

The backbone is described by a JSON spec so ``save_pretrained`` / ``from_pretrained`` round-trip and
the towers are built offline (random weights; real weights come from a checkpoint)::

    {"kind": "open_clip", "embed_dim": 512, "quick_gelu": true,
     "vision_cfg": {open_clip CLIPVisionCfg fields: a built-in ViT, or "timm_model_name": ...},
     "text_cfg": {open_clip CLIPTextCfg fields}            # CLIP text transformer, or
     "bert_config": {transformers BertConfig fields},       # BERT text encoder (open_clip HFTextEncoder)
     "text_proj": "mlp", "text_pooler": "cls_last_hidden_state_pooler"}

    {"kind": "transformers_clip", "text_config": {...}, "vision_config": {...}, "projection_dim": 512}

Released checkpoints (``MedCLIPSeg_unimedclip_ViT-B-16_latest.pth`` on the Hub repo
``TahaKoleilat/MedCLIPSeg``) load with :meth:`MedCLIPSeg.from_released`; the key map is
:data:`RELEASED_KEY_MAP` (see ``docs/medclipseg.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..encoders.base import TokenState, Tower
from ..encoders.lockstep import check_lockstep_layers, run_lockstep
from ..hub import CheckpointError, load_checkpoint_file, load_state_dict_strict, resolve_file
from ..layers import PixelTextHead, PVLAdapter, PVLAttention
from ..losses import DiceBCELoss, SoftPatchContrastiveLoss
from ..ops import probabilistic_attention
from ..registry import register_model
from ..tokenizers import CLIPTokenizer, PromptTokenizer, load_tokenizer
from .base import VLSM, ImageInput, SegmentationOutput, _needs_grad, _pairing

__all__ = [
    "RELEASED_KEY_MAP",
    "MedCLIPSeg",
    "MedCLIPSegLoss",
    "MedCLIPSegPrefix",
    "UncertaintyOutput",
    "build_towers",
    "load_released_state_dict",
    "released_checkpoint_name",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
RELEASED_REPO_ID = "TahaKoleilat/MedCLIPSeg"

#: Released (official ``CustomCLIP.state_dict()``) key prefix -> vlsegkit key prefix. Keys are
#: renamed by their first matching prefix; the rest of the name is unchanged.
RELEASED_KEY_MAP: dict[str, str] = {
    "vision_model.": "vision_tower.visual.",
    "text_model.": "text_tower.text.",
    "pvl_adapters.": "pvl_adapters.",
    "mask_head.": "head.mask_head.",
    "upscale.": "head.upscale.",
}
# Released keys that carry nothing vlsegkit uses: CLIP's temperature, BERT's pooler (MedCLIPSeg
# pools the last hidden [CLS]) and position / token-type buffers older transformers persisted.
_RELEASED_DROPPED_PREFIXES = ("logit_scale", "text_model.transformer.pooler.")
_RELEASED_DROPPED_SUFFIXES = ("position_ids", "token_type_ids")

TextPadding = Literal["max_length", "longest"]
# (image, prompt) rows per Monte Carlo forward pass when batch_samples is not given
_CPU_ROWS_PER_PASS = 8
_ROWS_PER_PASS = 32


# ------------------------------------------------------------------------------ backbone specs
def _json_copy(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable: {e}") from e


def _check_keys(spec: dict, allowed: set[str], required: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    missing = sorted(required - set(spec))
    if unknown or missing:
        raise ValueError(
            f"{where}: unknown keys {unknown}, missing keys {missing} (allowed: {sorted(allowed)})"
        )


def _open_clip_towers(spec: dict) -> tuple[Tower, Tower]:
    from open_clip.hf_model import HFTextEncoder
    from open_clip.model import _build_text_tower, _build_vision_tower
    from open_clip.timm_model import TimmModel
    from transformers import BertConfig

    from ..encoders.open_clip import (
        HFBertTextTower,
        OpenCLIPTextTower,
        OpenCLIPVisionTower,
        TimmViTTower,
    )

    where = "backbone (kind 'open_clip')"
    _check_keys(
        spec,
        {"kind", "embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "bert_config", "text_proj",
         "text_pooler"},
        {"embed_dim", "vision_cfg"},
        where,
    )  # fmt: skip
    if ("text_cfg" in spec) == ("bert_config" in spec):
        raise ValueError(f"{where}: give exactly one of 'text_cfg' and 'bert_config'")
    vision_cfg = dict(spec["vision_cfg"])
    if vision_cfg.get("timm_model_pretrained"):
        raise ValueError(
            f"{where}: vision_cfg.timm_model_pretrained must be false (towers are built offline; "
            "weights come from the checkpoint)"
        )
    embed_dim, quick_gelu = int(spec["embed_dim"]), bool(spec.get("quick_gelu", False))
    visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu)
    vision = TimmViTTower(visual) if isinstance(visual, TimmModel) else OpenCLIPVisionTower(visual)
    if "text_cfg" in spec:
        if spec["text_cfg"].get("hf_model_name"):
            raise ValueError(f"{where}: for a Hugging Face text encoder use 'bert_config'")
        return vision, OpenCLIPTextTower(
            _build_text_tower(embed_dim, dict(spec["text_cfg"]), quick_gelu)
        )
    pooler = spec.get("text_pooler", "cls_last_hidden_state_pooler")
    bert = BertConfig(**spec["bert_config"])
    encoder = HFTextEncoder(
        bert.name_or_path or "bert",
        output_dim=embed_dim,
        config=bert,
        pooler_type=pooler,
        proj_type=spec.get("text_proj", "mlp"),
    )
    if pooler != "cls_pooler":
        # open_clip's pretrained path builds BERT without its pooler unless cls_pooler uses it
        encoder.transformer.pooler = None
    return vision, HFBertTextTower(encoder)


def _transformers_clip_towers(spec: dict) -> tuple[Tower, Tower]:
    from transformers import CLIPConfig, CLIPModel

    from ..encoders.hf_clip import from_clip_model

    _check_keys(
        spec,
        {"kind", "text_config", "vision_config", "projection_dim"},
        {"text_config", "vision_config", "projection_dim"},
        "backbone (kind 'transformers_clip')",
    )
    config = CLIPConfig(
        text_config=dict(spec["text_config"]),
        vision_config=dict(spec["vision_config"]),
        projection_dim=int(spec["projection_dim"]),
    )
    return from_clip_model(CLIPModel(config))


def build_towers(backbone: dict[str, Any]) -> tuple[Tower, Tower]:
    """Build ``(vision_tower, text_tower)`` with random weights from a JSON backbone spec, offline.

    Args:
        backbone: ``{"kind": "open_clip", ...}`` (open_clip built-in ViT or timm ViT; open_clip text
            transformer via ``text_cfg`` or a BERT encoder via ``bert_config``) or
            ``{"kind": "transformers_clip", ...}``; see the module docstring. Nothing is downloaded.

    Returns:
        The two steppable towers (:mod:`vlsegkit.encoders`).
    """
    if not isinstance(backbone, dict):
        raise ValueError(f"backbone must be a dict spec, got {type(backbone).__name__}")
    kind = backbone.get("kind")
    if kind == "open_clip":
        return _open_clip_towers(backbone)
    if kind == "transformers_clip":
        return _transformers_clip_towers(backbone)
    raise ValueError(f"backbone['kind'] must be 'open_clip' or 'transformers_clip', got {kind!r}")


# ------------------------------------------------------------------------------ outputs
@dataclass
class MedCLIPSegPrefix:
    """The sampling-independent part of a forward pass, shared by every Monte Carlo sample.

    Attributes:
        vision: vision ``TokenState`` ``(B, N, D_v)`` after blocks ``0 .. start - 1`` (one row per image).
        text: text ``TokenState`` ``(T, M, D_t)`` after blocks ``0 .. start - 1`` (one row per prompt).
        text_key_mask: ``(T, M)`` bool padding mask for the PVL text keys, or None (attend to all).
        index: ``(B, C)`` long, the text row of output channel ``c`` of image ``b``.
        start: first block that depends on the adapters (the first adapter layer).
        image_size: ``(H, W)`` of the input pixels (the logits' resolution).
    """

    vision: TokenState
    text: TokenState
    text_key_mask: Tensor | None
    index: Tensor
    start: int
    image_size: tuple[int, int]


@dataclass
class UncertaintyOutput:
    """Monte Carlo statistics of :meth:`MedCLIPSeg.predict_with_uncertainty` (natural-log entropies).

    With ``p_s`` the sigmoid probability of sample ``s`` and ``H(p) = -p log p - (1-p) log(1-p)``:

    Attributes:
        mean: ``p_bar = mean_s p_s`` (the segmentation probability; threshold 0.5 for the mask).
        entropy: ``H(p_bar)``, the paper's uncertainty map (total predictive entropy).
        aleatoric: ``mean_s H(p_s)``, the expected entropy.
        epistemic: ``H(p_bar) - mean_s H(p_s)``, the mutual information between the prediction and
            the sampled values (>= 0 by Jensen; clamped at 0 against rounding).
        variance: ``mean_s p_s^2 - p_bar^2`` (clamped at 0).
        samples: number of stochastic passes aggregated (1 when sampling is off).

    Each map is ``(C, H, W)`` at the image's original size, or a list of them for a list of images.
    """

    mean: Tensor | list[Tensor]
    entropy: Tensor | list[Tensor]
    aleatoric: Tensor | list[Tensor]
    epistemic: Tensor | list[Tensor]
    variance: Tensor | list[Tensor]
    samples: int


def _binary_entropy(p: Tensor) -> Tensor:
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def _binary_entropy_from_logits(logits: Tensor) -> Tensor:
    # H = p softplus(-l) + (1 - p) softplus(l): exact for saturated logits, where 1 - p rounds to 0
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


class _RunningMoments:
    """Running sums of ``p``, ``p^2`` and ``H(p)`` over samples, at one image's output size."""

    def __init__(self, channels: int, size: tuple[int, int], device: torch.device) -> None:
        shape = (channels, *size)
        self.size = size
        self.sum_p = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_p2 = torch.zeros_like(self.sum_p)
        self.sum_h = torch.zeros_like(self.sum_p)
        self.count = 0

    def add(self, logits: Tensor) -> None:
        """Fold in ``(S, C, h, w)`` logits of S samples (resized to ``size`` first)."""
        logits = logits.to(torch.float64)
        if tuple(logits.shape[-2:]) != self.size:
            logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)
        p = torch.sigmoid(logits)
        self.sum_p += p.sum(0)
        self.sum_p2 += p.square().sum(0)
        self.sum_h += _binary_entropy_from_logits(logits).sum(0)
        self.count += logits.shape[0]

    def result(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.sum_p / n
        entropy = _binary_entropy(mean)
        if n == 1:  # one pass: no spread at all (not merely rounding-level spread)
            zeros = torch.zeros_like(mean)
            out = {"aleatoric": entropy, "epistemic": zeros, "variance": zeros}
        else:
            aleatoric = self.sum_h / n
            out = {
                "aleatoric": aleatoric,
                "epistemic": (entropy - aleatoric).clamp_min(0),
                "variance": (self.sum_p2 / n - mean.square()).clamp_min(0),
            }
        out.update(mean=mean, entropy=entropy)
        return {k: v.float().cpu() for k, v in out.items()}


# ------------------------------------------------------------------------------ loss
class MedCLIPSegLoss(nn.Module):
    """MedCLIPSeg's total loss ``L = w_d L_Dice + w_b L_BCE + w_c L_SoftCon`` (eq. 23, Appendix D).

    The paper (and the released code) use ``0.5 Dice + 0.5 BCE + 0.1 L_SoftCon`` with ``tau = 0.2``.
    The segmentation part is :class:`~vlsegkit.losses.DiceBCELoss` (per-image soft Dice; see its
    docstring for the released code's row-wise MONAI quirk), the contrastive part
    :class:`~vlsegkit.losses.SoftPatchContrastiveLoss` on the final patch tokens and global text
    embeddings of the MedCLIPSeg output (``extras["patch_tokens"]`` ``(B, C, P, E)`` and
    ``extras["text_embeddings"]`` ``(B, C, E)``; every (image, prompt) pair is one contrastive row).

    Args:
        dice_weight: weight of the soft Dice term (0.5).
        bce_weight: weight of the BCE term (0.5).
        softcon_weight: weight ``lambda_SoftCon`` of the soft patch contrastive term (0.1).
        temperature: contrastive temperature ``tau`` (0.2).
        softcon_variant: ``"paper"`` (eqs. 20-22) or ``"released"`` (official training code).
        smooth: Dice smoothing (see :class:`~vlsegkit.losses.DiceBCELoss`).

    Shapes:
        ``forward(output, masks)``: ``output.logits (B, C, H, W)``; ``masks`` of the same shape (or
        ``(B, H, W)`` when ``C = 1``), values in [0, 1]. Returns a scalar.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        softcon_weight: float = 0.1,
        temperature: float = 0.2,
        softcon_variant: Literal["paper", "released"] = "paper",
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if softcon_weight < 0:
            raise ValueError(f"softcon_weight must be >= 0, got {softcon_weight}")
        self.segmentation = DiceBCELoss(
            dice_weight=dice_weight, bce_weight=bce_weight, smooth=smooth
        )
        self.softcon = SoftPatchContrastiveLoss(temperature=temperature, variant=softcon_variant)
        self.softcon_weight = float(softcon_weight)

    def terms(self, output: SegmentationOutput, masks: Tensor) -> dict[str, Tensor]:
        """The weighted segmentation term, the (unweighted) contrastive term and the total."""
        logits = output.logits
        if masks.dim() == 3 and logits.dim() == 4 and logits.shape[1] == 1:
            masks = masks.unsqueeze(1)
        if masks.shape != logits.shape:
            raise ValueError(
                f"masks must have the shape of output.logits {tuple(logits.shape)} (B, C, H, W), "
                f"or (B, H, W) for one prompt per image; got {tuple(masks.shape)}"
            )
        seg = self.segmentation(logits, masks.to(logits.dtype))
        extras = output.extras or {}
        if "patch_tokens" not in extras or "text_embeddings" not in extras:
            raise ValueError(
                "output.extras must hold 'patch_tokens' (B, C, P, E) and 'text_embeddings' (B, C, E) "
                "(a MedCLIPSeg forward output)"
            )
        patches, text = extras["patch_tokens"], extras["text_embeddings"]
        softcon = self.softcon(patches.flatten(0, 1).float(), text.flatten(0, 1).float())
        return {
            "segmentation": seg,
            "softcon": softcon,
            "total": seg + self.softcon_weight * softcon,
        }

    def forward(self, output: SegmentationOutput, masks: Tensor) -> Tensor:
        """Total loss (scalar); see :meth:`terms` for the parts."""
        return self.terms(output, masks)["total"]

    def extra_repr(self) -> str:
        return f"softcon_weight={self.softcon_weight}"


# ------------------------------------------------------------------------------ helpers
def _take(state: TokenState, rows: Tensor) -> TokenState:
    """Rows ``rows`` of a state (tokens, padding mask and pooling index together)."""
    mask, pool = state.attention_mask, state.pool_index
    return state.replace(
        tokens=state.tokens[rows],
        attention_mask=None if mask is None else mask[rows],
        pool_index=None if pool is None else pool[rows],
    )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def released_checkpoint_name(dataset: str, *, percentage: int = 100, seed: int = 666) -> str:
    """Path of a released checkpoint inside the Hub repo ``TahaKoleilat/MedCLIPSeg``.

    ``{dataset}[_{percentage}]/trained_models/seed{seed}/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth``
    (the official ``utils/download_ckpt.py`` layout), e.g. ``released_checkpoint_name("BUSI")``.
    """
    folder = dataset if percentage == 100 else f"{dataset}_{percentage}"
    return f"{folder}/trained_models/seed{seed}/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"


def load_released_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state dict of a released MedCLIPSeg training checkpoint.

    The official ``train.py`` saves ``{"model": state_dict, "epoch", "optimizer", "scheduler",
    "best_loss"}``; the file is read with ``torch.load(weights_only=True)`` (no arbitrary pickle code)
    and the ``"model"`` (or ``"state_dict"``) entry returned. A flat state dict, pickled or
    ``.safetensors`` (read by :func:`vlsegkit.hub.load_checkpoint_file`), is accepted as well.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or no name -> tensor mapping inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_checkpoint_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for corrupt pickles
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} holds no MedCLIPSeg state dict (expected a name -> tensor mapping, possibly "
            "under 'model')"
        )
    return obj


# ------------------------------------------------------------------------------ model
class MedCLIPSeg(VLSM):
    """MedCLIPSeg: frozen vision / text towers, PVL adapters between their layers, pixel-text head.

    Forward pass (Koleilat et al. 2026, eqs. 3-19), with ``V`` / ``T`` the residual streams::

        V, T = vision.embed(x), text.embed(prompt)
        for i in range(L):
            if i in layers:                          # adapter n sits before block i
                V, T = PVLAdapter_n(V, T)            # eqs. 3, 14-17 (values sampled, eq. 10)
            V, T = vision.block(i, V), text.block(i, T)
        Z_v = vision.dense(V)                        # (P, E) patch tokens in the joint space
        z_t = text.pool(T)                           # global text token ([EOS] / BERT [CLS])
        logits = Upsample_{HxW}(psi(norm(Z_v)) . phi(norm(z_t)))     # eqs. 18-19

    The text stream interacts with the image, so every (image, prompt) pair runs its own lockstep
    pass: ``B`` images with ``C`` prompts each cost ``B * C`` passes of both towers after the first
    adapter (the blocks before it run once per image and once per prompt). Values are sampled in eval
    mode too (the paper's Monte Carlo inference); pass ``sample=False`` or build with
    ``deterministic=True`` for the value means.

    Args:
        backbone: JSON backbone spec (module docstring; :func:`build_towers`). Both towers must have
            the same depth ``L`` and the same joint width ``E``.
        layers: blocks (0-indexed) preceded by an adapter; default ``1 .. L-2`` (1..10 for L = 12,
            as in every released config). ``()`` gives the adapter-free "EoMT-CLIP" ablation.
        adapter_dim: shared adapter width ``D_s`` (256).
        adapter_heads: PVL attention heads (1 as released).
        beta: confidence penalty ``beta`` of eq. 8 (2.35).
        kv_norm: LayerNorm on the key / value means (not in the paper; needed by the released
            checkpoints, see :meth:`released_config`).
        var_eps: floor added to the softplus variances (1e-6 as released).
        gate_init: initial gate logit (0 -> g = 0.5; the released Covid19 config uses -0.02).
        deterministic: adapters use the value means unless ``sample=True`` is passed.
        num_upscale: ×2 ScaleBlocks in ``psi`` (2: 14x14 -> 56x56 for ViT-B/16 at 224).
        text_padding: ``"max_length"`` pads every prompt to ``context_length`` and lets the adapters
            attend to the padding, as released (T_t = 256 for BERT); ``"longest"`` pads to the
            batch's longest prompt and masks padded text keys in the adapters, so the output does not
            depend on what else is in the batch (and is much cheaper).
        context_length: text length (default ``min(256, max positions)`` for BERT, the position
            table length -- 77 -- for CLIP text towers).
        tokenizer: tokenizer folder or Hub id (:func:`vlsegkit.tokenizers.load_tokenizer`), resolved
            on first use. None means open_clip's bundled OpenAI BPE for CLIP text towers; BERT
            towers then need ``input_ids`` (or assign ``model.tokenizer``).
        image_size: ``(H, W)`` (or one int) ``predict`` resizes images to.
        image_mean, image_std: normalisation used by ``predict`` / ``preprocess``.
        channel_order: ``"RGB"``, or ``"BGR"`` to feed channels reversed (the released checkpoints
            were trained on OpenCV's BGR images with ImageNet statistics).
        freeze_backbone: freeze both towers (MedCLIPSeg trains only the adapters and the head).

    Shapes: ``forward(pixel_values (B, 3, H, W), prompts)`` -> ``logits (B, C, H, W)``, H and W
    multiples of the patch size.
    """

    model_type = "medclipseg"

    def __init__(
        self,
        *,
        backbone: dict[str, Any],
        layers: Sequence[int] | None = None,
        adapter_dim: int = 256,
        adapter_heads: int = 1,
        beta: float = 2.35,
        kv_norm: bool = False,
        var_eps: float = 1e-6,
        gate_init: float = 0.0,
        deterministic: bool = False,
        num_upscale: int = 2,
        text_padding: TextPadding = "max_length",
        context_length: int | None = None,
        tokenizer: str | None = None,
        image_size: int | Sequence[int] = 224,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        channel_order: Literal["RGB", "BGR"] = "RGB",
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        if text_padding not in ("max_length", "longest"):
            raise ValueError(
                f"text_padding must be 'max_length' or 'longest', got {text_padding!r}"
            )
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ValueError(
                "tokenizer must be a folder / Hub id string or None (assign a tokenizer object to "
                "model.tokenizer instead)"
            )
        self._backbone = _json_copy(backbone, "backbone")
        self.vision_tower, self.text_tower = build_towers(self._backbone)
        depth = self.vision_tower.num_layers
        if self.text_tower.num_layers != depth:
            raise ValueError(
                f"the towers must have the same depth to run in lockstep, got vision {depth} and "
                f"text {self.text_tower.num_layers} blocks"
            )
        embed_dim = self.vision_tower.embed_dim
        if self.text_tower.embed_dim != embed_dim:
            raise ValueError(
                f"the towers must share the joint width, got vision {embed_dim} and text "
                f"{self.text_tower.embed_dim}"
            )
        if layers is None:
            layers = range(1, depth - 1)
        self.layers = check_lockstep_layers(tuple(layers), depth)
        self._adapter_slot = {layer: n for n, layer in enumerate(self.layers)}
        self._adapter_cfg = dict(
            adapter_dim=_positive_int(adapter_dim, "adapter_dim"),
            adapter_heads=_positive_int(adapter_heads, "adapter_heads"),
            beta=float(beta),
            kv_norm=bool(kv_norm),
            var_eps=float(var_eps),
            gate_init=float(gate_init),
            deterministic=bool(deterministic),
        )
        self.pvl_adapters = nn.ModuleList(
            PVLAdapter(
                vision_dim=self.vision_tower.width,
                text_dim=self.text_tower.width,
                dim=adapter_dim,
                num_heads=adapter_heads,
                beta=beta,
                kv_norm=kv_norm,
                var_eps=var_eps,
                gate_init=gate_init,
                deterministic=deterministic,
            )
            for _ in self.layers
        )
        self.head = PixelTextHead(dim=embed_dim, num_upscale=num_upscale)
        self.num_upscale = int(num_upscale)
        self.deterministic = bool(deterministic)
        self.text_padding: str = text_padding
        max_positions = int(self.text_tower.max_positions)
        if context_length is None:
            is_bert = "bert_config" in self._backbone
            context_length = min(256, max_positions) if is_bert else max_positions
        if not 2 <= int(context_length) <= max_positions:
            raise ValueError(
                f"context_length must be in [2, {max_positions}] (the text position table), "
                f"got {context_length}"
            )
        self.context_length = int(context_length)
        self.tokenizer_name = tokenizer
        self._tokenizer: PromptTokenizer | None = None
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = (int(size[0]), int(size[1]))
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.channel_order: str = channel_order
        #: Recompute frozen tower blocks in backward instead of storing their activations.
        self.gradient_checkpointing = False
        if freeze_backbone:
            self.freeze_backbone()

    # ------------------------------------------------------------------ config / parts
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (``MedCLIPSeg(**model.config)`` rebuilds it)."""
        return {
            "backbone": self._backbone,
            "layers": list(self.layers),
            **self._adapter_cfg,
            "num_upscale": self.num_upscale,
            "text_padding": self.text_padding,
            "context_length": self.context_length,
            "tokenizer": self.tokenizer_name,
            "image_size": list(self.image_size),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "channel_order": self.channel_order,
            "freeze_backbone": not any(
                p.requires_grad
                for p in (*self.vision_tower.parameters(), *self.text_tower.parameters())
            ),
        }

    def freeze_backbone(self, frozen: bool = True) -> MedCLIPSeg:
        """Freeze (or unfreeze) both towers; adapters and head stay trainable."""
        self.vision_tower.requires_grad_(not frozen)
        self.text_tower.requires_grad_(not frozen)
        return self

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The prompt tokenizer, resolved on first use from ``tokenizer`` (folder / Hub id)."""
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                self._tokenizer = load_tokenizer(
                    self.tokenizer_name, context_length=self.context_length
                )
            elif "bert_config" in self._backbone:
                raise ValueError(
                    "this MedCLIPSeg has a BERT text tower but no tokenizer: build it with "
                    f"tokenizer=<folder or Hub id, e.g. {BIOMEDBERT_ID!r}>, assign model.tokenizer, "
                    "or pass input_ids / attention_mask instead of prompts"
                )
            else:
                self._tokenizer = CLIPTokenizer.from_open_clip(context_length=self.context_length)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: PromptTokenizer) -> None:
        self._tokenizer = value

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> channels reversed if ``channel_order="BGR"``, normalised."""
        if self.channel_order == "BGR":
            images = images.flip(-3)
        return super().normalize(images)

    # ------------------------------------------------------------------ text rows
    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, L)`` with this model's padding rule."""
        padding = "max_length" if self.text_padding == "max_length" else "longest"
        batch = self.tokenizer(list(prompts), context_length=self.context_length, padding=padding)
        return batch.input_ids, batch.attention_mask

    def _text_rows(self, batch: int, prompts, input_ids, attention_mask):
        """Text rows ``(T, L)`` (+ mask) and the ``(B, C)`` index pairing them with images."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts or input_ids")
        if input_ids is not None:
            if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
                shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else input_ids
                raise ValueError(f"input_ids must have shape (T, L), got {shape}")
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} "
                    f"(T, L), got {tuple(attention_mask.shape)}"
                )
            return input_ids, attention_mask, _pairing(batch, input_ids.shape[0])
        if attention_mask is not None:
            raise ValueError("attention_mask goes with input_ids, not with prompts")
        if isinstance(prompts, str):
            texts, index = [prompts], torch.zeros(batch, 1, dtype=torch.long)
        else:
            prompts = list(prompts)
            if not prompts:
                raise ValueError("prompts must not be an empty list")
            if all(isinstance(p, str) for p in prompts):
                texts, index = prompts, _pairing(batch, len(prompts))
            elif all(isinstance(p, (list, tuple)) for p in prompts):
                counts = {len(p) for p in prompts}
                if len(prompts) != batch or len(counts) != 1 or 0 in counts:
                    raise ValueError(
                        f"nested prompts must be B={batch} lists (one per image) of the same "
                        f"non-zero length, got lengths {[len(p) for p in prompts]}"
                    )
                texts = [s for row in prompts for s in row]
                if not all(isinstance(s, str) for s in texts):
                    raise ValueError("prompts must be strings")
                index = torch.arange(len(texts)).view(batch, -1)
            else:
                raise ValueError(
                    "prompts must be a string, a list of strings or B lists of strings"
                )
        ids, mask = self.tokenize(texts)
        return ids, mask, index

    # ------------------------------------------------------------------ forward
    def encode_prefix(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> MedCLIPSegPrefix:
        """Embed images and prompts and run the blocks before the first adapter (no sampling).

        Each image and each prompt is encoded once here, whatever the pairing and the number of
        Monte Carlo samples; :meth:`forward_from_prefix` does the rest. Arguments as in ``forward``.
        """
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else pixel_values
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {shape}")
        ids, mask, index = self._text_rows(
            pixel_values.shape[0], prompts, input_ids, attention_mask
        )
        return self._prefix(pixel_values, ids, mask, index)

    def _prefix(
        self, pixel_values: Tensor, ids: Tensor, mask: Tensor | None, index: Tensor
    ) -> MedCLIPSegPrefix:
        device = pixel_values.device
        ids = ids.to(device)
        mask = None if mask is None else mask.to(device)
        start = self.layers[0] if self.layers else self.vision_tower.num_layers
        with torch.set_grad_enabled(_needs_grad(self.vision_tower, pixel_values)):
            vision, _ = self.vision_tower.run(self.vision_tower.embed(pixel_values), stop_at=start)
        with torch.set_grad_enabled(_needs_grad(self.text_tower)):
            text = self.text_tower.embed(ids, mask)
            key_mask = text.attention_mask if self.text_padding == "longest" else None
            if text.causal:
                # right padding follows EOS, so the causal mask alone keeps it away from every real
                # token; upstream CLIP text encoders run exactly so (no padding mask)
                text = text.replace(attention_mask=None)
            text, _ = self.text_tower.run(text, stop_at=start)
        return MedCLIPSegPrefix(
            vision=vision,
            text=text,
            text_key_mask=None if key_mask is None else key_mask.bool(),
            index=index,
            start=start,
            image_size=(int(pixel_values.shape[-2]), int(pixel_values.shape[-1])),
        )

    def _sampling(self, sample: bool | None) -> bool:
        return (not self.deterministic) if sample is None else bool(sample)

    def _adapt(self, i, vision, text, *, key_mask, streams, sampling):
        """PVL adapter before block ``i``.

        With several ``streams`` (one generator per equal batch chunk, i.e. per Monte Carlo copy)
        chunk ``s`` draws exactly the noise a single pass with generator ``s`` would, while every
        projection and attention runs once for the whole batch (:func:`_adapter_streams`).
        """
        adapter = self.pvl_adapters[self._adapter_slot[i]]
        if sampling and streams is not None and len(streams) > 1:
            v, t = _adapter_streams(adapter, vision.tokens, text.tokens, streams, key_mask)
        else:
            g = None if streams is None else streams[0]
            v, t = adapter(
                vision.tokens, text.tokens, text_padding_mask=key_mask, generator=g, sample=sampling
            )
        return vision.with_tokens(v), text.with_tokens(t)

    def forward_from_prefix(
        self,
        prefix: MedCLIPSegPrefix,
        *,
        generators: Sequence[torch.Generator] | None = None,
        copies: int = 1,
        sample: bool | None = None,
    ) -> SegmentationOutput:
        """Finish a forward pass from :meth:`encode_prefix`, for several noise copies at once.

        The ``B * C`` (image, prompt) pairs are repeated ``copies`` times along the batch axis
        (copy-major) and stepped through the remaining blocks and adapters together.

        Args:
            prefix: output of :meth:`encode_prefix`.
            generators: one ``torch.Generator`` per copy (on the input device): copy ``s`` draws its
                value noise from ``generators[s]`` exactly as ``model(x, p, generator=generators[s])``
                would. ``copies`` is then ``len(generators)``. None uses the global RNG.
            copies: number of copies when ``generators`` is None.
            sample: sample the values; None follows ``deterministic``.

        Returns:
            :class:`SegmentationOutput` with ``logits (copies * B, C, H, W)``,
            ``conditional_embeddings`` / ``extras["text_embeddings"] (copies * B, C, E)`` and
            ``extras["patch_tokens"] (copies * B, C, h*w, E)``.
        """
        if generators is not None:
            generators = list(generators)
            copies = len(generators)
        copies = _positive_int(copies, "copies")
        sampling = self._sampling(sample)
        b, c = prefix.index.shape
        device = prefix.vision.tokens.device
        images = torch.arange(b, device=device).repeat_interleave(c).repeat(copies)
        rows = prefix.index.reshape(-1).to(device).repeat(copies)
        vision, text = _take(prefix.vision, images), _take(prefix.text, rows)
        key_mask = None if prefix.text_key_mask is None else prefix.text_key_mask[rows]

        def hook(i: int, v: TokenState, t: TokenState) -> tuple[TokenState, TokenState]:
            return self._adapt(
                i,
                v,
                t,
                key_mask=key_mask,
                streams=generators if sampling else None,
                sampling=sampling,
            )

        vision, text = run_lockstep(
            self.vision_tower,
            self.text_tower,
            vision,
            text,
            hook,
            layers=self.layers,
            start=prefix.start,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        patches = self.vision_tower.dense(vision)
        text_emb = self.text_tower.pool(text)
        logits = self.head(patches, vision.grid, text_emb, output_size=prefix.image_size)
        n = copies * b
        text_emb = text_emb.view(n, c, -1)
        return SegmentationOutput(
            logits=logits.view(n, c, *logits.shape[-2:]),
            conditional_embeddings=text_emb,
            extras={
                "patch_tokens": patches.view(n, c, *patches.shape[1:]),
                "text_embeddings": text_emb,
            },
        )

    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        sample: bool | None = None,
    ) -> SegmentationOutput:
        """Segment ``pixel_values`` with text prompts (one stochastic pass).

        Pairing of B images with prompts: a string -> every image (C = 1); B strings (or ``input_ids``
        with B rows) -> one per image (C = 1); T != B strings / rows -> every image with every prompt
        (C = T); B lists of C strings -> per-image prompt sets.

        Args:
            pixel_values: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
            prompts: text prompts (see above).
            input_ids, attention_mask: pre-tokenised prompts ``(T, L)`` instead of strings (e.g.
                for a BERT backbone without a tokenizer).
            generator: value-noise generator (reproducible sampling); None uses the global RNG.
            sample: sample the values (eq. 10); None follows ``deterministic`` (sampled by default,
                in eval mode too).

        Returns:
            :class:`SegmentationOutput`: ``logits (B, C, H, W)``, ``conditional_embeddings
            (B, C, E)`` (global text tokens) and ``extras`` with ``patch_tokens (B, C, h*w, E)`` and
            ``text_embeddings (B, C, E)`` for :class:`MedCLIPSegLoss`.
        """
        prefix = self.encode_prefix(
            pixel_values, prompts, input_ids=input_ids, attention_mask=attention_mask
        )
        return self.forward_from_prefix(
            prefix, generators=None if generator is None else [generator], sample=sample
        )

    # ------------------------------------------------------------------ Monte Carlo inference
    @staticmethod
    def sample_generators(
        samples: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[torch.Generator]:
        """The per-sample noise generators of :meth:`predict_with_uncertainty`.

        ``samples`` seeds are drawn from a base stream -- ``torch.Generator().manual_seed(seed)``, the
        given ``generator``, or the global RNG -- and each seeds one generator on ``device``. Sample
        ``s`` of ``predict_with_uncertainty(..., seed=seed)`` (first image chunk) uses exactly
        ``sample_generators(samples, seed=seed)[s]``, whatever ``batch_samples`` is.
        """
        samples = _positive_int(samples, "samples")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        base = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        return _derive_generators(base, samples, device)

    @torch.no_grad()
    def predict_with_uncertainty(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        samples: int = 30,
        *,
        batch_samples: int | None = None,
        batch_size: int = 8,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sample: bool | None = None,
    ) -> UncertaintyOutput:
        """Monte Carlo segmentation with uncertainty maps (section 3.2; 30 samples in the paper).

        Each image chunk is encoded once up to the first adapter (:meth:`encode_prefix`); then
        ``batch_samples`` noise copies at a time run the rest of the model as one batch, and their
        probabilities are folded into running sums at each image's original size, so memory does
        not grow with ``samples``. Logits are bilinearly resized to the original size before the
        sigmoid.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``), any
                size; resized to ``image_size`` and normalised.
            prompts: one prompt (every image), N prompts for N images (paired), or T != N prompts
                (every image with every prompt, C = T).
            samples: stochastic passes ``S``.
            batch_samples: passes run together in one batch; default ``8 // (B * C)`` on CPU (larger
                batches fall out of cache and get slower there) and ``32 // (B * C)`` elsewhere, at
                least 1.
            batch_size: images per chunk.
            seed: seeds the per-sample noise (:meth:`sample_generators`); with several image
                chunks each chunk draws the next ``samples`` seeds of the same stream.
            generator: base stream instead of ``seed``.
            sample: sample the values; False runs one deterministic pass (epistemic = 0).

        Returns:
            :class:`UncertaintyOutput` (maps ``(C, H, W)``, or lists for a list of images).
        """
        samples = _positive_int(samples, "samples")
        batch_size = _positive_int(batch_size, "batch_size")
        if batch_samples is not None:
            batch_samples = _positive_int(batch_samples, "batch_samples")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, Tensor) and images.dim() == 4
        )
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images must hold at least one image")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(p, str) for p in texts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        paired = len(texts) == len(items) and len(texts) > 1
        ids, mask = self.tokenize(texts)
        sampling = self._sampling(sample)
        passes = samples if sampling else 1
        base = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        was_training = self.training
        self.eval()
        moments: list[_RunningMoments] = []
        # inference mode skips autograd bookkeeping (version counters, views) on every op; the maps
        # are finalised outside it, so callers get ordinary tensors they may modify in place
        try:
            with torch.inference_mode():
                for start in range(0, len(items), batch_size):
                    pixels, sizes = self.preprocess(items[start : start + batch_size])
                    b = len(sizes)
                    if paired:
                        rows, index = slice(start, start + b), torch.arange(b).view(b, 1)
                    else:
                        rows, index = slice(None), torch.arange(len(texts)).expand(b, -1)
                    prefix = self._prefix(pixels, ids[rows], mask[rows], index)
                    c = index.shape[1]
                    # CPU: a few copies keep activations cache-resident; accelerators like big batches
                    budget = _CPU_ROWS_PER_PASS if pixels.device.type == "cpu" else _ROWS_PER_PASS
                    per_pass = batch_samples or max(1, budget // (b * c))
                    streams = _derive_generators(base, passes, pixels.device) if sampling else None
                    chunk = [_RunningMoments(c, size, pixels.device) for size in sizes]
                    moments.extend(chunk)
                    for s in range(0, passes, per_pass):
                        n = min(per_pass, passes - s)
                        out = self.forward_from_prefix(
                            prefix,
                            generators=None if streams is None else streams[s : s + n],
                            copies=n,
                            sample=sampling,
                        )
                        logits = out.logits.view(n, b, c, *out.logits.shape[-2:])
                        for j, acc in enumerate(chunk):
                            acc.add(logits[:, j])
        finally:
            self.train(was_training)
        stats = [acc.result() for acc in moments]
        fields = {k: [s[k] for s in stats] for k in stats[0]}
        if single:
            fields = {k: v[0] for k, v in fields.items()}
        return UncertaintyOutput(samples=passes, **fields)

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        samples: int = 30,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Tensor | list[Tensor]:
        """Mean Monte Carlo probability ``(C, H, W)`` per image at its original size (threshold 0.5).

        Shortcut for ``predict_with_uncertainty(...).mean``; ``samples=1`` with ``sample=False`` gives
        the deterministic (value-mean) prediction.
        """
        return self.predict_with_uncertainty(images, prompts, samples, seed=seed, **kwargs).mean

    # ------------------------------------------------------------------ released checkpoints
    @staticmethod
    def released_config(**overrides: Any) -> dict[str, Any]:
        """Constructor arguments matching the released UniMedCLIP checkpoints (spec §8-9).

        UniMedCLIP ViT-B/16 (QuickGELU) + BiomedBERT (768 -> 640 -> 512 MLP projection, [CLS] pool),
        adapters before blocks 1..10 with ``kv_norm=True``, text padded to 256 tokens with the
        padding attended to, BGR channel order with ImageNet mean / std, 224 x 224 input.
        """
        return {
            "backbone": _unimedclip_backbone(),
            "layers": list(range(1, 11)),
            "adapter_dim": 256,
            "kv_norm": True,
            "text_padding": "max_length",
            "context_length": 256,
            "tokenizer": BIOMEDBERT_ID,
            "image_size": [224, 224],
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "channel_order": "BGR",
            **overrides,
        }

    def convert_released_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename a released ``CustomCLIP`` state dict to this model's keys (:data:`RELEASED_KEY_MAP`).

        ``logit_scale``, an unused BERT pooler and persisted ``position_ids`` / ``token_type_ids``
        buffers are dropped; a leading ``module.`` (DataParallel) is stripped. Unknown keys are kept
        so the strict load names them.
        """
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.startswith(_RELEASED_DROPPED_PREFIXES) or key.endswith(
                _RELEASED_DROPPED_SUFFIXES
            ):
                continue
            for old, new in RELEASED_KEY_MAP.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = value
        return out

    @classmethod
    def from_released(
        cls,
        checkpoint: str | os.PathLike,
        *,
        filename: str | None = None,
        config: dict[str, Any] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MedCLIPSeg:
        """Load an official MedCLIPSeg checkpoint (``*_latest.pth`` of ``HealthX-Lab/MedCLIPSeg``).

        Args:
            checkpoint: the ``.pth`` file, a folder holding ``filename``, or a Hub repo id (e.g.
                ``"TahaKoleilat/MedCLIPSeg"`` with ``filename=released_checkpoint_name("BUSI")``).
            filename: file inside a folder / Hub repo.
            config: constructor arguments; default :meth:`released_config` (UniMedCLIP ViT-B/16 +
                BiomedBERT). The backbone must be an open_clip ViT + BERT spec.
            revision, cache_dir, local_files_only, token: Hub options.

        Returns:
            The model in eval mode. Values are still sampled in eval (as released); inputs must be
            prepared as released: BGR, ImageNet-normalised, 224 x 224 (``predict`` does this).

        Raises:
            CheckpointError: unreadable file, missing / unexpected keys or wrong shapes.
        """
        config = cls.released_config() if config is None else dict(config)
        backbone = config.get("backbone", {})
        if (
            backbone.get("kind") != "open_clip"
            or "bert_config" not in backbone
            or backbone.get("vision_cfg", {}).get("timm_model_name")
        ):
            raise ValueError(
                "the released key map covers the UniMedCLIP model: config['backbone'] must be an "
                "open_clip built-in ViT with 'bert_config'"
            )
        path = Path(checkpoint)
        if not path.is_file():
            if filename is None:
                raise ValueError(f"{checkpoint} is not a file: pass filename= (folder or Hub repo)")
            path = resolve_file(
                checkpoint,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        state = load_released_state_dict(path)
        model = cls(**config)
        load_state_dict_strict(model, model.convert_released_state_dict(state), source=str(path))
        return model._mark_source(checkpoint, revision).eval()


def _derive_generators(
    base: torch.Generator | None, samples: int, device: torch.device | str | None
) -> list[torch.Generator]:
    where = base.device if base is not None else "cpu"
    seeds = torch.randint(0, 2**62, (samples,), generator=base, device=where).tolist()
    device = torch.device("cpu" if device is None else device)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _attention_streams(
    attn: PVLAttention,
    x: Tensor,
    context: Tensor,
    generators: Sequence[torch.Generator],
    key_mask: Tensor | None,
) -> Tensor:
    """``attn(x, context)`` with sampled values, the noise of batch chunk ``s`` drawn from
    ``generators[s]``.

    :class:`~vlsegkit.layers.PVLAttention` takes one generator per call; Monte Carlo copies need one
    per copy. This composes the module's own parts -- ``gaussian_keys_values`` (eqs. 5-6),
    ``q_proj``, :func:`~vlsegkit.ops.probabilistic_attention` (eqs. 7-9), ``out_proj`` and the gate
    (eq. 13) -- around values ``V_mu + sqrt(V_var) * noise`` (eq. 10) whose chunk ``s`` is
    ``torch.randn(chunk_shape, generator=generators[s])``: the very draw ``attn(x_s, context_s,
    generator=generators[s])`` makes, so each chunk equals that call (tests pin it). Everything but
    the noise runs once for all chunks.
    """
    k_mu, k_var, v_mu, v_var = attn.gaussian_keys_values(context)
    noise = torch.cat(
        [
            torch.randn(chunk.shape, generator=g, device=chunk.device, dtype=chunk.dtype)
            for chunk, g in zip(v_mu.chunk(len(generators)), generators)
        ]
    )
    values = v_mu + v_var.sqrt() * noise
    q, k_mu, k_var, values = (
        rearrange(t, "b n (h d) -> b h n d", h=attn.num_heads)
        for t in (attn.q_proj(x), k_mu, k_var, values)
    )
    out = probabilistic_attention(
        q,
        k_mu,
        k_var,
        values,
        beta=attn.beta,
        key_padding_mask=key_mask,
        chunk_size=attn.chunk_size,
    )
    out = attn.out_proj(rearrange(out, "b h n d -> b n (h d)"))
    g = torch.sigmoid(attn.gate)
    return g * out + (1 - g) * x


def _adapter_streams(
    adapter: PVLAdapter,
    vision: Tensor,
    text: Tensor,
    generators: Sequence[torch.Generator],
    key_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``adapter(vision, text)`` (eqs. 3, 14-17) with one noise generator per batch chunk."""
    two_way = adapter.two_way
    v, t = adapter.proj_vis_down(vision), adapter.proj_txt_down(text)
    v = _attention_streams(two_way.cross_attn_img_to_txt, v, t, generators, key_mask)
    t = _attention_streams(two_way.cross_attn_txt_to_img, t, v, generators, None)
    return vision + adapter.proj_vis_up(v), text + adapter.proj_txt_up(t)


# ---------------------------------------------------------------------- registry
def _biomedbert_config() -> dict[str, Any]:
    # microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract: BERT-base shape, uncased 30522 vocab
    return dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
    )  # fmt: skip


def _vit_b16_cfg() -> dict[str, Any]:
    return {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64}


def _unimedclip_backbone() -> dict[str, Any]:
    return {
        "kind": "open_clip",
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": _vit_b16_cfg(),
        "bert_config": _biomedbert_config(),
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }


@register_model(
    "medclipseg-unimedclip-vit-b16",
    description="MedCLIPSeg (paper default): UniMedCLIP ViT-B/16 + BiomedBERT, 10 PVL adapters",
)
def medclipseg_unimedclip_vit_b16(**kwargs) -> MedCLIPSeg:
    defaults = dict(backbone=_unimedclip_backbone(), context_length=256, tokenizer=BIOMEDBERT_ID)
    return MedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "medclipseg-biomedclip-vit-b16",
    description="MedCLIPSeg on BiomedCLIP (timm ViT-B/16 + PubMedBERT), the Table 5 ablation",
)
def medclipseg_biomedclip_vit_b16(**kwargs) -> MedCLIPSeg:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "linear", "image_size": 224,
        },
        "bert_config": _biomedbert_config(),
        "text_proj": "mlp",
        "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip
    defaults = dict(backbone=backbone, context_length=256, tokenizer=BIOMEDBERT_ID)
    return MedCLIPSeg(**{**defaults, **kwargs})


@register_model(
    "medclipseg-clip-vit-b16",
    description="MedCLIPSeg on OpenAI CLIP ViT-B/16 (77-token text), the Table 5 ablation",
)
def medclipseg_clip_vit_b16(**kwargs) -> MedCLIPSeg:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": _vit_b16_cfg(),
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12},
    }  # fmt: skip
    return MedCLIPSeg(**{"backbone": backbone, **kwargs})


@register_model(
    "medclipseg-tiny",
    description="A tiny random MedCLIPSeg (width 64, 4 layers, CLIP BPE text) for tests and demos",
)
def medclipseg_tiny(**kwargs) -> MedCLIPSeg:
    backbone = {
        "kind": "open_clip",
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 4,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                     "layers": 4},
    }  # fmt: skip
    defaults = dict(
        backbone=backbone, adapter_dim=32, text_padding="longest", image_size=64,
    )  # fmt: skip
    return MedCLIPSeg(**{**defaults, **kwargs})
