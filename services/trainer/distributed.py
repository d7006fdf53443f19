"""Several trainer ranks with torch.distributed: gloo on CPU, NCCL on GPU.

Each rank reads its share of the rollout partitions (p % world == rank), the learner averages
gradients across ranks, and rank 0 writes the checkpoint's model, pushes weights and commits
offsets. The ranks agree before every update that each holds a full batch, so that no rank waits
in an all-reduce the others never reach.

Every collective the trainer makes is here, each a no-op (or the local value) on one rank:
  - the Kafka loop: `init_from_env`, `agree` (a full batch? a stop?), `barrier`, `shutdown`;
  - the learner: `vote` (batch sizes and refusals), `broadcast_parameters` (rank 0's weights at
    the start), `average_gradients` (before every optimizer step), `mean_over_ranks` (metrics
    the KL controller sees).
One vote encoding serves both agreements: [size, -size, -flag] under all-reduce(MIN).

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
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
    return RankInfo(dist.get_rank(), dist.get_world_size())


def world_size() -> int:
    """Ranks in the process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def active() -> bool:
    return world_size() > 1


def _device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Vote:
    """What every rank learns from `vote`."""

    smallest: int
    """The smallest size any rank brought."""
    largest: int
    """The largest size any rank brought."""
    flagged: bool
    """Whether any rank raised its flag."""


def vote(size: int, flag: bool) -> Vote:
    """Every rank's (size, flag) in one collective; one rank's own vote when it runs alone."""
    if not active():
        return Vote(size, size, flag)
    # [min size, -max size, -any flag]: one all-reduce(MIN) answers all three.
    ballot = torch.tensor([size, -size, -int(flag)], dtype=torch.int64, device=_device())
    dist.all_reduce(ballot, op=dist.ReduceOp.MIN)
    return Vote(int(ballot[0]), -int(ballot[1]), int(ballot[2]) < 0)


def agree(batch_size: int, stop: bool) -> tuple[bool, bool]:
    """(every rank holds a batch of the same size, some rank wants to stop)."""
    votes = vote(batch_size, stop)
    return votes.smallest > 0 and votes.smallest == votes.largest, votes.flagged


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values in `params` on every rank, in place."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every gradient replaced by its mean over the ranks, in place; a parameter without a
    gradient gets zeros first, so that every rank reduces the same buffer. One flat buffer, so
    one collective per optimizer step."""
    if not active():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for param in params:
        count = param.grad.numel()
        param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
        offset += count


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over the ranks, detached, as float64 on the CPU."""
    values = values.detach().double()
    if not active():
        return values.cpu()
    values = values.to(_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return (values / dist.get_world_size()).cpu()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        flat = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
