"""``TunedModel``: a frozen VLSM driven by hooks (prompt learners, adapters), saved as the hooks only.

TuneVLSeg (Adhikari et al., ACCV 2024, §5): "since all the parameters of the pretrained models are
frozen, we train and store only the learnable contexts for each downstream task"; VLSM-Adapter
(Dhakal et al., MICCAI 2024) trains only its adapters the same way. A tuned model's folder holds

* ``config.json`` -- ``model_type: "tuned"``, the hooks (class + arguments), the learnable upsampler
  arguments, and a reference to the base: its ``name_or_path`` and ``revision`` (where
  ``VLSM.from_pretrained`` loaded it from; local folders are recorded as absolute paths) plus a
  fingerprint (hashes of its config and of its weights) so that loading onto a different base fails
  clearly;
* ``model.safetensors`` -- the hook and upsampler weights only (``tuned.state_dict()`` leaves the
  frozen base out).

``VLSM.from_pretrained(path)`` (or ``TunedModel.from_pretrained(path, base=...)``) resolves the base
through ``VLSM.from_pretrained(name_or_path, revision=...)`` -- or takes it from ``base=`` -- checks the
fingerprint and restores the hooks. Any model with hook slots can be tuned
(:class:`~vlsegkit.models.capabilities.SupportsHooks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..encoders.hooks import TowerHook
from ..hub import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    load_checkpoint_file,
    load_state_dict_strict,
    read_json,
    resolve_file,
)
from ..layers.upsampler import LearnableUpsampler
from ..registry import hook_from_config
from .base import VLSM, eval_mode
from .capabilities import (
    SupportsDecoderFeatures,
    SupportsHooks,
    SupportsRetrieval,
    SupportsTextFree,
)
from .outputs import SegmentationOutput

__all__ = ["TunedModel", "base_fingerprint", "load_tuned"]

_BASE_PREFIX = "base."


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of all of ``model``'s floating parameters, or None (none, or mixed)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _weights_sha256(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of the name, shape, dtype and raw bytes of every state-dict tensor, with floating
    tensors cast to ``dtype`` first when it is given."""
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(state[name].shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def base_fingerprint(model: VLSM) -> dict[str, Any]:
    """Identify a base model's architecture and exact weights without storing them.

    Args:
        model: the base VLSM.

    Returns:
        ``{"model_type", "config_sha256", "weights_sha256", "num_parameters", "dtype"}``. The
        config hash ignores trainability switches (keys starting with ``freeze``); the weights
        hash covers the name, shape, dtype and raw bytes of every state-dict tensor (about 0.4 s
        for the 150M parameters of CLIPSeg ViT-B/16 on one CPU core). ``dtype`` (the parameters'
        floating dtype, or None when mixed) is informative: it lets a failed check say when the
        weights differ only by their dtype.
    """
    config = {k: v for k, v in model.config.items() if not k.startswith("freeze")}
    config_text = json.dumps(
        {"model_type": model.model_type, "config": config}, sort_keys=True, default=list
    )
    dtype = _floating_dtype(model)
    return {
        "model_type": model.model_type,
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "weights_sha256": _weights_sha256(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }


def _dtype_only_difference(base: VLSM, expected: dict[str, Any]) -> str | None:
    """The dtype the base matches the expected weights hash in, when it does in another floating
    dtype than its own (None otherwise). Tried: the recorded ``dtype``; for fingerprints written
    before it was recorded, the usual training dtypes."""
    own = _floating_dtype(base)
    recorded = expected.get("dtype")
    names = [recorded] if isinstance(recorded, str) else ["float32", "bfloat16", "float16"]
    for name in names:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == own:
            continue
        if _weights_sha256(base, dtype) == expected.get("weights_sha256"):
            return name
    return None


def _check_fingerprint(base: VLSM, expected: dict[str, Any], source: str) -> None:
    found = base_fingerprint(base)
    keys = ("model_type", "config_sha256", "weights_sha256", "num_parameters")
    wrong = [k for k in keys if found[k] != expected.get(k)]
    if wrong == ["weights_sha256"]:
        trained = _dtype_only_difference(base, expected)
        if trained is not None:
            raise CheckpointError(
                f"the prompt learner in {source} was trained on this base model's weights in "
                f"{trained}, but the base given is {found['dtype'] or 'of mixed dtypes'}: its "
                f"weights cast to {trained} match, so the difference is (or may be only) the dtype. "
                f"Load the base in {trained} (e.g. base.to(torch.{trained})), then cast the tuned "
                f"model: TunedModel.from_pretrained(..., base=base).to(torch.<dtype>)"
            )
    if wrong:
        details = "; ".join(f"{k}: expected {expected.get(k)!r}, found {found[k]!r}" for k in wrong)
        raise CheckpointError(
            f"the prompt learner in {source} was trained on a different base model: "
            f"{', '.join(wrong)} differ ({details}). Load the base it was trained on (config.json "
            "'base' names it) or pass that model as base="
        )


_NO_BASE_SOURCE = (
    "does not record where its base model comes from (the base was built in code, e.g. with "
    "create_model, not loaded with VLSM.from_pretrained)"
)


def _resolve_base(reference: dict[str, Any], source: Any = None, **hub_kwargs: Any) -> VLSM:
    path = reference.get("name_or_path")
    if not path:
        where = "this tuned model" if source is None else f"the tuned model {str(source)!r}"
        raise CheckpointError(
            f"{where} {_NO_BASE_SOURCE}: build that base again and load it with "
            f"vlsegkit.TunedModel.from_pretrained({'path' if source is None else repr(str(source))}"
            ", base=<the base model>) (VLSM.from_pretrained cannot take base=; the base's "
            "fingerprint is checked)"
        )
    try:
        return VLSM.from_pretrained(path, revision=reference.get("revision"), **hub_kwargs)
    except CheckpointError as e:
        raise CheckpointError(
            f"cannot load this tuned model's base {path!r}: {e}. If the base moved or you are "
            "offline, load it yourself and pass base= (its fingerprint is checked)"
        ) from e


class TunedModel(VLSM):
    """A frozen base VLSM driven by hooks, optionally with TuneVLSeg's learnable upsampler.

    ``tuned(pixel_values, prompts)`` runs ``base(pixel_values, prompts, hooks=tuned.hooks)``; with an
    upsampler the logits become ``upsampler(logits, decoder_features)``. The base is frozen in place
    (``requires_grad_(False)``) and kept in eval mode; ``trainable_parameters()`` yields the hooks' and
    upsampler's parameters only, and ``state_dict()`` holds only them.

    Args:
        base: the pretrained model (any :class:`~vlsegkit.models.capabilities.SupportsHooks`, e.g.
            :class:`~vlsegkit.CLIPSeg`, :class:`~vlsegkit.MedCLIPSeg`), or the ``base`` reference of
            a saved ``config.json`` (resolved with ``VLSM.from_pretrained``).
        hooks: one :class:`~vlsegkit.encoders.TowerHook` or a list of them (or their configs); bound
            to the base's hook slots here.
        upsampler: a :class:`~vlsegkit.prompts.LearnableUpsampler`, its config dict, True (default
            arguments, input width ``base.decoder_feature_dim``), a mode (``"residual"``,
            ``"interpolate"``, ``"add"``), ``"auto"`` (True when the base offers decoder features)
            or None / False (none).
        gradient_checkpointing: recompute the frozen towers' block activations in backward instead of
            storing them (sets ``base.gradient_checkpointing``).

    Example:
        >>> base = VLSM.from_pretrained("CIDAS/clipseg-rd64")
        >>> tuned = VPT(depth=6).attach(base)              # == TunedModel(base, VPT(depth=6), ...)
        >>> fit(tuned, loader, lr=1e-3)
        >>> tuned.save_pretrained("vpt-kvasir")            # hook weights + base id / revision
        >>> again = VLSM.from_pretrained("vpt-kvasir")
    """

    model_type = "tuned"

    def __init__(
        self,
        base: VLSM | dict[str, Any],
        hooks: TowerHook | dict[str, Any] | Sequence[TowerHook | dict[str, Any]],
        *,
        upsampler: LearnableUpsampler | dict[str, Any] | bool | str | None = None,
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
        if not isinstance(base, SupportsHooks):
            raise TypeError(
                f"{type(base).__name__} has no hook slots: prompt learners and adapters cannot act "
                "inside it"
            )
        if isinstance(hooks, (TowerHook, dict)) or not isinstance(hooks, (list, tuple)):
            hooks = [hooks]
        built = [hook_from_config(h) if isinstance(h, dict) else h for h in hooks]
        if not built or not all(isinstance(h, TowerHook) for h in built):
            raise TypeError(f"hooks must be TowerHook instances or their configs, got {hooks!r}")
        slots = base.hook_slots()
        for hook in built:
            slots.require(hook)  # a clear error for a tower the base cannot offer hooks
        bound = [h.bind(slots) for h in built]
        # the base's own rules for hooks, as when it is built with them (refused here, at attach
        # time, rather than at the first forward inside fit); frozen: nothing of the base trains
        base.check_hooks(bound, frozen=True)
        base.requires_grad_(False)
        self.base = base
        self.hooks = nn.ModuleList(bound)
        self.upsampler = self._make_upsampler(base, upsampler)
        first = next(base.parameters(), None)
        if first is not None:
            # the hooks and upsampler compute with the base's tensors: the base's device and, when
            # its weights share one floating dtype, that dtype (float32 hooks on a float64 base
            # would mix precisions or fail in a matmul)
            dtype = _floating_dtype(base)
            self.hooks.to(device=first.device, dtype=dtype)
            if self.upsampler is not None:
                self.upsampler.to(device=first.device, dtype=dtype)
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
        from ..uncertainty import SupportsMonteCarlo

        # the tuned model keeps the base's inference API, run with the hooks (without an
        # upsampler: these methods delegate to the base's, which know nothing of one)
        if self.upsampler is None:
            if isinstance(base, SupportsMonteCarlo):
                self.__class__ = _StochasticTunedModel
            elif isinstance(base, SupportsTextFree):
                self.__class__ = _TextFreeTunedModel
            elif isinstance(base, SupportsRetrieval):
                self.__class__ = _RetrievalTunedModel

    @staticmethod
    def _make_upsampler(base: VLSM, upsampler) -> LearnableUpsampler | None:
        if upsampler == "auto":
            upsampler = isinstance(base, SupportsDecoderFeatures)
        if upsampler is None or upsampler is False:
            return None
        if isinstance(upsampler, str):  # a LearnableUpsampler mode
            upsampler = {"mode": upsampler}
        if not isinstance(base, SupportsDecoderFeatures):
            raise TypeError(
                f"{type(base).__name__} cannot return decoder features for a learnable upsampler; "
                "use upsampler=None"
            )
        if isinstance(upsampler, LearnableUpsampler):
            return upsampler
        if upsampler is True or isinstance(upsampler, dict):
            kwargs = {} if upsampler is True else dict(upsampler)
            kwargs.setdefault("in_channels", base.decoder_feature_dim)
            return LearnableUpsampler(**kwargs)
        raise TypeError(
            "upsampler must be a LearnableUpsampler, a dict, a bool, a mode, 'auto' or None, got "
            f"{upsampler!r}"
        )

    @property
    def learner(self) -> TowerHook:
        """The first prompt learner among the hooks (``tuned.learner``)."""
        from ..prompts.base import ContextLearner

        for hook in self.hooks:
            if isinstance(hook, ContextLearner):
                return hook
        raise AttributeError("this tuned model has no prompt learner")

    # ------------------------------------------------------------------ switches
    @property
    def gradient_checkpointing(self) -> bool | str:
        """Whether the base recomputes its frozen blocks in backward (memory for time): True,
        False or ``"auto"`` (above a size, see :func:`~vlsegkit.encoders.run_towers`)."""
        value = getattr(self.base, "gradient_checkpointing", False)
        return value if value == "auto" else bool(value)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool | str) -> None:
        if enabled and not hasattr(self.base, "gradient_checkpointing"):
            raise ValueError(f"{type(self.base).__name__} does not support gradient checkpointing")
        if hasattr(self.base, "gradient_checkpointing"):
            self.base.gradient_checkpointing = enabled if enabled == "auto" else bool(enabled)

    def train(self, mode: bool = True) -> TunedModel:
        """Train mode for the hooks and upsampler; the frozen base always stays in eval mode."""
        super().train(mode)
        self.base.eval()
        return self

    def default_task(self):
        """The base model's task (its paper's loss)."""
        return self.base.default_task()

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
            "hooks": [h.config for h in self.hooks],
            "upsampler": None if self.upsampler is None else self.upsampler.config,
        }

    # ------------------------------------------------------------------ forward
    def tokenize(self, prompts: str | Sequence[str], *, reserve: int = 0) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``(T, L)`` by the base's rule, leaving room for the text
        context tokens of the hooks (the base's own and this model's), as ``forward`` does.

        Raises:
            TypeError: the base takes no token ids (it has no ``tokenize``).
        """
        tokenize = getattr(self.base, "tokenize", None)
        if not callable(tokenize):
            raise TypeError(f"{type(self.base).__name__} takes no pre-tokenised prompts")
        hooks = (*getattr(self.base, "hooks", ()), *self.hooks)
        reserve += sum(h.num_tokens("text") for h in hooks if "text" in h.towers)
        return tokenize(prompts, reserve=reserve)

    def forward(
        self,
        pixel_values: Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        **kwargs: Any,
    ) -> SegmentationOutput:
        """Segment with the hooks: arguments as the base model's ``forward``.

        Returns:
            the base's output type with ``logits (B, C, H, W)`` (after the upsampler, if any).
        """
        if self.upsampler is not None:
            kwargs["output_decoder_features"] = True
        out = self.base(
            pixel_values, prompts, hooks=[*self.hooks, *kwargs.pop("hooks", ())], **kwargs
        )
        if self.upsampler is None:
            return out
        logits = self.upsampler(out.logits, out.decoder_features)
        return dataclasses.replace(out, logits=logits)

    # ------------------------------------------------------------------ Hub I/O
    def save_pretrained(self, save_directory: str | os.PathLike):
        """Write the hooks' (and upsampler's) weights and ``config.json`` with the base reference.

        Warns when the base records no source (built in code, not loaded with
        ``VLSM.from_pretrained``): the folder then loads only with
        ``TunedModel.from_pretrained(folder, base=...)``.
        """
        if not self.base.name_or_path:
            warnings.warn(
                f"the base model {_NO_BASE_SOURCE}: the saved folder will load only with "
                f"vlsegkit.TunedModel.from_pretrained({str(save_directory)!r}, base=<the base "
                "model>). Save the base (base.save_pretrained) and load it with "
                "VLSM.from_pretrained before attaching, to record it",
                stacklevel=2,
            )
        return super().save_pretrained(save_directory)

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
        """Load a tuned model: resolve (or take) the base, check its fingerprint, load the hooks.

        Args:
            id_or_path: folder or Hub repo id written by ``save_pretrained`` / ``push_to_hub``.
            base: the base model to attach to (e.g. offline); its fingerprint must match.
            revision, cache_dir, local_files_only, token: Hub options, for the tuned repository and
                the base (the base uses its own recorded revision).

        Raises:
            CheckpointError: not a tuned-model folder, a different base, or bad hook weights.
        """
        kw = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        config_path = resolve_file(id_or_path, CONFIG_NAME, revision=revision, **kw)
        config = read_json(config_path)
        if not isinstance(config, dict) or config.get("model_type") != cls.model_type:
            found = config.get("model_type") if isinstance(config, dict) else None
            raise CheckpointError(
                f"{config_path} is not a tuned model (model_type={found!r}, expected "
                f"{cls.model_type!r})"
            )
        return cls._from_vlsegkit(
            id_or_path, config, config_path, base=base, revision=revision, **kw
        )

    @classmethod
    def _from_vlsegkit(
        cls, id_or_path, config, config_path, *, base: VLSM | None = None, **hub_kwargs
    ) -> TunedModel:
        reference = config.get("base")
        if not isinstance(reference, dict):
            raise CheckpointError(f"{config_path} has no 'base' reference")
        hooks = config.get("hooks")
        if not isinstance(hooks, list) or not hooks:
            raise CheckpointError(f"{config_path} has no 'hooks' list")
        revision = hub_kwargs.pop("revision", None)
        if base is None:
            base = _resolve_base(reference, id_or_path, **hub_kwargs)
        _check_fingerprint(base, reference.get("fingerprint", {}), str(config_path))
        try:
            model = cls(base, hooks, upsampler=config.get("upsampler"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: cannot rebuild the tuned model: {e}") from e
        weights = resolve_file(id_or_path, SAFETENSORS_NAME, revision=revision, **hub_kwargs)
        # the base came through from_pretrained (one copy); the small hook / upsampler modules are
        # built for real (their construction reads the base) and take the file's tensors
        load_state_dict_strict(
            model, load_checkpoint_file(weights), source=str(weights), assign=True
        )
        return model._mark_source(id_or_path, revision).eval()


class _StochasticTunedModel(TunedModel):
    """A :class:`TunedModel` over a stochastic base (e.g. MedCLIPSeg): Monte Carlo inference with
    the hooks (:class:`~vlsegkit.uncertainty.SupportsMonteCarlo`,
    :class:`~vlsegkit.models.capabilities.SupportsUncertainty`)."""

    def is_sampling(self, sample: bool | None) -> bool:
        return self.base.is_sampling(sample)

    def encode_prefix(self, pixel_values: Tensor, prompts: Any, **kwargs: Any):
        hooks = [*self.hooks, *kwargs.pop("hooks", ())]
        return self.base.encode_prefix(pixel_values, prompts, hooks=hooks, **kwargs)

    def forward_from_prefix(self, prefix: Any, **kwargs: Any):
        return self.base.forward_from_prefix(prefix, **kwargs)

    def predict_with_uncertainty(self, images: Any, prompts: Any, samples: int = 30, **kwargs: Any):
        """Monte Carlo maps of the base run with the hooks; see
        :func:`vlsegkit.uncertainty.monte_carlo_predict`."""
        from ..uncertainty import monte_carlo_predict

        return monte_carlo_predict(self, images, prompts, samples, **kwargs)

    @torch.no_grad()
    def predict(self, images: Any, prompts: Any, *, samples: int = 30, **kwargs: Any):
        """Mean Monte Carlo probability per image at its original size."""
        return self.predict_with_uncertainty(images, prompts, samples, **kwargs).mean


class _TextFreeTunedModel(TunedModel):
    """A :class:`TunedModel` over a text-free base (CoTexNet): ``predict(images)`` and
    ``image_condition`` from the image alone, with the hooks
    (:class:`~vlsegkit.models.capabilities.SupportsTextFree`)."""

    def image_condition(self, pixel_values: Tensor) -> Tensor:
        """The base's text-free conditioning vectors ``(B, E)``, with the hooks."""
        return self.base.image_condition(pixel_values, hooks=list(self.hooks))

    @torch.no_grad()
    def predict(
        self,
        images: Any,
        prompts: Any = None,
        *,
        batch_size: int = 8,
        progress: bool | None = False,
    ) -> Tensor | list[Tensor]:
        """The base's text-free ``predict`` with the hooks (in eval mode): probabilities
        ``(C, H, W)`` at each image's original size, from the images alone (``prompts`` must be
        None)."""
        with eval_mode(self):
            return self.base.predict(
                images, prompts, batch_size=batch_size, progress=progress, hooks=list(self.hooks)
            )


class _RetrievalTunedModel(TunedModel):
    """A :class:`TunedModel` over a dual encoder: the base's embeddings, similarity and zero-shot
    ``predict``, with the hooks (:class:`~vlsegkit.models.capabilities.SupportsRetrieval`)."""

    @property
    def embed_dim(self) -> int:
        """Width ``E`` of the joint embedding space."""
        return self.base.embed_dim

    def encode_image(self, pixel_values: Tensor, *, hooks: Sequence[TowerHook] = ()) -> Tensor:
        """Image embeddings ``(B, E)`` of the base run with the tuned hooks (and ``hooks``)."""
        return self.base.encode_image(pixel_values, hooks=[*self.hooks, *hooks])

    def encode_text(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        hooks: Sequence[TowerHook] = (),
    ) -> Tensor:
        """Text embeddings ``(T, E)`` of T strings or token ids ``(T, L)``, by the base run with
        the tuned hooks (and ``hooks``)."""
        return self.base.encode_text(
            texts,
            input_ids=input_ids,
            attention_mask=attention_mask,
            hooks=[*self.hooks, *hooks],
        )

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """The base's ``(B, T)`` similarity logits."""
        return self.base.similarity(image_embeds, text_embeds)

    @torch.no_grad()
    def predict(self, images: Any, texts: str | Sequence[str], *, batch_size: int = 8) -> Tensor:
        """The base's zero-shot classification with the hooks (in eval mode): the softmax over
        ``texts`` of each image's logits, ``(T,)`` for one image, ``(N, T)`` for N images."""
        with eval_mode(self):
            return self.base.predict(images, texts, batch_size=batch_size, hooks=list(self.hooks))


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
