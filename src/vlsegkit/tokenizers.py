"""Prompt tokenizers: from strings to ``input_ids`` + ``attention_mask``, one facade per backend.

The facades wrap the upstream tokenizers -- ``transformers`` CLIP BPE and BERT WordPiece tokenizers, and
the OpenAI BPE bundled with ``open_clip`` -- and add the behaviour the VLSM papers rely on:

* ``[BOS] tokens [EOS]`` (CLIP) or ``[CLS] tokens [SEP]`` (BERT), right-padded to the longest prompt of
  the batch (or to the context length) with the tokenizer's pad id, and a ``(B, L)`` attention mask;
* the empty prompt ``""`` -- the P0 prompt of Poudel et al., "Exploring Transfer Learning in Medical
  Image Segmentation using Vision-Language Models" -- gives ``[BOS, EOS]``;
* ``reserve`` keeps positions free for learnable context tokens (CoOp / MaPLe / VPT text prompts of
  TuneVLSeg), so that prompt + context never exceed the text tower's position table;
* prompts longer than the limit are truncated keeping the end token last (CLIP pools at EOS) and a
  :class:`PromptTruncationWarning` names the prompt and the limit.

For prompts within the limit the ids equal those of ``tokenizer(texts, padding=True)`` in transformers,
and those of ``open_clip.SimpleTokenizer`` up to its zero padding to the full context length.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "BertTokenizer",
    "CLIPBPETokenizer",
    "CLIPTokenizer",
    "PromptTokenizer",
    "PromptTruncationWarning",
    "TextBatch",
    "load_tokenizer",
]

# transformers uses a huge sentinel for "no limit" in model_max_length.
_UNBOUNDED_MAX_LENGTH = 1_000_000
# Keyword arguments of transformers' from_pretrained that also make sense for reading a single file.
_FILE_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than the context length allows and was truncated (end token kept)."""


@dataclass(frozen=True)
class TextBatch:
    """Tokenised prompts, right-padded.

    Attributes:
        input_ids: ``(B, L)`` long token ids; row ``b`` is ``[BOS, t_1, ..., t_n, EOS, PAD, ...]``.
        attention_mask: ``(B, L)`` long, 1 for real tokens (BOS/EOS included), 0 for padding.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "attention_mask"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.ndim != 2:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a (B, L) tensor, got {shape}")
            if value.dtype != torch.long:
                raise ValueError(f"{name} must have dtype torch.long, got {value.dtype}")
        if self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(self.input_ids.shape)}, "
                f"got {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def eos_index(self) -> Tensor:
        """``(B,)`` long: position of the last real token of each row (CLIP EOS / BERT SEP)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (self.attention_mask * positions).argmax(dim=1)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TextBatch:
        """A copy with both tensors on ``device`` (dtype stays ``torch.long``)."""
        return TextBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
        )


class PromptTokenizer:
    """Shared behaviour of the tokenizer facades (use :class:`CLIPTokenizer` or :class:`BertTokenizer`).

    Args:
        tokenizer: the upstream tokenizer object, kept as ``self.tokenizer``.
        encode_batch: maps a list of strings to their ids *without* special tokens.
        bos_token_id: id put first in every row (CLIP ``<|startoftext|>``, BERT ``[CLS]``).
        eos_token_id: id put last in every row (CLIP ``<|endoftext|>``, BERT ``[SEP]``).
        pad_token_id: id of padding positions.
        vocab_size: number of ids, special tokens included (rows of the token embedding table).
        context_length: default maximum row length, special tokens included.
    """

    default_context_length: ClassVar[int] = 77

    def __init__(
        self,
        *,
        tokenizer: Any,
        encode_batch: Callable[[list[str]], list[list[int]]],
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        vocab_size: int,
        context_length: int,
    ) -> None:
        self.tokenizer = tokenizer
        self._encode_batch = encode_batch
        self.bos_token_id = int(bos_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(vocab_size)
        self.context_length = _check_context_length(context_length, reserve=0)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens and without truncation.

        Useful to initialise learnable context vectors from a phrase (CoOp's "a photo of a").
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._encode_batch([text])[0])

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        context_length: int | None = None,
        reserve: int = 0,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> TextBatch:
        """Tokenise prompts into a padded :class:`TextBatch`.

        Args:
            texts: one prompt or a non-empty sequence of prompts; ``""`` gives ``[BOS, EOS]``.
            context_length: maximum row length including BOS/EOS; defaults to ``self.context_length``.
            reserve: positions kept free for learnable context tokens inserted later, so rows hold at
                most ``context_length - reserve`` tokens.
            padding: ``"longest"`` pads to the longest row of the batch; ``"max_length"`` pads every
                row to ``context_length - reserve`` (the fixed-length convention of the released
                medvlsm / MedCLIPSeg code).

        Returns:
            ``TextBatch`` with ``input_ids`` and ``attention_mask`` of shape ``(B, L)``.

        Warns:
            PromptTruncationWarning: for each prompt longer than the limit; the prompt keeps its first
                tokens and the end token stays last.
        """
        prompts = _as_prompt_list(texts)
        limit = _check_context_length(
            self.context_length if context_length is None else context_length, reserve=reserve
        )
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        rows = []
        for prompt, ids in zip(prompts, self._encode_batch(prompts), strict=True):
            row = [self.bos_token_id, *ids, self.eos_token_id]
            if len(row) > limit:
                warnings.warn(
                    _truncation_message(prompt, len(row), limit),
                    PromptTruncationWarning,
                    stacklevel=2,
                )
                row = [*row[: limit - 1], self.eos_token_id]
            rows.append(row)
        width = limit if padding == "max_length" else max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return TextBatch(input_ids=input_ids, attention_mask=attention_mask)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, bos_token_id={self.bos_token_id}, "
            f"eos_token_id={self.eos_token_id}, pad_token_id={self.pad_token_id})"
        )


class CLIPTokenizer(PromptTokenizer):
    """CLIP byte-level BPE prompts: ``[<|startoftext|>] tokens [<|endoftext|>]`` (Radford et al., 2021).

    Wraps either a transformers ``CLIPTokenizer`` / ``CLIPTokenizerFast`` (what the HF CLIPSeg repos
    ship, pad token ``<|endoftext|>``) or open_clip's ``SimpleTokenizer`` (the OpenAI BPE bundled in the
    open_clip wheel, zero padding). Both give the same ids for ordinary prompts; they differ in text
    cleaning of unusual input (open_clip runs ``ftfy`` and HTML unescaping, transformers NFC).

    Args:
        tokenizer: a transformers CLIP tokenizer or an ``open_clip.SimpleTokenizer``.
        context_length: default maximum row length; defaults to the tokenizer's own limit, at most 77.
        pad_token_id: overrides the padding id (transformers: the tokenizer's pad token, else EOS;
            open_clip: 0).

    Example:
        >>> tok = CLIPTokenizer.from_open_clip()
        >>> batch = tok(["", "a small round polyp"], reserve=4)
        >>> batch.input_ids.shape
        torch.Size([2, 6])
    """

    default_context_length: ClassVar[int] = 77

    def __init__(
        self, tokenizer: Any, *, context_length: int | None = None, pad_token_id: int | None = None
    ) -> None:
        if _is_open_clip_bpe(tokenizer):
            pad = 0 if pad_token_id is None else pad_token_id
            super().__init__(
                tokenizer=tokenizer,
                encode_batch=lambda texts: [tokenizer.encode(t) for t in texts],
                bos_token_id=tokenizer.sot_token_id,
                eos_token_id=tokenizer.eot_token_id,
                pad_token_id=pad,
                vocab_size=tokenizer.vocab_size,
                context_length=context_length or tokenizer.context_length or 77,
            )
            return
        hf = _unwrap_hf_tokenizer(tokenizer, "CLIPTokenizer")
        bos, eos = hf.bos_token_id, hf.eos_token_id
        if bos is None or eos is None:
            raise ValueError(
                f"CLIPTokenizer needs a tokenizer with bos/eos tokens (<|startoftext|>, <|endoftext|>); "
                f"{type(hf).__name__} has bos_token_id={bos}, eos_token_id={eos}. "
                "For WordPiece (BERT) tokenizers use vlsegkit.tokenizers.BertTokenizer."
            )
        if pad_token_id is None:
            pad_token_id = eos if hf.pad_token_id is None else hf.pad_token_id
        super().__init__(
            tokenizer=hf,
            encode_batch=_hf_encode_batch(hf),
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad_token_id,
            vocab_size=len(hf),
            context_length=context_length or _default_length(hf, self.default_context_length),
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        *,
        context_length: int | None = None,
        pad_token_id: int | None = None,
        **hub_kwargs: Any,
    ) -> CLIPTokenizer:
        """Load transformers' CLIP tokenizer from a folder or Hub id (e.g. ``CIDAS/clipseg-rd64``).

        Args:
            path_or_repo: local folder or Hub repository id holding ``vocab.json`` + ``merges.txt``
                (or ``tokenizer.json``).
            context_length, pad_token_id: as in the constructor.
            **hub_kwargs: passed to ``transformers`` ``from_pretrained`` (``cache_dir``,
                ``revision``, ``local_files_only``, ``token``, ...).
        """
        import transformers

        hf_cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
        hf = hf_cls.from_pretrained(str(path_or_repo), **hub_kwargs)
        return cls(hf, context_length=context_length, pad_token_id=pad_token_id)

    @classmethod
    def from_open_clip(
        cls, *, context_length: int = 77, pad_token_id: int = 0, bpe_path: str | Path | None = None
    ) -> CLIPTokenizer:
        """The OpenAI CLIP BPE bundled with open_clip (``open_clip.SimpleTokenizer``), offline.

        Args:
            context_length: default maximum row length (77 for every OpenAI / open_clip CLIP).
            pad_token_id: padding id; open_clip and the original CRIS code pad with 0.
            bpe_path: another merges file in the same format; defaults to the bundled one.
        """
        if bpe_path is None:
            # the bundled vocabulary is read on first use: importing open_clip and parsing the
            # merges takes about a second, which a model that is only loaded need not pay
            tokenizer: Any = _BundledBPE(context_length)
        else:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=context_length, bpe_path=str(bpe_path))
        return cls(tokenizer, context_length=context_length, pad_token_id=pad_token_id)


class _BundledBPE:
    """``open_clip.tokenizer.SimpleTokenizer`` over its bundled OpenAI BPE, built on first use.

    The special ids and the vocabulary size are those of the bundled file (256 byte tokens, their
    ``</w>`` forms and 48,894 merges, then ``<start_of_text>`` and ``<end_of_text>``), so a
    :class:`CLIPTokenizer` can be made without reading it; they are checked against the real
    tokenizer when it is built. Everything else is forwarded to the real tokenizer.
    """

    sot_token_id = 49406
    eot_token_id = 49407
    vocab_size = 49408

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._tokenizer: Any = None

    def _load(self) -> Any:
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=self.context_length)
            found = (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size)
            if found != (self.sot_token_id, self.eot_token_id, self.vocab_size):
                raise RuntimeError(
                    f"open_clip's bundled BPE has (sot, eot, vocab_size) = {found}, not "
                    f"{(self.sot_token_id, self.eot_token_id, self.vocab_size)}; pass bpe_path="
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._load().encode(text)

    def bpe(self, token: str) -> str:
        return self._load().bpe(token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set above; dunders (copy, pickle) stay unforwarded
        if name.startswith("__") or "_tokenizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._load(), name)


#: Alias of :class:`CLIPTokenizer`, for code that prefers naming the BPE explicitly.
CLIPBPETokenizer = CLIPTokenizer


class BertTokenizer(PromptTokenizer):
    """BERT WordPiece prompts: ``[CLS] tokens [SEP]`` (Devlin et al., 2019).

    BiomedCLIP's text tower is BiomedBERT with a context length of 256 (Zhang et al., 2023,
    "BiomedCLIP"); its tokenizer pads with ``[PAD]`` (id 0) and pools the ``[CLS]`` token. So
    ``bos_token_id`` is the ``[CLS]`` id and ``eos_token_id`` the ``[SEP]`` id.

    Args:
        tokenizer: a transformers ``BertTokenizer`` / ``BertTokenizerFast``, or an
            ``open_clip.tokenizer.HFTokenizer`` wrapping one (as returned by
            ``open_clip.get_tokenizer`` for BiomedCLIP).
        context_length: default maximum row length; defaults to the open_clip wrapper's context
            length or 256, capped by the tokenizer's ``model_max_length``.
    """

    default_context_length: ClassVar[int] = 256

    def __init__(self, tokenizer: Any, *, context_length: int | None = None) -> None:
        wrapper_length = getattr(tokenizer, "context_length", None)
        hf = _unwrap_hf_tokenizer(tokenizer, "BertTokenizer")
        cls_id, sep_id, pad_id = hf.cls_token_id, hf.sep_token_id, hf.pad_token_id
        if cls_id is None or sep_id is None or pad_id is None:
            raise ValueError(
                f"BertTokenizer needs a tokenizer with [CLS], [SEP] and [PAD] tokens; "
                f"{type(hf).__name__} has cls_token_id={cls_id}, sep_token_id={sep_id}, "
                f"pad_token_id={pad_id}. For CLIP BPE tokenizers use vlsegkit.tokenizers.CLIPTokenizer."
            )
        default = wrapper_length if isinstance(wrapper_length, int) else self.default_context_length
        super().__init__(
            tokenizer=hf,
            encode_batch=_hf_encode_batch(hf),
            bos_token_id=cls_id,
            eos_token_id=sep_id,
            pad_token_id=pad_id,
            vocab_size=len(hf),
            context_length=context_length or _default_length(hf, default),
        )

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, *, context_length: int | None = None, **hub_kwargs: Any
    ) -> BertTokenizer:
        """Load transformers' BERT tokenizer from a folder or Hub id (``vocab.txt``).

        Args:
            path_or_repo: local folder or Hub id, e.g.
                ``"microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"``.
            context_length: as in the constructor.
            **hub_kwargs: passed to ``transformers`` ``from_pretrained``.
        """
        import transformers

        hf_cls = getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer
        hf = hf_cls.from_pretrained(str(path_or_repo), **hub_kwargs)
        return cls(hf, context_length=context_length)


_CLIP_CLASS = re.compile(r"^CLIP(Seg)?Tokenizer(Fast)?$")
_BERT_CLASS = re.compile(r"^(Bert|DistilBert)Tokenizer(Fast)?$")


def load_tokenizer(
    path_or_repo: str | Path, *, context_length: int | None = None, **hub_kwargs: Any
) -> PromptTokenizer:
    """Pick and load the right facade for a tokenizer folder or Hub repository.

    Decision order:

    1. ``tokenizer_config.json``'s ``tokenizer_class``: ``CLIPTokenizer(Fast)`` -> :class:`CLIPTokenizer`,
       ``(Distil)BertTokenizer(Fast)`` -> :class:`BertTokenizer`; any other class is an error.
    2. ``open_clip_config.json`` (open_clip / BiomedCLIP repositories): ``text_cfg.hf_tokenizer_name``
       -> that tokenizer (this folder's own files first, as open_clip does for ``local-dir:``),
       otherwise the bundled OpenAI BPE; ``text_cfg.context_length`` is the default length.
    3. Files: ``vocab.txt`` -> BERT; ``vocab.json`` + ``merges.txt`` with ``<|startoftext|>`` -> CLIP.

    Args:
        path_or_repo: local folder or Hub repository id.
        context_length: default maximum row length of the returned tokenizer.
        **hub_kwargs: ``cache_dir``, ``revision``, ``local_files_only``, ``token``, ... passed to
            ``huggingface_hub`` / ``transformers``.

    Raises:
        ValueError: the tokenizer type cannot be determined or is not supported.
    """
    local = Path(path_or_repo)
    if local.exists() and not local.is_dir():
        raise ValueError(f"path_or_repo must be a folder or a Hub repo id, got the file {local}")
    find = _file_finder(path_or_repo, hub_kwargs)

    open_clip_cfg = find("open_clip_config.json")
    text_cfg = (
        _read_json(open_clip_cfg).get("model_cfg", {}).get("text_cfg", {}) if open_clip_cfg else {}
    )
    if context_length is None and isinstance(text_cfg.get("context_length"), int):
        context_length = text_cfg["context_length"]

    config_path = find("tokenizer_config.json")
    tokenizer_class = _read_json(config_path).get("tokenizer_class") if config_path else None
    if tokenizer_class:
        if _CLIP_CLASS.match(tokenizer_class):
            return CLIPTokenizer.from_pretrained(
                path_or_repo, context_length=context_length, **hub_kwargs
            )
        if _BERT_CLASS.match(tokenizer_class):
            return BertTokenizer.from_pretrained(
                path_or_repo, context_length=context_length, **hub_kwargs
            )
        raise ValueError(
            f"unsupported tokenizer_class {tokenizer_class!r} in {path_or_repo}/tokenizer_config.json; "
            "vlsegkit supports CLIP BPE (CLIPTokenizer) and WordPiece (BertTokenizer) tokenizers"
        )

    if open_clip_cfg is not None:
        hf_name = text_cfg.get("hf_tokenizer_name")
        if not hf_name:
            return CLIPTokenizer.from_open_clip(context_length=context_length or 77)
        if find("vocab.txt") is None and find("vocab.json") is None:
            # a hub:-style open_clip repo: the tokenizer lives in another repository
            other = {k: v for k, v in hub_kwargs.items() if k != "revision"}
            return load_tokenizer(hf_name, context_length=context_length, **other)

    if find("vocab.txt") is not None:
        return BertTokenizer.from_pretrained(
            path_or_repo, context_length=context_length, **hub_kwargs
        )
    vocab_json = find("vocab.json")
    if vocab_json is not None and find("merges.txt") is not None:
        if "<|startoftext|>" in _read_json(vocab_json):
            return CLIPTokenizer.from_pretrained(
                path_or_repo, context_length=context_length, **hub_kwargs
            )
        raise ValueError(
            f"{path_or_repo} holds a byte-level BPE vocabulary without <|startoftext|>: "
            "not a CLIP tokenizer, and vlsegkit supports only CLIP BPE and BERT WordPiece"
        )
    hint = "" if local.is_dir() else " (for a Hub id offline: is the repository in the cache?)"
    raise ValueError(
        f"cannot tell the tokenizer type of {path_or_repo!s}: expected tokenizer_config.json with a "
        "tokenizer_class, open_clip_config.json, vocab.txt (BERT) or vocab.json + merges.txt (CLIP)"
        + hint
    )


# ---------------------------------------------------------------------------------------- helpers
def _as_prompt_list(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    prompts = list(texts)
    if not prompts:
        raise ValueError("texts must contain at least one prompt, got an empty sequence")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(prompt).__name__}")
    return prompts


def _truncation_message(prompt: str, num_tokens: int, limit: int) -> str:
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return (
        f"prompt {shown!r} has {num_tokens} tokens (with start/end tokens) but the limit is {limit}; "
        "it was truncated, keeping the end token last"
    )


def _check_context_length(context_length: Any, *, reserve: Any) -> int:
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise ValueError(f"reserve must be a non-negative int, got {reserve!r}")
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise ValueError(f"context_length must be an int, got {context_length!r}")
    limit = context_length - reserve
    if limit < 2:
        raise ValueError(
            f"context_length - reserve must be >= 2 (room for the start and end tokens), got "
            f"context_length={context_length}, reserve={reserve}"
        )
    return limit


def _is_open_clip_bpe(tokenizer: Any) -> bool:
    return all(hasattr(tokenizer, a) for a in ("sot_token_id", "eot_token_id", "encode", "bpe"))


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    return callable(tokenizer) and all(
        hasattr(tokenizer, a) for a in ("convert_tokens_to_ids", "pad_token_id", "model_max_length")
    )


def _unwrap_hf_tokenizer(tokenizer: Any, facade: str) -> Any:
    if not _is_hf_tokenizer(tokenizer) and _is_hf_tokenizer(getattr(tokenizer, "tokenizer", None)):
        tokenizer = tokenizer.tokenizer  # open_clip's HFTokenizer wrapper
    if not _is_hf_tokenizer(tokenizer):
        raise TypeError(
            f"{facade} expects a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    return tokenizer


def _hf_encode_batch(hf: Any) -> Callable[[list[str]], list[list[int]]]:
    def encode_batch(texts: list[str]) -> list[list[int]]:
        # verbose=False: the facade truncates and warns itself
        out = hf(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return out["input_ids"]

    return encode_batch


def _default_length(hf: Any, default: int) -> int:
    limit = getattr(hf, "model_max_length", None)
    if isinstance(limit, int) and 2 <= limit < _UNBOUNDED_MAX_LENGTH:
        return min(default, limit)
    return default


def _file_finder(
    path_or_repo: str | Path, hub_kwargs: dict[str, Any]
) -> Callable[[str], Path | None]:
    from vlsegkit.hub import resolve_file

    file_kwargs = {k: hub_kwargs[k] for k in _FILE_HUB_KWARGS if k in hub_kwargs}

    def find(filename: str) -> Path | None:
        return resolve_file(path_or_repo, filename, required=False, **file_kwargs)

    return find


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
