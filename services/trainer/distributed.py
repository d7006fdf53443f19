"""Several trainer ranks with torch.distributed: gloo on CPU, NCCL on GPU.

Each rank reads its share of the rollout partitions (p % world == rank), the learner averages
gradients across ranks, and rank 0 writes the checkpoint's model, pushes weights and commits
offsets. The ranks agree before every update that each holds a full batch, so that no rank waits
in an all-reduce the others never reach.

Launch (two ranks on one machine):
    torchrun --nproc-per-node 2 -m services.trainer
or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself for each process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    """Which rank this process is and how many there are."""

    rank: int
    """This process's rank, 0 .. world - 1."""
    world: int
    """Number of trainer ranks."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def init_from_env(timeout_s: float = 300.0) -> RankInfo:
    """Joins the process group described by RANK/WORLD_SIZE/MASTER_*; one rank needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return RankInfo(0, 1)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return RankInfo(dist.get_rank(), dist.get_world_size())


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(batch_size: int, stop: bool) -> tuple[bool, bool]:
    """(every rank holds a batch of the same size, some rank wants to stop)."""
    if not active():
        return batch_size > 0, stop
    # [min size, -max size, any stop]: one all-reduce(MIN) answers all three.
    flags = torch.tensor([batch_size, -batch_size, -int(stop)], dtype=torch.int64, device=_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    smallest, largest, stop_any = int(flags[0]), -int(flags[1]), -int(flags[2]) > 0
    return smallest > 0 and smallest == largest, stop_any


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0)
    return int(t[0])


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
