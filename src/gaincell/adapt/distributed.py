"""The torchrun process group as adaptation sees it: rank, world size, barrier and sum reduction.

Without a process group (one process) every function is the identity / a no-op.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist


def world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks (a CPU tensor; ``t`` itself when there is one process)."""
    if world()[1] > 1:
        # NCCL needs the tensor on the rank's GPU; gloo takes CPU tensors.
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t = buf.cpu()
    return t
