"""ContrastiveTask and the fine-tuning recipes: terms, retrieval scores, training, bad batches.

The DDP gathering is tested with two processes in tests/test_contrastive_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlsegkit import create_model
from vlsegkit.contrastive import (
    RECIPES,
    ContrastiveTask,
    contrastive_recipe,
    gather_embeddings,
)
from vlsegkit.losses import DHNNCELoss, InfoNCELoss
from vlsegkit.metrics import retrieval_hits
from vlsegkit.train import evaluate, fit

POSITIONS = ["top left", "top right", "bottom left", "bottom right"]


def square_pairs(n_batches, *, b=4, seed=0, size=64):
    """Images with a bright quadrant, captioned with its position (4 classes, distinct per batch)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        classes = torch.randperm(4, generator=g)[:b].tolist()
        images = 0.3 * torch.randn(b, 3, size, size, generator=g)
        for i, c in enumerate(classes):
            r, q = divmod(c, 2)
            h = size // 2
            images[i, :, r * h : (r + 1) * h, q * h : (q + 1) * h] += 1.5
        captions = [f"a bright square at the {POSITIONS[c]}" for c in classes]
        batches.append({"image": images, "text": captions})
    return batches


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("dual-encoder-tiny")


# --------------------------------------------------------------------------- steps
def test_training_and_evaluation_steps(tiny):
    batch = square_pairs(1, seed=3)[0]
    task = tiny.default_task()
    assert isinstance(task, ContrastiveTask) and isinstance(task.loss, DHNNCELoss)
    assert (task.loss.temperature, task.loss.beta1, task.loss.alpha) == (0.6, 0.15, 0.0)
    torch.manual_seed(0)
    terms = task.training_step(tiny.eval(), batch)
    with torch.no_grad():
        out = tiny(batch["image"], batch["text"])
        expected = DHNNCELoss().terms(out.image_embeds, out.text_embeds)
    assert terms.keys() == {"loss", "v2t_loss", "t2v_loss"}
    for key in terms:
        torch.testing.assert_close(terms[key].detach(), expected[key])
    assert terms["loss"].requires_grad
    with torch.no_grad():
        scores = task.evaluation_step(tiny, batch)
    hits = retrieval_hits(out.image_embeds, out.text_embeds, ks=(1, 5))
    assert set(task.metrics) <= scores.keys()
    for key, value in hits.items():
        assert torch.equal(scores[key], value)
    torch.testing.assert_close(scores["top1"], (hits["i2t_top1"] + hits["t2i_top1"]) / 2)
    # the caption key may be "text", "caption" or "prompt"; token ids work too
    ids = tiny.tokenizer(batch["text"])
    for other in ({"image": batch["image"], "caption": batch["text"]},
                  {"image": batch["image"], "input_ids": ids.input_ids,
                   "attention_mask": ids.attention_mask}):  # fmt: skip
        with torch.no_grad():
            again = task.training_step(tiny, other)["loss"]
        torch.testing.assert_close(again, terms["loss"].detach(), rtol=1e-5, atol=1e-5)


def test_other_losses_ks_and_single_pair(tiny):
    batch = square_pairs(1, seed=4)[0]
    with torch.no_grad():
        out = tiny.eval()(batch["image"], batch["text"])
        released = ContrastiveTask(loss=DHNNCELoss(released=True)).training_step(tiny, batch)
        assert released.keys() == {"loss"}
        torch.testing.assert_close(
            released["loss"], DHNNCELoss(released=True)(out.image_embeds, out.text_embeds)
        )
        plain = ContrastiveTask(loss=lambda a, b: (a - b).square().sum()).training_step(tiny, batch)
        torch.testing.assert_close(
            plain["loss"], (out.image_embeds - out.text_embeds).square().sum()
        )
        task = ContrastiveTask(loss=InfoNCELoss(), ks=(2,))
        assert task.metrics == ("loss", "top1", "i2t_top2", "t2i_top2")
        scores = task.evaluation_step(tiny, batch)
        assert {"i2t_top2", "t2i_top2"} <= scores.keys() and "i2t_top1" not in scores
        # a single pair has no negatives: no loss, and retrieving it is no test (it was always a
        # hit, lifting the accuracy of a set whose size leaves one pair in the last batch)
        one = {"image": batch["image"][:1], "text": batch["text"][:1]}
        scores = ContrastiveTask().evaluation_step(tiny, one)
        assert all(v.isnan().all() for k, v in scores.items() if k != "loss")
        assert scores["loss"].isnan().all() and scores["top1"].shape == (1,)
        whole = evaluate(tiny, [batch], progress=False)
        with_one = evaluate(tiny, [batch, one], progress=False)
        assert with_one["top1"] == whole["top1"] and with_one["i2t_top1"] == whole["i2t_top1"]
    with pytest.raises(ValueError, match="at least 2 pairs"):
        ContrastiveTask().training_step(tiny, one)


def test_bad_batches_and_outputs_are_refused(tiny):
    task = ContrastiveTask()
    images = torch.randn(2, 3, 64, 64)
    for batch, match in [
        ([images, ["a", "b"]], "must be a dict with 'image'"),
        ({"image": images}, "needs one caption per image"),
        ({"image": images, "text": "a polyp"}, "must be a list of B=2 strings"),
        ({"image": images, "text": ["a"]}, "one caption string per image"),
        ({"image": images, "prompt": [["a", "b"], ["c", "d"]]}, "one caption string per image"),
        ({"image": images[0], "text": ["a", "b"]}, r"must be a \(B, 3, H, W\) tensor"),
        ({"image": images, "input_ids": torch.ones(3, 4, dtype=torch.long)}, r"\(B=2, L\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            task.training_step(tiny, batch)

    class Wrong(nn.Module):
        def forward(self, images, texts):
            return images.flatten(1)[:, :4], torch.zeros(3, 4)

    with pytest.raises(ValueError, match=r"text_embeds of shape \(B=2, E\)"):
        task.training_step(Wrong(), {"image": images, "text": ["a", "b"]})
    with pytest.raises(TypeError, match="loss must be callable"):
        ContrastiveTask(loss=3)
    with pytest.raises(ValueError, match="ks must be"):
        ContrastiveTask(ks=())
    x = torch.randn(3, 2)
    assert gather_embeddings(x) is x  # one process: nothing to gather


# --------------------------------------------------------------------------- training
def test_fine_tuning_raises_retrieval_top1_on_synthetic_pairs():
    torch.manual_seed(0)
    model = create_model("dual-encoder-tiny")
    train, val = square_pairs(16, seed=0), square_pairs(8, seed=1)  # unseen validation pairs
    task = ContrastiveTask()
    before = evaluate(model, val, task=task, progress=False)
    history = fit(model, train, val_loader=val, task=task, epochs=4, lr=3e-4, seed=0,
                  progress=False)  # fmt: skip
    after = history.val[-1]
    print(f"val top-1 {before['top1']:.3f} -> {[round(r['top1'], 3) for r in history.val]}")
    assert history.monitor == "val_top1"
    assert after["top1"] >= before["top1"] + 0.4  # from chance (1/4) towards 1
    assert after["i2t_top1"] > before["i2t_top1"] and after["t2i_top1"] > before["t2i_top1"]
    assert after["loss"] < before["loss"] - 3
    assert history.train_terms[-1].keys() == {"loss", "v2t_loss", "t2v_loss"}


def test_same_seed_same_run():
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        model = create_model("dual-encoder-tiny")
        fit(model, square_pairs(2, seed=5), task=ContrastiveTask(), max_steps=2, lr=1e-3, seed=3,
            progress=False)  # fmt: skip
        results.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(results[0], results[1])


# --------------------------------------------------------------------------- recipes
def test_recipes_hold_the_paper_and_the_released_settings():
    paper, released = contrastive_recipe("paper"), contrastive_recipe("released")
    assert set(RECIPES) == {"paper", "released"}
    # paper §3.4.1: tau 0.6, beta 0.15, lr 1e-6, batch 64; the loss of eqs. 9-13
    assert (paper.lr, paper.batch_size) == (1e-6, 64)
    assert paper.make_loss().extra_repr() == DHNNCELoss().extra_repr()
    # biomedclip.sh and open_clip's defaults for a ViT model
    assert (released.lr, released.batch_size, released.epochs) == (1e-3, 16, 32)
    assert (released.weight_decay, released.warmup_steps) == (0.1, 1000)
    assert (released.betas, released.eps) == ((0.9, 0.98), 1e-6)
    loss = released.make_loss()
    assert loss.released and (loss.temperature, loss.alpha, loss.beta1, loss.beta2) == (
        0.6, 0.0, 0.15, 0.15,
    )  # fmt: skip
    with pytest.raises(KeyError, match="unknown contrastive recipe"):
        contrastive_recipe("medpix")


def test_recipe_optimizer_groups_and_fit_options(tiny):
    recipe = contrastive_recipe("released")
    optimizer = recipe.optimizer(tiny)
    names = {id(p): n for n, p in tiny.named_parameters()}
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    plain = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(("bias", "weight", "embedding", "class_embedding")) for n in plain)
    assert any("ln_" in n for n in plain) and any(n.endswith(".bias") for n in plain)
    assert all(dict(tiny.named_parameters())[n].dim() >= 2 for n in decayed)
    assert len(plain) + len(decayed) == len(names)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    options = recipe.fit_options(tiny, world_size=2, epochs=1)
    assert options["batch_size"] == 8 and options["epochs"] == 1
    assert options["scheduler"] == "cosine" and options["warmup_steps"] == 1000
    assert options["autocast_dtype"] is None  # fp16 AMP on CUDA only
    with pytest.raises(ValueError, match="must split evenly"):
        recipe.fit_options(tiny, world_size=3)
    # one step: linear warmup from lr / (warmup + 1)
    records = []
    model = create_model("dual-encoder-tiny")
    fit(model, square_pairs(1), task=recipe.task(), log_fn=records.append, progress=False,
        **recipe.fit_options(model, max_steps=1))  # fmt: skip
    assert records[0]["lr"] == pytest.approx(1e-3 / 1001)
