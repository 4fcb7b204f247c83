"""DualEncoder: parity with the upstream CLIP models it loads, upstream export, hooks, bad input.

Parity: a tiny random transformers ``CLIPModel`` saved in Hub layout loads through
``VLSM.from_pretrained``, and a tiny BiomedCLIP-shaped open_clip model (timm ``test_vit`` + tiny
BERT, written as an open_clip repository folder with its tokenizer) loads through
``DualEncoder.from_open_clip``; embeddings and logits match the upstream ``get_*_features`` /
``encode_*`` and the exported state dict loads back into the upstream model. The shared
forward / gradient / save-load / autocast tests come from tests/test_models.py (``dual-encoder-tiny``).
"""

from __future__ import annotations

import json

import pytest
import torch

import vlsegkit
from vlsegkit import CoCoOp, CoOp, PVLAdapters, create_model
from vlsegkit.hub import CheckpointError
from vlsegkit.models import DualEncoder, DualEncoderOutput, SupportsRetrieval
from vlsegkit.testing import write_bert_tokenizer_files

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
WORDS = ("lesion", "polyp", "small", "large", "round", "left", "right", "a", "the", "at", "on")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _jitter(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (LayerNorms, biases, logit_scale included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- transformers CLIP
@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    _jitter(model, 0)
    model.save_pretrained(root)
    (root / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3],
                    "image_std": [0.2, 0.3, 0.4], "size": {"shortest_edge": 32}})
    )  # fmt: skip
    return root, model


def test_transformers_clip_loads_and_matches_upstream(hf_clip):
    root, clip = hf_clip
    model = vlsegkit.VLSM.from_pretrained(root)
    assert type(model) is DualEncoder and isinstance(model, SupportsRetrieval)
    assert model.image_size == (32, 32) and model.image_mean == (0.5, 0.4, 0.3)
    assert not model.training
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a small round lesion", "two polyps on the left", ""]
    batch = model.tokenizer(texts)
    with torch.no_grad():
        ours = model(x, texts)
        ref_img = clip.get_image_features(x).pooler_output
        ref_txt = clip.get_text_features(batch.input_ids, attention_mask=batch.attention_mask)
        ref = clip(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=x)
    assert isinstance(ours, DualEncoderOutput)
    assert _maxdiff(ours.image_embeds, ref_img) < ATOL
    assert _maxdiff(ours.text_embeds, ref_txt.pooler_output) < ATOL
    assert _maxdiff(ours.logits, ref.logits_per_image) < 1e-4
    # the weights go back into the upstream model unchanged
    exported = model.upstream_state_dict()
    fresh = transformers.CLIPModel(clip.config).eval()
    missing, unexpected = fresh.load_state_dict(exported, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    upstream = clip.state_dict()
    assert all(torch.equal(v, upstream[k]) for k, v in exported.items())


# --------------------------------------------------------------------------- open_clip BiomedCLIP
@pytest.fixture(scope="module")
def biomedclip_folder(tmp_path_factory):
    """A BiomedCLIP-shaped open_clip repository: config, BERT text config, tokenizer, weights."""
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("tiny_biomedclip")
    bert_dir = root / "bert"
    transformers.BertConfig(
        vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    ).save_pretrained(bert_dir)  # fmt: skip
    write_bert_tokenizer_files(root, WORDS, model_max_length=24)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 160},
            "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(root),
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 24},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }  # fmt: skip
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False).eval()
    _jitter(model, 1)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root, model


def test_open_clip_biomedclip_loads_and_matches_upstream(biomedclip_folder):
    root, upstream = biomedclip_folder
    model = DualEncoder.from_open_clip(root)
    assert model.context_length == 24 and model.image_size == (160, 160)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    texts = ["a small round lesion at the left", "polyp"]
    batch = model.tokenizer(texts)  # the repository's own BERT tokenizer
    assert batch.input_ids[0, 0] == 2  # [CLS]
    with torch.no_grad():
        ours = model(x, texts)
        ref_img = upstream.encode_image(x)
        ref_txt = upstream.encode_text(batch.input_ids)  # open_clip masks [PAD] itself
    assert _maxdiff(ours.image_embeds, ref_img) < ATOL
    assert _maxdiff(ours.text_embeds, ref_txt) < ATOL
    logits = upstream.logit_scale.exp() * (
        torch.nn.functional.normalize(ref_img, dim=-1)
        @ torch.nn.functional.normalize(ref_txt, dim=-1).T
    )
    assert _maxdiff(ours.logits, logits) < 1e-4
    # export: the open_clip model loads it strictly and then computes the same embeddings
    exported = model.upstream_state_dict()
    assert exported.keys() == upstream.state_dict().keys()
    clone = open_clip.create_model(f"local-dir:{root}", pretrained_text=False).eval()
    clone.load_state_dict(exported, strict=True)
    with torch.no_grad():
        assert _maxdiff(clone.encode_image(x), ref_img) == 0.0


def test_fine_tuned_towers_round_trip_and_export(biomedclip_folder, tmp_path):
    root, _ = biomedclip_folder
    model = DualEncoder.from_open_clip(root).train()
    x = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    texts = ["a lesion", "a polyp", "a small lesion on the left", "a large round polyp"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    loss = model.default_task().training_step(model, {"image": x, "text": texts})["loss"]
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("vision_tower.") for k in changed)  # both towers are fine-tuned
    assert any(k.startswith("text_tower.") for k in changed)
    model.save_pretrained(tmp_path / "ft")
    loaded = vlsegkit.VLSM.from_pretrained(tmp_path / "ft")
    assert type(loaded) is DualEncoder and loaded.tokenizer_name == str(root)
    with torch.no_grad():
        model.eval()
        a, b = model(x, texts), loaded(x, texts)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.text_embeds, b.text_embeds)
    # the fine-tuned weights load back into open_clip (e.g. for MedCLIP-SAMv2's convert.py)
    upstream = open_clip.create_model(f"local-dir:{root}", pretrained_text=False).eval()
    upstream.load_state_dict(loaded.upstream_state_dict(), strict=True)
    with torch.no_grad():
        assert _maxdiff(upstream.encode_image(x), a.image_embeds) < ATOL


def test_open_clip_folder_problems(tmp_path):
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json not found in the folder"):
        DualEncoder.from_open_clip(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32,
                                       "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2,
                     "layers": 1}}}))  # fmt: skip
    with pytest.raises(CheckpointError, match="no open_clip weights"):
        DualEncoder.from_open_clip(tmp_path)
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing keys"):
        DualEncoder.from_open_clip(tmp_path)


# --------------------------------------------------------------------------- behaviour
def test_encoders_are_independent_and_match_forward():
    torch.manual_seed(0)
    model = create_model("dual-encoder-tiny").eval()
    x = torch.randn(3, 3, 64, 64)
    texts = ["a polyp", "a polyp", "two lesions at the top"]
    with torch.no_grad():
        out = model(x, texts)
        image = model.encode_image(x)
        text = model.encode_text(texts)
        single = model.encode_text("two lesions at the top")
        ids = model.tokenizer(texts)
        by_ids = model(x, input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    assert torch.equal(out.text_embeds[0], out.text_embeds[1])  # repeated texts keep their rows
    assert _maxdiff(out.image_embeds, image) < 1e-6 and _maxdiff(out.text_embeds, text) < 1e-6
    assert _maxdiff(single, text[2:]) < 1e-5  # padding to the longest text changes nothing
    assert _maxdiff(by_ids.logits, out.logits) < 1e-6
    cos = (
        torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    )
    assert _maxdiff(out.logits, model.logit_scale.exp() * cos) < 1e-5


def test_hooks_that_pair_texts_with_images_are_refused():
    model = create_model("dual-encoder-tiny")
    assert model.hook_slots().lockstep is False
    for hook in (CoCoOp(depth=1), PVLAdapters(dim=16)):
        with pytest.raises(ValueError, match="embeds images and texts independently"):
            hook.attach(model)(torch.randn(2, 3, 64, 64), ["a", "b"])
    with pytest.raises(ValueError, match="embeds images and texts independently"):
        create_model("dual-encoder-tiny", hooks=[CoCoOp(depth=1)])
    # a model-owned text prompt learner saves and reloads with the model
    owned = create_model("dual-encoder-tiny", hooks=[CoOp(depth=1)])
    assert owned.config["hooks"][0]["name"] == "CoOp"


def test_bad_inputs_are_refused():
    model = create_model("dual-encoder-tiny")
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="exactly one of texts or input_ids"):
        model(x)
    with pytest.raises(ValueError, match="texts must be a string or a non-empty list"):
        model(x, [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="texts must be a string or a non-empty list"):
        model(x, [])
    with pytest.raises(ValueError, match=r"input_ids must be a \(T, L\) tensor"):
        model(x, input_ids=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, H, W\)"):
        model(torch.randn(2, 64, 64), "a")
    with pytest.raises(ValueError, match=r"image_embeds must be an \(N, 32\) tensor"):
        model.similarity(torch.randn(2, 31), torch.randn(2, 32))
    with pytest.raises(ValueError, match="context_length must be an int in"):
        create_model("dual-encoder-tiny", context_length=78)
    with pytest.raises(ValueError, match="tokenizer must be a folder / Hub id string"):
        create_model("dual-encoder-tiny", tokenizer=object())


def test_bert_tower_without_tokenizer_asks_for_one():
    pytest.importorskip("timm")
    backbone = {
        "kind": "open_clip", "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 160},
        "bert_config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 300},
        "text_pooler": "cls_last_hidden_state_pooler",
    }  # fmt: skip
    model = DualEncoder(backbone=backbone)
    assert model.context_length == 256  # BiomedCLIP's, within BERT's 300 positions
    assert model.hook_slots().tokenizer is None
    with pytest.raises(ValueError, match="BERT text tower but no tokenizer"):
        model.encode_text("a lesion")
    ids = torch.tensor([[2, 7, 9, 3]])  # token ids work without one
    assert model.encode_text(input_ids=ids).shape == (1, 16)


def test_loading_assigns_the_files_tensors(hf_clip, biomedclip_folder, load_calls):
    """transformers and open_clip folders load with one copy of the weights: built without weights,
    the file's tensors assigned (no random initialisation, no copy); same values as upstream."""
    root, clip = hf_clip
    model = vlsegkit.VLSM.from_pretrained(root)
    assert load_calls == [True] and not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.upstream_state_dict()["text_projection.weight"],
                       clip.state_dict()["text_projection.weight"])  # fmt: skip
    load_calls.clear()
    folder, _ = biomedclip_folder
    hooked = DualEncoder.from_open_clip(folder, hooks=[vlsegkit.CoOp(num_context=2, init=None)])
    assert load_calls == [True] and not any(p.is_meta for p in hooked.parameters())
    assert len(hooked.hooks) == 1 and hooked.config["hooks"]  # bound after the load
