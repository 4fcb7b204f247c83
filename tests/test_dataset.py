"""ImageMaskPromptDataset on tiny PNG/JPEG datasets written to tmp_path: the medvlsm JSON layout,
plain folders, multi-class expansion, prompt choice, attribute templates, joint augmentation,
determinism and the errors that name the offending file."""

from __future__ import annotations

import json
import warnings
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
from vlsegkit.data.images import to_image_tensor


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
    # 0/1 masks are detected as such (they used to need mask_threshold=0 and were silently
    # empty under the old default threshold of 127, which now raises instead).
    save(root / "masks" / "1_benign_mask.png", block_mask(10, 12, (2, 6), (3, 9), value=1))
    detected = ImageMaskPromptDataset.from_folder(root, mask_suffix="_mask", image_size=None)
    assert detected[0]["mask"].sum() == 24
    zero_one = ImageMaskPromptDataset.from_folder(
        root, mask_suffix="_mask", mask_threshold=0, image_size=None
    )
    assert zero_one[0]["mask"].sum() == 24
    with pytest.raises(
        ValueError, match=r"mask_threshold=127 is not below the largest value \(1\)"
    ):
        ImageMaskPromptDataset.from_folder(root, mask_suffix="_mask", mask_threshold=127)


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
    # 16-bit images keep their 16 bits (they used to lose the low 8), the same as to_image_tensor
    # gives predict for the same file.
    full = torch.from_numpy(sixteen.astype(np.float64) / 65535).float()
    torch.testing.assert_close(item["image"], full.expand(3, -1, -1), rtol=0, atol=1e-7)
    same = to_image_tensor(Image.open(root / "images" / "x.png"))
    assert torch.equal(item["image"], same)


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


# --------------------------------------------------------------------------- mask encodings
# Each case writes a mask file whose foreground is known by construction (BLOCK: rows 2-5,
# columns 3-8 of a 10 x 12 image, 4 * 6 = 24 pixels) and checks the sample's mask against it.
BLOCK = block_mask(10, 12, (2, 6), (3, 9), value=1).astype(bool)


def one_image_folder(tmp_path, mask_writer, name="m.png"):
    """``<tmp>/enc/{images/m.png, masks/<name>}`` with the mask written by ``mask_writer(path)``."""
    root = tmp_path / "enc"
    save(root / "images" / "m.png", rgb(10, 12, 5))
    (root / "masks").mkdir(parents=True)
    mask_writer(root / "masks" / name)
    return root


def read_block(root, **kwargs):
    ds = ImageMaskPromptDataset.from_folder(root, image_size=None, **kwargs)
    return ds[0]["mask"][0].numpy().astype(bool)


def palette_image(index, colours):
    img = Image.fromarray(index.astype(np.uint8), mode="P")
    img.putpalette([c for colour in colours for c in colour])
    return img


@pytest.mark.parametrize(
    "writer",
    [
        # 0/1 and 0/255 greyscale, 8 and 16 bits (0/1 used to be read as all background).
        lambda p: Image.fromarray(BLOCK.astype(np.uint8)).save(p),
        lambda p: Image.fromarray(BLOCK.astype(np.uint8) * 255).save(p),
        lambda p: Image.fromarray(BLOCK.astype(np.uint16)).save(p),
        lambda p: Image.fromarray(BLOCK.astype(np.uint16) * 255).save(p),
        lambda p: Image.fromarray(BLOCK.astype(np.uint16) * 65535).save(p),
        # Bilevel.
        lambda p: Image.fromarray(BLOCK).save(p),
        # Palette: index 1 with a white colour, and index 5 whose colour is white (grey palette).
        lambda p: palette_image(BLOCK, [(0, 0, 0), (255, 255, 255)]).save(p),
        lambda p: palette_image(BLOCK * 5, [(0, 0, 0)] * 5 + [(255, 255, 255)]).save(p),
        # Grey-looking RGB and RGBA (alpha ignored), 0/1 and 0/255.
        lambda p: Image.fromarray(np.repeat(BLOCK[..., None], 3, -1).astype(np.uint8)).save(p),
        lambda p: Image.fromarray(
            np.concatenate(
                [np.repeat(BLOCK[..., None], 3, -1) * 255, np.full((10, 12, 1), 128)], axis=-1
            ).astype(np.uint8)
        ).save(p),
        # Grey with alpha.
        lambda p: Image.fromarray(
            np.stack([BLOCK * 255, np.full((10, 12), 255)], -1).astype(np.uint8), mode="LA"
        ).save(p),
    ],
    ids=[
        "01-8bit",
        "0-255-8bit",
        "01-16bit",
        "0-255-16bit",
        "0-65535-16bit",
        "bilevel",
        "palette-01",
        "palette-grey-colour",
        "rgb-01",
        "rgba-0-255",
        "la-0-255",
    ],
)
def test_binary_mask_encodings_are_detected_per_file(tmp_path, writer):
    root = one_image_folder(tmp_path, writer)
    assert np.array_equal(read_block(root), BLOCK)


def test_float_tiff_masks(tmp_path):
    root = one_image_folder(
        tmp_path, lambda p: Image.fromarray(BLOCK.astype(np.float32)).save(p), "m.tif"
    )
    assert np.array_equal(read_block(root), BLOCK)
    soft = np.where(BLOCK, 0.75, 0.125).astype(np.float32)
    Image.fromarray(soft).save(root / "masks" / "m.tif")
    with pytest.raises(
        ValueError, match=r"m.tif' \(float \(mode 'F'\)\) has values \{0.125, 0.75\}"
    ):
        read_block(root)
    assert np.array_equal(read_block(root, mask_threshold=0.5), BLOCK)


def test_encodings_differ_between_files_of_one_dataset(tmp_path):
    root = tmp_path / "mixed"
    for i, (scale, dtype) in enumerate([(1, np.uint8), (255, np.uint8), (65535, np.uint16)]):
        save(root / "images" / f"{i}.png", rgb(10, 12, i))
        save(root / "masks" / f"{i}.png", BLOCK.astype(dtype) * dtype(scale))
    ds = ImageMaskPromptDataset.from_folder(root, image_size=None)
    for i in range(3):
        assert np.array_equal(ds[i]["mask"][0].numpy().astype(bool), BLOCK)


def test_json_layout_reads_0_1_masks_and_takes_mask_values(tmp_path):
    root = tmp_path / "json01"
    save(root / "images" / "a.png", rgb(10, 12, 0))
    save(root / "masks" / "a.png", BLOCK.astype(np.uint8))
    labels = BLOCK.astype(np.uint8) * 7
    labels[0, 0] = 200
    save(root / "masks" / "b.png", labels)
    entries = [
        {"img_name": "a.png", "mask_name": m, "prompts": "polyp"} for m in ("a.png", "b.png")
    ]
    (root / "anns").mkdir()
    (root / "anns" / "train.json").write_text(json.dumps(entries[:1]))
    (root / "anns" / "two.json").write_text(json.dumps(entries))
    ds = ImageMaskPromptDataset.from_medvlsm(root, image_size=None)
    assert np.array_equal(ds[0]["mask"][0].numpy().astype(bool), BLOCK)
    # {0, 7, 200} fits no binary encoding: a clear error, already at construction.
    with pytest.raises(ValueError, match=r"mask '.*b.png' \(8-bit grey.*\{0, 7, 200\}.*classes="):
        ImageMaskPromptDataset.from_json(root / "anns" / "two.json")
    picked = ImageMaskPromptDataset.from_json(
        root / "anns" / "two.json", mask_values=(1, 7), image_size=None
    )
    assert np.array_equal(picked[1]["mask"][0].numpy().astype(bool), BLOCK)
    assert np.array_equal(picked[0]["mask"][0].numpy().astype(bool), BLOCK)
    with pytest.raises(ValueError, match=r"mask '.*a.png'.*\{0, 1\}, none of them in mask_values"):
        ImageMaskPromptDataset.from_json(root / "anns" / "two.json", mask_values=255)


def test_masks_that_fit_no_encoding_raise_naming_the_file(tmp_path):
    red = np.zeros((10, 12, 3), np.uint8)
    red[BLOCK] = (255, 0, 0)  # read through luminance (76) it used to be all background
    root = one_image_folder(tmp_path, lambda p: Image.fromarray(red).save(p))
    with pytest.raises(ValueError, match=r"mask '.*m.png' is a colour image \(mode 'RGB'\).*"):
        read_block(root)
    palette_image(BLOCK * 5, [(0, 0, 0)] * 5 + [(255, 0, 0)]).save(root / "masks" / "m.png")
    with pytest.raises(ValueError, match=r"mask '.*m.png' \(palette \(mode 'P'\)\) has values"):
        read_block(root)
    # The same palette mask with explicit values, and as a label map.
    assert np.array_equal(read_block(root, mask_values=[5]), BLOCK)
    assert np.array_equal(read_block(root, classes={5: "lesion"}), BLOCK)


def test_mask_threshold_and_mask_values_options(tmp_path):
    grey = np.where(BLOCK, 180, 60).astype(np.uint8)
    root = one_image_folder(tmp_path, lambda p: Image.fromarray(grey).save(p))
    with pytest.raises(ValueError, match=r"\{60, 180\}, which fit no binary mask encoding"):
        read_block(root)
    assert np.array_equal(read_block(root, mask_threshold=100), BLOCK)
    assert np.array_equal(read_block(root, mask_values=180), BLOCK)
    with pytest.raises(ValueError, match=r"mask_threshold=180 is not below the largest value"):
        read_block(root, mask_threshold=180)
    with pytest.raises(ValueError, match=r"mask_threshold=300 is not below the largest value a"):
        read_block(root, mask_threshold=300)
    for kwargs, match in (
        ({"mask_threshold": -1}, "mask_threshold must be None"),
        ({"mask_threshold": float("nan")}, "mask_threshold must be None"),
        ({"mask_threshold": True}, "mask_threshold must be None"),
        ({"mask_threshold": "127"}, "mask_threshold must be None"),
        ({"mask_values": []}, "mask_values must be"),
        ({"mask_values": -1}, "mask_values must be"),
        ({"mask_values": (1.5,)}, "mask_values must be"),
        ({"mask_values": True}, "mask_values must be"),
        ({"mask_values": "255"}, "mask_values must be"),
        ({"mask_values": 1, "mask_threshold": 0}, "exclusive"),
        ({"check_masks": -1}, "check_masks"),
    ):
        with pytest.raises(ValueError, match=match):
            ImageMaskPromptDataset.from_folder(root, **kwargs)


def test_all_empty_masks_warn_once_with_the_count(tmp_path):
    root = tmp_path / "empty"
    for i in range(20):
        save(root / "images" / f"{i:02d}.png", rgb(6, 6, i))
        save(root / "masks" / f"{i:02d}.png", np.zeros((6, 6), np.uint8))
    with pytest.warns(UserWarning, match=r"all 16 masks checked of the 20 samples are empty"):
        ImageMaskPromptDataset.from_folder(root)
    with pytest.warns(UserWarning, match=r"all 3 masks checked of the 20 samples are empty"):
        ImageMaskPromptDataset.from_folder(root, check_masks=3)
    # The last file is among the evenly spaced ones checked: one foreground pixel, no warning.
    save(root / "masks" / "19.png", block_mask(6, 6, (0, 1), (0, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageMaskPromptDataset.from_folder(root)
        # check_masks=0 reads no mask at construction: a broken one is found at item time.
        (root / "masks" / "00.png").write_bytes(b"broken")
        lazy = ImageMaskPromptDataset.from_folder(root, check_masks=0)
    with pytest.raises(ValueError, match=r"cannot read mask file '.*00.png'"):
        lazy[0]
    with pytest.raises(ValueError, match=r"cannot read mask file '.*00.png'"):
        ImageMaskPromptDataset.from_folder(root)


def test_image_files_convert_like_to_image_tensor(tmp_path):
    root = tmp_path / "imgs"
    rgba = np.random.default_rng(9).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    save(root / "images" / "rgba.png", rgba)
    index = np.random.default_rng(9).integers(0, 3, (10, 12), dtype=np.uint8)
    palette_image(index, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]).save(root / "images" / "pal.png")
    Image.fromarray(np.full((10, 12), 0.5, np.float32)).save(root / "images" / "half.tif")
    for stem in ("rgba", "pal", "half"):
        save(root / "masks" / f"{stem}.png", BLOCK.astype(np.uint8))
    ds = ImageMaskPromptDataset.from_folder(root, image_size=None)
    by_name = {s.image.stem: i for i, s in enumerate(ds.samples)}
    expected_rgba = torch.from_numpy(rgba[..., :3].astype(np.float64) / 255).permute(2, 0, 1)
    torch.testing.assert_close(ds[by_name["rgba"]]["image"], expected_rgba.float())
    colours = torch.eye(3)[torch.from_numpy(index).long()].permute(2, 0, 1)  # red, green, blue
    assert torch.equal(ds[by_name["pal"]]["image"], colours)
    assert torch.equal(ds[by_name["half"]]["image"], torch.full((3, 10, 12), 0.5))
    for stem, i in by_name.items():
        same = to_image_tensor(Image.open(ds.samples[i].image))
        assert torch.equal(ds[i]["image"], same), stem
    # Float files outside [0, 1] raise, naming the file.
    Image.fromarray(np.full((10, 12), 200.0, np.float32)).save(root / "images" / "half.tif")
    with pytest.raises(ValueError, match=r"image file '.*half.tif': image: float images must be"):
        ds[by_name["half"]]


def test_16_bit_images_resize_and_augment_as_float(tmp_path):
    root = tmp_path / "sixteen"
    ramp = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 655).astype(np.uint16)
    save(root / "images" / "a.png", ramp)
    save(root / "masks" / "a.png", block_mask(10, 10, (2, 6), (3, 9)))
    seen = {}

    def spy(image, mask):
        seen["dtype"] = image.dtype
        return image, mask

    ds = ImageMaskPromptDataset.from_folder(
        root, image_size=20, interpolation="bicubic", transform=spy
    )
    item = ds[0]
    assert seen["dtype"] == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    raw, _ = ds.load(0)
    torch.testing.assert_close(raw[0], torch.from_numpy(ramp / 65535.0).float(), rtol=0, atol=1e-7)
