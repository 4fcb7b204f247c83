"""SyntheticLesions, the connected-components helper and the attribute prompts built from masks."""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlsegkit.data import (
    SyntheticLesions,
    attribute_prompt,
    collate_prompts,
    connected_components,
    mask_attributes,
)

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five"]


# --------------------------------------------------------------------------- slow references
def bfs_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Flood fill in raster order: the obviously-correct labelling the fast helper must match."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    labels = np.zeros((h, w), dtype=np.int32)
    num = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                num += 1
                labels[y, x] = num
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = num
                            queue.append((ny, nx))
    return labels, num


def pixel_moments(mask: np.ndarray) -> list[tuple[float, ...]]:
    """Per component (largest first): area, centroid, axis ratio, IoU with the moment ellipse."""
    labels, num = bfs_labels(mask, 8)
    out = []
    for k in range(1, num + 1):
        ys, xs = np.nonzero(labels == k)
        pts = np.stack([ys, xs], 1).astype(np.float64)
        centred = pts - pts.mean(0)
        cov = centred.T @ centred / len(pts) + np.eye(2) / 12
        inside = np.einsum("ni,ij,nj->n", centred, np.linalg.inv(cov), centred) <= 4
        evals = np.linalg.eigvalsh(cov)
        ellipse_area = 4 * math.pi * math.sqrt(evals.prod())
        iou = inside.sum() / (len(pts) + ellipse_area - inside.sum())
        out.append((len(pts), *pts.mean(0), math.sqrt(evals[1] / evals[0]), iou))
    return sorted(out, key=lambda t: -t[0])


def disk(h: int, w: int, cy: float, cx: float, r: float, ratio: float = 1.0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / (r / math.sqrt(ratio))) ** 2 + ((x - cx) / (r * math.sqrt(ratio))) ** 2 <= 1


# --------------------------------------------------------------------------- connected components
@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_flood_fill(connectivity):
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 17), (23, 1), (12, 12), (31, 20), (40, 57)]
    for trial in range(30):
        h, w = shapes[trial % len(shapes)]
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.7)
        labels, num = connected_components(mask, connectivity=connectivity)
        ref, ref_num = bfs_labels(mask, connectivity)
        assert num == ref_num
        np.testing.assert_array_equal(labels, ref)
    for mask in (np.zeros((5, 7), bool), np.ones((5, 7), bool)):
        labels, num = connected_components(mask, connectivity=connectivity)
        assert num == int(mask.any())
        np.testing.assert_array_equal(labels, mask.astype(np.int32))


def test_connectivity_corner_touching():
    mask = np.zeros((10, 10), bool)
    mask[0:5, 0:5] = True
    mask[5:10, 5:10] = True  # touches the first square only at a corner
    assert connected_components(mask, connectivity=8)[1] == 1
    assert connected_components(mask, connectivity=4)[1] == 2
    assert connected_components(torch.from_numpy(mask), connectivity=4)[1] == 2
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(mask, connectivity=6)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        connected_components(np.zeros((2, 3, 4)))


# --------------------------------------------------------------------------- attributes
def test_attribute_statistics_match_pixel_reference():
    ds = SyntheticLesions(length=12, image_size=(72, 96), seed=4)
    for i in range(len(ds)):
        mask = ds.render(i)[1]
        got = mask_attributes(mask, min_area_fraction=0)
        ref = pixel_moments(mask)
        assert len(got) == len(ref)
        for g, (area, cy, cx, ratio, iou) in zip(got, ref):
            assert g.area_fraction == pytest.approx(area / mask.size, abs=1e-12)
            assert g.centroid == pytest.approx((cy, cx), abs=1e-9)
            assert g.axis_ratio == pytest.approx(ratio, rel=1e-9)
            assert g.ellipse_iou == pytest.approx(iou, abs=1e-9)


def test_prompt_single_lesion_words():
    mask = disk(96, 96, 15, 15, 10)  # 317 px = 3.4 % of the image
    assert attribute_prompt(mask) == "one small round lesion at the top left of the image"
    assert (
        attribute_prompt(mask, noun="polyp") == "one small round polyp at the top left of the image"
    )
    large = disk(100, 100, 50, 50, 35)  # 38 % of the image
    assert attribute_prompt(large) == "one large round lesion in the center of the image"
    oval = disk(100, 100, 80, 50, 12, ratio=2.5)
    assert attribute_prompt(oval) == "one small oval lesion at the bottom of the image"
    cross = np.zeros((100, 100), bool)
    cross[40:60, 20:80] = True
    cross[20:80, 40:60] = True
    assert attribute_prompt(cross) == "one medium irregular lesion in the center of the image"


@pytest.mark.parametrize(
    ("row", "col", "phrase"),
    [
        (0, 0, "at the top left"),
        (0, 1, "at the top"),
        (0, 2, "at the top right"),
        (1, 0, "on the left"),
        (1, 1, "in the center"),
        (1, 2, "on the right"),
        (2, 0, "at the bottom left"),
        (2, 1, "at the bottom"),
        (2, 2, "at the bottom right"),
    ],
)
def test_prompt_locations_on_non_square_grid(row, col, phrase):
    h, w = 90, 150
    mask = disk(h, w, (row + 0.5) * h / 3, (col + 0.5) * w / 3, 6)
    assert attribute_prompt(mask) == f"one small round lesion {phrase} of the image"


def test_prompt_several_lesions_largest_first_and_overlap_merges():
    h = w = 200
    big = disk(h, w, 100, 100, 40, ratio=2.0)  # 12.6 % -> medium oval
    tiny = disk(h, w, 185, 185, 3)  # 29 px = 0.07 % -> tiny
    assert (
        attribute_prompt(big | tiny) == "two lesions, one medium oval lesion in the center and one "
        "tiny round lesion at the bottom right of the image"
    )
    # Two drawn discs that overlap are one lesion, and no longer round.
    merged = disk(h, w, 100, 80, 25) | disk(h, w, 100, 120, 25)
    comps = mask_attributes(merged)
    assert len(comps) == 1 and comps[0].shape != "round"
    assert attribute_prompt(merged).startswith("one medium ")


def test_prompt_empty_specks_and_many_components():
    assert attribute_prompt(np.zeros((50, 50))) == "no lesion in the image"
    speck = np.zeros((200, 200), bool)
    speck[10, 10] = True  # 1 px = 2.5e-5 of the image <= 1e-4: ignored as noise
    assert attribute_prompt(speck) == "no lesion in the image"
    assert (
        attribute_prompt(speck, min_area_fraction=0)
        == "one tiny round lesion at the top left of the image"
    )
    five = np.zeros((100, 300), bool)
    for k, r in enumerate([9, 8, 7, 5, 4]):
        five |= disk(100, 300, 50, 30 + 60 * k, r)
    prompt = attribute_prompt(five)
    assert prompt.startswith("five lesions, one small round lesion on the left, ")
    assert prompt.endswith(" of the image, plus two smaller lesions")
    with pytest.raises(ValueError, match="max_listed"):
        attribute_prompt(five, max_listed=0)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_attributes(np.zeros((2, 5, 5)))


# --------------------------------------------------------------------------- dataset
def test_items_shapes_and_prompts_from_mask():
    ds = SyntheticLesions(length=10, image_size=64, seed=0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
        mask = item["mask"][0].numpy() > 0
        assert item["prompt"] == attribute_prompt(mask)
        # The number word agrees with an independent flood-fill count of the mask.
        num = bfs_labels(mask, 8)[1]
        assert 1 <= num <= 3
        assert item["prompt"].split()[0] == NUMBER_WORDS[num]


def test_determinism_any_order_instance_and_worker():
    ds = SyntheticLesions(length=8, image_size=48, seed=7)
    forward = [ds[i] for i in range(8)]
    backward = [ds[i] for i in reversed(range(8))][::-1]
    fresh = SyntheticLesions(length=8, image_size=48, seed=7)
    for a, b in zip(forward, backward):
        assert torch.equal(a["image"], b["image"]) and a["prompt"] == b["prompt"]
    for i in (3, 5, -1):
        assert torch.equal(fresh[i]["image"], ds[i]["image"])
        assert torch.equal(fresh[i]["mask"], ds[i]["mask"])
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=collate_prompts)
    for batch in loader:
        for j, index in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["image"][j], forward[index]["image"])
            assert torch.equal(batch["mask"][j], forward[index]["mask"])
            assert batch["prompt"][j] == forward[index]["prompt"]
    other = SyntheticLesions(length=8, image_size=48, seed=8)
    assert not torch.equal(other[0]["image"], ds[0]["image"])
    assert not torch.equal(ds[0]["image"], ds[1]["image"])


def test_negative_fraction_and_class_prompts():
    ds = SyntheticLesions(length=20, image_size=40, seed=1, negative_fraction=0.25)
    negatives = [i for i in range(20) if ds.is_negative(i)]
    assert len(negatives) == 5
    for i in range(20):
        item = ds[i]
        if i in negatives:
            assert item["mask"].sum() == 0 and item["prompt"] == "no lesion in the image"
        else:
            assert item["mask"].sum() > 0 and item["prompt"] != "no lesion in the image"
    assert all(
        SyntheticLesions(length=4, image_size=32, negative_fraction=1.0)[i]["mask"].sum() == 0
        for i in range(4)
    )
    cls = SyntheticLesions(
        length=20, image_size=40, seed=1, negative_fraction=0.25, prompt_style="class"
    )
    for i in (0, negatives[0]):
        assert cls[i]["prompt"] == "lesion"
        assert torch.equal(cls[i]["image"], ds[i]["image"])


def test_normalisation_and_non_square_size():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = SyntheticLesions(length=3, image_size=(40, 56), seed=2)
    norm = SyntheticLesions(length=3, image_size=(40, 56), seed=2, mean=mean, std=std)
    item, ref = norm[1], raw[1]
    assert item["image"].shape == (3, 40, 56) and item["mask"].shape == (1, 40, 56)
    expected = (ref["image"] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)
    assert torch.equal(item["mask"], ref["mask"])
    shifted = SyntheticLesions(length=3, image_size=(40, 56), seed=2, mean=0.5)
    torch.testing.assert_close(shifted[1]["image"], ref["image"] - 0.5, rtol=0, atol=1e-6)


def test_variety_and_visible_lesions():
    ds = SyntheticLesions(length=60, image_size=96, seed=3)
    counts, shapes, sizes, locations, contrast = set(), set(), set(), set(), []
    reds = []
    for i in range(len(ds)):
        image, mask = ds.render(i)
        comps = mask_attributes(mask)
        counts.add(len(comps))
        shapes.update(c.shape for c in comps)
        sizes.update(c.size for c in comps)
        locations.update(c.location for c in comps)
        # Lesion vs a ring of background around it: the task must be learnable from pixels.
        ring = bfs_dilate(mask, 4) & ~mask
        contrast.append(np.abs(image[:, mask].mean(1) - image[:, ring].mean(1)).max())
        reds.append(image[0].mean() - image[1].mean())
    assert counts == {1, 2, 3}
    assert shapes == {"round", "oval", "irregular"}
    assert len(sizes) >= 3 and len(locations) >= 8
    assert np.median(contrast) > 0.1
    assert np.std(reds) > 0.03  # both skin-like and mucosa-like colourings occur


def bfs_dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_generation_is_fast():
    for size, budget_ms in ((64, 15), (352, 60)):  # generous: CI machines are shared
        ds = SyntheticLesions(length=20, image_size=size, seed=0)
        ds[0]
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        assert (time.perf_counter() - start) / len(ds) * 1e3 < budget_ms


def test_collate_prompts():
    ds = SyntheticLesions(length=4, image_size=32, seed=0)
    items = [ds[i] for i in range(3)]
    batch = collate_prompts(items)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 1, 32, 32)
    assert batch["prompt"] == [it["prompt"] for it in items]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]
    assert torch.equal(batch["image"][2], items[2]["image"])
    with pytest.raises(ValueError, match="at least one"):
        collate_prompts([])
    odd = SyntheticLesions(length=1, image_size=40)[0]
    with pytest.raises(ValueError, match=r"'image'.*same shape"):
        collate_prompts([items[0], odd])
    with pytest.raises(ValueError, match="keys"):
        collate_prompts([items[0], {"image": items[1]["image"]}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": -1}, "length"),
        ({"image_size": (4, 32)}, "image_size"),
        ({"image_size": (32, 32, 3)}, "image_size"),
        ({"negative_fraction": 1.5}, "negative_fraction"),
        ({"prompt_style": "sentence"}, "prompt_style"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticLesions(**kwargs)


def test_index_out_of_range():
    ds = SyntheticLesions(length=3, image_size=32)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    assert ds[np.int64(2)]["index"] == 2
