"""Prompt tokenizer facades and the offline tokenizer fixtures of ``vlsegkit.testing``.

Every id is checked against the upstream tokenizers: transformers' CLIP / BERT tokenizers loaded with
``from_pretrained`` and open_clip's ``SimpleTokenizer`` / ``HFTokenizer``.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

from vlsegkit.testing import (  # noqa: E402
    MEDICAL_WORDS,
    populate_hub_cache,
    write_bert_tokenizer_files,
    write_clip_tokenizer_files,
)
from vlsegkit.tokenizers import (  # noqa: E402
    BertTokenizer,
    CLIPTokenizer,
    PromptTruncationWarning,
    TextBatch,
    load_tokenizer,
)

SENTENCES = [
    "a photo of a polyp",
    "",
    "A small, round, PINK polyp located in the upper-left of the image.",
    "two   irregular\tlesions\nat the bottom",
    "it's a benign tumour; we're 99% sure (size 3.5 cm)",
    "café naïve résumé",
    "myocardium, left ventricle cavity and left atrium cavity in an ultrasound scan",
]
LONG = " ".join(["lesion"] * 120)
COMMIT = "a" * 40


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_bert_tokenizer_files(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def hf_clip(clip_dir):
    return transformers.CLIPTokenizer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def hf_bert(bert_dir):
    return transformers.BertTokenizer.from_pretrained(bert_dir)


@pytest.fixture(scope="module")
def simple():
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def clip(hf_clip):
    return CLIPTokenizer(hf_clip)


@pytest.fixture(scope="module")
def oc_clip():
    return CLIPTokenizer.from_open_clip()


@pytest.fixture(scope="module")
def bert(hf_bert):
    return BertTokenizer(hf_bert)


def _rows(batch: TextBatch) -> list[list[int]]:
    """Unpadded rows of a batch."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)]


# ------------------------------------------------------------------------- testing.py: fixture files
def test_clip_files_rebuild_open_clip_vocabulary(clip_dir, simple):
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    # open_clip names its specials <start_of_text>/<end_of_text>; transformers uses <|...|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {renamed.get(tok, tok): i for tok, i in simple.encoder.items()}
    assert vocab == expected
    merges = (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert [tuple(m.split()) for m in merges[1:]] == sorted(
        simple.bpe_ranks, key=simple.bpe_ranks.get
    )
    config = json.loads((clip_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert config["pad_token"] == "<|endoftext|>"


def test_clip_files_load_in_transformers_with_open_clip_ids(hf_clip, simple):
    assert len(hf_clip) == 49408
    assert (hf_clip.bos_token_id, hf_clip.eos_token_id, hf_clip.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    assert hf_clip.model_max_length == 77
    for text in [*SENTENCES, "Skin lesion 🙂 with 中文 and numbers 12345"]:
        expected = [simple.sot_token_id, *simple.encode(text), simple.eot_token_id]
        assert hf_clip(text)["input_ids"] == expected, text


def test_bert_files_load_with_biomedbert_layout(bert_dir, hf_bert):
    fast = transformers.BertTokenizerFast.from_pretrained(bert_dir)
    assert fast("a small polyp")["input_ids"] == hf_bert("a small polyp")["input_ids"]
    assert [hf_bert.pad_token_id, hf_bert.unk_token_id, hf_bert.cls_token_id] == [0, 1, 2]
    assert [hf_bert.sep_token_id, hf_bert.mask_token_id] == [3, 4]
    assert hf_bert.model_max_length == 256
    vocab = hf_bert.get_vocab()
    for word in MEDICAL_WORDS:
        assert hf_bert.tokenize(word) == [word]
        assert word in vocab
    # words outside the list are spelled with ## pieces, never [UNK]
    pieces = hf_bert.tokenize("Xyzzy tumors")
    assert pieces == ["x", "##y", "##z", "##z", "##y", "tumors"]
    assert hf_bert.unk_token_id not in hf_bert("qwerty polyps!")["input_ids"]


def test_bert_files_custom_words_and_bad_words(tmp_path):
    directory = write_bert_tokenizer_files(tmp_path / "b", words=["adenoma", "hyperplastic"])
    hf = transformers.BertTokenizer.from_pretrained(directory)
    assert hf.tokenize("Hyperplastic adenoma") == ["hyperplastic", "adenoma"]
    assert hf.tokenize("polyp") != ["polyp"]
    for bad in (["Upper"], ["two words"], [""]):
        with pytest.raises(ValueError, match="words must be"):
            write_bert_tokenizer_files(tmp_path / "bad", words=bad)


def test_populate_hub_cache_validates_arguments(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="repo_id"):
        populate_hub_cache(clip_dir, tmp_path, "no-slash")
    with pytest.raises(ValueError, match="commit"):
        populate_hub_cache(clip_dir, tmp_path, "org/tok", commit="abc")
    with pytest.raises(ValueError, match="source"):
        populate_hub_cache(tmp_path / "missing", tmp_path, "org/tok")


# ------------------------------------------------------------------------ parity with the upstream
def test_clip_facade_equals_transformers_padding(clip, hf_clip):
    batch = clip(SENTENCES)
    ref = hf_clip(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long


def test_open_clip_facade_equals_simple_tokenizer(oc_clip, simple):
    batch = oc_clip(SENTENCES)
    ref = simple(SENTENCES)  # (B, 77), zero padded
    width = batch.input_ids.shape[1]
    assert torch.equal(batch.input_ids, ref[:, :width])
    assert not ref[:, width:].any()
    lengths = torch.tensor([len(simple.encode(t)) + 2 for t in SENTENCES])
    assert torch.equal(batch.attention_mask.sum(1), lengths)
    assert (oc_clip.vocab_size, oc_clip.context_length, oc_clip.pad_token_id) == (49408, 77, 0)


def test_simple_tokenizer_passed_directly(simple, oc_clip):
    tok = CLIPTokenizer(open_clip_tokenizer.SimpleTokenizer(context_length=16))
    assert (tok.pad_token_id, tok.context_length, tok.vocab_size) == (0, 16, 49408)
    assert torch.equal(tok(SENTENCES[:2]).input_ids, oc_clip(SENTENCES[:2]).input_ids)
    assert CLIPTokenizer(simple, pad_token_id=49407)([""]).input_ids.tolist() == [[49406, 49407]]
    padded = CLIPTokenizer(simple, pad_token_id=49407)(["", "a"]).input_ids
    assert padded[0].tolist() == [49406, 49407, 49407]


def test_hf_and_open_clip_facades_agree(clip, oc_clip):
    a, b = clip(SENTENCES), oc_clip(SENTENCES)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert _rows(a) == _rows(b)
    # only the padding convention differs: <|endoftext|> (CIDAS) vs 0 (open_clip / CRIS)
    assert (a.input_ids[a.attention_mask == 0] == 49407).all()
    assert (b.input_ids[b.attention_mask == 0] == 0).all()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.text(alphabet="abcdefgXYZ xyz019.,;!?'-()", max_size=40), min_size=1, max_size=4)
)
def test_clip_facades_match_upstream_on_random_text(clip, oc_clip, hf_clip, texts):
    batch = clip(texts)
    ref = hf_clip(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert _rows(oc_clip(texts)) == _rows(batch)


def test_bert_facade_equals_transformers_padding(bert, hf_bert):
    batch = bert(SENTENCES)
    ref = hf_bert(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert (bert.bos_token_id, bert.eos_token_id, bert.pad_token_id) == (2, 3, 0)
    assert bert.context_length == 256 and bert.vocab_size == len(hf_bert)


def test_bert_facade_equals_open_clip_hf_tokenizer(bert_dir):
    """BiomedCLIP's path: open_clip.HFTokenizer pads every row to its context length."""
    wrapper = open_clip_tokenizer.HFTokenizer(str(bert_dir), context_length=40)
    facade = BertTokenizer(wrapper)
    assert facade.context_length == 40
    batch = facade(SENTENCES, padding="max_length")
    assert torch.equal(batch.input_ids, wrapper(SENTENCES))
    with pytest.warns(PromptTruncationWarning):
        truncated = facade([LONG, ""], padding="max_length")
    assert torch.equal(truncated.input_ids, wrapper([LONG, ""]))
    # open_clip's text tower rebuilds the mask as ids != pad
    assert torch.equal(batch.attention_mask, (batch.input_ids != 0).long())


def test_encode_has_no_special_tokens(clip, bert, hf_clip, hf_bert):
    text = "a photo of a small polyp"
    assert clip.encode(text) == hf_clip(text, add_special_tokens=False)["input_ids"]
    assert bert.encode(text) == hf_bert(text, add_special_tokens=False)["input_ids"]
    assert clip.encode("") == []
    with pytest.raises(TypeError, match="text must be a str"):
        clip.encode(["a"])


# ----------------------------------------------------------------------------- prompts and padding
@pytest.mark.parametrize("name", ["clip", "oc_clip", "bert"])
def test_empty_prompt_is_bos_eos(name, request):
    tok = request.getfixturevalue(name)
    single = tok("")
    assert single.input_ids.tolist() == [[tok.bos_token_id, tok.eos_token_id]]
    assert single.attention_mask.tolist() == [[1, 1]]
    batch = tok(["", "a small round polyp", "   "])
    assert batch.input_ids[0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert batch.attention_mask[0].tolist() == [1, 1] + [0] * (batch.input_ids.shape[1] - 2)
    assert _rows(batch)[2] == [tok.bos_token_id, tok.eos_token_id]


@pytest.mark.parametrize("name", ["clip", "oc_clip", "bert"])
def test_batch_padding_masks_and_eos_index(name, request):
    tok = request.getfixturevalue(name)
    batch = tok(SENTENCES)
    lengths = [len(tok.encode(t)) + 2 for t in SENTENCES]
    assert len(batch) == len(SENTENCES)
    assert batch.input_ids.shape == (len(SENTENCES), max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all()
    assert batch.eos_index.tolist() == [n - 1 for n in lengths]
    eos = batch.input_ids.gather(1, batch.eos_index[:, None]).squeeze(1)
    assert (eos == tok.eos_token_id).all()
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()
    # a row does not depend on the other prompts of the batch, and tokenising is deterministic
    for i, text in enumerate(SENTENCES):
        alone = tok(text)
        assert _rows(alone)[0] == _rows(batch)[i]
    assert torch.equal(tok(SENTENCES).input_ids, batch.input_ids)


def test_max_length_padding(clip, bert):
    batch = clip(["", "a polyp"], context_length=12, reserve=2, padding="max_length")
    assert batch.input_ids.shape == (2, 10)
    assert batch.attention_mask.sum(1).tolist() == [2, len(clip.encode("a polyp")) + 2]
    assert bert(["a polyp"], padding="max_length").input_ids.shape == (1, 256)


def test_text_batch_to_device_and_validation():
    batch = TextBatch(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 0]]))
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert moved.input_ids.dtype == torch.long
    assert batch.to("cpu").input_ids.tolist() == [[5, 6, 7]]
    with pytest.raises(
        ValueError, match=r"attention_mask must have the shape of input_ids \(1, 3\)"
    ):
        TextBatch(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) tensor"):
        TextBatch(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must have dtype torch\.long"):
        TextBatch(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------- truncation, reserve
def test_truncation_keeps_eos_and_matches_upstream(clip, hf_clip, bert, hf_bert, oc_clip, simple):
    for tok, hf in ((clip, hf_clip), (bert, hf_bert)):
        with pytest.warns(PromptTruncationWarning, match=r"limit is 8"):
            batch = tok([LONG, "a polyp"], context_length=8)
        ref = hf(
            [LONG, "a polyp"], truncation=True, max_length=8, padding=True, return_tensors="pt"
        )
        assert torch.equal(batch.input_ids, ref["input_ids"])
        assert torch.equal(batch.attention_mask, ref["attention_mask"])
        assert batch.input_ids[0, -1].item() == tok.eos_token_id
    with pytest.warns(PromptTruncationWarning):
        batch = oc_clip(LONG, context_length=8)
    assert torch.equal(batch.input_ids, simple(LONG, context_length=8))


def test_truncation_default_context_and_warning_text(clip):
    with pytest.warns(PromptTruncationWarning) as record:
        batch = clip([LONG, "short prompt", LONG + " tail"])
    assert len(record) == 2  # one warning per truncated prompt, none for the short one
    message = str(record[0].message)
    assert "'lesion lesion" in message and "..." in message and "limit is 77" in message
    assert f"{len(clip.encode(LONG)) + 2} tokens" in message
    assert batch.input_ids.shape == (3, 77)
    assert batch.input_ids[0].tolist() == [49406, *clip.encode(LONG)[:75], 49407]
    assert record[0].filename == __file__  # points at the caller


def test_truncation_boundary(clip):
    text = " ".join(["the"] * 6)
    assert len(clip.encode(text)) == 6  # 8 tokens with BOS/EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = clip(text, context_length=8)
    assert batch.input_ids.shape == (1, 8)
    with pytest.warns(PromptTruncationWarning, match="has 9 tokens"):
        batch = clip(text + " the", context_length=8)
    assert batch.input_ids.tolist() == [[49406, *clip.encode(text)[:6], 49407]]


def test_reserve_keeps_room_for_context_tokens(clip, bert):
    for tok in (clip, bert):
        with pytest.warns(PromptTruncationWarning, match="limit is 6"):
            reserved = tok(LONG, context_length=10, reserve=4)
        with pytest.warns(PromptTruncationWarning):
            plain = tok(LONG, context_length=6)
        assert torch.equal(reserved.input_ids, plain.input_ids)
        assert reserved.input_ids[0, -1].item() == tok.eos_token_id
    # default context length with CoOp's 4 context tokens: 77 - 4 = 73 text positions
    with pytest.warns(PromptTruncationWarning, match="limit is 73"):
        assert clip(LONG, reserve=4).input_ids.shape == (1, 73)
    # reserve does not change short prompts
    assert torch.equal(clip("a polyp", reserve=4).input_ids, clip("a polyp").input_ids)


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("texts", "error", "match"),
    [
        (123, TypeError, "texts must be a str or a sequence of str, got int"),
        (b"polyp", TypeError, "texts must be a str or a sequence of str, got bytes"),
        (["a polyp", 3], TypeError, r"texts\[1\] must be a str, got int"),
        ([], ValueError, "at least one prompt"),
        ((), ValueError, "at least one prompt"),
    ],
)
def test_bad_texts(clip, bert, texts, error, match):
    for tok in (clip, bert):
        with pytest.raises(error, match=match):
            tok(texts)


def test_bad_lengths_and_padding(clip):
    with pytest.raises(ValueError, match=r"context_length - reserve must be >= 2"):
        clip("a", context_length=1)
    with pytest.raises(ValueError, match=r"context_length=10, reserve=9"):
        clip("a", context_length=10, reserve=9)
    with pytest.raises(ValueError, match="reserve must be a non-negative int"):
        clip("a", reserve=-1)
    with pytest.raises(ValueError, match="context_length must be an int"):
        clip("a", context_length=7.5)
    with pytest.raises(ValueError, match="padding must be 'longest' or 'max_length'"):
        clip("a", padding="max")


def test_wrong_tokenizer_for_facade(hf_clip, hf_bert):
    with pytest.raises(ValueError, match="bos/eos tokens"):
        CLIPTokenizer(hf_bert)
    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\] and \[PAD\]"):
        BertTokenizer(hf_clip)
    with pytest.raises(TypeError, match="expects a transformers tokenizer, got object"):
        CLIPTokenizer(object())
    with pytest.raises(TypeError, match="expects a transformers tokenizer, got str"):
        BertTokenizer("bert-base-uncased")


# ----------------------------------------------------------------------------- loading, Hub cache
def test_from_pretrained_folder_and_context_length(clip_dir, bert_dir, clip):
    loaded = CLIPTokenizer.from_pretrained(clip_dir, context_length=16)
    assert loaded.context_length == 16
    assert torch.equal(loaded(SENTENCES[:2]).input_ids, clip(SENTENCES[:2]).input_ids)
    assert BertTokenizer.from_pretrained(bert_dir).context_length == 256


def test_load_tokenizer_picks_facade_from_folder(clip_dir, bert_dir, clip, bert):
    for directory, cls, ref in ((clip_dir, CLIPTokenizer, clip), (bert_dir, BertTokenizer, bert)):
        tok = load_tokenizer(directory)
        assert type(tok) is cls
        assert torch.equal(tok(SENTENCES).input_ids, ref(SENTENCES).input_ids)


def test_load_tokenizer_without_tokenizer_class(tmp_path, clip_dir, bert_dir):
    for src, cls in ((clip_dir, CLIPTokenizer), (bert_dir, BertTokenizer)):
        folder = tmp_path / src.name
        shutil.copytree(src, folder)
        (folder / "tokenizer_config.json").unlink()
        assert type(load_tokenizer(folder)) is cls


def test_load_tokenizer_rejects_unknown(tmp_path, clip_dir):
    folder = tmp_path / "roberta"
    shutil.copytree(clip_dir, folder)
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "RobertaTokenizer"}')
    with pytest.raises(ValueError, match="unsupported tokenizer_class 'RobertaTokenizer'"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|startoftext|>"]
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("without <|startoftext|>")):
        load_tokenizer(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot tell the tokenizer type"):
        load_tokenizer(empty)
    with pytest.raises(ValueError, match="must be a folder or a Hub repo id"):
        load_tokenizer(clip_dir / "vocab.json")


def test_load_tokenizer_from_open_clip_config(tmp_path, bert_dir, oc_clip):
    builtin = tmp_path / "openclip"
    builtin.mkdir()
    cfg = {"model_cfg": {"embed_dim": 16, "text_cfg": {"context_length": 16, "width": 32}}}
    (builtin / "open_clip_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(builtin)
    assert type(tok) is CLIPTokenizer and tok.context_length == 16 and tok.pad_token_id == 0
    assert torch.equal(tok(SENTENCES[:2]).input_ids, oc_clip(SENTENCES[:2]).input_ids)

    # BiomedCLIP-style: the BERT tokenizer lives in another folder / repo
    biomed = tmp_path / "biomed"
    biomed.mkdir()
    cfg = {"model_cfg": {"text_cfg": {"hf_tokenizer_name": str(bert_dir), "context_length": 32}}}
    (biomed / "open_clip_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(biomed)
    assert type(tok) is BertTokenizer and tok.context_length == 32


def test_fabricated_hub_cache(tmp_path, clip_dir, bert_dir, clip, bert):
    cache = tmp_path / "hub"
    snapshot = populate_hub_cache(clip_dir, cache, "org/tok", commit=COMMIT)
    assert snapshot == cache / "models--org--tok" / "snapshots" / COMMIT
    assert (cache / "models--org--tok" / "refs" / "main").read_text() == COMMIT
    populate_hub_cache(bert_dir, cache, "org/bert", commit=COMMIT)

    tok = CLIPTokenizer.from_pretrained("org/tok", cache_dir=cache, local_files_only=True)
    assert torch.equal(tok(SENTENCES).input_ids, clip(SENTENCES).input_ids)
    picked = load_tokenizer("org/bert", cache_dir=cache, local_files_only=True)
    assert type(picked) is BertTokenizer
    assert torch.equal(picked(SENTENCES).input_ids, bert(SENTENCES).input_ids)
    assert type(load_tokenizer("org/tok", cache_dir=cache, local_files_only=True)) is CLIPTokenizer
    with pytest.raises(ValueError, match="is the repository in the cache"):
        load_tokenizer("org/missing", cache_dir=cache, local_files_only=True)
