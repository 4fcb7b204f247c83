"""The tower factory and configs recorded from constructor arguments.

``create_towers(spec)`` must build exactly the upstream architecture a spec names (checked against
open_clip's own ``CLIP`` / transformers' ``CLIPSegModel`` with the same weights), specs must
round-trip through their dict form, and models / hooks must record their constructor arguments so
that a rebuild from the config gives the same thing.
"""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from vlsegkit._config import RecordsConfig, json_value  # noqa: E402
from vlsegkit.encoders import (  # noqa: E402
    BertText,
    HFBertTextTower,
    HFCLIPTextTower,
    HFCLIPVisionTower,
    OpenCLIPSpec,
    OpenCLIPText,
    OpenCLIPTextTower,
    OpenCLIPVisionTower,
    OpenCLIPViT,
    TimmViT,
    TimmViTTower,
    TransformersCLIPSpec,
    create_towers,
    tower_spec_from_dict,
)
from vlsegkit.models import CLIPSeg  # noqa: E402
from vlsegkit.prompts import CoOp  # noqa: E402

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
TEXT = {"context_length": 16, "vocab_size": 500, "width": 24, "heads": 2, "layers": 2}


def test_open_clip_spec_builds_the_upstream_clip():
    spec = OpenCLIPSpec(embed_dim=16, vision=OpenCLIPViT(VISION), text=OpenCLIPText(TEXT),
                        quick_gelu=True)  # fmt: skip
    assert tower_spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    torch.manual_seed(0)
    towers = create_towers(spec.to_dict())
    assert isinstance(towers.vision, OpenCLIPVisionTower)
    assert isinstance(towers.text, OpenCLIPTextTower)
    torch.manual_seed(1)
    upstream = open_clip.CLIP(embed_dim=16, vision_cfg=VISION, text_cfg=TEXT,
                              quick_gelu=True).eval()  # fmt: skip
    # the upstream CLIP's weights, renamed through the factory's key map, fill the towers exactly
    state = upstream.state_dict()
    mapped = {}
    for key, value in state.items():
        if key in ("logit_scale",) or key.startswith("attn_mask"):
            continue
        if key.startswith("visual."):
            mapped[f"vision.{key}"] = value
        else:
            mapped[f"text.text.{key}"] = value
    holder = torch.nn.ModuleDict({"vision": towers.vision, "text": towers.text})
    holder.load_state_dict(mapped, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(1, 400, (2, 16))
    ids[:, 6:] = 0
    ids[:, 5] = 499
    with torch.no_grad():
        assert (towers.vision(pixels).pooled - upstream.encode_image(pixels)).abs().max() < 1e-5
        assert (towers.text(ids).pooled - upstream.encode_text(ids)).abs().max() < 1e-5
    assert towers.make_tokenizer(16).context_length == 16


def test_open_clip_spec_with_timm_trunk_and_bert_text():
    spec = tower_spec_from_dict({
        "kind": "open_clip", "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 32},
        "bert_config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 24},
    })  # fmt: skip
    assert isinstance(spec.vision, TimmViT) and isinstance(spec.text, BertText)
    assert spec.text.proj == "mlp" and spec.text.pooler == "cls_last_hidden_state_pooler"
    towers = create_towers(spec)
    assert isinstance(towers.vision, TimmViTTower) and isinstance(towers.text, HFBertTextTower)
    assert towers.make_tokenizer is None  # a BERT vocabulary comes from files
    assert towers.text.text.transformer.pooler is None  # open_clip's pretrained BERT has none
    ours = {n for n, _ in towers.vision.named_parameters()}
    assert all(v.split(".", 1)[1] in ours for k, v in towers.upstream_keys.items()
               if v.startswith("vision."))  # fmt: skip


def test_transformers_spec_is_canonical_and_builds_clipseg_towers():
    partial = {"text_config": {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 48, "max_position_embeddings": 20},
               "vision_config": {"hidden_size": 32, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "intermediate_size": 64,
                                 "image_size": 32, "patch_size": 8},
               "projection_dim": 16, "model": "clipseg"}  # fmt: skip
    spec = TransformersCLIPSpec.from_dict(partial)
    full = spec.to_dict()
    assert full["text_config"]["vocab_size"] == 49408  # transformers' default, made explicit
    assert full["vision_config"]["layer_norm_eps"] == 1e-5
    assert tower_spec_from_dict(full) == spec
    towers = create_towers(spec)
    assert isinstance(towers.vision, HFCLIPVisionTower)
    assert isinstance(towers.text, HFCLIPTextTower)
    upstream = transformers.CLIPSegModel(spec._hf_config())
    names = {n for n, _ in upstream.named_parameters()} - {"logit_scale"}
    assert names == set(towers.upstream_keys) & names  # every upstream weight has a tower key


_BERT = {"kind": "open_clip", "embed_dim": 16, "vision_cfg": VISION,
         "bert_config": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 64,
                         "max_position_embeddings": 24}}  # fmt: skip
_HF = {"kind": "transformers_clip", "projection_dim": 16,
       "text_config": {"vocab_size": 300, "hidden_size": 24, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 48,
                       "max_position_embeddings": 20},
       "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 64, "image_size": 32, "patch_size": 8}}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "vocab"),
    [({"kind": "open_clip", "embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}, 500),
     (_BERT, 100), (_HF, 300)],
    ids=["open_clip", "bert", "transformers"],
)  # fmt: skip
def test_token_ids_outside_the_vocabulary_name_input_ids(spec, vocab):
    text = create_towers(spec).text
    ids = torch.ones(2, 6, dtype=torch.long)
    text.embed(ids)  # in range: fine
    ids[1, 3] = vocab  # one past the table
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {vocab}\).*\[1, {vocab}\]"):
        text.embed(ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="input_ids must lie in"):
        text.embed(ids)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        text.embed(ids.float())


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("open_clip", "must be a dict spec"),
        ({"kind": "timm"}, r"backbone\['kind'\] must be one of"),
        ({"kind": "open_clip", "embed_dim": 8, "vision_cfg": VISION}, "exactly one of 'text_cfg'"),
        ({"kind": "open_clip", "embed_dim": 8, "vision_cfg": VISION, "text_cfg": TEXT, "x": 1},
         r"unknown keys \['x'\]"),
        ({"kind": "open_clip", "embed_dim": 8, "vision_cfg": {"timm_model_name": "test_vit",
          "timm_model_pretrained": True}, "text_cfg": TEXT}, "timm_model_pretrained must be false"),
        ({"kind": "transformers_clip", "text_config": {}, "vision_config": {}},
         r"missing keys \['projection_dim'\]"),
        ({"kind": "transformers_clip", "text_config": {}, "vision_config": {},
          "projection_dim": 8, "model": "siglip"}, "model must be 'clip' or 'clipseg'"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        create_towers(spec)


# ------------------------------------------------------------------------ recorded configs
class _Base(RecordsConfig):
    def __init__(self, *, a: int = 1, b: tuple = (1, 2)) -> None:
        self.a, self.b = a, b


class _Child(_Base):
    def __init__(self, *, c: str = "x", **kwargs) -> None:
        super().__init__(**kwargs)
        self.c = c


def test_records_the_outermost_constructor_call():
    assert _Base(a=3).config_args == {"a": 3, "b": [1, 2]}
    assert _Child(c="y", a=5).config_args == {"c": "y", "a": 5}
    with pytest.raises(ValueError, match="holds a object"):
        json_value({"x": object()})
    with pytest.raises(ValueError, match="non-finite"):
        json_value([float("nan")])


def test_model_config_is_its_constructor_arguments():
    model = CLIPSeg(
        backbone={"text_config": {"hidden_size": 24, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 48},
                  "vision_config": {"hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "intermediate_size": 64,
                                    "image_size": 32, "patch_size": 8},
                  "projection_dim": 16},
        extract_layers=(0, 1), reduce_dim=8, decoder_mlp_dim=16, image_size=32,
        hooks=[CoOp(num_context=2, init=None)],
    )  # fmt: skip
    config = model.config
    assert config["extract_layers"] == [0, 1] and config["reduce_dim"] == 8
    assert config["backbone"]["kind"] == "transformers_clip"  # canonical spec
    assert config["hooks"][0]["name"] == "CoOp"
    assert config["hooks"][0]["args"]["text_width"] == 24  # sizes learned when binding
    rebuilt = CLIPSeg(**json.loads(json.dumps(config)))
    assert rebuilt.config == config
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
