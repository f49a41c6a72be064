"""The process group of a `torchrun` launch, for the command line.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT) starts one process per rank; multi-node jobs use its --nnodes/--rdzv-endpoint.
Backend: NCCL when every rank of this machine has a CUDA device of its own (LOCAL_RANK picks it),
gloo otherwise (CPU ranks). A rank that dies makes its peers' next send or receive fail, and torchrun
tears the whole group down; the process-group timeout bounds every other wait.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    device: torch.device
    group: Optional["dist.ProcessGroup"]

    def close(self):
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()


def start(device: str, timeout_s: float) -> Launch:
    """Join the launcher's process group (a single process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Launch(0, 1, torch.device(device), None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    own_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available() \
        and torch.cuda.device_count() >= local_world
    if own_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device(device)
    dist.init_process_group("nccl" if own_gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if own_gpu else {}))
    return Launch(rank, world, device, dist.group.WORLD)
