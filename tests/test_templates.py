"""Attribute prompt templates P0..P9: template syntax, measured fields on synthetic masks with known
answers, metadata normalisation and the per-dataset families (endoscopy/skin/ulcer, BUSI, CAMUS,
CheXlocalize) against prompts of the released medvlsm annotation files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsegkit.data import DATASET_TEMPLATES, PromptTemplates, get_templates
from vlsegkit.data.templates import (
    GENERAL_DESCRIPTIONS,
    colour_name,
    mask_prompt_fields,
    normalize_metadata,
    number_to_words,
    render_template,
)

YY, XX = np.mgrid[:64, :64]


def disc(cy, cx, r, size=64):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# Lattice points in a disc of radius 12 (Gauss circle problem): 441 -> 441 / 4096 = 0.1077, medium.
CENTRE = disc(32, 32, 12)
# Radius 3: 29 pixels -> 0.0071 of the image, small; its centroid (8, 56) is in the top-right cell.
CORNER = disc(8, 56, 3)


# --------------------------------------------------------------------------- words and syntax
@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (15, "fifteen"),
        (20, "twenty"),
        (46, "forty-six"),
        (64, "sixty-four"),
        (100, "one hundred"),
        (105, "one hundred and five"),
        (999, "nine hundred and ninety-nine"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("bad", [-1, 1000, 2.5, True, "3"])
def test_number_to_words_rejects(bad):
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 999\]"):
        number_to_words(bad)


def test_render_template_optional_segments_and_lists():
    t = "[{size}] [{color}] {cls}[, located in {location} of the image]"
    assert render_template(t, {"cls": "polyp"}) == ["polyp"]
    assert render_template(t, {"cls": "polyp", "color": None, "size": "small"}) == ["small polyp"]
    assert render_template(t, {"cls": "polyp", "location": "top"}) == [
        "polyp, located in top of the image"
    ]
    # Nested: the outer part needs {sex}; the inner age is optional on its own.
    nested = "{cls}[ of a[ {age}-year-old] {sex}]."
    assert render_template(nested, {"cls": "LV", "age": "forty"}) == ["LV."]
    assert render_template(nested, {"cls": "LV", "sex": "male"}) == ["LV of a male."]
    assert render_template(nested, {"cls": "LV", "sex": "male", "age": "forty"}) == [
        "LV of a forty-year-old male."
    ]
    # List fields expand (product), duplicates collapse, order follows the lists.
    out = render_template("{a} {b}", {"a": ["x", "y"], "b": ["1", "1", "2"]})
    assert out == ["x 1", "x 2", "y 1", "y 2"]
    # An empty list is unknown, like None; an empty string is a known (empty) value.
    assert render_template("[{a} ]b", {"a": []}) == ["b"]
    assert render_template("tumor{s} here", {"s": ""}) == ["tumor here"]
    # Dropped segments leave no stray spaces, before punctuation either.
    assert render_template("{a} [{b}] , [{b}] .", {"a": "x"}) == ["x,."]


def test_render_template_errors():
    with pytest.raises(KeyError, match=r"template field 'cls' is unknown"):
        render_template("{cls} in a chest Xray.", {})
    with pytest.raises(ValueError, match=r"unbalanced '\['"):
        render_template("[{cls}", {"cls": "a"})
    with pytest.raises(ValueError, match=r"unbalanced '\]'"):
        render_template("{cls}]", {"cls": "a"})
    with pytest.raises(ValueError, match="placeholder"):
        render_template("{cls", {"cls": "a"})
    with pytest.raises(ValueError, match="unbalanced"):
        PromptTemplates(name="bad", templates={"p1": "[{cls}"})


# --------------------------------------------------------------------------- measured fields
def test_fields_single_disc():
    fields = mask_prompt_fields(CENTRE)
    assert int(CENTRE.sum()) == 441
    assert fields == {
        "number": "one",
        "s": "",
        "size": "medium",
        "location": "center",
        "shape": "round",
        "color": None,
    }


def test_fields_two_components_sizes_locations_joined_largest_first():
    fields = mask_prompt_fields(torch.from_numpy(CENTRE | CORNER)[None])  # (1, H, W) tensor
    assert int(CORNER.sum()) == 29
    assert fields["number"] == "two" and fields["s"] == "s"
    assert fields["size"] == "medium, small"
    assert fields["location"] == "center, top right"
    assert fields["shape"] == "round"
    # Same size twice is listed once.
    twins = disc(16, 16, 6) | disc(48, 48, 6)
    assert mask_prompt_fields(twins)["size"] == "small"
    assert mask_prompt_fields(twins)["location"] == "top left, bottom right"


def test_fields_size_classes_shapes_and_specks():
    assert mask_prompt_fields(disc(32, 32, 25))["size"] == "large"  # 1961 px = 0.48
    tiny = np.zeros((64, 64), bool)
    tiny[50, 10:13] = True  # 3 px = 0.00073 < 0.001; row 50 of 64 is in the bottom third
    assert mask_prompt_fields(tiny)["size"] == "tiny"
    assert mask_prompt_fields(tiny)["location"] == "bottom left"
    ellipse = ((YY - 32) / 8.0) ** 2 + ((XX - 30) / 20.0) ** 2 <= 1  # axis ratio 2.5
    assert mask_prompt_fields(ellipse)["shape"] == "oval"
    # A single pixel in 128x128 covers 6e-5 <= 1e-4 of the image: ignored as a speck.
    speck = np.zeros((128, 128), bool)
    speck[5, 5] = True
    assert mask_prompt_fields(speck)["number"] == "zero"
    empty = mask_prompt_fields(np.zeros((8, 8)))
    assert empty["number"] == "zero" and empty["size"] is None and empty["shape"] is None


def test_colour_name():
    mask = CENTRE
    for name, rgb in (("pink", (0.95, 0.6, 0.65)), ("brown", (0.45, 0.27, 0.12))):
        image = np.zeros((3, 64, 64), np.float32)
        image[:, mask] = np.array(rgb, np.float32)[:, None]
        image[:, ~mask] = 1.0  # a white background must not leak into the answer
        assert colour_name(image, mask) == name
        u8 = torch.from_numpy((image * 255).round().astype(np.uint8))
        assert colour_name(u8, torch.from_numpy(mask)) == name
    assert colour_name(np.zeros((3, 64, 64)), np.zeros((64, 64))) is None
    with pytest.raises(ValueError, match=r"image must have shape \(3, H, W\) = \(3, 64, 64\)"):
        colour_name(np.zeros((64, 64, 3)), mask)


def test_normalize_metadata():
    out = normalize_metadata(
        {
            "View": "2CH",
            "phase": "ES",
            "Gender": "F",
            "age": 46,
            "ImageQuality": "Poor",
            "tumour_type": "Malignant",
            "pathologies": ["Edema", "Atelectasis"],
            "extra": 3,
            "none": None,
        }
    )
    assert out == {
        "view": "two-chamber",
        "cycle": "systole",
        "sex": "female",
        "age": "forty-six",
        "quality": "poor",
        "tumor_type": "malignant",
        "tumor_regularity": "irregular",
        "pathologies": "Edema, Atelectasis",
        "extra": "3",
    }
    assert normalize_metadata({"view": "4ch"})["view"] == "four-chamber"
    assert normalize_metadata({"view": "frontal"})["view"] == "frontal"
    with pytest.raises(ValueError, match="metadata 'age'"):
        normalize_metadata({"age": "unknown"})


# --------------------------------------------------------------------------- dataset families
def test_endoscopy_templates_all_keys():
    image = np.ones((3, 64, 64), np.float32)
    image[:, CENTRE] = np.array([0.95, 0.6, 0.65], np.float32)[:, None]  # pink polyp
    p = get_templates("kvasir").prompts(CENTRE, image=image)
    assert list(p) == [f"p{k}" for k in range(10)]
    assert p["p0"] == [""]
    assert p["p1"] == ["polyp"]
    assert p["p2"] == ["round polyp"]
    assert p["p3"] == ["pink round polyp"]
    assert p["p4"] == ["medium pink round polyp"]
    assert p["p5"] == ["one medium pink round polyp"]
    assert p["p6"] == ["one medium pink round polyp, located in center of the image"]
    desc = GENERAL_DESCRIPTIONS["endoscopy"]
    assert p["p7"] == [f"polyp which is {d}" for d in desc] and len(desc) == 5
    assert p["p8"] == [f"one medium pink round polyp which is {d}" for d in desc]
    assert p["p9"][2] == (
        "one medium pink round polyp which is a small lump in the lining of colon located in "
        "center of the image"
    )
    # Without an image the colour is unknown and drops out.
    assert get_templates("endoscopy").prompts(CENTRE)["p3"] == ["round polyp"]
    # Several components, as in the released files: no plural, distinct locations joined.
    two = get_templates("endoscopy").prompts(CENTRE | CORNER)
    assert two["p6"] == ["two medium, small round polyp, located in center, top right of the image"]


def test_skin_and_ulcer_names_and_negatives():
    assert get_templates("isic").prompts(CENTRE)["p1"] == ["skin melanoma"]
    ulcer = get_templates("dfu").prompts(CENTRE)
    assert ulcer["p7"][0] == "foot ulcer which is a wound in foot and toes"
    negative = get_templates("skin").prompts(np.zeros((64, 64)))
    assert negative["p0"] == [""]
    assert all(negative[f"p{k}"] == ["no skin melanoma in the image"] for k in range(1, 10))


def test_busi_matches_released_prompts():
    # Like medvlsm's busi val entry "111_malignant" (two tumours at "center, left"); the left
    # disc has 113 px = 0.028 of the image -> small, so the sizes read "medium, small".
    left = disc(32, 7, 6)
    mask = CENTRE | left
    assert mask_prompt_fields(mask)["location"] == "center, left"
    p = get_templates("busi").prompts(mask, metadata={"tumor_type": "malignant"})
    assert p["p1"] == ["Tumor in the breast ultrasound image."]
    assert p["p2"] == [
        "Malignant tumor in the breast ultrasound image.",
        "Irregular-shaped tumor in the breast ultrasound image.",
    ]
    assert p["p3"] == [
        "Two malignant tumors in the breast ultrasound image.",
        "Two irregular-shaped tumors in the breast ultrasound image.",
    ]
    assert p["p5"][0] == (
        "Two medium, small malignant tumors at the center, left in the breast ultrasound image."
    )
    assert p["p6"] == [
        "Two medium, small round-shaped malignant tumors at the center, left in the breast "
        "ultrasound image.",
        "Two medium, small round-shaped irregular tumors at the center, left in the breast "
        "ultrasound image.",
    ]
    one = get_templates("busi").prompts(CENTRE, metadata={"type": "benign"})
    # Released: "One medium oval-shaped benign tumor at the center in the breast ultrasound image."
    assert one["p6"][0] == (
        "One medium round-shaped benign tumor at the center in the breast ultrasound image."
    )
    assert one["p4"][1] == "One medium regular-shaped tumor in the breast ultrasound image."
    normal = get_templates("busi").prompts(np.zeros((64, 64)), metadata={"type": "normal"})
    assert normal["p0"] == [""]
    assert all(normal[f"p{k}"] == ["No tumor in the breast ultrasound image."] for k in range(1, 7))
    assert left.sum() == 113


def test_camus_matches_released_prompts():
    meta = {"view": "2CH", "cycle": "ED", "sex": "F", "age": 64, "quality": "medium"}
    p = get_templates("camus").prompts(CENTRE, metadata=meta, class_name="Left ventricular cavity")
    # Released (medvlsm camus val.json, patient0010_2CH_ED_gt_1), shape word aside:
    assert p["p1"] == [
        "Left ventricular cavity of the heart.",
        "Left ventricular cavity in the cardiac ultrasound.",
    ]
    assert p["p3"][0] == (
        "Left ventricular cavity in two-chamber view of the heart at end of the diastole cycle."
    )
    assert p["p6"][1] == (
        "Left ventricular cavity in two-chamber view in the cardiac ultrasound at end of the "
        "diastole cycle of a sixty-four-year-old female with medium image quality."
    )
    assert p["p7"][0] == (
        "Left ventricular cavity of round shape in two-chamber view of the heart at end of the "
        "diastole cycle of a sixty-four-year-old female with medium image quality."
    )
    assert list(p) == [f"p{k}" for k in range(8)]
    # Missing metadata drops the clauses instead of failing.
    bare = get_templates("camus").prompts(CENTRE, class_name="Myocardium")
    assert bare["p6"] == ["Myocardium of the heart.", "Myocardium in the cardiac ultrasound."]
    no_age = get_templates("camus").prompts(CENTRE, class_name="M", metadata={"sex": "M"})
    assert no_age["p5"][0] == "M of the heart of a male."


def test_chexlocalize_matches_released_prompts():
    meta = {"view": "lateral", "pathologies": ["Enlarged Cardiomediastinum", "Lung Opacity"]}
    p = get_templates("chexlocalize").prompts(CENTRE, metadata=meta, class_name="Atelectasis")
    assert p["p1"] == ["Atelectasis in a chest Xray."]
    assert p["p2"] == ["Atelectasis in the lateral view of a Chest Xray."]
    assert p["p3"] == ["Atelectasis of shape round in the lateral view of a Chest Xray."]
    assert p["p4"] == [
        "Atelectasis of shape round, and located in center of the lateral view of a Chest Xray."
    ]
    assert p["p5"] == [
        "Atelectasis of shape round, and located in center of the lateral view of a Chest Xray. "
        "Enlarged Cardiomediastinum, Lung Opacity are present."
    ]
    assert p["p6"] == [
        "Atelectasis in a Chest Xray. Enlarged Cardiomediastinum, Lung Opacity are present."
    ]
    assert get_templates("chexlocalize").prompts(CENTRE, class_name="Edema")["p5"] == [
        "Edema of shape round, and located in center of a Chest Xray."
    ]


def test_registry_and_custom_templates():
    assert set(DATASET_TEMPLATES) == {"endoscopy", "skin", "ulcer", "busi", "camus", "chexlocalize"}
    assert get_templates("POLYP") is DATASET_TEMPLATES["endoscopy"]
    with pytest.raises(KeyError, match="unknown prompt template family 'brain'"):
        get_templates("brain")
    custom = PromptTemplates(
        name="clip",
        templates={"p1": ["a photo of a {cls}.", "{cls}"], "p2": "{number} {cls}{s}"},
        negative={"p2": "no {cls}"},
        defaults={"cls": "lesion"},
    )
    assert custom.keys == ("p1", "p2")
    assert custom.prompts(CENTRE | CORNER) == {
        "p1": ["a photo of a lesion.", "lesion"],
        "p2": ["two lesions"],
    }
    assert custom.prompts(np.zeros((4, 4)), class_name="cyst")["p2"] == ["no cyst"]
    assert custom.render({"cls": "nodule", "number": "three", "s": "s"})["p2"] == ["three nodules"]
