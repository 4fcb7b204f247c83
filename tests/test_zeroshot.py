"""Zero-shot MedCLIP-SAMv2: post-processing, SAM refinement, the pipeline and ``vlsegkit zeroshot``.

Post-processing is checked against plain loops over the paper's equations (Otsu's between-class
variance, Eq. 18's component confidence) and the released rules (exhaustive 2-means, K largest
components, the union box clipped as ``prompt_sam.py`` does); SAM refinement against calling
transformers' ``SamProcessor`` + ``SamModel`` directly on the same prompts; the pipeline against its
parts run by hand. The CLIP and SAM models are tiny, random and built offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlsegkit import viz
from vlsegkit.cli import main
from vlsegkit.data import SyntheticLesions
from vlsegkit.testing import populate_hub_cache, save_tiny_clip, save_tiny_sam
from vlsegkit.uncertainty import derive_generators
from vlsegkit.zeroshot import (
    POINT_PAD_LABEL,
    MedCLIPSAM,
    SaliencyPrompter,
    SAMRefiner,
    component_statistics,
    keep_largest_components,
    otsu_threshold,
    two_means_threshold,
)


# ------------------------------------------------------------------------------ references
def _otsu_reference(values: np.ndarray, bins: int) -> float:
    """Otsu (1979) by brute force: every split of the histogram, between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_k = -1.0, None
    for k in range(bins - 1):
        w0, w1 = hist[: k + 1].sum(), hist[k + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[: k + 1] * centres[: k + 1]).sum() / w0
        m1 = (hist[k + 1 :] * centres[k + 1 :]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_k = between, k
    return edges[best_k + 1]


def _two_means_reference(values: np.ndarray) -> float:
    """1-D 2-means by brute force: the split of the sorted values with the least squared error."""
    v = np.sort(values.ravel())
    best, threshold = np.inf, None
    for k in range(1, len(v)):
        if v[k] == v[k - 1]:
            continue
        low, high = v[:k], v[k:]
        sse = ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()
        if sse < best - 1e-12:
            best, threshold = sse, v[k]
    return threshold


def _blobs(h=48, w=64, seed=0):
    """Two bright blobs, one dim plateau (above Otsu's threshold, mean below 0.5) and noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    s = np.exp(-((yy - 12) ** 2 + (xx - 14) ** 2) / 30.0)
    s += 0.9 * np.exp(-((yy - 34) ** 2 + (xx - 48) ** 2) / 20.0)
    s[30:40, 4:14] = np.maximum(s[30:40, 4:14], 0.42)
    s += 0.03 * np.random.default_rng(seed).random((h, w))
    return torch.from_numpy((s - s.min()) / (s.max() - s.min()))


# ------------------------------------------------------------------------------ post-processing
@pytest.mark.parametrize("bins", [16, 256])
def test_otsu_matches_brute_force(bins):
    rng = np.random.default_rng(bins)
    values = np.clip(np.concatenate([rng.normal(0.25, 0.08, 900), rng.normal(0.7, 0.1, 300)]), 0, 1)
    values = values.reshape(30, 40)
    threshold, fg = otsu_threshold(torch.from_numpy(values), bins=bins)
    assert threshold == pytest.approx(_otsu_reference(values, bins))
    assert torch.equal(fg, torch.from_numpy(values >= threshold))
    assert 0.35 < threshold < 0.6  # between the two modes


def test_two_means_matches_brute_force_and_lloyd():
    rng = np.random.default_rng(1)
    values = np.round(np.clip(rng.beta(0.6, 1.8, (24, 24)), 0, 1) * 255) / 255
    t, fg = two_means_threshold(torch.from_numpy(values))
    assert t == pytest.approx(_two_means_reference(values))
    assert torch.equal(fg, torch.from_numpy(values >= t))
    # Lloyd's iterations from the extremes reach the same partition
    c = np.array([values.min(), values.max()])
    for _ in range(100):
        high = np.abs(values - c[1]) < np.abs(values - c[0])
        c = np.array([values[~high].mean(), values[high].mean()])
    assert np.array_equal(high, fg.numpy())


def test_constant_maps_have_no_foreground():
    for fn in (otsu_threshold, two_means_threshold):
        t, fg = fn(torch.full((5, 6), 0.3, dtype=torch.float64))
        assert t == float("inf") and not fg.any()
    prompts = SaliencyPrompter()(torch.zeros(8, 8))
    assert prompts.empty and not prompts.coarse.any() and prompts.points.shape[0] == 0


def test_component_statistics_match_plain_loops():
    s = _blobs()
    mask = s > 0.3
    stats = component_statistics(mask, s)
    for k in range(len(stats.area)):
        ys, xs = np.nonzero(stats.labels == k + 1)
        assert stats.area[k] == len(ys)
        assert stats.confidence[k] == pytest.approx(float(s.numpy()[ys, xs].mean()))
        assert stats.boxes[k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_paper_path_keeps_confident_components_with_one_prompt_each():
    s = _blobs()
    prompts = SaliencyPrompter(num_points=5)(s, generator=torch.Generator().manual_seed(0))
    _, fg = otsu_threshold(s)
    stats = component_statistics(fg, s)
    confident = [k for k in range(len(stats.area)) if stats.confidence[k] > 0.5]
    assert len(stats.area) >= 3 and len(confident) == 2  # the plateau is cut by Eq. 19
    assert prompts.boxes.tolist() == stats.boxes[confident].tolist()
    assert prompts.confidence.tolist() == pytest.approx(stats.confidence[confident].tolist())
    expected = np.isin(stats.labels, [k + 1 for k in confident])
    assert torch.equal(prompts.coarse, torch.from_numpy(expected))
    assert prompts.points.shape == (2, 5, 2) and (prompts.point_labels == 1).all()
    for k, c in enumerate(confident):
        xy = prompts.points[k].long().numpy()
        assert (stats.labels[xy[:, 1], xy[:, 0]] == c + 1).all()  # inside its own component
        assert len({tuple(p) for p in xy.tolist()}) == 5  # drawn without replacement
    assert prompts.keep_components is None and prompts.saliency.shape == (48, 64)


def test_released_path_follows_the_scripts():
    s = _blobs()
    prompter = SaliencyPrompter(mode="released", num_points=7)
    prompts = prompter(s, size=(96, 128), generator=torch.Generator().manual_seed(1))
    # nearest-neighbour resize and an 8-bit PNG round trip
    big = s.float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.allclose(prompts.saliency, torch.round(big * 255) / 255)
    # 2-means on the 256x256 nearest-resized map, resized back
    small = torch.nn.functional.interpolate(prompts.saliency[None, None], size=(256, 256))[0, 0]
    t = _two_means_reference(small.double().numpy())
    fg = torch.nn.functional.interpolate((small >= t)[None, None].float(), size=(96, 128))[0, 0]
    stats = component_statistics(fg, prompts.saliency)
    largest = int(np.argmax(stats.area))
    assert torch.equal(prompts.coarse, torch.from_numpy(stats.labels == largest + 1))
    x0, y0, x1, y1 = stats.boxes[largest]
    assert prompts.boxes.tolist() == [[x0, y0, min(x1, 127), min(y1, 95)]]
    assert prompts.points.shape == (1, 7, 2) and prompts.keep_components == 1
    xy = prompts.points[0].long().numpy()
    assert prompts.coarse[xy[:, 1], xy[:, 0]].all()
    # two components, one box around both, or one per component
    two = SaliencyPrompter(mode="released", num_components=2)(s)
    both = SaliencyPrompter(mode="released", num_components=2, multicontour=True)(s)
    assert two.boxes.shape == (1, 4) and both.boxes.shape == (2, 4)
    assert two.boxes[0, 0] == both.boxes[:, 0].min() and two.boxes[0, 2] == both.boxes[:, 2].max()
    assert two.keep_components == 2


def test_keep_largest_components_keeps_ties():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0:2, 0:2] = True  # 4
    mask[5:7, 5:7] = True  # 4 (tie)
    mask[9, 9] = True  # 1
    kept = keep_largest_components(mask, 1)
    assert int(kept.sum()) == 8 and not kept[9, 9]


def test_points_are_seeded_and_bad_arguments_are_refused():
    s = _blobs()
    a = SaliencyPrompter()(s, generator=torch.Generator().manual_seed(3))
    b = SaliencyPrompter()(s, generator=torch.Generator().manual_seed(3))
    c = SaliencyPrompter()(s, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    with pytest.raises(ValueError, match="mode"):
        SaliencyPrompter(mode="crf")
    with pytest.raises(ValueError, match="confidence"):
        SaliencyPrompter(confidence=1.0)
    with pytest.raises(ValueError, match="num_points"):
        SaliencyPrompter(num_points=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SaliencyPrompter()(s * 2)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        SaliencyPrompter()(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="bins"):
        otsu_threshold(s, bins=1)


# ------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot_models")
    return save_tiny_clip(root / "clip"), save_tiny_sam(root / "sam")


@pytest.fixture(scope="module")
def images():
    data = SyntheticLesions(length=3, image_size=(40, 56), seed=1)
    return [data[i]["image"] for i in range(3)], [data[i]["mask"][0] > 0 for i in range(3)]


def test_sam_refiner_matches_the_processor_and_model(folders, images):
    from transformers import SamModel, SamProcessor

    refiner = SAMRefiner.from_pretrained(folders[1], local_files_only=True)
    model = SamModel.from_pretrained(folders[1]).eval()
    processor = SamProcessor.from_pretrained(folders[1])
    pics = images[0][:2]
    embedded = refiner.embed(pics)
    arrays = [viz.to_rgb_uint8(p) for p in pics]
    boxes = [[4.0, 3.0, 30.0, 25.0], [20.0, 10.0, 50.0, 38.0]]
    points = [[[10.0, 10.0], [12.0, 15.0]], [[40.0, 20.0], [0.0, 0.0]]]
    labels = [[1, 1], [1, POINT_PAD_LABEL]]
    for kwargs, ours in (
        ({"input_boxes": [boxes]}, {"boxes": torch.tensor(boxes)}),
        ({"input_points": [points], "input_labels": [labels]},
         {"points": torch.tensor(points), "point_labels": torch.tensor(labels)}),
    ):  # fmt: skip
        enc = processor(images=arrays[1], return_tensors="pt", **kwargs)
        with torch.no_grad():
            out = model(**{k: v for k, v in enc.items() if k not in ("original_sizes",
                           "reshaped_input_sizes")}, multimask_output=False)  # fmt: skip
        ref = processor.image_processor.post_process_masks(
            out.pred_masks, enc["original_sizes"], enc["reshaped_input_sizes"]
        )[0].any(dim=(0, 1))
        mask = refiner.segment(embedded, 1, **ours)
        assert mask.shape == (40, 56) and torch.equal(mask, ref)
        assert 0 < int(mask.sum()) < mask.numel()  # not trivially empty or full
    assert not refiner.segment(embedded, 0).any()  # no prompt, no mask
    with pytest.raises(ValueError, match="point_labels"):
        refiner.segment(embedded, 0, points=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"boxes must have shape \(K, 4\)"):
        refiner.segment(embedded, 0, boxes=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 2\)"):
        refiner.segment(embedded, 2, boxes=torch.tensor(boxes[0]))
    one_box = refiner.segment(
        embedded, -1, boxes=torch.tensor(boxes[1])
    )  # (4,) and a negative index
    assert torch.equal(one_box, refiner.segment(embedded, 1, boxes=torch.tensor([boxes[1]])))


def test_sam_multimask_keeps_the_best_scored_mask(folders, images):
    from transformers import SamModel, SamProcessor

    refiner = SAMRefiner.from_pretrained(folders[1], multimask_output=True)
    model = SamModel.from_pretrained(folders[1]).eval()
    processor = SamProcessor.from_pretrained(folders[1])
    box = [[6.0, 4.0, 40.0, 30.0]]
    enc = processor(images=viz.to_rgb_uint8(images[0][0]), input_boxes=[box], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=enc["pixel_values"], input_boxes=enc["input_boxes"],
                    multimask_output=True)  # fmt: skip
    best = int(out.iou_scores[0, 0].argmax())
    masks = processor.image_processor.post_process_masks(
        out.pred_masks, enc["original_sizes"], enc["reshaped_input_sizes"]
    )[0]
    mask = refiner.segment(refiner.embed(images[0][:1]), 0, boxes=torch.tensor(box))
    assert torch.equal(mask, masks[0, best])


@pytest.fixture(scope="module")
def pipe(folders):
    return MedCLIPSAM.from_pretrained(*folders, layer=1, steps=3, samples=2,
                                      local_files_only=True)  # fmt: skip


def test_pipeline_is_the_composition_of_its_parts(pipe, images):
    pics = images[0]
    results = pipe.segment(pics, "a small round lesion", seed=5, batch_size=2)
    assert len(results) == 3
    base = torch.Generator().manual_seed(5)
    noise = derive_generators(base, 3, "cpu")
    points = derive_generators(base, 3, "cpu")
    att = pipe.attributor
    target = att.encode_text(["a small round lesion"]).mean(0)
    maps = att(pipe.preprocess(pics), target, generator=noise)
    embedded = pipe.sam.embed(pics)
    for j, r in enumerate(results):
        p = SaliencyPrompter()(maps[j], size=(40, 56), generator=points[j])
        assert torch.equal(r.saliency, p.saliency) and torch.equal(r.coarse, p.coarse)
        assert torch.equal(r.prompts.points, p.points)
        assert torch.equal(r.mask, pipe.sam.refine(embedded, j, p))
        assert r.mask.shape == (40, 56) and r.saliency.min() >= 0 and r.saliency.max() <= 1
    # the results do not depend on the batch size, and the seed repeats them
    again = pipe.segment(pics, "a small round lesion", seed=5, batch_size=3)
    assert all(torch.equal(a.mask, b.mask) and torch.equal(a.saliency, b.saliency)
               for a, b in zip(results, again))  # fmt: skip


def test_pipeline_prompt_forms(pipe, images):
    pics = images[0][:2]
    one = pipe.segment(pics[0], "a lesion", seed=0)
    assert one.mask.shape == (40, 56)
    with pytest.warns(UserWarning, match="read as one prompt ensemble"):  # 2 prompts, 2 images
        ensemble = pipe.segment(pics, ["a lesion", "a polyp"], seed=0)
    per_image = pipe.segment(pics, [["a lesion", "a polyp"], ["a lesion", "a polyp"]], seed=0)
    assert all(torch.equal(a.saliency, b.saliency) for a, b in zip(ensemble, per_image))
    with pytest.raises(ValueError, match="prompts"):
        pipe.segment(pics, [["a lesion"]], seed=0)
    with pytest.raises(ValueError, match="seed or generator"):
        pipe.segment(pics, "a lesion", seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        pipe.segment(pics, "a lesion", batch_size=0)


def test_pipeline_points_both_released_and_empty(folders, images):
    pics = images[0][:2]
    for prompter, kind in ((SaliencyPrompter(mode="released"), "both"),
                           (SaliencyPrompter(), "points")):  # fmt: skip
        pipe = MedCLIPSAM.from_pretrained(*folders, layer=1, steps=2, samples=2,
                                          prompter=prompter, prompt_type=kind)  # fmt: skip
        for r in pipe.segment(pics, "a lesion", seed=1):
            assert r.mask.shape == (40, 56) and r.coarse.any()
    # no component above the confidence: no prompt, an empty mask
    strict = MedCLIPSAM(pipe.attributor, pipe.sam, prompter=SaliencyPrompter(confidence=0.999))
    r = strict.segment(pics[0], "a lesion", seed=1)
    assert r.prompts.empty and not r.mask.any() and not r.coarse.any()


def test_pipeline_loads_from_a_hub_cache_offline(folders, tmp_path, images):
    cache = tmp_path / "hub"
    populate_hub_cache(folders[0], cache, "tiny/clip")
    populate_hub_cache(folders[1], cache, "tiny/sam")
    pipe = MedCLIPSAM.from_pretrained("tiny/clip", "tiny/sam", layer=1, steps=2, samples=2,
                                      cache_dir=cache, local_files_only=True)  # fmt: skip
    assert pipe.image_size == (32, 32) and pipe.image_mean[0] == pytest.approx(0.48145466)
    assert pipe.segment(images[0][0], "a lesion", seed=0).mask.shape == (40, 56)


def test_bad_pipeline_arguments(pipe):
    with pytest.raises(TypeError, match="attributor"):
        MedCLIPSAM(pipe.sam, pipe.sam)
    with pytest.raises(ValueError, match="prompt_type"):
        MedCLIPSAM(pipe.attributor, pipe.sam, prompt_type="masks")
    with pytest.raises(ValueError, match="image_std"):
        MedCLIPSAM(pipe.attributor, pipe.sam, image_std=(0.5, 0.5, 0.0))


@pytest.fixture(scope="module")
def tuned_dual(tmp_path_factory):
    """A tiny dual encoder after a few DHN-NCE steps (its default task), saved like a train run."""
    from torch.utils.data import DataLoader

    from vlsegkit import create_model
    from vlsegkit.data import collate_prompts
    from vlsegkit.train import fit

    torch.manual_seed(0)
    dual = create_model("dual-encoder-tiny")
    data = SyntheticLesions(length=8, image_size=dual.image_size, seed=2,
                            mean=dual.image_mean, std=dual.image_std)  # fmt: skip
    untuned = {k: v.clone() for k, v in dual.state_dict().items()}
    loader = DataLoader(data, batch_size=4, collate_fn=collate_prompts)
    fit(dual, loader, epochs=2, lr=1e-2, progress=False)
    folder = dual.save_pretrained(tmp_path_factory.mktemp("dual") / "model")
    return folder, untuned


def test_pipeline_from_a_fine_tuned_dual_encoder(tuned_dual, folders, images):
    """MedCLIP-SAMv2's stages joined: M2IB runs on the towers as fine-tuned by DHN-NCE."""
    from vlsegkit import create_model
    from vlsegkit.models import VLSM

    folder, untuned = tuned_dual
    pipe = MedCLIPSAM.from_pretrained(folder, folders[1], layer=1, steps=3, samples=2,
                                      local_files_only=True)  # fmt: skip
    dual = VLSM.from_pretrained(folder).eval()
    prompts = ["a small round lesion", "a polyp"]
    pixels = pipe.preprocess(images[0][:2])
    with torch.no_grad():
        out = dual(pixels, prompts)  # the dual encoder's own forward: text and image embeddings
        image_embeds = pipe.attributor.vision(pixels).pooled
    torch.testing.assert_close(pipe.attributor.encode_text(prompts), out.text_embeds)
    torch.testing.assert_close(image_embeds, out.image_embeds)
    assert (pipe.image_size, pipe.image_mean, pipe.image_std) == (
        dual.image_size, dual.image_mean, dual.image_std
    )  # fmt: skip
    tuned = pipe.segment(images[0][0], prompts[0], seed=0)
    assert tuned.mask.shape == (40, 56)

    # the same pipeline on the towers before fine-tuning gives another map: the weights matter
    before = create_model("dual-encoder-tiny")
    before.load_state_dict(untuned)
    pipe_before = MedCLIPSAM.from_dual_encoder(before, pipe.sam, layer=1, steps=3, samples=2)
    assert pipe_before.attributor.vision is before.vision_tower  # shared, not copied
    other = pipe_before.segment(images[0][0], prompts[0], seed=0)
    assert (tuned.saliency - other.saliency).abs().max() > 1e-3


def test_pipeline_refuses_what_is_not_a_plain_dual_encoder(tuned_dual, folders, tmp_path):
    from vlsegkit import create_model
    from vlsegkit.prompts import CoOp

    create_model("clipseg-tiny").save_pretrained(tmp_path / "clipseg")
    with pytest.raises(TypeError, match="must be a DualEncoder"):
        MedCLIPSAM.from_pretrained(tmp_path / "clipseg", folders[1], layer=1)
    owned = create_model("dual-encoder-tiny", hooks=[CoOp(depth=1)])
    with pytest.raises(ValueError, match=r"owns hooks \(CoOp\) that M2IB would not run"):
        MedCLIPSAM.from_dual_encoder(owned, folders[1], layer=1)
    with pytest.raises(ValueError, match="layer must be an int in"):
        MedCLIPSAM.from_dual_encoder(tuned_dual[0], folders[1], layer=3)


# ------------------------------------------------------------------------------ figures and CLI
def test_zeroshot_panel_and_sheet(pipe, images):
    pics, masks = images
    r = pipe.segment(pics[0], "a lesion", seed=2)
    tile = viz.zeroshot_panel(pics[0], r.saliency, r.coarse, r.mask, boxes=r.prompts.boxes,
                              points=r.prompts.points, point_labels=r.prompts.point_labels)  # fmt: skip
    assert tile.shape == (40, 4 * 56 + 3 * 2, 3) and tile.dtype == np.uint8
    rgb = viz.to_rgb_uint8(pics[0])
    assert np.array_equal(tile[:, :56], rgb)  # the first tile is the image itself
    if len(r.prompts.boxes):  # the box outline is drawn on the third tile
        x0, y0 = (int(v) for v in r.prompts.boxes[0, :2])
        assert tuple(tile[y0, 2 * 58 + x0]) == viz.zeroshot.BOX_COLOR
    sheet = viz.zeroshot_sheet(
        [dict(image=pics[0], saliency=r.saliency, coarse=r.coarse, mask=r.mask,
              boxes=r.prompts.boxes, target=masks[0], label="lesion")], tile=64,
    )  # fmt: skip
    assert sheet.mode == "RGB" and sheet.size[0] >= 4 * 64
    with pytest.raises(ValueError, match="missing"):
        viz.zeroshot_sheet([dict(image=pics[0])])


def test_cli_zeroshot_writes_masks_and_overlays(folders, images, tmp_path, capsys):
    paths = []
    for i, im in enumerate(images[0][:2]):
        path = tmp_path / f"case{i}.png"
        Image.fromarray(viz.to_rgb_uint8(im)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    args = ["zeroshot", *paths, "--prompt", "a lesion", "--prompt", "a polyp", "--clip",
            str(folders[0]), "--sam", str(folders[1]), "--out", str(out), "--layer", "1",
            "--steps", "2", "--samples", "2", "--offline", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    records = json.loads((out / "zeroshot.json").read_text())
    assert [r["image"] for r in records] == paths
    for r in records:
        stem = r["mask"].removesuffix("_mask.png")
        for kind in ("mask", "coarse", "saliency", "overlay"):
            assert (out / f"{stem}_{kind}.png").is_file()
        with Image.open(out / r["overlay"]) as im:
            assert im.size == (4 * 56 + 6, 40)
        with Image.open(out / r["mask"]) as im:
            assert im.size == (56, 40) and set(np.unique(np.asarray(im))) <= {0, 255}
        assert r["prompt"] == ["a lesion", "a polyp"]
    assert "foreground" in capsys.readouterr().out
    # bad arguments: exit status 2 with the option named
    assert main([*args[:-4], "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main([*args[:-4], "--clip", str(tmp_path / "no-clip")]) == 2
    assert "--clip: no such folder" in capsys.readouterr().err
    assert main(["zeroshot", str(tmp_path / "nope.png"), "--prompt", "x"]) == 2


def test_cli_zeroshot_with_a_fine_tuned_dual_encoder_folder(tuned_dual, folders, images, tmp_path):
    """``vlsegkit train dual-encoder-...`` then ``vlsegkit zeroshot --clip RUN/model``."""
    path = tmp_path / "case0.png"
    Image.fromarray(viz.to_rgb_uint8(images[0][0])).save(path)
    out = tmp_path / "out"
    args = ["zeroshot", str(path), "--prompt", "a lesion", "--clip", str(tuned_dual[0]),
            "--sam", str(folders[1]), "--out", str(out), "--layer", "1", "--steps", "2",
            "--samples", "2", "--offline", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    (record,) = json.loads((out / "zeroshot.json").read_text())
    pipe = MedCLIPSAM.from_dual_encoder(tuned_dual[0], folders[1], layer=1, steps=2, samples=2)
    with Image.open(path) as im:
        expected = pipe.segment(im.convert("RGB"), ["a lesion"], seed=0)
    with Image.open(out / record["mask"]) as im:
        np.testing.assert_array_equal(np.asarray(im) == 255, expected.mask.numpy())
