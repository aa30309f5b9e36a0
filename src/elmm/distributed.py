"""This process's place in a torchrun job, and the few collectives training needs.

Under `torchrun` (WORLD_SIZE set) every process joins a process group (nccl on GPU, gloo on CPU).
Outside it, `Dist()` is rank 0 of 1 and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group exists

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n rows (sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE in the environment).

    GPU: one device per local rank and nccl; CPU: gloo. Returns this rank's device.
    """
    if "WORLD_SIZE" not in os.environ:
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        # Rank 0 validates alone while the others wait at a barrier: allow a long wait.
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return Dist(rank, world, local, True), device


def shutdown_distributed(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_sum(value: float, dist: Dist, device: torch.device) -> float:
    """The sum of `value` over all ranks."""
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return float(t.item())


def broadcast_int(value: int, dist: Dist, device: torch.device) -> int:
    """Rank 0's `value` on every rank."""
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch_dist.broadcast(t, src=0)
    return int(t.item())


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """`model` in DistributedDataParallel when a process group exists, else `model` itself."""
    if not dist.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # The model moves its inputs itself; buffers (rotary tables) are identical on every rank,
    # so they need no broadcast before every forward (newer torch renamed the option).
    no_sync_buffers = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return DistributedDataParallel(model, **no_sync_buffers)
