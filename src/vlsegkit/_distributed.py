"""Private helpers that let ``vlsegkit.train`` run unchanged in one process or under ``torchrun``.

Three concerns live here:

* the process group: ``setup()`` joins the group ``torchrun`` describes in the environment
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) unless the caller already
  initialised one, and ``DistEnv`` says who we are;
* small collectives on Python numbers (``all_reduce_sum``, ``broadcast_object``, ``all_gather_object``)
  that are no-ops in a single process, so the training loop needs no ``if distributed`` branches;
* data order: ``ResumableSampler`` (a seeded permutation per epoch, sharded like
  ``torch.utils.data.DistributedSampler`` and able to start mid-epoch) and ``ShardSampler`` (an
  unpadded, ordered split for evaluation, so no image is scored twice).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistEnv",
    "ResumableSampler",
    "ShardSampler",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "current",
    "mix_seed",
    "setup",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the (possibly trivial) process group.

    Attributes:
        rank: global rank, 0 on the main process.
        world_size: number of processes; 1 without ``torch.distributed``.
        local_rank: rank on this machine (selects the GPU under ``torchrun``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints."""
        return self.rank == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistEnv:
    """The ``DistEnv`` of the initialised process group, or the single-process one."""
    if not _initialized():
        return DistEnv()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def setup() -> DistEnv:
    """Join the process group described by ``torchrun``'s environment variables, if any.

    Does nothing when a group is already initialised (the caller chose the backend) or when
    ``WORLD_SIZE`` is absent or 1. Otherwise initialises torch's default backend (gloo for CPU
    tensors, plus NCCL for CUDA tensors when CUDA is available), selects ``cuda:LOCAL_RANK`` as the
    current CUDA device, and destroys the group at interpreter exit.

    Returns:
        This process's ``DistEnv``.
    """
    if _initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return current()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group()
    sys.excepthook = _note_failures(sys.excepthook)
    atexit.register(_destroy)
    return current()


def _destroy() -> None:
    if not _initialized():
        return
    # Wait for every rank before tearing down: a rank that destroys the group (and rank 0 its
    # TCPStore) while another is still in its own teardown made about one exit in six abort with
    # "terminate called without an active exception" (torch 2.14, gloo). Only on a clean exit: a
    # rank leaving on an exception must not wait for ranks that sit in their next collective (its
    # exit is what makes them fail and torchrun stop the job).
    # (A plain blocking barrier: gloo's monitored_barrier, which only acknowledges through rank 0,
    # still aborted in 2 of 20 runs, an async barrier waited with a timeout in 1 of 20; this in 0 of
    # 70. A rank that finishes early waits here until the others exit.)
    if not _FAILED:
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()


_FAILED = False


def _note_failures(hook: Any) -> Any:
    """``sys.excepthook`` that records an uncaught exception for :func:`_destroy`."""

    def excepthook(*args: Any) -> None:
        global _FAILED
        _FAILED = True
        hook(*args)

    return excepthook


def _reduction_device() -> torch.device:
    # A pure NCCL group cannot reduce CPU tensors; the default "cpu:gloo,cuda:nccl" group can.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum each number over all processes (float64); returns ``values`` unchanged in one process."""
    if not _initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (pickled; for small Python objects only)."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_reduction_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (pickled; for small Python objects only)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mix_seed(seed: int, *words: int) -> int:
    """A well-spread generator seed for ``(seed, *words)``, stable across Python/numpy versions."""
    entropy = [int(seed) % 2**64, *(int(w) % 2**64 for w in words)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) % 2**63


class ResumableSampler(Sampler[int]):
    """Dataset indices for one process and one epoch, in a reproducible order that can resume.

    The epoch's order is ``torch.randperm(length)`` from a generator seeded by ``(seed, epoch)`` (or
    ``range(length)`` without shuffling). As in ``DistributedSampler`` it is padded by wrapping
    around to a multiple of ``world_size`` and rank ``r`` takes positions ``r, r + world_size, ...``,
    so per-rank batch ``j`` of ``b`` items from every rank together hold exactly the items of
    single-process batch ``j`` of ``b · world_size`` items. ``set_position(epoch, start)`` selects
    the epoch and skips this rank's first ``start`` indices (``start`` = batches done × batch size),
    which is how training resumes mid-epoch without loading the skipped items.

    Args:
        length: dataset length.
        shuffle: permute the indices every epoch.
        seed: base seed of the permutations.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, length: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.length = length
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch`` and skip this rank's first ``start`` indices of it."""
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list of ``epoch`` (ignoring ``start``)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        total = math.ceil(self.length / self.world_size) * self.world_size
        if order and total > len(order):
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.length / self.world_size) - self.start)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: an unpadded split for scoring.

    Args:
        length: dataset length.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, length: int, *, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
