"""``fit`` / ``evaluate`` under ``torchrun`` (2 CPU processes, gloo) against one process.

The launch test runs this file as the torchrun script (``... test_train_distributed.py worker
OUT``); the worker trains with per-process batches that together form the single-process batch,
and the parent compares weights, histories, logs and checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TinySeg, params_of
from vlsegkit import _distributed
from vlsegkit._distributed import DistEnv, ResumableSampler, ShardSampler, mix_seed
from vlsegkit.data import SyntheticLesions, collate_prompts
from vlsegkit.hub import load_checkpoint_file
from vlsegkit.train import evaluate, find_checkpoint, fit, seed_everything

WORLD = 2


# one intra-op thread (tests/conftest.py): these tiny loops only lose to thread overhead
pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("length", [12, 13, 1])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resumable_sampler_shards_form_the_single_process_order(length, shuffle):
    single = ResumableSampler(length, shuffle=shuffle, seed=7)
    for epoch in range(3):
        order = single.epoch_indices(epoch)
        assert sorted(order) == list(range(length))
        if shuffle and length > 1:
            gen = torch.Generator().manual_seed(mix_seed(7, epoch))
            assert order == torch.randperm(length, generator=gen).tolist()
        shards = [
            ResumableSampler(length, shuffle=shuffle, seed=7, rank=r, world_size=3).epoch_indices(
                epoch
            )
            for r in range(3)
        ]
        assert len({len(s) for s in shards}) == 1  # equal per-rank lengths (padded)
        interleaved = [s[i] for i in range(len(shards[0])) for s in shards]
        padded = (order * 3)[: len(interleaved)]
        assert interleaved == padded  # rank r holds positions r, r + 3, ... of the padded order
    orders = [single.epoch_indices(e) for e in range(3)]
    assert (orders[0] != orders[1]) == (shuffle and length > 1)


def test_resumable_sampler_starts_mid_epoch():
    sampler = ResumableSampler(10, shuffle=True, seed=3, rank=1, world_size=2)
    full = sampler.epoch_indices(4)
    sampler.set_position(4, start=2)
    assert list(sampler) == full[2:] and len(sampler) == 3
    loader = DataLoader(range(10), batch_size=2, sampler=sampler)
    assert [b.tolist() for b in loader] == [full[2:4], full[4:5]]
    with pytest.raises(ValueError, match="rank must be in"):
        ResumableSampler(4, shuffle=False, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("length", [0, 1, 7, 8])
def test_shard_sampler_is_an_unpadded_partition(length):
    shards = [list(ShardSampler(length, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(length))
    assert [len(ShardSampler(length, rank=r, world_size=3)) for r in range(3)] == [
        len(s) for s in shards
    ]


def test_single_process_helpers_are_identities():
    assert _distributed.setup() == DistEnv() and DistEnv().is_main and not DistEnv().enabled
    assert _distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert _distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert _distributed.all_gather_object(3) == [3]
    _distributed.barrier()
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(1, 3) != mix_seed(2, 2)
    assert 0 <= mix_seed(2**70, 5) < 2**63


# --------------------------------------------------------------------------- the runs
def train_set():
    return SyntheticLesions(length=16, image_size=16, seed=0)


def val_set(length=6):
    return SyntheticLesions(length=length, image_size=16, seed=5)


def run_a(batch_size, out: Path | None = None, log_fn=None):
    """Dataset input, cosine warmup, clipping, validation, checkpoints and logs."""
    seed_everything(0)
    model = TinySeg()
    history = fit(
        model,
        train_set(),
        val_loader=val_set(),
        batch_size=batch_size,
        epochs=2,
        lr=2e-2,
        scheduler="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        seed=3,
        checkpoint_dir=None if out is None else out / "ckpt",
        checkpoint_every=None if out is None else 3,
        log_dir=None if out is None else out / "logs",
        log_fn=log_fn,
        progress=False,
    )
    return model, history


def run_b(batch_size, grad_accum_steps):
    """A shuffling DataLoader (re-made with a sharded sampler) and gradient accumulation."""
    seed_everything(1)
    model = TinySeg()
    data = DataLoader(
        train_set(),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_prompts,
        generator=torch.Generator().manual_seed(4),
    )
    history = fit(model, data, grad_accum_steps=grad_accum_steps, lr=2e-2, progress=False)
    return model, history


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    records = []
    model_a, history_a = run_a(4 // WORLD, out, log_fn=records.append)
    model_b, history_b = run_b(1, 2)
    scores = evaluate(model_a, val_set(7), batch_size=2)
    torch.save(
        {
            "a": params_of(model_a),
            "history_a": history_a.state_dict(),
            "records": records,
            "b": params_of(model_b),
            "history_b": history_b.state_dict(),
            "evaluate": scores,
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
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        __file__, "worker", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, ranks


def test_two_processes_equal_one_process_with_the_same_global_batch(ddp_results):
    _, ranks = ddp_results
    assert [r["env"] for r in ranks] == [DistEnv(i, WORLD, local_rank=i) for i in range(WORLD)]
    # DDP keeps the replicas identical.
    assert all(
        torch.equal(r["a"], ranks[0]["a"]) and torch.equal(r["b"], ranks[0]["b"]) for r in ranks
    )
    records = []
    model_a, history_a = run_a(4, log_fn=records.append)
    model_b, history_b = run_b(4, 1)
    start = params_of(TinySeg())  # any init: the runs must have moved far from it
    for name, model, history in (("a", model_a, history_a), ("b", model_b, history_b)):
        ddp_params, ddp_history = ranks[0][name], ranks[0][f"history_{name}"]
        diff = (ddp_params - params_of(model)).abs().max().item()
        print(f"config {name}: max |DDP - single| = {diff:.3g}")
        assert diff <= 1e-6
        assert (params_of(model) - start).abs().max() > 1e-2
        assert ddp_history["steps"] == history.steps
        torch.testing.assert_close(ddp_history["train_loss"], history.train_loss, rtol=1e-6, atol=0)
        for ours, theirs in zip(ddp_history["val"], history.val, strict=True):
            assert ours["count"] == theirs["count"] == 6
            assert ours["dice"] == pytest.approx(theirs["dice"], abs=1e-9)
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert all(r[f"history_{name}"] == ddp_history for r in ranks)
    assert 0.0 < history_a.val[-1]["dice"] < 1.0
    # Step records: same steps and learning rates, losses reduced over both processes.
    assert [r["step"] for r in ranks[0]["records"]] == [r["step"] for r in records]
    for ours, theirs in zip(ranks[0]["records"], records, strict=True):
        assert ours.keys() == theirs.keys() and ours.get("lr") == theirs.get("lr")
        key = "loss" if "loss" in ours else "train_loss"
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6)
    assert ranks[1]["records"] == []  # log_fn runs on rank 0 only


def test_evaluate_reduces_over_processes(ddp_results):
    _, ranks = ddp_results
    model = TinySeg()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(ranks[0]["a"], model.parameters())
    single = evaluate(model, val_set(7), batch_size=2)
    for r in ranks:
        assert r["evaluate"]["count"] == single["count"] == 7  # odd length: nothing padded
        assert r["evaluate"]["dice"] == pytest.approx(single["dice"], abs=1e-9)
        assert r["evaluate"]["iou"] == pytest.approx(single["iou"], abs=1e-9)
        assert r["evaluate"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_rank_zero_writes_logs_and_checkpoints_once(ddp_results):
    out, ranks = ddp_results
    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines == ranks[0]["records"]
    assert [r["step"] for r in lines if "lr" in r] == list(range(1, 9))
    folders = sorted(p.name.split("-")[0] for p in (out / "ckpt").iterdir() if p.is_dir())
    assert folders == ["best", "last"]
    weights = load_checkpoint_file(find_checkpoint(out / "ckpt") / "model.safetensors")
    model = TinySeg()
    assert weights.keys() == model.state_dict().keys()
    model.load_state_dict(weights)
    assert torch.equal(params_of(model), ranks[0]["a"])
    state = torch.load(find_checkpoint(out / "ckpt") / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == WORLD and state["layout"]["world_size"] == WORLD


def _failing_worker() -> None:
    """Rank 1 fails after joining; rank 0 waits in a collective for it."""
    _distributed.setup()
    if int(os.environ["RANK"]) == 1:
        raise RuntimeError("rank 1 fails on purpose")
    _distributed.all_reduce_sum([1.0])


def test_a_failing_rank_ends_the_job_quickly(tmp_path):
    """The exit handler waits for every rank only on a clean exit: a rank leaving on an exception
    must not wait in a barrier for ranks that sit in their next collective (the job then hung)."""
    import time

    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        __file__, "fail",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "rank 1 fails on purpose" in proc.stderr
    assert time.perf_counter() - start < 45  # the monitored barrier alone would wait 60 s


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
    # The results are saved. Leave without interpreter teardown: torch's gloo teardown still
    # aborts now and then under load ("terminate called without an active exception"), after all
    # the work, which would fail the launch for a reason that is not what these tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
elif __name__ == "__main__" and sys.argv[1:2] == ["fail"]:
    _failing_worker()
