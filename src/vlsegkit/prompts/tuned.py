"""``TunedModel``: a frozen VLSM + a context learner (+ upsampler), saved as the learner only.

TuneVLSeg (Adhikari et al., ACCV 2024, §5): "since all the parameters of the pretrained models are
frozen, we train and store only the learnable contexts for each downstream task". A tuned model's
folder therefore holds

* ``config.json`` -- ``model_type: "prompt-tuned"``, the learner (class + arguments), the upsampler
  arguments, and a reference to the base: its ``name_or_path`` and ``revision`` (where
  ``VLSM.from_pretrained`` loaded it from) plus a fingerprint (hashes of its config and of its
  weights) so that loading onto a different base fails clearly;
* ``model.safetensors`` -- the learner and upsampler weights only (``tuned.state_dict()`` leaves the
  frozen base out).

``TunedModel.from_pretrained(path)`` (or ``vlsegkit.VLSM.from_pretrained(path)`` once
``vlsegkit.prompts`` is imported, or :func:`load_tuned`) resolves the base through
``VLSM.from_pretrained(name_or_path, revision=...)`` -- or takes it from ``base=`` -- checks the
fingerprint and restores the learner.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import CONFIG_NAME, SAFETENSORS_NAME, CheckpointError, read_json, resolve_file
from ..models.base import VLSM, ImageInput, SegmentationOutput
from .base import ContextLearner, learner_from_config
from .upsampler import LearnableUpsampler

__all__ = ["TunedModel", "base_fingerprint", "load_tuned"]

_BASE_PREFIX = "base."


def base_fingerprint(model: VLSM) -> dict[str, Any]:
    """Identify a base model's architecture and exact weights without storing them.

    Args:
        model: the base VLSM.

    Returns:
        ``{"model_type", "config_sha256", "weights_sha256", "num_parameters"}``. The config hash
        ignores trainability switches (keys starting with ``freeze``); the weights hash covers the
        name, shape, dtype and raw bytes of every state-dict tensor (about 0.4 s for the 150M
        parameters of CLIPSeg ViT-B/16 on one CPU core).
    """
    config = {k: v for k, v in model.config.items() if not k.startswith("freeze")}
    config_text = json.dumps(
        {"model_type": model.model_type, "config": config}, sort_keys=True, default=list
    )
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(state[name].shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return {
        "model_type": model.model_type,
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def _check_fingerprint(base: VLSM, expected: dict[str, Any], source: str) -> None:
    found = base_fingerprint(base)
    keys = ("model_type", "config_sha256", "weights_sha256", "num_parameters")
    wrong = [k for k in keys if found[k] != expected.get(k)]
    if wrong:
        details = "; ".join(f"{k}: expected {expected.get(k)!r}, found {found[k]!r}" for k in wrong)
        raise CheckpointError(
            f"the prompt learner in {source} was trained on a different base model: "
            f"{', '.join(wrong)} differ ({details}). Load the base it was trained on (config.json "
            "'base' names it) or pass that model as base="
        )


def _resolve_base(reference: dict[str, Any], **hub_kwargs: Any) -> VLSM:
    path = reference.get("name_or_path")
    if not path:
        raise CheckpointError(
            "this tuned model does not record where its base model comes from (the base was not "
            "loaded with VLSM.from_pretrained); pass base= explicitly"
        )
    return VLSM.from_pretrained(path, revision=reference.get("revision"), **hub_kwargs)


class TunedModel(VLSM):
    """A frozen base VLSM driven by a context learner, optionally with a learnable upsampler.

    ``tuned(pixel_values, prompts)`` runs ``base(pixel_values, prompts, prompter=learner)``; with an
    upsampler the logits become ``upsampler(logits, decoder_features)``. The base is frozen in place
    (``requires_grad_(False)``) and kept in eval mode; ``trainable_parameters()`` yields the learner and
    upsampler parameters only, and ``state_dict()`` holds only them.

    Args:
        base: the pretrained model (its ``forward`` must accept ``prompter=`` and
            ``output_decoder_features=``, as :class:`vlsegkit.CLIPSeg` does), or the ``base``
            reference of a saved ``config.json`` (resolved with ``VLSM.from_pretrained``).
        learner: a :class:`~vlsegkit.prompts.ContextLearner` (bound to the base's towers here) or its
            ``config``.
        upsampler: a :class:`~vlsegkit.prompts.LearnableUpsampler`, its config dict, True (default
            arguments, input width ``base.decoder_feature_dim``) or None / False (none).
        gradient_checkpointing: recompute the frozen towers' block activations in backward instead of
            storing them (sets ``base.gradient_checkpointing``).

    Example:
        >>> base = VLSM.from_pretrained("CIDAS/clipseg-rd64")
        >>> tuned = VPT(depth=6).attach(base)              # == TunedModel(base, VPT(depth=6))
        >>> fit(tuned, loader, lr=1e-3)
        >>> tuned.save_pretrained("vpt-kvasir")            # learner weights + base id / revision
        >>> again = TunedModel.from_pretrained("vpt-kvasir")
    """

    model_type = "prompt-tuned"

    def __init__(
        self,
        base: VLSM | dict[str, Any],
        learner: ContextLearner | dict[str, Any],
        *,
        upsampler: LearnableUpsampler | dict[str, Any] | bool | None = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(base, dict):
            reference = base
            base = _resolve_base(reference)
            source = f"the tuned model of base {reference.get('name_or_path')!r}"
            _check_fingerprint(base, reference.get("fingerprint", {}), source)
        if not isinstance(base, VLSM):
            raise TypeError(f"base must be a VLSM, got {type(base).__name__}")
        params = inspect.signature(base.forward).parameters
        if "prompter" not in params:
            raise TypeError(
                f"{type(base).__name__}.forward has no 'prompter' argument: it does not support "
                "prompt learners"
            )
        if isinstance(learner, dict):
            learner = learner_from_config(learner)
        if not isinstance(learner, ContextLearner):
            raise TypeError(f"learner must be a ContextLearner, got {type(learner).__name__}")
        base.requires_grad_(False)
        learner.bind(
            text_tower=getattr(base, "text_tower", None),
            vision_tower=getattr(base, "vision_tower", None),
            tokenizer=getattr(base, "tokenizer", None),
        )
        self.base = base
        self.learner = learner
        self.upsampler = self._make_upsampler(base, upsampler)
        if self.upsampler is not None and "output_decoder_features" not in params:
            raise TypeError(
                f"{type(base).__name__}.forward cannot return decoder features "
                "(output_decoder_features); use upsampler=None"
            )
        first = next(base.parameters(), None)
        if first is not None:
            self.learner.to(first.device)
            if self.upsampler is not None:
                self.upsampler.to(first.device)
        self.image_size, self.image_mean, self.image_std = (
            base.image_size,
            base.image_mean,
            base.image_std,
        )
        self.gradient_checkpointing = gradient_checkpointing
        self.register_state_dict_post_hook(_drop_base_keys)
        self.register_load_state_dict_pre_hook(_remember_prefix)
        self.register_load_state_dict_post_hook(_ignore_missing_base_keys)
        self.base.eval()

    @staticmethod
    def _make_upsampler(base: VLSM, upsampler) -> LearnableUpsampler | None:
        if upsampler is None or upsampler is False:
            return None
        if isinstance(upsampler, LearnableUpsampler):
            return upsampler
        if upsampler is True or isinstance(upsampler, dict):
            kwargs = {} if upsampler is True else dict(upsampler)
            if "in_channels" not in kwargs:
                width = getattr(base, "decoder_feature_dim", None)
                if width is None:
                    raise ValueError(
                        f"{type(base).__name__} has no decoder_feature_dim; pass "
                        "upsampler=LearnableUpsampler(in_channels=...)"
                    )
                kwargs["in_channels"] = width
            return LearnableUpsampler(**kwargs)
        raise TypeError(
            f"upsampler must be a LearnableUpsampler, a dict, a bool or None, got {upsampler!r}"
        )

    # ------------------------------------------------------------------ switches
    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the base recomputes its frozen blocks in backward (memory for time)."""
        return bool(getattr(self.base, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        if enabled and not hasattr(self.base, "gradient_checkpointing"):
            raise ValueError(f"{type(self.base).__name__} does not support gradient checkpointing")
        if hasattr(self.base, "gradient_checkpointing"):
            self.base.gradient_checkpointing = bool(enabled)

    def train(self, mode: bool = True) -> TunedModel:
        """Train mode for the learner and upsampler; the frozen base always stays in eval mode."""
        super().train(mode)
        self.base.eval()
        return self

    # ------------------------------------------------------------------ config
    @property
    def base_reference(self) -> dict[str, Any]:
        """Where the base comes from and its fingerprint (stored in ``config.json``)."""
        return {
            "name_or_path": self.base.name_or_path,
            "revision": self.base.revision,
            "fingerprint": base_fingerprint(self.base),
        }

    @property
    def config(self) -> dict[str, Any]:
        return {
            "base": self.base_reference,
            "learner": self.learner.config,
            "upsampler": None if self.upsampler is None else self.upsampler.config,
        }

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> SegmentationOutput:
        """Segment with the learned prompts: arguments as the base model's ``forward``.

        Returns:
            :class:`~vlsegkit.models.SegmentationOutput` with ``logits (B, C, H, W)``; with an
            upsampler ``extras["decoder_features"]`` holds the features it read.
        """
        out = self.base(
            pixel_values,
            prompts,
            prompter=self.learner,
            output_decoder_features=self.upsampler is not None,
            **kwargs,
        )
        if self.upsampler is None:
            return out
        logits = self.upsampler(out.logits, out.extras["decoder_features"])
        return SegmentationOutput(
            logits=logits, conditional_embeddings=out.conditional_embeddings, extras=out.extras
        )

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        batch_size: int = 8,
    ) -> Tensor | list[Tensor]:
        """Probabilities ``(C, H, W)`` for every prompt at each image's original size.

        Args:
            images: one image or a list (PIL, numpy, tensors), any size.
            prompts: one prompt or a list of C prompts, applied to every image.
            batch_size: images per forward pass.
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, Tensor) and images.dim() == 4
        )
        items = [images] if single else list(images)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ValueError("predict() needs at least one prompt")
        was_training = self.training
        self.eval()
        out: list[Tensor] = []
        try:
            for start in range(0, len(items), batch_size):
                pixels, sizes = self.base.preprocess(items[start : start + batch_size])
                probs = self(pixels, [prompt_list] * pixels.shape[0]).logits.sigmoid()
                for p, size in zip(probs, sizes):
                    up = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)
                    out.append(up[0].cpu())
        finally:
            self.train(was_training)
        return out[0] if single else out

    # ------------------------------------------------------------------ Hub I/O
    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        *,
        base: VLSM | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> TunedModel:
        """Load a tuned model: resolve (or take) the base, check its fingerprint, load the learner.

        Args:
            id_or_path: folder or Hub repo id written by ``save_pretrained`` / ``push_to_hub``.
            base: the base model to attach to (e.g. offline); its fingerprint must match.
            revision, cache_dir, local_files_only, token: Hub options, for the tuned repository and
                the base (the base uses its own recorded revision).

        Raises:
            CheckpointError: not a tuned-model folder, a different base, or bad learner weights.
        """
        kw = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        config_path = resolve_file(id_or_path, CONFIG_NAME, revision=revision, **kw)
        config = read_json(config_path)
        if config.get("model_type") != cls.model_type:
            raise CheckpointError(
                f"{config_path} is not a prompt-tuned model (model_type="
                f"{config.get('model_type')!r}, expected {cls.model_type!r})"
            )
        reference = config.get("base")
        if not isinstance(reference, dict):
            raise CheckpointError(f"{config_path} has no 'base' reference")
        if base is None:
            base = _resolve_base(reference, **kw)
        _check_fingerprint(base, reference.get("fingerprint", {}), str(config_path))
        model = cls(base, config["learner"], upsampler=config.get("upsampler"))
        weights = resolve_file(id_or_path, SAFETENSORS_NAME, revision=revision, **kw)
        from ..hub import load_checkpoint_file, load_state_dict_strict

        load_state_dict_strict(model, load_checkpoint_file(weights), source=str(weights))
        return model._mark_source(id_or_path, revision).eval()


def load_tuned(id_or_path: str | os.PathLike, **kwargs: Any) -> TunedModel:
    """``TunedModel.from_pretrained(id_or_path, **kwargs)``."""
    return TunedModel.from_pretrained(id_or_path, **kwargs)


# --------------------------------------------------------------------------- state-dict hooks
def _drop_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _BASE_PREFIX)]:
        del state_dict[key]


def _remember_prefix(module: nn.Module, state_dict, prefix: str, *args) -> None:
    module._load_prefix = prefix


def _ignore_missing_base_keys(module: nn.Module, incompatible) -> None:
    # the frozen base is identified by reference, never loaded from the tuned checkpoint
    skip = getattr(module, "_load_prefix", "") + _BASE_PREFIX
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(skip)]
