"""Offline fixtures shared by the vlsegkit test-suite.

These helpers build *genuine* upstream artefacts -- tokenizer files that ``transformers`` loads with its
ordinary ``from_pretrained``, Hub-cache layouts that ``huggingface_hub`` resolves with
``local_files_only=True`` -- without touching the network. They are part of the public package so that
downstream projects can test their own vlsegkit models the same way, but they are meant for tests, not
for training or inference.

Nothing here downloads anything: the CLIP vocabulary is rebuilt from the BPE merges file that
``open_clip`` ships inside its wheel, and the BERT vocabulary is a tiny hand-written WordPiece list.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MEDICAL_WORDS",
    "clip_bpe_merges_path",
    "populate_hub_cache",
    "save_tiny_clip",
    "save_tiny_sam",
    "write_bert_tokenizer_files",
    "write_clip_tokenizer_files",
]

# The OpenAI CLIP tokenizer keeps the first 49152 - 256 - 2 merges of the bundled file (the first line of
# the file is a header), which gives 256 bytes + 256 bytes with </w> + merges + 2 specials = 49408 ids.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_WORD_LIST = """
    a an the of in on at to and or with without is are was were be this that these there which
    for from by as it its into over under near between within along across around image images
    scan photo picture view shows showing contains containing region area part seen visible
    lesion lesions polyp polyps tumor tumors tumour tumours mass masses nodule nodules cyst cysts
    cancer cancerous benign malignant abnormality abnormal normal growth ulcer ulcers bleeding
    tissue skin mole melanoma nevus wound infection infected inflamed inflammation hemorrhage
    calcification fluid air blood instrument surgical tool
    breast lung lungs heart liver kidney kidneys spleen brain colon rectum stomach bowel
    intestine intestinal pancreas prostate bladder gallbladder esophagus duodenum appendix
    thyroid bone bones spine rib ribs chest abdomen pelvis head neck uterus ovary aorta nerve
    eye retina optic disc cup vessel vessels artery vein muscle fat
    cell cells nucleus nuclei gland glands
    left right upper lower top bottom middle center central peripheral anterior posterior
    inferior superior medial lateral side sides both front back corner edge border
    small tiny little medium large big huge sized size wide narrow thin thick
    round oval circular elliptical irregular regular flat raised bumpy smooth rough elongated
    shape shaped shapes
    red pink white black brown gray grey yellow green blue purple dark light bright pale
    colour color colored coloured
    one two three four five six seven eight nine ten single multiple many several few
    first second third
    x ray xray ct mri ultrasound endoscopy colonoscopy dermoscopy microscopy histology
    radiograph radiology mammogram mammography fundus
    myocardium ventricle atrium cavity cardiac pleural effusion pneumothorax edema
    consolidation atelectasis opacity cardiomegaly fracture
    segment segmentation mask boundary outline
"""

#: Default word list of :func:`write_bert_tokenizer_files`: vocabulary of attribute prompts (P1-P9 of
#: the medvlsm paper: class names, colours, shapes, sizes, locations, counts) plus common glue words.
MEDICAL_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_LIST.split()))

# Word pieces that let the tiny vocabulary cover inflections of the words above.
_SUFFIXES = ("s", "es", "ed", "ing", "al", "ly", "er", "est", "ous", "ic", "ity", "tion")


def clip_bpe_merges_path() -> Path:
    """Path of the CLIP BPE merges file bundled in the ``open_clip_torch`` wheel.

    The package is located without importing it (importing ``open_clip`` pulls in torchvision and timm).

    Raises:
        ImportError: ``open_clip_torch`` is not installed.
        FileNotFoundError: the installed wheel does not contain the merges file.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "write_clip_tokenizer_files needs open_clip_torch (pip install open_clip_torch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's bundled BPE merges file is missing: {path}")
    return path


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in vocabulary order.

    Bytes that are already printable Latin-1 characters stand for themselves; the remaining bytes
    (control characters, space, soft hyphen...) are shifted to code points 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def _read_clip_merges() -> list[str]:
    with gzip.open(clip_bpe_merges_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a header; the tokenizer uses a fixed prefix of the merge list
    merges = lines[1 : _CLIP_NUM_MERGES + 1]
    if len(merges) != _CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError("unexpected format of open_clip's bpe_simple_vocab_16e6.txt.gz")
    return merges


def write_clip_tokenizer_files(
    directory: str | os.PathLike,
    *,
    pad_token: str = _CLIP_EOS,
    model_max_length: int = 77,
) -> Path:
    """Write a real CLIP BPE tokenizer (49408 ids) to ``directory``, offline.

    The vocabulary is built the way the OpenAI CLIP tokenizer builds it (Radford et al., 2021,
    "Learning Transferable Visual Models From Natural Language Supervision"; github.com/openai/CLIP):
    the 256 byte-level symbols, the same 256 symbols with the end-of-word marker ``</w>``, the
    concatenation of each of the first 48894 merges of open_clip's bundled merges file, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). The files written are ``vocab.json``,
    ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` -- the layout of the
    ``CIDAS/clipseg-rd64*`` Hub repositories, whose pad token is ``<|endoftext|>``.

    ``transformers.CLIPTokenizer.from_pretrained(directory)`` loads the result and gives the same ids as
    ``open_clip.SimpleTokenizer``.

    Args:
        directory: destination folder (created if needed).
        pad_token: padding token written to the config (CIDAS repos use ``<|endoftext|>``).
        model_max_length: context length written to the config.

    Returns:
        The destination folder as a ``Path``.
    """
    if pad_token not in (_CLIP_BOS, _CLIP_EOS):
        raise ValueError(f"pad_token must be {_CLIP_EOS!r} or {_CLIP_BOS!r}, got {pad_token!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    merges = _read_clip_merges()
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(s + "</w>" for s in alphabet), *(m.replace(" ", "") for m in merges)]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the rebuilt CLIP vocabulary has duplicate entries")

    specials = {
        "bos_token": _CLIP_BOS,
        "eos_token": _CLIP_EOS,
        "unk_token": _CLIP_EOS,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)
    return out


def write_bert_tokenizer_files(
    directory: str | os.PathLike,
    words: Iterable[str] | None = None,
    *,
    model_max_length: int = 256,
) -> Path:
    """Write a tiny uncased WordPiece (BERT) tokenizer to ``directory``, offline.

    The vocabulary follows the layout of BiomedBERT (the text encoder of BiomedCLIP, Zhang et al.,
    2023): ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``, then single characters (letters, digits,
    punctuation) and their ``##`` continuations so that every lowercase ASCII word can be spelled, then a
    few suffix pieces, then ``words``. Loads with ``transformers.BertTokenizer(Fast).from_pretrained``.

    Args:
        directory: destination folder (created if needed).
        words: whole words to add (lowercase, no whitespace). Defaults to :data:`MEDICAL_WORDS`.
        model_max_length: context length written to ``tokenizer_config.json`` (BiomedCLIP uses 256).

    Returns:
        The destination folder as a ``Path``.
    """
    words = MEDICAL_WORDS if words is None else tuple(words)
    for w in words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w) or w != w.lower():
            raise ValueError(f"words must be non-empty lowercase strings without spaces, got {w!r}")
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,;:!?'\"()[]-/%&+*=<>#_"]
    pieces = [
        *_BERT_SPECIALS,
        *chars,
        *("##" + c for c in chars if c.isalnum()),
        *("##" + s for s in _SUFFIXES),
        *words,
    ]
    vocab = list(dict.fromkeys(pieces))  # drop duplicates, keep the first position

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": model_max_length,
        **specials,
    }
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)
    return out


def populate_hub_cache(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike,
    repo_id: str,
    *,
    commit: str = "0123456789abcdef0123456789abcdef01234567",
    revision: str = "main",
) -> Path:
    """Copy the files of ``source`` into a fabricated Hugging Face Hub cache.

    Reproduces the layout ``huggingface_hub`` writes, ``<cache_dir>/models--<org>--<name>/`` with
    ``snapshots/<commit>/<files>`` and ``refs/<revision>`` holding the commit hash, so that
    ``from_pretrained(repo_id, cache_dir=cache_dir, local_files_only=True)`` (or ``HF_HUB_OFFLINE=1``)
    resolves the files exactly as for a repository downloaded earlier.

    Args:
        source: folder whose files (recursively) become the repository content.
        cache_dir: root of the cache (what ``cache_dir=`` / ``HF_HUB_CACHE`` points at).
        repo_id: ``"org/name"`` repository id.
        commit: 40-hex-digit commit hash of the fabricated snapshot.
        revision: branch or tag name that points at ``commit``.

    Returns:
        The snapshot folder.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
    src = Path(source)
    if not src.is_dir():
        raise ValueError(f"source must be an existing folder, got {src}")
    repo_root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_root / "snapshots" / commit
    shutil.copytree(src, snapshot, dirs_exist_ok=True)
    ref = repo_root / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit, encoding="utf-8")
    return snapshot


# --------------------------------------------------------------------------- tiny upstream models
def save_tiny_clip(
    directory: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 3,
    seed: int = 0,
) -> Path:
    """Save a tiny random transformers ``CLIPModel`` with a real CLIP tokenizer, offline.

    The folder has the layout of a Hub CLIP repository (``config.json``, ``model.safetensors``,
    the tokenizer files of :func:`write_clip_tokenizer_files` and a ``preprocessor_config.json``
    with OpenAI's normalisation), so ``CLIPModel.from_pretrained`` and
    ``vlsegkit.tokenizers.load_tokenizer`` read it like ``openai/clip-vit-base-patch16``. The text
    tower has the full 49408-token vocabulary (its end token, 49407, is the pooling position).

    Args:
        directory: destination folder (created if needed).
        image_size, patch_size: vision input side and patch side.
        width: hidden size of both towers (the joint space is ``width`` wide too).
        layers: blocks per tower.
        seed: ``torch.manual_seed`` for the random weights.

    Returns:
        The destination folder as a ``Path``.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(directory)
    torch.manual_seed(seed)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=2)  # fmt: skip
    text = dict(common, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)  # fmt: skip
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))
    model.save_pretrained(out)
    write_clip_tokenizer_files(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)
    return out


def save_tiny_sam(
    directory: str | os.PathLike, *, image_size: int = 64, patch_size: int = 8, seed: int = 0
) -> Path:
    """Save a tiny random transformers ``SamModel`` and its ``SamProcessor``, offline.

    Same layout as ``facebook/sam-vit-base`` (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``): ``SamModel.from_pretrained`` / ``SamProcessor.from_pretrained``
    load it. The processor resizes the longest side to ``image_size`` (SAM's 1024) and pads to a
    square, and the low-resolution masks are ``4 * image_size / patch_size`` wide (SAM's 256).

    Args:
        directory: destination folder (created if needed).
        image_size: SAM's input side.
        patch_size: its patch side.
        seed: ``torch.manual_seed`` for the random weights.

    Returns:
        The destination folder as a ``Path``.
    """
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam import SamImageProcessor

    out = Path(directory)
    torch.manual_seed(seed)
    grid = image_size // patch_size
    vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, window_size=max(1, grid // 2),
                  global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8)  # fmt: skip
    prompt = dict(hidden_size=16, image_size=image_size, patch_size=patch_size,
                  mask_input_channels=4)  # fmt: skip
    decoder = dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                   iou_head_hidden_dim=16)  # fmt: skip
    config = SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )
    SamModel(config).save_pretrained(out)
    low = 4 * grid
    processor = SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": low},
            mask_pad_size={"height": low, "width": low},
        )
    )
    processor.save_pretrained(out)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
