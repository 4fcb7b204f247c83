"""Image-text retrieval metrics against plain loops (numpy cosine, one query at a time)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlsegkit.metrics import retrieval_accuracy, retrieval_hits, retrieval_ranks


def reference_hits(image, text, ks):
    """Rank of each query's partner = number of candidates with a strictly higher cosine (the
    random embeddings here have no ties; ties are tested by enumeration below)."""
    a = image.double().numpy()
    b = text.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)
    out = {}
    for k in ks:
        i2t, t2i = [], []
        for q in range(n):
            sims = [float(a[q] @ b[j]) for j in range(n)]
            i2t.append(float(sum(s > sims[q] for s in sims) < k))
            sims = [float(a[j] @ b[q]) for j in range(n)]
            t2i.append(float(sum(s > sims[q] for s in sims) < k))
        out[f"i2t_top{k}"], out[f"t2i_top{k}"] = i2t, t2i
    return out


def pairs(n=12, d=6, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g)
    return image, image + noise * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("ks", [(1, 5), (1, 2, 3), (4,)])
def test_hits_match_the_loop(ks):
    image, text = pairs(noise=2.5)
    ours = retrieval_hits(image, text, ks=ks)
    ref = reference_hits(image, text, ks)
    assert ours.keys() == ref.keys()
    for key, values in ref.items():
        assert ours[key].tolist() == values, key
    # neither all hits nor all misses: the comparison means something
    assert 0 < float(ours[f"i2t_top{ks[0]}"].mean()) < 1


def test_ranks_and_ties():
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.5, 0.7], [0.3, 0.1, 0.3]])
    i2t, t2i = retrieval_ranks(sim)
    assert i2t.tolist() == [0, 1, 0]  # row 0: a tie with text 1 does not push text 0 down
    assert t2i.tolist() == [0, 1, 1]  # column 2: image 1 scores 0.7 > 0.3
    # identical captions (common in medical data) share the credit: an arbitrary tie-break puts
    # either first, so each image's partner is first with probability 1/2, and surely in the top 2
    image = torch.eye(3)
    text = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    hits = retrieval_hits(image, text, ks=(1, 2))
    assert hits["i2t_top1"].tolist() == [0.5, 0.5, 1.0]
    assert hits["i2t_top2"].tolist() == [1.0, 1.0, 1.0]


def _tie_break_average(similarity, k):
    """Mean over every ordering of the tied candidates of 'partner among the k first' (brute
    force over all permutations of each query's candidates, stable sort by score)."""
    import itertools

    n = similarity.shape[0]
    out = []
    for q in range(n):
        row = similarity[q].tolist()
        hits = []
        for order in itertools.permutations(range(n)):
            ranked = sorted(order, key=lambda j: -row[j])  # stable: ties keep the permuted order
            hits.append(float(ranked.index(q) < k))
        out.append(sum(hits) / len(hits))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ties_are_broken_at_random_in_expectation(k):
    """Collapsed embeddings used to score 100 %; with every score tied they score chance."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 4, generator=g)
    text = torch.randn(5, 4, generator=g)
    text[1] = text[3]  # two identical captions
    cases = [
        (torch.ones(5, 4), torch.randn(1, 4, generator=g).repeat(5, 1)),  # collapsed towers
        (torch.zeros(5, 4), torch.zeros(5, 4)),  # zero embeddings
        (image, text),
    ]
    for a, b in cases:
        hits = retrieval_hits(a, b, ks=(k,))
        sim = (
            torch.nn.functional.normalize(a.double(), dim=-1)
            @ torch.nn.functional.normalize(b.double(), dim=-1).T
        )
        assert hits[f"i2t_top{k}"].tolist() == pytest.approx(_tie_break_average(sim, k))
        assert hits[f"t2i_top{k}"].tolist() == pytest.approx(_tie_break_average(sim.T, k))
    collapsed = retrieval_hits(*cases[0][:2], ks=(k,))[f"i2t_top{k}"]
    assert collapsed.mean().item() == pytest.approx(k / 5)


def test_non_finite_embeddings_are_refused():
    image, text = pairs(n=4)
    image[2, 0] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        retrieval_hits(image, text)
    with pytest.raises(ValueError, match="must be finite"):
        retrieval_hits(text, torch.full_like(text, float("inf")))


def test_paper_protocol_batches_and_runs():
    image, text = pairs(n=23, seed=1, noise=1.5)
    # one run over the whole set is retrieval_hits' mean
    whole = retrieval_accuracy(image, text, ks=(1, 2), batch_size=None, runs=1)
    hits = retrieval_hits(image, text, ks=(1, 2))
    for key, (mean, std) in whole.items():
        assert mean == pytest.approx(float(hits[key].double().mean())) and std == 0.0
    # batches of 5 over 3 shuffles, restated with the same permutations
    out = retrieval_accuracy(
        image, text, ks=(1, 2), batch_size=5, runs=3, generator=torch.Generator().manual_seed(4)
    )
    g = torch.Generator().manual_seed(4)
    per_run = {k: [] for k in out}
    for _ in range(3):
        order = torch.randperm(23, generator=g).tolist()
        scored = {k: [] for k in out}
        for start in range(0, 23, 5):
            rows = order[start : start + 5]
            ref = reference_hits(image[rows], text[rows], (1, 2))
            for k in out:
                scored[k] += ref[k]
        for k in out:
            per_run[k].append(sum(scored[k]) / 23)
    for k, (mean, std) in out.items():
        values = per_run[k]
        m = sum(values) / 3
        s = math.sqrt(sum((v - m) ** 2 for v in values) / 2)
        assert mean == pytest.approx(m, abs=1e-12) and std == pytest.approx(s, abs=1e-12)
    # smaller batches make retrieval easier
    assert out["i2t_top1"][0] > whole["i2t_top1"][0]


def test_bad_inputs():
    image, text = pairs(n=4)
    with pytest.raises(ValueError, match=r"same shape \(N, D\)"):
        retrieval_hits(image, text[:3])
    with pytest.raises(ValueError, match=r"image_embeds must be a floating-point \(N, D\)"):
        retrieval_hits(image[0], text)
    with pytest.raises(ValueError, match="ks must be a non-empty sequence of ints >= 1"):
        retrieval_hits(image, text, ks=(0,))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or None"):
        retrieval_accuracy(image, text, batch_size=0)
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        retrieval_accuracy(image, text, runs=0)
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        retrieval_ranks(torch.zeros(2, 3))
