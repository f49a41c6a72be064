"""Image-parallel sampling over torch.distributed: strip-edge K/V exchange and the final gather.

Each rank sweeps its strip of the block grid (strips.py). After every network call a rank sends
the per-layer K/V of its strip's last block of each line to the next rank (isend, one message per
layer). When a call starts, a rank posts the receives of the previous rank's blocks that the call
reads (irecv) and hands them to the K/V cache still in flight: the cache waits for a layer only when
it first reads it, so every layer but the first arrives while the layers before it compute, and
the receiving rank holds no block ahead of the call that reads it. Each layer's buffer is freed
once its last reader has read it. Messages follow one fixed order (network call, image, line,
layer) on both sides, so no tags are needed. There is no barrier between network calls: the Heun
update is pixel-local, so a rank starts its next call as soon as its own strip is done, and after
the first fill the ranks compute at once. Rank 0 gathers the strips at the end.

K/V messages travel on the job's process group (NCCL between GPUs); canvases travel on a gloo
group, since they live in host memory.
"""
from __future__ import annotations

import functools
from collections import deque
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from .strips import Block, StripSchedule
from .uniba import KVCache, neighbour_slots

# Blocks a rank leaves in flight before waiting for the oldest send. One overlaps every send with
# the next call's compute; more would only let this rank run further ahead of the next, each block
# holding its K/V of every layer (147 MB at the released size).
MAX_PENDING = 1
AUTO = "auto"

_cpu_groups: dict = {}


def resolve_group(group: Union[str, None, "dist.ProcessGroup"] = AUTO) -> Optional["dist.ProcessGroup"]:
    """The process group to split an image over: the given one; with AUTO, the default group when
    torch.distributed is initialised with more than one rank; None for a single process."""
    if group == AUTO:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    return group


def world_and_rank(group) -> tuple[int, int]:
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def cpu_group(group):
    """A gloo group over the same ranks, for host tensors (created once, collectively)."""
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _cpu_groups:
        _cpu_groups[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
    return _cpu_groups[group]


def _comm_device(group, compute: torch.device) -> torch.device:
    return compute if dist.get_backend(group) == "nccl" else torch.device("cpu")


class StripExchange:
    """The NeighbourExchange of one rank (see denoiser.py)."""

    def __init__(self, schedule: StripSchedule, group, model):
        cfg = model.config
        self.group, self.compute, self.dtype = group, model.device, model.dtype
        # One message: a block's K/V of one layer; a block is num_layers of them.
        self.kv_shape = (2, cfg.num_heads, cfg.block_tokens ** 2, cfg.head_dim)
        self.num_layers = cfg.num_layers
        self.comm = _comm_device(group, self.compute)
        self.nbytes = torch.Size(self.kv_shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        self.incoming = schedule.incoming
        self.position = {block: n for n, block in enumerate(self.incoming)}
        rank = schedule.rank
        self.previous = dist.get_global_rank(group, rank - 1) if self.incoming else None
        self.next = dist.get_global_rank(group, rank + 1) if schedule.outgoing else None
        self.pending: deque = deque()
        self.received = 0

    def begin_sweep(self):
        self.received = 0

    def receive(self, cache: KVCache, blocks: list[Block]):
        needed = max((self.position[s] for block in blocks for s in neighbour_slots(block) if s in self.position),
                     default=-1)
        while self.received <= needed:
            cache.put(self.incoming[self.received], [self._post() for _ in range(self.num_layers)])
            self.received += 1

    def _post(self) -> Callable[[], torch.Tensor]:
        """Receive one layer's message; returns the wait for it."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.comm)
        return functools.partial(self._arrived, dist.irecv(buffer, src=self.previous, group=self.group), buffer)

    def _arrived(self, work, buffer: torch.Tensor) -> torch.Tensor:
        work.wait()
        return buffer.view(self.dtype).view(self.kv_shape).to(self.compute)

    def send(self, packed: list[tuple[Block, list[torch.Tensor]]]):
        for _, layers in packed:
            buffers = [kv.view(torch.uint8).flatten().to(self.comm) for kv in layers]
            self.pending.append([(dist.isend(buffer, dst=self.next, group=self.group), buffer) for buffer in buffers])
            while len(self.pending) > MAX_PENDING:
                self._wait_sent()

    def _wait_sent(self):
        for work, _ in self.pending.popleft():
            work.wait()

    def close(self):
        """Wait until the next rank has every message (blocking, not spinning)."""
        while self.pending:
            self._wait_sent()


def gather_strips(strip: torch.Tensor, schedule: StripSchedule, block_size: int, group,
                  shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The whole canvas `shape` on rank 0 from every rank's strip (None on the other ranks)."""
    group = cpu_group(group)
    strip = strip.to("cpu", torch.float32).contiguous()
    if schedule.rank != 0:
        if strip.numel():
            dist.send(strip, dst=dist.get_global_rank(group, 0), group=group)
        return None
    whole = torch.empty(shape, dtype=torch.float32)
    for rank in range(schedule.world):
        other = StripSchedule(schedule.batch, schedule.rows, schedule.cols, schedule.world, rank)
        if not other.span:
            continue
        target = other.crop(whole, block_size)
        if rank == 0:
            target.copy_(strip)
        else:
            received = torch.empty(target.shape, dtype=torch.float32)
            dist.recv(received, src=dist.get_global_rank(group, rank), group=group)
            target.copy_(received)
    return whole


def broadcast_from_first(image: Optional[torch.Tensor], shape: tuple[int, ...], group) -> torch.Tensor:
    """Rank 0's image on every rank (host memory)."""
    group = cpu_group(group)
    buffer = image.to("cpu", torch.float32).contiguous() if dist.get_rank(group) == 0 else torch.empty(shape)
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group)
    return buffer
