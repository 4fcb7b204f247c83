"""fit / evaluate / seed_everything on a tiny prompt-conditioned conv net and SyntheticLesions."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.losses import DiceBCELoss
from vlsegkit.metrics import dice_score, iou_score
from vlsegkit.train import EarlyStopping, History, evaluate, fit, seed_everything


@dataclass
class Output:
    logits: Tensor


class TinySeg(nn.Module):
    """Two convs with the prompt's hashed bag of words added as a per-channel bias (FiLM-lite).

    No batch-dependent layers, so gradient accumulation must be exact.
    """

    def __init__(self, width: int = 8, vocab: int = 64) -> None:
        super().__init__()
        self.vocab = vocab
        self.words = nn.EmbeddingBag(vocab, width, mode="mean")
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images: Tensor, prompts: list[str]) -> Output:
        ids = [[zlib.crc32(w.encode()) % self.vocab for w in p.split()] for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        flat = torch.tensor([i for words in ids for i in words], device=images.device)
        cond = self.words(flat, offsets.to(images.device))
        # Lesions are darker (skin) or paler (mucosa) than their surroundings: centring each image
        # (a per-sample op, not a batch statistic) lets two small convs see that.
        images = 4 * (images - images.mean((2, 3), keepdim=True))
        x = F.gelu(self.conv1(images))
        x = F.gelu(self.conv2(x) + cond[:, :, None, None])
        return Output(logits=self.head(x))


# one intra-op thread (tests/conftest.py): these tiny loops only lose to thread overhead
pytestmark = pytest.mark.usefixtures("single_thread")


def loader(length=16, batch_size=4, *, size=32, seed=0, shuffle=False, negative_fraction=0.0):
    ds = SyntheticLesions(
        length=length, image_size=size, seed=seed, negative_fraction=negative_fraction
    )
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_prompts)


def params_of(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_loss_decreases_and_dice_improves():
    torch.manual_seed(0)
    model = TinySeg()
    train = loader(32, 8, seed=0, shuffle=True)
    val = loader(16, 8, seed=100)
    before = evaluate(model, val)
    history = fit(model, train, val_loader=val, epochs=5, lr=2e-2, progress=False)
    assert isinstance(history, History) and history.epochs == 5 and history.steps == 20
    assert history.train_loss[-1] < 0.7 * history.train_loss[0]
    assert history.val[-1]["loss"] < 0.7 * before["loss"]
    assert history.metric("dice")[-1] > before["dice"] + 0.3
    assert (
        set(history.val[-1]) == {"dice", "iou", "loss", "count"} and history.val[-1]["count"] == 16
    )


@pytest.mark.parametrize(
    ("length", "small", "k"),
    # (5, 2, 3): batches of 2, 2, 1 in one group; (10, 4, 3): 4, 4, 2 -- a short batch in a group
    [(16, 4, 2), (12, 4, 2), (18, 3, 3), (5, 2, 3), (10, 4, 3)],
)
def test_grad_accumulation_equals_one_big_batch(length, small, k):
    torch.manual_seed(1)
    base = TinySeg()
    accum, big, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    h_acc = fit(
        accum,
        loader(length, small),
        grad_accum_steps=k,
        optimizer=torch.optim.SGD(accum.parameters(), lr=0.5),
        progress=False,
    )
    h_big = fit(
        big,
        loader(length, small * k),
        optimizer=torch.optim.SGD(big.parameters(), lr=0.5),
        progress=False,
    )
    assert h_acc.steps == h_big.steps == math.ceil(length / (small * k))
    torch.testing.assert_close(params_of(accum), params_of(big), rtol=0, atol=2e-6)
    torch.testing.assert_close(h_acc.train_loss[0], h_big.train_loss[0], rtol=1e-5, atol=1e-6)
    # Control: stepping after every small batch is a different trajectory.
    fit(
        plain,
        loader(length, small),
        optimizer=torch.optim.SGD(plain.parameters(), lr=0.5),
        progress=False,
    )
    assert (params_of(plain) - params_of(big)).abs().max() > 1e-3


def test_grad_accumulation_of_a_loader_without_len_weights_batches_by_size():
    """A loader without len(): the epoch's short last group is only known when the data ends;
    it has fewer batches than grad_accum_steps and they (3 + 2 items) must weigh by their sizes,
    as in one batch of its 5 items."""
    torch.manual_seed(3)
    base = TinySeg()
    accum, big = copy.deepcopy(base), copy.deepcopy(base)
    batches = list(loader(14, 3))  # 3, 3, 3, 3, 2 items: groups of 3 + 3 + 3 and of 3 + 2

    class NoLen:
        def __iter__(self):
            return iter(batches)

    fit(accum, NoLen(), grad_accum_steps=3, optimizer=torch.optim.SGD(accum.parameters(), lr=0.5),
        progress=False)  # fmt: skip
    # The reference: plain SGD steps on one batch of each group's items (mean-reduced loss).
    big_batches = list(loader(14, 9))
    assert [len(b["prompt"]) for b in big_batches] == [9, 5]
    fit(big, big_batches, optimizer=torch.optim.SGD(big.parameters(), lr=0.5), progress=False)
    torch.testing.assert_close(params_of(accum), params_of(big), rtol=0, atol=2e-6)


def test_grad_accumulation_with_default_adamw():
    torch.manual_seed(2)
    a = TinySeg()
    b = copy.deepcopy(a)
    fit(a, loader(16, 4), grad_accum_steps=2, lr=1e-2, progress=False)
    fit(b, loader(16, 8), lr=1e-2, progress=False)
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=1e-5)


def run_seeded(seed: int) -> tuple[Tensor, History]:
    seed_everything(seed)
    model = TinySeg()
    history = fit(
        model,
        loader(16, 4, shuffle=True),
        val_loader=loader(8, 4, seed=9),
        epochs=2,
        progress=False,
    )
    return params_of(model), history


def test_determinism_with_seed():
    p1, h1 = run_seeded(123)
    p2, h2 = run_seeded(123)
    assert torch.equal(p1, p2)
    assert h1.train_loss == h2.train_loss and h1.val == h2.val
    p3, _ = run_seeded(124)
    assert not torch.equal(p1, p3)
    assert seed_everything(5) == 5
    first = torch.rand(3)
    seed_everything(5)
    assert torch.equal(first, torch.rand(3))


class MaskAsImage(Dataset):
    """SyntheticLesions whose image is the mask itself, so an oracle model can read the answer."""

    def __init__(self, **kwargs) -> None:
        self.inner = SyntheticLesions(**kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        return {**item, "image": item["mask"].expand(3, -1, -1).clone()}


class Oracle(nn.Module):
    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images, prompts):
        return Output(logits=self.sign * 40.0 * (images[:, :1] - 0.5) + 0 * self.dummy)


def test_evaluate_oracle_and_anti_oracle():
    ds = MaskAsImage(length=12, image_size=24, seed=3, negative_fraction=0.25)
    data = DataLoader(ds, batch_size=5, collate_fn=collate_prompts)
    oracle = Oracle().train()
    result = evaluate(oracle, data)
    assert result == {"dice": 1.0, "iou": 1.0, "loss": pytest.approx(0.0, abs=1e-6), "count": 12}
    assert oracle.training  # mode restored
    anti = evaluate(Oracle(sign=-1.0), data)
    assert anti["dice"] == 0.0 and anti["iou"] == 0.0 and anti["loss"] > 5


def test_evaluate_matches_manual_computation():
    torch.manual_seed(4)
    model = TinySeg()
    with torch.no_grad():
        model.head.bias.fill_(0.3)  # predict some foreground, so the scores are not trivially 0
    data = loader(10, 4, seed=5, negative_fraction=0.2)
    result = evaluate(model, data, threshold=0.55)
    dice, iou, loss_sum = [], [], 0.0
    model.eval()
    with torch.no_grad():
        for batch in data:
            logits = model(batch["image"], batch["prompt"]).logits
            prob = torch.sigmoid(logits)
            dice.append(dice_score(prob, batch["mask"], threshold=0.55))
            iou.append(iou_score(prob, batch["mask"], threshold=0.55))
            loss_sum += DiceBCELoss()(logits, batch["mask"]).item() * len(batch["prompt"])
    assert result["dice"] == pytest.approx(torch.cat(dice).double().mean().item(), abs=1e-7)
    assert result["iou"] == pytest.approx(torch.cat(iou).double().mean().item(), abs=1e-7)
    assert result["loss"] == pytest.approx(loss_sum / 10, rel=1e-6)
    assert 0.0 < result["dice"] < 1.0


def test_max_grad_norm_clips_the_update():
    torch.manual_seed(5)
    base = TinySeg()
    clipped, free = copy.deepcopy(base), copy.deepcopy(base)
    start = params_of(base)
    for model, norm in ((clipped, 1e-3), (free, None)):
        fit(
            model,
            loader(8, 4),
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            max_grad_norm=norm,
            max_steps=1,
            progress=False,
        )
    assert (params_of(clipped) - start).norm() == pytest.approx(1e-3, rel=1e-3)
    assert (params_of(free) - start).norm() > 1e-2


class HeadOnly(TinySeg):
    def trainable_parameters(self):
        return self.head.parameters()


def test_trainable_parameters_and_frozen_params_are_respected():
    torch.manual_seed(6)
    model = HeadOnly()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, loader(8, 4), lr=1e-2, progress=False)
    after = model.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    plain = TinySeg()
    plain.conv2.requires_grad_(False)
    frozen = plain.conv2.weight.clone()
    fit(plain, loader(8, 4), lr=1e-2, progress=False)
    assert torch.equal(plain.conv2.weight, frozen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step(dtype):
    torch.manual_seed(7)
    model = TinySeg(width=4)
    ref = copy.deepcopy(model)
    start = params_of(model)
    data = loader(4, 4, size=16)
    h = fit(model, data, autocast_dtype=dtype, lr=1e-2, progress=False)
    h_ref = fit(ref, data, lr=1e-2, progress=False)
    assert math.isfinite(h.train_loss[0]) and h.steps == 1
    assert h.train_loss[0] == pytest.approx(h_ref.train_loss[0], abs=0.02)
    # One AdamW step moves each weight by ~lr·sign(grad): low-precision forward passes must give
    # nearly the same update direction as full precision.
    delta, delta_ref = params_of(model) - start, params_of(ref) - start
    assert torch.isfinite(delta).all()
    assert F.cosine_similarity(delta, delta_ref, dim=0) > 0.9
    result = evaluate(model, data, autocast_dtype=dtype)
    assert 0.0 <= result["dice"] <= 1.0
    assert result["loss"] == pytest.approx(evaluate(model, data)["loss"], abs=0.02)


def test_log_fn_max_steps_and_progress(capsys, monkeypatch):
    records = []
    model = TinySeg()
    history = fit(
        model, loader(16, 4), epochs=5, max_steps=3, log_fn=records.append, progress=False
    )
    assert history.steps == 3 and history.epochs == 1
    step_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_logs] == [1, 2, 3]
    assert all(r["lr"] == 1e-3 and r["epoch"] == 0 for r in step_logs)
    assert records[-1] == {"step": 3, "epoch": 0, "train_loss": history.train_loss[0]}
    assert capsys.readouterr().err == ""
    # progress bars only on a terminal: none in logs, even with progress=True
    fit(model, loader(4, 4, size=16), progress=True)
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fit(model, loader(4, 4, size=16), progress=True)
    assert "epoch 1/1" in terminal.getvalue()


class WrongShape(TinySeg):
    def forward(self, images, prompts):
        return Output(logits=super().forward(images, prompts).logits[..., ::2, ::2])


class ReturnsDict(TinySeg):
    def forward(self, images, prompts):
        return {"logits": super().forward(images, prompts).logits}


class NaNModel(TinySeg):
    def forward(self, images, prompts):
        return Output(logits=super().forward(images, prompts).logits * float("nan"))


def test_bad_inputs():
    data = loader(4, 4, size=16)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        fit(TinySeg(), data, grad_accum_steps=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        fit(TinySeg(), data, autocast_dtype=torch.float32)
    with pytest.raises(ValueError, match="max_steps"):
        fit(TinySeg(), data, max_steps=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(TinySeg().requires_grad_(False), data)
    with pytest.raises(ValueError, match=r"logits have shape \(4, 1, 8, 8\).*\(4, 1, 16, 16\)"):
        fit(WrongShape(), data, progress=False)
    with pytest.raises(ValueError, match="'image', 'mask' and 'prompt'"):
        fit(TinySeg(), [{"image": torch.zeros(1, 3, 8, 8)}], progress=False)
    with pytest.raises(TypeError, match=r"\.logits"):
        evaluate(ReturnsDict(), data)
    with pytest.raises(FloatingPointError, match="batch 0"):
        fit(NaNModel(), data, progress=False)


# --------------------------------------------------------------------------- v2: data, schedules,
# early stopping, logs
class IndexLog(Dataset):
    """SyntheticLesions that records which items were read, in order."""

    def __init__(self, **kwargs) -> None:
        self.inner = SyntheticLesions(**kwargs)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.inner[i]


def test_dataset_input_and_seeded_data_order():
    torch.manual_seed(8)
    base = TinySeg()
    from_ds, from_loader = copy.deepcopy(base), copy.deepcopy(base)
    ds = IndexLog(length=12, image_size=16, seed=0)
    fit(from_ds, ds, batch_size=4, shuffle=False, lr=1e-2, progress=False)
    assert ds.seen == list(range(12))
    fit(from_loader, loader(12, 4, size=16), lr=1e-2, progress=False)
    assert torch.equal(params_of(from_ds), params_of(from_loader))

    # Shuffled: a seeded permutation per epoch, the same for a Dataset and a shuffling DataLoader.
    ds = IndexLog(length=12, image_size=16, seed=0)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    fit(a, ds, batch_size=4, epochs=2, seed=3, progress=False)
    order = ds.seen
    epoch0, epoch1 = order[:12], order[12:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != list(range(12)) and epoch0 != epoch1
    ds.seen = []
    shuffling = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_prompts)
    fit(b, shuffling, epochs=2, seed=3, progress=False)
    assert ds.seen == order and torch.equal(params_of(a), params_of(b))
    ds.seen = []
    fit(c, ds, batch_size=4, epochs=2, seed=4, progress=False)
    assert ds.seen != order


def cosine_reference(t: int, *, lr: float, warmup: int, total: int | None, floor: float) -> float:
    if t < warmup:
        return lr * (t + 1) / (warmup + 1)
    if total is None:
        return lr
    p = min(1.0, (t - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)


@pytest.mark.parametrize(
    ("scheduler", "warmup", "max_steps", "total"),
    [("cosine", 3, None, 8), ("cosine", 0, 5, 5), (None, 3, None, None)],
)
def test_warmup_cosine_schedule_matches_reference(scheduler, warmup, max_steps, total):
    records = []
    fit(
        TinySeg(width=4),
        loader(16, 4, size=8),
        epochs=2,
        lr=0.02,
        scheduler=scheduler,
        warmup_steps=warmup,
        min_lr_ratio=0.1,
        max_steps=max_steps,
        log_fn=records.append,
        progress=False,
    )
    lrs = [r["lr"] for r in records if "loss" in r]
    expected = [
        cosine_reference(t, lr=0.02, warmup=warmup, total=total, floor=0.1) for t in range(len(lrs))
    ]
    assert len(lrs) == (total or 8)
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    if scheduler == "cosine":
        assert lrs[-1] < 0.2 * 0.02  # decayed close to the floor of 0.1·lr
        # ... but the floor would be reached one step after the last (FitConfig's docstring):
        last = 0.02 * (0.1 + 0.9 * (1 - math.cos(math.pi / (total - warmup))) / 2)
        assert lrs[-1] == pytest.approx(last, rel=1e-12) and lrs[-1] > 0.1 * 0.02


class ConstantSeg(Oracle):
    """Predicts from the image only, with a parameter of zero gradient: the loss never changes."""


def constant_loss_run(epochs, **kwargs):
    model = ConstantSeg()
    records = []
    history = fit(
        model,
        loader(4, 4, size=8),
        epochs=epochs,
        lr=0.1,
        monitor="train_loss",
        log_fn=records.append,
        progress=False,
        optimizer=kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1),
        **kwargs,
    )
    return history, [r["lr"] for r in records if "loss" in r]


def test_plateau_schedule_reduces_lr_when_the_monitor_stalls():
    # torch's defaults: patience 10, factor 0.1, so epoch 12 is the first at the reduced rate.
    history, lrs = constant_loss_run(13, scheduler="plateau")
    assert lrs == pytest.approx([0.1] * 12 + [0.01], rel=1e-12)
    assert history.best_epoch == 0 and history.monitor == "train_loss"
    model = ConstantSeg()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, patience=1, factor=0.5)
    _, lrs = constant_loss_run(6, optimizer=sgd, scheduler=plateau)
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-12)


def test_early_stopping_ends_training():
    rule = EarlyStopping(metric="train_loss", patience=3)
    history, lrs = constant_loss_run(10, early_stopping=rule)
    # Epoch 0 sets the best, epochs 1-3 do not improve: stop after 4 epochs.
    assert history.stopped_early and history.epochs == 4 and len(lrs) == 4
    assert rule.bad_epochs == 3 and rule.best == history.train_loss[0]
    # Without the rule all epochs run, and a rule is reset by every new fit.
    history, _ = constant_loss_run(6)
    assert not history.stopped_early and history.epochs == 6
    history, _ = constant_loss_run(10, early_stopping=rule)
    assert history.epochs == 4


def early_stopping_reference(values, mode, patience, min_delta):
    best, bad = None, 0
    for i, v in enumerate(values):
        better = best is None or (v < best - min_delta if mode == "min" else v > best + min_delta)
        if v != v:
            better = False
        if better:
            best, bad = v, 0
        else:
            bad += 1
            if bad >= patience:
                return i
    return None


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("patience", [0, 1, 3])
@pytest.mark.parametrize("min_delta", [0.0, 0.05])
def test_early_stopping_rule_matches_reference(mode, patience, min_delta):
    gen = torch.Generator().manual_seed(patience * 10 + int(min_delta * 100))
    for _ in range(20):
        values = (torch.rand(12, generator=gen) * 0.3).cumsum(0)
        values = (values + 0.2 * torch.randn(12, generator=gen)).tolist()
        values[3] = float("nan")
        rule = EarlyStopping(metric="val_loss", mode=mode, patience=patience, min_delta=min_delta)
        stopped = next((i for i, v in enumerate(values) if rule.update(v)), None)
        assert stopped == early_stopping_reference(values, mode, patience, min_delta)


def test_early_stopping_arguments():
    assert EarlyStopping(metric="val_loss").resolved_mode == "min"
    assert EarlyStopping(metric="dice").resolved_mode == "max"
    assert EarlyStopping(metric="dice", mode="min").resolved_mode == "min"
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match=r"early_stopping.metric 'dice'.*\['train_loss'\]"):
        fit(TinySeg(), loader(4, 4, size=8), early_stopping=EarlyStopping(metric="dice"))


def test_jsonl_log_matches_log_fn(tmp_path):
    records = []
    kwargs = dict(epochs=2, val_loader=loader(4, 4, size=8, seed=7), progress=False)
    fit(TinySeg(), loader(8, 4, size=8), log_dir=tmp_path, log_fn=records.append, **kwargs)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert len(records) == 2 * 2 + 2 and {"val_dice", "train_loss"} <= set(records[2])
    # A fresh run replaces the log rather than appending to it.
    fit(TinySeg(), loader(8, 4, size=8), log_dir=tmp_path, **{**kwargs, "epochs": 1})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_tensorboard_is_optional(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            fit(TinySeg(), loader(4, 4, size=8), log_dir=tmp_path, tensorboard=True)
        pytest.skip("tensorboard is not installed")
    fit(TinySeg(), loader(4, 4, size=8), log_dir=tmp_path, tensorboard=True, progress=False)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_bad_arguments_v2(tmp_path):
    data = loader(4, 4, size=8)
    model = TinySeg()
    cases = [
        (dict(scheduler="linear"), "scheduler must be 'cosine', 'plateau'"),
        (dict(scheduler="plateau", warmup_steps=2), "warmup_steps is only supported"),
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(scheduler_interval="batch"), "scheduler_interval"),
        (dict(checkpoint_every=2), "checkpoint_every needs checkpoint_dir"),
        (dict(checkpoint_every=0, checkpoint_dir=tmp_path), "checkpoint_every must be an int >= 1"),
        (dict(resume=True), "resume=True needs checkpoint_dir"),
        (dict(resume=3), "resume must be a bool or a checkpoint path"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(num_workers=-1), "num_workers"),
        (dict(tensorboard=True), "tensorboard=True needs log_dir"),
        (dict(monitor="val_dice"), r"monitor 'val_dice' .*\['train_loss'\]"),
        (dict(scheduler=torch.optim.lr_scheduler.StepLR(
            torch.optim.SGD(TinySeg().parameters(), lr=0.1), 1)), "attached to the optimizer"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(model, data, progress=False, **kwargs)
    unsized = (batch for batch in data)
    with pytest.raises(ValueError, match="scheduler='cosine' needs the number of steps"):
        fit(model, unsized, scheduler="cosine", progress=False)
