"""Distributed training plumbing: the process group from torchrun's environment (gloo on
CPU, nccl on CUDA), its teardown, and the broadcast of rank 0's weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Initialise the process group from the environment when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    # Import torch.distributed.nn before the group exists. Ten of its functions declare
    # ``group=group.WORLD`` as a default argument, evaluated at import: imported later (a DDP
    # run imports it lazily), their __defaults__ hold the live default ProcessGroup for good,
    # so destroy_process_group cannot free it and gloo's worker and TCP-loop threads and the
    # TCPStore thread run on into interpreter teardown, where a rank aborted with
    # std::terminate ("terminate called without an active exception"). Imported now, they
    # hold None.
    from torch.distributed import nn as _dist_nn  # noqa: F401

    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, initialized_here=True)


def shutdown_distributed(info: DistInfo, finished: bool) -> None:
    """Destroy the process group that ``init_distributed`` created. After a normal finish
    the ranks first meet at a barrier: a gloo rank whose peer tears down while it is still
    working (rank 0 writing the last files, say) can abort with std::terminate."""
    if not (info.initialized_here and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)
