"""``VLSM``: the base class of every vlsegkit model, with Hub save / load and preprocessing.

A model's config is the keyword arguments it was built with, recorded once at construction
(``model.config``; no hand-written config property can drift from the constructor) and rebuilt with
``VLSM.from_config``; ``save_pretrained`` writes it as ``config.json`` (with ``model_type`` and
``vlsegkit_format_version``) plus ``model.safetensors``. ``VLSM.from_pretrained`` reads the config,
picks the class registered for its ``model_type`` and loads the weights strictly. Upstream checkpoint
layouts (e.g. a transformers CLIPSeg repository) are recognised and converted on load by the class that
claims them (``_from_foreign``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._config import RecordsConfig
from ..data.images import to_image_tensor
from ..encoders.factory import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..hub import (
    CONFIG_NAME,
    PICKLE_NAMES,
    SAFETENSORS_NAME,
    CheckpointError,
    empty_weights,
    load_checkpoint_file,
    load_state_dict_strict,
    read_json,
    resolve_file,
    save_safetensors,
    write_json,
)
from ..registry import hook_from_config, model_class, model_types, register_model_type
from .outputs import SegmentationOutput

if TYPE_CHECKING:
    from ..encoders.hooks import TowerHook
    from ..tasks import Task

__all__ = ["VLSM", "ImageInput", "SegmentationOutput", "eval_mode", "to_image_tensor"]

FORMAT_VERSION = 1

ImageInput = Any  # PIL.Image.Image | np.ndarray | Tensor


def parse_text_prompts(prompts: Any, batch: int) -> tuple[list[str], Tensor]:
    """Distinct prompt strings and the ``(B, C)`` index of the string each output channel uses.

    The pairing rule of every model's ``forward`` (B images):

    - a string: the same prompt for every image (C = 1);
    - a list of B strings: one prompt per image (C = 1), the transformers convention;
    - a list of T != B strings: every image with every prompt (C = T);
    - a list of B lists of C strings: per-image prompt sets.

    Identical strings are kept once (each distinct prompt is encoded once). An empty string is a
    valid prompt: medvlsm's ``p0`` ablation trains and evaluates with empty prompts.

    Raises:
        ValueError: an empty list, non-strings, or nested lists that do not match the batch.
    """
    kind = _prompt_kind(prompts)
    if kind == "one":
        return [prompts], torch.zeros(batch, 1, dtype=torch.long)
    if kind == "flat":
        flat, index = list(prompts), _pairing(batch, len(prompts))
    else:
        flat = [s for row in _per_image_lists(prompts, batch) for s in row]
        index = torch.arange(len(flat)).view(batch, -1)
    distinct = list(dict.fromkeys(flat))
    where = {text: n for n, text in enumerate(distinct)}
    remap = torch.tensor([where[text] for text in flat], dtype=torch.long)
    return distinct, remap[index]


def check_token_rows(
    input_ids: Any, attention_mask: Any, batch: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Validate pre-tokenised prompts ``(T, L)`` (+ mask) and pair them like ``parse_text_prompts``."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = (
            tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        )
        raise ValueError(f"input_ids must be a (T, L) tensor with T, L >= 1, got {shape}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
    ):
        shape = getattr(attention_mask, "shape", type(attention_mask).__name__)
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} (T, L), "
            f"got {tuple(shape) if isinstance(shape, torch.Size) else shape}"
        )
    return input_ids, attention_mask, _pairing(batch, input_ids.shape[0])


def check_pixels(pixel_values: Any, channels: int = 3) -> Tensor:
    """Validate ``(B, C, H, W)`` floating-point pixels with B >= 1."""
    if not isinstance(pixel_values, Tensor):
        raise ValueError(
            f"pixel_values must be a (B, {channels}, H, W) tensor, got {type(pixel_values).__name__}"
            " (use model.predict for PIL images or numpy arrays)"
        )
    if pixel_values.dim() != 4 or pixel_values.shape[1] != channels or pixel_values.shape[0] == 0:
        raise ValueError(
            f"pixel_values must have shape (B, {channels}, H, W) with B >= 1, got "
            f"{tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be normalised floating-point images, got dtype {pixel_values.dtype}"
            " (use model.preprocess or model.predict for raw images)"
        )
    return pixel_values


def pair_rows(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Expand a ``(B, C)`` pairing to one row per (image, condition) pair.

    Returns:
        ``(rows, images, pair_index)``: the condition row of each pair ``(B*C,)``, the image of
        each pair ``(B*C,)`` and the new ``(B, C)`` index ``arange(B*C)``.
    """
    b, c = index.shape
    rows = index.reshape(-1)
    images = torch.arange(b).repeat_interleave(c)
    return rows, images, torch.arange(b * c).view(b, c)


def _pairing(batch: int, rows: int) -> Tensor:
    """``(B, C)`` index of the condition row each output channel uses.

    One row per image when ``rows == B`` (the transformers convention), else every image with every
    row (C = rows).
    """
    if rows == batch:
        return torch.arange(batch).view(batch, 1)
    return torch.arange(rows).view(1, rows).expand(batch, rows)


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[bool, list[ImageInput]]:
    """``(single, items)``: one image or a list / batch of them."""
    many = isinstance(images, (list, tuple)) or (isinstance(images, Tensor) and images.dim() == 4)
    items = list(images) if many else [images]
    if not items:
        raise ValueError("images must hold at least one image")
    return not many, items


def _per_image_lists(prompts: Sequence[Any], batch: int) -> list[list[str]]:
    """Validate one list of C strings per image (the same C for all) and return them as lists."""
    counts = {len(p) for p in prompts}
    if len(prompts) != batch or len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"nested prompts must be B={batch} lists (one per image) of the same non-zero "
            f"length, got lengths {[len(p) for p in prompts]}"
        )
    if not all(isinstance(s, str) for row in prompts for s in row):
        raise ValueError("prompts must be strings")
    return [list(p) for p in prompts]


def _prompt_kind(prompts: Any) -> str:
    """``"one"`` (a string), ``"flat"`` (strings) or ``"nested"`` (lists of strings)."""
    if isinstance(prompts, str):
        return "one"
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, Tensor)):
        raise ValueError(
            "prompts must be a string, a list of strings or one list of strings per image, got "
            f"{type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError("prompts must not be an empty list")
    if all(isinstance(p, str) for p in prompts):
        return "flat"
    if all(isinstance(p, (list, tuple)) for p in prompts):
        return "nested"
    raise ValueError("prompts must be a string, a list of strings or one list of strings per image")


def prompts_per_image(prompts: Any, num_images: int) -> list[list[str]]:
    """The prompts of every image under ``predict``'s rule (the same for every model).

    Args:
        prompts: one string (every image, C = 1); a list of C strings (every image gets all C,
            whatever C is); or a list with one list of C strings per image (the same C for all).
        num_images: number of images.

    Returns:
        ``num_images`` lists of C strings.

    Raises:
        ValueError: no prompts, non-strings, or nested lists that do not give each image C prompts.
    """
    kind = _prompt_kind(prompts)
    if kind == "one":
        return [[prompts] for _ in range(num_images)]
    if kind == "flat":
        return [list(prompts) for _ in range(num_images)]
    return _per_image_lists(prompts, num_images)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and restore every submodule's train / eval flag afterwards, even
    on errors.

    Each flag is restored as it was, not by ``model.train(mode)``: that would also switch back to
    training the parts a user had put in eval mode on purpose (frozen BatchNorm statistics, a
    tower without dropout), and a model's own ``train`` override may keep parts in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def preprocessing_from_hf(id_or_path: Any, **hub_kwargs: Any) -> dict[str, Any]:
    """``image_size`` / ``image_mean`` / ``image_std`` from the ``preprocessor_config.json`` of a
    transformers folder or Hub repo ({} when it has none); see :func:`_preprocessing_fields`."""
    pre = resolve_file(id_or_path, "preprocessor_config.json", required=False, **hub_kwargs)
    return {} if pre is None else _preprocessing_fields(read_json(pre))


def _preprocessing_fields(pre: Mapping[str, Any]) -> dict[str, Any]:
    """``image_size`` / ``image_mean`` / ``image_std`` of a transformers ``preprocessor_config.json``.

    The size is the center crop's when the processor crops (CLIP: resize the shortest edge, then
    crop), else the resize target (CLIPSeg: ``{"height", "width"}``); fields that are absent are
    left out, so the model's defaults apply. Values are validated later by :func:`preprocessing_args`.
    """
    out: dict[str, Any] = {}
    crop = pre.get("crop_size") if pre.get("do_center_crop", True) else None
    size = crop or pre.get("size")
    if isinstance(size, int):
        out["image_size"] = size
    elif isinstance(size, Mapping) and "height" in size and "width" in size:
        out["image_size"] = (size["height"], size["width"])
    elif isinstance(size, Mapping) and "shortest_edge" in size:
        out["image_size"] = size["shortest_edge"]
    for key in ("image_mean", "image_std"):
        if pre.get(key):
            out[key] = tuple(pre[key])
    return out


def preprocessing_args(
    image_size: Any, image_mean: Any, image_std: Any
) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """Validated ``(image_size (H, W), mean, std)`` of a model's ``predict`` preprocessing.

    Raises:
        ValueError: a size that is not one or two positive ints; a mean / std that is not three
            finite numbers, or a std that is not positive.
    """
    import math

    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"image_size must be a positive int or (H, W) of them, got {image_size!r}")
    stats = {}
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        ok = isinstance(values, Sequence) and len(values) == 3
        ok = ok and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        if not ok or (name == "image_std" and min(values) <= 0):
            need = (
                "three positive finite numbers" if name == "image_std" else "three finite numbers"
            )
            raise ValueError(f"{name} must be {need}, got {values!r}")
        stats[name] = tuple(float(v) for v in values)
    return (int(size[0]), int(size[1])), stats["image_mean"], stats["image_std"]


class LazyTokenizer:
    """Mixin for models whose prompt tokenizer is resolved on first use.

    From ``tokenizer_name`` (a folder / Hub id, :func:`vlsegkit.tokenizers.load_tokenizer`), else from
    the tower factory's ``_make_tokenizer`` (CLIP BPE towers). A BERT text tower has no built-in
    vocabulary: without a name, using the tokenizer raises a ``ValueError`` that says what to pass.
    The host sets ``_make_tokenizer`` and ``text_tower``, and calls :meth:`_init_tokenizer`.
    """

    #: A Hub id suggested in the error for a BERT tower without tokenizer files.
    _tokenizer_hint: ClassVar[str] = ""
    _make_tokenizer: Any

    def _init_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ValueError(
                "tokenizer must be a folder / Hub id string or None (assign a tokenizer object to "
                "model.tokenizer instead)"
            )
        self.tokenizer_name: str | None = tokenizer
        self._tokenizer: Any = None

    def _tokenizer_length(self) -> int | None:
        """Token rows' length for a tokenizer built here (None: the text tower's maximum)."""
        return getattr(self, "context_length", None)

    @property
    def tokenizer(self) -> Any:
        """The prompt tokenizer, resolved on first use from ``tokenizer`` (folder / Hub id)."""
        if self._tokenizer is None:
            from ..tokenizers import load_tokenizer

            n = self._tokenizer_length()
            if self.tokenizer_name is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_name, context_length=n)
            elif self._make_tokenizer is None:
                raise ValueError(
                    f"this {type(self).__name__} has a BERT text tower but no tokenizer: build it "
                    f"with tokenizer=<folder or Hub id, e.g. {self._tokenizer_hint!r}>, assign "
                    "model.tokenizer, or pass input_ids / attention_mask instead of text"
                )
            else:
                self._tokenizer = self._make_tokenizer(n or self.text_tower.max_positions)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def _maybe_tokenizer(self, errors: tuple[type[Exception], ...] = (ValueError,)) -> Any:
        """The tokenizer, or None when it cannot be resolved (hooks then bind without one)."""
        try:
            return self.tokenizer
        except errors:
            return None


class VLSM(RecordsConfig, nn.Module):
    """Base class of vision-language segmentation models.

    Subclasses set ``model_type`` and implement ``forward``; their constructor arguments are recorded
    as ``config`` automatically. They inherit Hub I/O, ``predict``, the frozen / trainable split and
    ``default_task``, and may override ``_from_foreign`` to accept upstream checkpoint layouts.
    Models built from towers also define ``hook_slots()`` and take ``hooks=`` (see
    :class:`~vlsegkit.models.capabilities.SupportsHooks`).

    Class attributes:
        model_type: registry key written to ``config.json``.
        image_size: ``(H, W)`` the model resizes inputs to in ``predict``.
        image_mean, image_std: normalisation applied in ``predict`` / ``preprocess``.
    """

    model_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("model_type"):
            register_model_type(cls.model_type, cls)

    # -------------------------------------------------------------- configuration
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (``type(model)(**model.config)`` rebuilds it)."""
        return self.config_args

    @classmethod
    def _config_class(cls, model_type: Any, where: str) -> type[VLSM]:
        """The class a config's ``model_type`` names, which must be ``cls`` or a subclass."""
        if not isinstance(model_type, str) or not model_type:
            raise CheckpointError(
                f"{where}: 'model_type' must name the model class (e.g. 'clipseg'; see "
                f"vlsegkit.registry.model_types()), got {model_type!r}"
            )
        try:
            target = model_class(model_type)
        except KeyError as e:
            raise CheckpointError(f"{where}: {e.args[0]}") from None
        if cls is not VLSM and not issubclass(target, cls):
            raise CheckpointError(
                f"{where} is for {target.__name__} (model_type {model_type!r}), not "
                f"{cls.__name__}; load it with vlsegkit.VLSM.from_pretrained"
            )
        return target

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VLSM:
        """Build a model (random weights) from ``config``, dispatching on ``model_type``."""
        if not isinstance(config, dict):
            raise CheckpointError(
                f"a model config must be a JSON object, got {type(config).__name__}"
            )
        config = dict(config)
        model_type = config.pop("model_type", cls.model_type)
        config.pop("vlsegkit_format_version", None)
        target = cls._config_class(model_type, "config.json")
        from .._config import check_config_types

        try:
            check_config_types(target, config, where="config.json")
            return target(**config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json does not fit {target.__name__}: {e}") from e

    # -------------------------------------------------------------- hooks
    def _bind_hooks(self, hooks: Sequence[TowerHook | dict] | None) -> nn.ModuleList:
        """Rebuild (from configs) and bind the model-owned hooks to this model's slots."""
        from ..encoders.hooks import TowerHook

        bound = []
        for hook in hooks or ():
            if isinstance(hook, dict):
                hook = hook_from_config(hook)
            if not isinstance(hook, TowerHook):
                raise TypeError(f"hooks must be TowerHook instances or configs, got {hook!r}")
            slots = self.hook_slots()
            slots.require(hook)  # a clear error for a tower the model cannot offer hooks
            bound.append(hook.bind(slots))
        self.check_hooks(bound)
        return nn.ModuleList(bound)

    def check_hooks(self, hooks: Sequence[TowerHook], *, frozen: bool = False) -> None:
        """Refuse bound hooks this model cannot run, or would run without any effect.

        Called for the hooks a model owns (at construction, ``frozen=False``) and for the hooks a
        :class:`~vlsegkit.TunedModel` attaches to it (``frozen=True``), so both paths refuse the
        same hooks with the same message before any training. The default accepts every hook.

        Args:
            hooks: hooks already bound to this model's slots.
            frozen: the hooks drive this model frozen (nothing of the model trains with them).

        Raises:
            ValueError: naming the hook, why it does not fit and what to use instead.
        """

    def _run_hooks(self, extra: Sequence[TowerHook]) -> tuple[TowerHook, ...]:
        """The model's own hooks followed by the ones given to this call."""
        from ..encoders.hooks import TowerHook

        for hook in extra:
            if not isinstance(hook, TowerHook):
                raise TypeError(f"hooks must be TowerHook instances, got {type(hook).__name__}")
        return (*getattr(self, "hooks", ()), *extra)

    # -------------------------------------------------------------- parameters
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with ``requires_grad`` (what an optimizer should receive)."""
        return (p for p in self.parameters() if p.requires_grad)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)

    def freeze_backbone(self, frozen: bool = True) -> VLSM:
        """Freeze (or unfreeze) the pretrained towers; everything else keeps its state."""
        for name in ("vision_tower", "text_tower"):
            tower = getattr(self, name, None)
            if tower is not None:
                tower.requires_grad_(not frozen)
        if "freeze_backbone" in self.__dict__.get("_config_args", {}):
            self._set_config_arg(freeze_backbone=frozen)
        return self

    # -------------------------------------------------------------- training
    def default_task(self) -> Task:
        """The task of this model's paper (what ``fit(model, loader)`` optimises).

        Default: :class:`~vlsegkit.tasks.SegmentationTask` with ``0.5 Dice + 0.5 BCE``.
        """
        from ..losses import DiceBCELoss
        from ..tasks import SegmentationTask

        return SegmentationTask(loss=DiceBCELoss())

    # -------------------------------------------------------------- preprocessing
    image_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → normalised with the model's mean / std."""
        mean = images.new_tensor(self.image_mean)[:, None, None]
        std = images.new_tensor(self.image_std)[:, None, None]
        return (images - mean) / std

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> tuple[Tensor, list]:
        """Resize + normalise images for ``forward``.

        Returns:
            ``pixel_values (B, 3, *image_size)`` and the list of original ``(H, W)`` sizes.
        """
        _, items = _as_image_list(images)
        tensors = [to_image_tensor(im) for im in items]
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        device = self._device()
        batch = torch.stack(
            [
                F.interpolate(
                    t[None].to(device),
                    size=self.image_size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
                for t in tensors
            ]
        )
        return self.normalize(batch), sizes

    def image_chunks(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int,
        *,
        progress: bool | None = False,
    ) -> Iterator[tuple[int, Tensor, list[tuple[int, int]]]]:
        """``(start, pixel_values, original sizes)`` for consecutive chunks of ``batch_size`` images.

        Args:
            progress: a tqdm bar over the images; None shows it only when stderr is a terminal.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        _, items = _as_image_list(images)
        from tqdm.auto import tqdm

        disable = None if progress is None else not progress
        with tqdm(total=len(items), unit="image", disable=disable, leave=False) as bar:
            for start in range(0, len(items), batch_size):
                pixels, sizes = self.preprocess(items[start : start + batch_size])
                yield start, pixels, sizes
                bar.update(len(sizes))

    def _predict_probs(self, pixel_values: Tensor, prompts: list[list[str]]) -> Tensor:
        """``(B, C, H, W)`` probabilities at the model's resolution for per-image prompt lists."""
        return self(pixel_values, prompts).logits.sigmoid()

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        batch_size: int = 8,
        progress: bool | None = False,
    ) -> Tensor | list[Tensor]:
        """Probabilities for every prompt, at each image's original size.

        Args:
            images: one image or a list (PIL, numpy ``(H, W[, 3])``, tensors ``(3, H, W)``), any size;
                resized to ``image_size`` and normalised.
            prompts: one prompt, or a list of C prompts applied to **every** image, or one list of C
                prompts per image (:func:`prompts_per_image`; the same rule for every model).
            batch_size: images per forward pass.
            progress: a progress bar over the images (None: only when stderr is a terminal).

        Returns:
            ``(C, H, W)`` probabilities for a single image, or a list of them for a list of images.
            The model's train / eval mode is restored afterwards, also after an error.
        """
        single, items = _as_image_list(images)
        per_image = prompts_per_image(prompts, len(items))
        out: list[Tensor] = []
        with eval_mode(self):
            for start, pixels, sizes in self.image_chunks(items, batch_size, progress=progress):
                probs = self._predict_probs(pixels, per_image[start : start + len(sizes)])
                for p, size in zip(probs, sizes):
                    up = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)
                    out.append(up[0].cpu())
        return out[0] if single else out

    # -------------------------------------------------------------- Hub I/O
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) to ``save_directory``."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory {directory} exists and is not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), directory / SAFETENSORS_NAME)
        write_json(directory / CONFIG_NAME, self.hub_config())
        return directory

    def hub_config(self) -> dict[str, Any]:
        """What ``config.json`` holds: the config plus ``model_type`` and the format version."""
        return {
            **self.config,
            "model_type": self.model_type,
            "vlsegkit_format_version": FORMAT_VERSION,
        }

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload vlsegkit model",
        revision: str | None = None,
    ) -> str:
        """Save to a temporary folder and upload it to the Hub repository ``repo_id``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )
        return str(info)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> VLSM:
        """Load a model from a Hub repo id or a local folder, returning the right class.

        vlsegkit folders (``config.json`` with ``vlsegkit_format_version``) load directly; upstream
        layouts (e.g. transformers CLIPSeg) are converted by the class that recognises them. Loading is
        strict: missing or unexpected keys, wrong shapes and corrupt files raise ``CheckpointError``.
        The model is returned in eval mode.
        """
        kw = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        config_path = resolve_file(id_or_path, CONFIG_NAME, **kw)
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} does not hold a JSON object")
        if "vlsegkit_format_version" in config:
            version = config["vlsegkit_format_version"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise CheckpointError(
                    f"{config_path}: vlsegkit_format_version must be a positive int, got "
                    f"{version!r}"
                )
            if version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{config_path}: vlsegkit_format_version {version!r} is newer than this "
                    f"vlsegkit understands ({FORMAT_VERSION}); upgrade vlsegkit"
                )
            target = cls._config_class(config.get("model_type", cls.model_type), str(config_path))
            return target._from_vlsegkit(id_or_path, config, config_path, **kw)
        for klass in model_types().values():
            if (cls is VLSM or issubclass(klass, cls)) and klass._claims_foreign(config):
                model = klass._from_foreign(id_or_path, config, **kw)
                return model._mark_source(id_or_path, revision).eval()
        raise CheckpointError(
            f"{config_path} is neither a vlsegkit config (no 'vlsegkit_format_version') nor an "
            f"upstream layout vlsegkit can convert (model_type={config.get('model_type')!r})"
        )

    @classmethod
    def _from_vlsegkit(cls, id_or_path, config: dict[str, Any], config_path, **hub_kwargs) -> VLSM:
        """Build from a vlsegkit ``config.json`` and load ``model.safetensors`` strictly.

        One copy of the weights: the model is built without them (``empty_weights``) while the
        memory-mapped file is checked for NaN / inf in the background, then takes the file's tensors
        (``assign=True``).
        """
        weights = resolve_file(id_or_path, SAFETENSORS_NAME, **hub_kwargs)
        state = load_checkpoint_file(weights, check_in_background=True)
        with empty_weights():
            model = cls.from_config(config)
        load_state_dict_strict(model, state, source=str(weights), assign=True)
        return model._mark_source(id_or_path, hub_kwargs.get("revision")).eval()

    #: Where ``from_pretrained`` loaded the weights from (Hub id or folder) and the revision asked
    #: for; None for models built from a config. Tuned models record these to find their base.
    name_or_path: str | None = None
    revision: str | None = None

    def _mark_source(self, id_or_path, revision: str | None) -> VLSM:
        local = Path(id_or_path)
        # a folder is recorded absolute, so a tuned model finds its base from any working directory
        self.name_or_path = str(local.resolve()) if local.is_dir() else str(id_or_path)
        self.revision = revision
        return self

    @classmethod
    def _claims_foreign(cls, config: dict[str, Any]) -> bool:
        return False

    @classmethod
    def _from_foreign(cls, id_or_path, config: dict[str, Any], **hub_kwargs) -> VLSM:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _load_weights_file(id_or_path, **hub_kwargs) -> tuple[dict[str, Tensor], str]:
        """State dict from ``model.safetensors``, else ``pytorch_model.bin`` (weights_only),
        memory-mapped, with its NaN / inf check started in the background."""
        for name in (SAFETENSORS_NAME, *PICKLE_NAMES):
            path = resolve_file(id_or_path, name, required=False, **hub_kwargs)
            if path is not None:
                return load_checkpoint_file(path, check_in_background=True), str(path)
        raise CheckpointError(
            f"no weights found in {id_or_path}: expected {SAFETENSORS_NAME} or {PICKLE_NAMES[0]}"
        )
