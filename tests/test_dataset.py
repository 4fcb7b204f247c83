"""ImageMaskPromptDataset on tiny PNG/JPEG datasets written to tmp_path: the medvlsm JSON layout,
plain folders, multi-class expansion, prompt choice, attribute templates, joint augmentation,
determinism and the errors that name the offending file."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from vlsegkit.data import (
    CAMUS_CLASSES,
    ImageMaskPromptDataset,
    SegmentationSample,
    collate_prompts,
)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def block_mask(h, w, rows, cols, value=255):
    m = np.zeros((h, w), np.uint8)
    m[rows[0] : rows[1], cols[0] : cols[1]] = value
    return m


@pytest.fixture
def medvlsm_root(tmp_path):
    """``<root>/{images, masks, anns/train.json}`` with two entries, one JPEG mask."""
    root = tmp_path / "kvasir_polyp"
    save(root / "images" / "a.png", rgb(8, 8, 0))
    save(root / "masks" / "a.png", block_mask(8, 8, (0, 4), (4, 8)))
    save(root / "images" / "b.png", rgb(8, 8, 1))
    # JPEG masks (as Kvasir ships them) are noisy around 0 and 255; the 127 threshold absorbs it.
    Image.fromarray(block_mask(8, 8, (4, 8), (0, 4))).convert("RGB").save(
        root / "masks" / "b.jpg", quality=90
    )
    entries = [
        {
            "img_name": "a.png",
            "mask_name": "a.png",
            "bbox": [4, 0, 8, 4],
            "prompts": {"p0": "", "p1": "polyp", "p2": ["round polyp", "oval polyp"]},
        },
        {
            "img_name": "b.png",
            "mask_name": "b.jpg",
            "prompts": {"p0": "", "p1": "polyp", "p2": "small polyp"},
        },
    ]
    (root / "anns").mkdir()
    (root / "anns" / "train.json").write_text(json.dumps(entries))
    return root


# --------------------------------------------------------------------------- medvlsm JSON
def test_medvlsm_json_items_are_exact(medvlsm_root):
    ds = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, "train", image_size=None)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"image", "mask", "prompt", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 8, 8)
    expected = torch.from_numpy(rgb(8, 8, 0)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)
    mask = torch.from_numpy(block_mask(8, 8, (0, 4), (4, 8)) > 0).float()[None]
    assert torch.equal(item["mask"], mask)
    assert item["prompt"] == "polyp" and item["index"] == 0
    jpeg = ds[1]["mask"]
    assert torch.equal(jpeg, torch.from_numpy(block_mask(8, 8, (4, 8), (0, 4)) > 0).float()[None])
    assert ds[-1]["index"] == 1


def test_resize_is_nearest_for_masks_and_collates(medvlsm_root):
    ds = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, image_size=16)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    small = torch.from_numpy(block_mask(8, 8, (0, 4), (4, 8)) > 0).float()
    # Doubling with nearest neighbours repeats every pixel twice in each direction.
    assert torch.equal(item["mask"][0], small.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_prompts)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    assert batch["prompt"] == ["polyp", "polyp"]
    assert torch.equal(batch["index"], torch.tensor([0, 1]))


def test_prompt_lists_keys_random_and_seeds(medvlsm_root):
    ds = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, prompt_key="p2", seed=3)
    assert ds[0]["prompt"] == ds[0]["prompt"]  # same (seed, epoch, index): same draw
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        seen.add(ds[0]["prompt"])
    assert seen == {"round polyp", "oval polyp"}
    assert ds[1]["prompt"] == "small polyp"
    # "random": any key but p0, then any list entry.
    rand = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, prompt_key="random", seed=0)
    counts = Counter()
    for epoch in range(120):
        rand.set_epoch(epoch)
        counts[rand[0]["prompt"]] += 1
    assert set(counts) == {"polyp", "round polyp", "oval polyp"}
    assert 40 - 20 < counts["polyp"] < 60 + 20  # key p1 half of the time, 60 expected
    pair = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, prompt_key=["p0", "p1"], seed=1)
    draws = set()
    for epoch in range(30):
        pair.set_epoch(epoch)
        draws.add(pair[1]["prompt"])
    assert draws == {"", "polyp"}
    # Without a seed the global generator drives the choice.
    unseeded = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, prompt_key="p2")
    assert {unseeded[0]["prompt"] for _ in range(40)} == {"round polyp", "oval polyp"}


# --------------------------------------------------------------------------- folders
def test_folder_binary_with_suffix_prompts_file_and_negatives(tmp_path):
    root = tmp_path / "busi"
    save(root / "images" / "1_benign.png", rgb(10, 12, 2)[..., 0])  # grayscale ultrasound
    save(root / "masks" / "1_benign_mask.png", block_mask(10, 12, (2, 6), (3, 9)))
    save(root / "images" / "2_normal.png", rgb(10, 12, 3)[..., 0])
    save(root / "masks" / "2_normal_mask.png", np.zeros((10, 12), np.uint8))
    prompts = {"1_benign": {"p1": "Tumor in the breast ultrasound image.", "p2": ["a", "b"]}}
    (root / "prompts.json").write_text(json.dumps(prompts))
    ds = ImageMaskPromptDataset.from_folder(
        root, mask_suffix="_mask", class_name="tumor", image_size=None
    )
    assert len(ds) == 2 and ds.class_names == ("tumor",)
    first, negative = ds[0], ds[1]
    assert first["prompt"] == "Tumor in the breast ultrasound image."
    gray = torch.from_numpy(rgb(10, 12, 2)[..., 0]).float() / 255
    torch.testing.assert_close(first["image"], gray.expand(3, -1, -1), rtol=0, atol=0)
    assert first["mask"].sum() == 4 * 6
    assert negative["mask"].sum() == 0 and negative["prompt"] == "tumor"  # class-name fallback
    # BUSI's original layout: images and "_mask" files side by side in one folder.
    shared = tmp_path / "shared"
    save(shared / "c.png", rgb(6, 6, 4))
    save(shared / "c_mask.png", block_mask(6, 6, (0, 3), (0, 3)))
    same = ImageMaskPromptDataset.from_folder(shared, images=".", masks=".", mask_suffix="_mask")
    assert [s.image.name for s in same.samples] == ["c.png"]
    assert same[0]["mask"].mean() == pytest.approx(0.25)
    # 0/1 masks need mask_threshold=0.
    save(root / "masks" / "1_benign_mask.png", block_mask(10, 12, (2, 6), (3, 9), value=1))
    assert ImageMaskPromptDataset.from_folder(root, mask_suffix="_mask")[0]["mask"].sum() == 0
    zero_one = ImageMaskPromptDataset.from_folder(
        root, mask_suffix="_mask", mask_threshold=0, image_size=None
    )
    assert zero_one[0]["mask"].sum() == 24


def test_multiclass_label_maps_expand_per_class(tmp_path):
    root = tmp_path / "camus"
    labels = [np.zeros((8, 8), np.uint8) for _ in range(3)]
    labels[0][1:3, 1:3], labels[0][5:7, 5:8] = 1, 2  # LV cavity and myocardium
    labels[1][0:2, 6:8] = 3  # left atrium only
    for i, lab in enumerate(labels):  # labels[2]: no structure at all
        save(root / "images" / f"p{i}.png", rgb(8, 8, 10 + i))
        save(root / "masks" / f"p{i}.png", lab)
    (root / "prompts.json").write_text(json.dumps({"p0": {"Myocardium": "heart muscle"}}))
    (root / "metadata.json").write_text(json.dumps({"p1.png": {"view": "2CH", "age": 50}}))
    ds = ImageMaskPromptDataset.from_folder(root, classes=CAMUS_CLASSES, image_size=None)
    assert ds.samples[2].metadata == {"view": "2CH", "age": 50}  # keyed by file name
    got = [(s.image.stem, s.class_value) for s in ds.samples]
    # Present classes per image; the empty image is kept as one negative per class.
    assert got == [("p0", 1), ("p0", 2), ("p1", 3), ("p2", 1), ("p2", 2), ("p2", 3)]
    for i, sample in enumerate(ds.samples):
        lab = labels[int(sample.image.stem[1])]
        expected = torch.from_numpy(lab == sample.class_value).float()[None]
        assert torch.equal(ds[i]["mask"], expected)
    assert ds[0]["prompt"] == "Left ventricular cavity"
    assert ds[1]["prompt"] == "heart muscle"  # per-class entry of prompts.json
    assert ds[3]["mask"].sum() == 0 and ds[3]["prompt"] == "Left ventricular cavity"
    # CAMUS templates fed by metadata.json (either of the two released variants); the age
    # clause "of a fifty-year-old <sex>" needs the sex, which p1 lacks, so it drops out.
    camus = ImageMaskPromptDataset.from_folder(
        root, classes=CAMUS_CLASSES, templates="camus", prompt_key="p5", image_size=None
    )
    assert camus[2]["prompt"] in {
        "Left atrium cavity in two-chamber view of the heart.",
        "Left atrium cavity in two-chamber view in the cardiac ultrasound.",
    }
    negative = {"No Myocardium of the heart.", "No Myocardium in the cardiac ultrasound."}
    assert camus[4]["prompt"] in negative
    everything = ImageMaskPromptDataset.from_folder(
        root, classes=CAMUS_CLASSES, absent_classes=True
    )
    assert len(everything) == 9
    assert everything.class_names == tuple(CAMUS_CLASSES.values())
    # A list of names maps to values 1, 2, ...
    listed = ImageMaskPromptDataset.from_folder(
        root, classes=["lv", "myo", "la"], prompts_file=None
    )
    assert [s.class_name for s in listed.samples][:3] == ["lv", "myo", "la"]
    (root / "prompts.json").write_text(json.dumps({"p0": {"p1": "oops"}}))
    with pytest.raises(ValueError, match=r"image 'p0.png' in the prompts file must map class"):
        ImageMaskPromptDataset.from_folder(root, classes=CAMUS_CLASSES)


def test_palette_and_16_bit_files(tmp_path):
    root = tmp_path / "odd"
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    save(root / "images" / "x.png", sixteen)
    palette = Image.fromarray(block_mask(8, 8, (0, 8), (0, 2), value=2)).convert("P")
    (root / "masks").mkdir()
    palette.save(root / "masks" / "x.png")
    assert Image.open(root / "masks" / "x.png").mode == "P"
    ds = ImageMaskPromptDataset.from_folder(root, classes={2: "vessel"}, image_size=None)
    item = ds[0]
    assert item["mask"].sum() == 16
    top_bits = torch.from_numpy((sixteen >> 8).astype(np.float32)) / 255
    torch.testing.assert_close(item["image"], top_bits.expand(3, -1, -1), rtol=0, atol=0)


# --------------------------------------------------------------------------- templates, transforms
@pytest.fixture
def polyp_folder(tmp_path):
    """32x32 white images with a pink 6x6 polyp in the top-right cell."""
    root = tmp_path / "polyps"
    image = np.full((32, 32, 3), 255, np.uint8)
    image[3:9, 23:29] = (242, 153, 166)
    save(root / "images" / "a.png", image)
    save(root / "masks" / "a.png", block_mask(32, 32, (3, 9), (23, 29)))
    return root


def test_attribute_templates_follow_the_augmented_mask(polyp_folder):
    kw = {"templates": "endoscopy", "prompt_key": "p6", "image_size": 32}
    ds = ImageMaskPromptDataset.from_folder(polyp_folder, **kw)
    # 36 px of 1024 = 0.035 -> small; centroid (5.5, 25.5) -> top right; mean colour pink; too
    # few pixels to call the square irregular, so round.
    assert ds[0]["prompt"] == "one small pink round polyp, located in top right of the image"
    flipped = ImageMaskPromptDataset.from_folder(
        polyp_folder, transform=v2.RandomHorizontalFlip(p=1.0), **kw
    )
    item, plain = flipped[0], ds[0]
    assert torch.equal(item["mask"], plain["mask"].flip(-1))
    assert torch.equal(item["image"], plain["image"].flip(-1))
    assert item["prompt"].endswith("located in top left of the image")
    # Templates take the class name of the sample.
    named = ImageMaskPromptDataset.from_folder(
        polyp_folder, class_name="adenoma", templates="endoscopy", prompt_key="p1"
    )
    assert named[0]["prompt"] == "adenoma"


def test_normalisation_and_seeded_augmentation(polyp_folder):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    plain = ImageMaskPromptDataset.from_folder(polyp_folder, image_size=24)
    norm = ImageMaskPromptDataset.from_folder(polyp_folder, image_size=24, mean=mean, std=std)
    expected = (plain[0]["image"] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    torch.testing.assert_close(norm[0]["image"], expected)
    augment = v2.Compose([v2.RandomAffine(degrees=30, translate=(0.2, 0.2)), v2.ColorJitter(0.3)])
    ds = ImageMaskPromptDataset.from_folder(polyp_folder, image_size=24, transform=augment, seed=7)
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    outputs = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        outputs.add(ds[0]["mask"].numpy().tobytes())
    assert len(outputs) > 1
    # The dataset's seeding leaves the global torch generator untouched.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    ds[0]
    assert torch.equal(torch.rand(1), before)
    # Without a seed, augmentation follows the global generator.
    free = ImageMaskPromptDataset.from_folder(polyp_folder, image_size=24, transform=augment)
    torch.manual_seed(5)
    first = free[0]["image"]
    torch.manual_seed(5)
    assert torch.equal(free[0]["image"], first)


# --------------------------------------------------------------------------- errors
def test_missing_files_are_named(medvlsm_root, tmp_path):
    (medvlsm_root / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 dataset file\(s\) missing: '.*images/b.png'"):
        ImageMaskPromptDataset.from_medvlsm(medvlsm_root)
    with pytest.raises(FileNotFoundError, match=r"annotation file '.*anns/val.json'"):
        ImageMaskPromptDataset.from_medvlsm(medvlsm_root, "val")
    folder = tmp_path / "folder"
    save(folder / "images" / "z.png", rgb(4, 4, 0))
    (folder / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no mask for image '.*z.png'.*masks/z_seg"):
        ImageMaskPromptDataset.from_folder(folder, mask_suffix="_seg")
    with pytest.raises(FileNotFoundError, match="image folder"):
        ImageMaskPromptDataset.from_folder(tmp_path / "nowhere")


def test_unreadable_and_mismatched_files_are_named(medvlsm_root):
    (medvlsm_root / "images" / "a.png").write_bytes(b"not a png at all")
    ds = ImageMaskPromptDataset.from_medvlsm(medvlsm_root)
    with pytest.raises(ValueError, match=r"cannot read image file '.*images/a.png'"):
        ds[0]
    save(medvlsm_root / "images" / "b.png", rgb(9, 8, 0))
    with pytest.raises(
        ValueError, match=r"mask '.*masks/b.jpg' has size \(H, W\) = \(8, 8\) but image"
    ):
        ds[1]


def test_bad_annotations_and_options(medvlsm_root):
    path = medvlsm_root / "anns" / "bad.json"
    path.write_text(json.dumps([{"img_name": "a.png", "prompts": {"p1": "x"}}]))
    with pytest.raises(ValueError, match=r"entry 0 of annotation file '.*bad.json'.*mask_name"):
        ImageMaskPromptDataset.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageMaskPromptDataset.from_json(path)
    path.write_text(
        json.dumps([{"img_name": "a.png", "mask_name": "a.png", "prompts": {"p1": []}}])
    )
    with pytest.raises(ValueError, match="non-empty list of strings"):
        ImageMaskPromptDataset.from_json(path)
    ds = ImageMaskPromptDataset.from_medvlsm(medvlsm_root, prompt_key="p7")
    with pytest.raises(KeyError, match=r"prompt key\(s\) \['p7'\].*'a.png'.*\['p0', 'p1', 'p2'\]"):
        ds[0]
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    grow = ImageMaskPromptDataset.from_medvlsm(
        medvlsm_root, image_size=8, transform=v2.Resize((12, 12))
    )
    with pytest.raises(ValueError, match=r"transform must return .* \(H, W\) = \(8, 8\)"):
        grow[0]
    for kwargs, match in (
        ({"image_size": 4}, "image_size"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"std": (1.0, 0.0, 1.0)}, "std must be positive"),
        ({"templates": 3}, "templates"),
        ({"prompt_key": []}, "prompt_key"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=match):
            ImageMaskPromptDataset.from_medvlsm(medvlsm_root, **kwargs)
    with pytest.raises(KeyError, match="unknown prompt template family"):
        ImageMaskPromptDataset.from_medvlsm(medvlsm_root, templates="brain")
    with pytest.raises(ValueError, match="classes must map"):
        ImageMaskPromptDataset.from_folder(medvlsm_root, classes={"1": "x"})
    with pytest.raises(ValueError, match="SegmentationSample"):
        ImageMaskPromptDataset([("a.png", "a.png")])
    sample = SegmentationSample(medvlsm_root / "images" / "a.png", medvlsm_root / "masks" / "a.png")
    assert ImageMaskPromptDataset([sample], image_size=None)[0]["prompt"] == ""
