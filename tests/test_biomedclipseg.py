"""BiomedCLIPSeg / BiomedCLIPSeg-D against a re-statement of medvlsm's forward pass.

A tiny BiomedCLIP-shaped open_clip model (timm ``test_vit`` + a tiny BERT, with BERT tokenizer files
written offline) is saved in open_clip's Hub layout and a tiny transformers CLIPSeg in transformers'
layout; ``BiomedCLIPSeg.from_biomedclip`` reads both the way a user reads the real ones. The
reference is medvlsm's ``BiomedCLIPSeg.forward`` re-stated: timm blocks one by one keeping only block
outputs, ``hidden[i + 1]`` for the CLIPSeg config's ``extract_layers``, the open_clip BERT encoder
(pooler + projection) as the condition, and transformers' ``CLIPSegDecoder``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import vlsegkit  # noqa: E402
from vlsegkit import VLSM, BiomedCLIPSeg, CLIPSeg  # noqa: E402
from vlsegkit.hub import CheckpointError  # noqa: E402
from vlsegkit.models.biomedclipseg import init_decoder_like_transformers  # noqa: E402
from vlsegkit.testing import write_bert_tokenizer_files  # noqa: E402

ATOL = 1e-5
EMBED = 16
HF_EXTRACT = [1, 2, 3]  # the tiny CLIPSeg config's extract_layers; medvlsm taps blocks i + 1


def _jitter(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory):
    """A tiny BiomedCLIP in open_clip's Hub layout (config, weights, BERT config and tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_biomedclip")
    write_bert_tokenizer_files(root, model_max_length=24)
    vocab = len((root / "vocab.txt").read_text().split())
    bert = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    bert.save_pretrained(root)
    config = {
        "model_cfg": {
            "embed_dim": EMBED,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 64},
            "text_cfg": {"hf_model_name": str(root), "hf_tokenizer_name": str(root),
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 24},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }  # fmt: skip
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False)
    _jitter(model, 1)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              root / "open_clip_model.safetensors")  # fmt: skip
    return model, root


def _clipseg_config(vision_width: int = 64, reduce_dim: int = 16):
    return transformers.CLIPSegConfig(
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(hidden_size=vision_width, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=2, image_size=64, patch_size=16),
        projection_dim=EMBED, extract_layers=HF_EXTRACT, reduce_dim=reduce_dim,
        decoder_num_attention_heads=2, decoder_intermediate_size=48,
        use_complex_transposed_convolution=True,
    )  # fmt: skip


def _hf_clipseg(path, seed: int, **kwargs):
    torch.manual_seed(seed)
    hf = transformers.CLIPSegForImageSegmentation(_clipseg_config(**kwargs)).eval()
    _jitter(hf.decoder, seed)
    with torch.no_grad():
        hf.decoder.transposed_convolution[-1].weight.mul_(0.05)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clipseg")
    return _hf_clipseg(path, 2), path


def _medvlsm_forward(biomedclip, hf_decoder, x, ids, mask):
    vit = biomedclip.visual.trunk
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    hidden = []
    for block in vit.blocks:  # block outputs only, no embedding entry
        h = block(h)
        hidden.append(h)
    activations = [hidden[i + 1] for i in HF_EXTRACT]
    bert = biomedclip.text
    out = bert.transformer(input_ids=ids, attention_mask=mask)
    cond = bert.proj(bert.pooler(out, mask))
    logits = hf_decoder(activations, cond).logits
    return logits.reshape(x.shape[0], 1, *x.shape[-2:])


def _ids(tokenizer, prompts):
    batch = tokenizer(prompts)
    return batch.input_ids, batch.attention_mask


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


DECODER = dict(reduce_dim=16, decoder_num_heads=2, decoder_mlp_dim=48)


@pytest.fixture(scope="module")
def model_d(biomedclip, clipseg_dir):
    _, root = biomedclip
    _, hf_dir = clipseg_dir
    return BiomedCLIPSeg.from_biomedclip(
        root, clipseg_decoder=hf_dir, extract_layers=(2, 3, 4), **DECODER
    )


def test_biomedclipseg_d_matches_medvlsm_forward(biomedclip, clipseg_dir, model_d):
    upstream, _ = biomedclip
    hf, _ = clipseg_dir
    prompts = ["polyp", "a small round lesion in the colon", ""]
    ids, mask = _ids(model_d.tokenizer, prompts)  # BERT WordPiece from the repo, lazily
    assert ids[0, 0] == 2 and (ids[0, mask[0].sum() :] == 0).all()  # [CLS] ... [SEP] [PAD]
    x = _images(3)
    with torch.no_grad():
        ref = _medvlsm_forward(upstream, hf.decoder, x, ids, mask)
        ours = model_d(x, input_ids=ids, attention_mask=mask).logits
        by_string = model_d(x, prompts).logits
    assert (ours - ref).abs().max() < ATOL
    assert torch.equal(ours, by_string)
    assert model_d.config["decoder_init"] == "clipseg" and not model_d.training
    assert model_d.context_length == 24 and model_d.hook_slots().kept["vision"] == (2, 3, 4)


def test_tapped_blocks_are_a_config_value(biomedclip, model_d):
    _, root = biomedclip
    clipseg_style = BiomedCLIPSeg.from_biomedclip(root, extract_layers=(1, 2, 3), **DECODER)
    clipseg_style.decoder.load_state_dict(model_d.decoder.state_dict())
    ids, mask = _ids(model_d.tokenizer, ["polyp"])
    x = _images(1)
    with torch.no_grad():
        a = model_d(x, input_ids=ids, attention_mask=mask).logits
        b = clipseg_style(x, input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4  # one block deeper is another model
    assert clipseg_style.config["decoder_init"] == "random"


def test_decoder_widths_are_adapted(model_d, tmp_path):
    import copy

    model_d = copy.deepcopy(model_d)  # the module's fixture stays as loaded
    hf = _hf_clipseg(tmp_path / "wide", 3, vision_width=48)  # reduces read 48-wide activations
    before = {k: v.clone() for k, v in model_d.decoder.state_dict().items()}
    report = model_d.load_clipseg_decoder(tmp_path / "wide")
    assert report["reinitialised"] == ["reduces.0", "reduces.1", "reduces.2"]
    assert {"film_mul", "film_add", "layers.0.self_attn.q_proj", "transposed_convolution.4"} <= set(
        report["copied"]
    )
    after = model_d.decoder.state_dict()
    theirs = hf.decoder.state_dict()
    for key, value in after.items():
        expected = before[key] if key.startswith("reduces.") else theirs[key]
        assert torch.equal(value, expected), key
    _hf_clipseg(tmp_path / "narrow", 4, reduce_dim=8)
    with pytest.raises(CheckpointError, match="reduce_dim: checkpoint 8, model 16"):
        model_d.load_clipseg_decoder(tmp_path / "narrow")
    # a transformers CLIPSeg folder stays CLIPSeg's
    assert type(VLSM.from_pretrained(tmp_path / "wide")) is CLIPSeg


def test_random_decoder_follows_transformers_initialisation():
    torch.manual_seed(0)
    model = vlsegkit.create_model("biomedclipseg-tiny", reduce_dim=64, decoder_mlp_dim=2048)
    d = 64
    layer = model.decoder.layers[0]
    std_in = d**-0.5 * 24**-0.5  # (2 * 12 vision layers) ** -0.5
    for w, std in ((layer.self_attn.q_proj.weight, std_in), (layer.self_attn.out_proj.weight, d**-0.5),
                   (layer.mlp.fc1.weight, (2 * d) ** -0.5), (layer.mlp.fc2.weight, std_in)):  # fmt: skip
        assert abs(w.std().item() / std - 1) < 0.08
    assert all((m.bias == 0).all() for m in model.decoder.modules() if isinstance(m, nn.Linear))
    assert (layer.layer_norm1.weight == 1).all() and (layer.layer_norm1.bias == 0).all()
    # FiLM / reduce weights keep PyTorch's default (uniform, bound 1/sqrt(fan_in))
    bound = model.decoder.film_mul.in_features**-0.5
    assert model.decoder.film_mul.weight.abs().max() <= bound
    fresh = nn.Linear(4, 4)
    init_decoder_like_transformers(nn.ModuleDict({"layers": nn.ModuleList(), "x": fresh}))
    assert (fresh.bias == 0).all()


def test_bert_tower_without_tokenizer_says_what_to_do(biomedclip):
    _, root = biomedclip
    model = BiomedCLIPSeg.from_biomedclip(root, tokenizer=None, extract_layers=(2, 3, 4), **DECODER)
    with pytest.raises(ValueError, match="BERT text tower but no tokenizer"):
        model(_images(1), "polyp")
    ids = torch.tensor([[2, 40, 3]])
    assert model(_images(1), input_ids=ids).logits.shape == (1, 1, 64, 64)


def test_full_size_registry_entries():
    with torch.device("meta"):
        model = vlsegkit.create_model("biomedclipseg")
        d = vlsegkit.create_model("biomedclipseg-d")
        hf = transformers.CLIPSegForImageSegmentation(
            transformers.CLIPSegConfig(  # CIDAS/clipseg-rd64-refined's decoder fields
                reduce_dim=64,
                use_complex_transposed_convolution=True,
                vision_config={"patch_size": 16},
            )
        )
    assert model.extract_layers == (4, 7, 10)  # medvlsm's blocks, one deeper than CLIPSeg's
    assert model.vision_tower.num_layers == 12
    assert model.context_length == 256 and model.image_size == (224, 224)
    assert d.config["decoder_init"] == "clipseg" and model.config["decoder_init"] == "random"
    ours = {k: v.shape for k, v in model.decoder.state_dict().items()}
    theirs = {k: v.shape for k, v in hf.decoder.state_dict().items()}
    assert ours == theirs  # the rd64-refined decoder, name for name
    assert model.vision_tower.width == 768 and model.vision_tower.embed_dim == 512


def test_bad_arguments():
    with pytest.raises(ValueError, match="decoder_init must be"):
        vlsegkit.create_model("biomedclipseg-tiny", decoder_init="pretrained")
    with pytest.raises(ValueError, match="not a ResNet"):
        BiomedCLIPSeg(backbone=vlsegkit.create_model("cris-tiny").config["backbone"])
    with pytest.raises(ValueError, match="context_length must be in"):
        vlsegkit.create_model("biomedclipseg-tiny", context_length=500)


def test_text_learner_on_the_bert_tower(model_d):
    from vlsegkit import CoOp

    tuned = CoOp(depth=2, init="polyp").attach(model_d)  # phrase init with the repo's WordPiece
    word = model_d.tokenizer.encode("polyp")
    table = model_d.text_tower.text.transformer.embeddings.word_embeddings.weight
    assert tuned.learner.num_context == len(word)
    assert torch.equal(tuned.learner.context[0], table[word])
    out = tuned(_images(2), ["polyp", "lesion"])
    assert out.logits.shape == (2, 1, 64, 64) and torch.isfinite(out.logits).all()


def test_default_task_is_medvlsm_loss():
    task = vlsegkit.create_model("biomedclipseg-tiny").default_task()
    assert (task.loss.dice_weight, task.loss.bce_weight, task.loss.smooth) == (1.0, 0.2, 1e-5)
    assert task.threshold == 0.5


def test_loads_by_repo_id_from_a_hub_cache_offline(biomedclip, clipseg_dir, model_d, tmp_path):
    import shutil

    from vlsegkit.testing import populate_hub_cache

    _, root = biomedclip
    _, hf_dir = clipseg_dir
    repo = tmp_path / "repo"
    shutil.copytree(root, repo)
    config = json.loads((repo / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "tiny/bert"  # the BERT config's own repo
    (repo / "open_clip_config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    populate_hub_cache(repo, cache, "tiny/biomedclip")
    populate_hub_cache(root, cache, "tiny/bert")
    populate_hub_cache(hf_dir, cache, "tiny/clipseg")
    model = BiomedCLIPSeg.from_biomedclip(
        "hf-hub:tiny/biomedclip", clipseg_decoder="tiny/clipseg", cache_dir=cache,
        local_files_only=True, extract_layers=(2, 3, 4), **DECODER,
    )  # fmt: skip
    assert model.name_or_path == "tiny/biomedclip"
    ours, theirs = model.state_dict(), model_d.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # vlsegkit's offline error names the file, the repo and the fixes
    with pytest.raises(
        CheckpointError, match=r"tiny/missing is not in the Hub cache.*local_files_only"
    ):
        BiomedCLIPSeg.from_biomedclip("tiny/missing", cache_dir=cache, local_files_only=True)
