"""Contrastive fine-tuning under ``torchrun`` (2 CPU processes, gloo) against one process.

As in tests/test_train_distributed.py, the launch test runs this file as the torchrun script
(``... test_contrastive_distributed.py worker OUT``). Each process trains on half of every global
batch; with the embeddings gathered over processes the loss sees the whole batch, and the weights
must end where one process training on the whole batch ends. Without gathering they must not (the
test can tell the two apart). A small stand-in encoder makes the comparison quick and sharp; the
tiny ``DualEncoder`` is trained the same way to show the real model under DDP (every trainable
parameter reached by the loss, or the gradient reduction would stall). ``gather_embeddings`` is also
checked on uneven shares: values in rank order, gradients only to the local rows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlsegkit import _distributed, create_model
from vlsegkit.contrastive import ContrastiveTask, gather_embeddings
from vlsegkit.train import fit, seed_everything

WORLD = 2
WORDS = ["polyp", "tumor", "cyst", "ulcer", "nodule", "lesion", "mass", "spot"]


class PairEncoder(nn.Module):
    """A small stand-in for a pair of towers: conv image encoder, bag-of-words text encoder."""

    def __init__(self, vocab: int = 97, dim: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, dim)
        )
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")

    def forward(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = [[zlib.crc32(w.encode()) % self.vocab for w in t.split()] for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        flat = torch.tensor([i for words in ids for i in words])
        return self.image(images), self.words(flat, offsets)


class Pairs(Dataset):
    """Image-caption pairs: the class shows as a brightness level and names the caption."""

    def __init__(self, length: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.classes = torch.randint(len(WORDS), (length,), generator=g).tolist()
        self.noise = 0.1 * torch.randn(length, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> dict:
        c = self.classes[i]
        return {"image": self.noise[i] + c / 4, "prompt": f"a {WORDS[c]} seen here"}


class Squares(Dataset):
    """64 px images with one bright quadrant, captioned with its position."""

    POSITIONS = ("top left", "top right", "bottom left", "bottom right")

    def __init__(self, length: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        self.noise = 0.3 * torch.randn(length, 3, 64, 64, generator=g)

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, i: int) -> dict:
        r, q = divmod(i % 4, 2)
        image = self.noise[i].clone()
        image[:, 32 * r : 32 * (r + 1), 32 * q : 32 * (q + 1)] += 1.5
        return {"image": image, "text": f"a bright square at the {self.POSITIONS[i % 4]}"}


def params_of(model: nn.Module) -> Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def run(batch_size: int, *, gather: bool = True, log_fn=None):
    seed_everything(0)
    model = PairEncoder()
    # plain SGD: Adam would hide a wrong gradient scale (its steps barely depend on it)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(model, Pairs(), task=ContrastiveTask(gather=gather), batch_size=batch_size,
                  epochs=2, optimizer=optimizer, seed=3, log_fn=log_fn, progress=False)  # fmt: skip
    return model, history


def run_dual(batch_size: int):
    seed_everything(0)
    model = create_model("dual-encoder-tiny")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fit(
        model,
        Squares(),
        batch_size=batch_size,
        epochs=1,
        optimizer=optimizer,
        seed=3,
        progress=False,
    )  # fmt: skip  (the model's own task: ContrastiveTask with DHN-NCE)
    return model


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    records = []
    gathered, history = run(8 // WORLD, log_fn=records.append)
    local, _ = run(8 // WORLD, gather=False)
    dual = run_dual(8 // WORLD)
    # uneven shares: rank r holds r + 2 rows of value r
    x = torch.full((rank + 2, 3), float(rank), requires_grad=True)
    rows = gather_embeddings(x)
    weights = torch.arange(rows.numel(), dtype=torch.float32).view_as(rows)
    (rows * weights).sum().backward()
    torch.save(
        {
            "gathered": params_of(gathered),
            "local": params_of(local),
            "dual": params_of(dual),
            "history": history.state_dict(),
            "records": records,
            "rows": rows.detach(),
            "grad": x.grad,
            "env": _distributed.current(),
        },
        out / f"rank{rank}.pt",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_contrastive")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        __file__, "worker", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gathered_loss_trains_like_one_process_on_the_global_batch(ddp_results):
    ranks = ddp_results
    assert all(torch.equal(r["gathered"], ranks[0]["gathered"]) for r in ranks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = []
        single, history = run(8, log_fn=records.append)
    finally:
        torch.set_num_threads(threads)
    start = params_of(PairEncoder())
    diff = (ranks[0]["gathered"] - params_of(single)).abs().max().item()
    scale = params_of(single).abs().max().item()
    print(f"max |DDP - single| = {diff:.3g} (largest weight {scale:.3g})")
    # float rounding only (the pairs are summed in another order); a wrong gradient scale or a
    # missing gather moves the weights by ~0.1-1 here
    assert diff <= 1e-5 * max(1.0, scale)
    assert (params_of(single) - start).abs().max() > 1e-2  # the runs moved far from any init
    ddp_history = ranks[0]["history"]
    assert ddp_history["steps"] == history.steps == 4
    torch.testing.assert_close(ddp_history["train_loss"], history.train_loss, rtol=1e-6, atol=0)
    assert ddp_history["train_terms"][0].keys() == {"loss", "v2t_loss", "t2v_loss"}
    for ours, theirs in zip(ranks[0]["records"], records, strict=True):
        key = "loss" if "loss" in ours else "train_loss"
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6)
    # each process's own loss (no gathering) is another objective: the weights differ
    assert (ranks[0]["local"] - params_of(single)).abs().max() > 1e-4


def test_the_dual_encoder_trains_under_ddp_like_one_process(ddp_results):
    assert torch.equal(ddp_results[0]["dual"], ddp_results[1]["dual"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = params_of(run_dual(8))
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = params_of(create_model("dual-encoder-tiny"))
    diff = (ddp_results[0]["dual"] - single).abs().max().item()
    print(f"DualEncoder: max |DDP - single| = {diff:.3g}, moved {(single - start).abs().max():.3g}")
    assert diff <= 1e-5 * max(1.0, single.abs().max().item())
    assert (single - start).abs().max() > 1e-3


def test_gather_embeddings_on_uneven_shares(ddp_results):
    sizes = [r + 2 for r in range(WORLD)]
    expected = torch.cat([torch.full((n, 3), float(r)) for r, n in enumerate(sizes)])
    weights = torch.arange(expected.numel(), dtype=torch.float32).view_as(expected)
    for rank, result in enumerate(ddp_results):
        assert torch.equal(result["rows"], expected)
        start = sum(sizes[:rank])
        assert torch.equal(result["grad"], weights[start : start + sizes[rank]])


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
    # The results are saved. Leave without interpreter teardown: torch's gloo teardown still
    # aborts now and then under load ("terminate called without an active exception"), after all
    # the work, which would fail the launch for a reason that is not what these tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
