"""Predicted peak memory of a block sweep, the block-batch chooser, and out-of-memory detection.

The prediction counts the weights, the per-layer K/V cache (one row of blocks along the shorter
side), the activations of one network call and the sampler's canvases.
The activation factor was calibrated with benchmarks/bench_uniba.py (which prints the planner's
error next to the measured peak).
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import InfDiTConfig
from .model import InfDiT

# Hidden-sized tensors ([blocks, tokens, width]) alive at the peak of one layer's forward: the
# 4-slot keys and values gathered, offset and laid out for attention, next to q, k, v, the residual
# stream and the attention output. Measured: 21-22 (benchmarks/bench_uniba.py, CPU fp32).
ACTIVATION_FACTOR = 22
# Float32 canvases [B, 3, H, W] the sampler holds at once in a Heun step: x, the concat LR, the
# previous estimate, the derivative, the Euler point, the new estimate and a temporary.
CANVASES = 7


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv_cache: int
    activations: int
    canvases: int
    block_batch: int
    blocks: int  # blocks in the whole batch

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.canvases

    @property
    def working(self) -> int:
        """What a run needs beyond the loaded weights."""
        return self.total - self.weights


@functools.lru_cache(maxsize=None)
def parameter_count(config: InfDiTConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in InfDiT(config).parameters())


def plan(config: InfDiTConfig, H: int, W: int, block_batch: int, dtype: torch.dtype = torch.bfloat16,
         batch: int = 1) -> MemoryPlan:
    """Predicted peak bytes of sampling an H x W (padded to the block grid) output."""
    e = torch.empty((), dtype=dtype).element_size()
    s = config.block_size
    rows, cols = math.ceil(H / s), math.ceil(W / s)
    blocks = batch * rows * cols
    m = max(1, min(block_batch, blocks))
    block_bytes = config.block_tokens ** 2 * config.hidden_size * e
    # The store peaks at one row (along the shorter side) plus one block; the fresh K/V of the blocks
    # in flight are already counted with the activations.
    cached = 0 if m >= blocks else config.num_layers * 2 * (min(rows, cols) + 1) * block_bytes
    return MemoryPlan(
        weights=parameter_count(config) * e,
        kv_cache=cached,
        activations=ACTIVATION_FACTOR * m * block_bytes,
        canvases=CANVASES * batch * 3 * rows * s * cols * s * 4,
        block_batch=m,
        blocks=blocks,
    )


def free_memory(device: Union[str, torch.device]) -> int:
    """Bytes a run may use on `device` now."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free for us too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:  # Linux; elsewhere assume a modest 8 GB
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in info else 8 << 30


def choose_block_batch(config: InfDiTConfig, H: int, W: int, dtype: torch.dtype, budget: int,
                       batch: int = 1) -> int:
    """Largest block batch whose working memory (weights already loaded) fits `budget` bytes."""
    whole = plan(config, H, W, sys.maxsize, dtype, batch)
    if whole.working <= budget:
        return whole.blocks  # the whole image at once needs no K/V cache
    # Below the whole image, working memory grows with the block batch: bisect.
    low, high = 1, max(1, whole.blocks - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if plan(config, H, W, mid, dtype, batch).working <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def resolve_block_batch(block_batch: Union[int, str], config: InfDiTConfig, H: int, W: int,
                        dtype: torch.dtype, device, batch: int = 1,
                        budget: Optional[int] = None) -> int:
    if block_batch == "auto":
        # Leave headroom for the allocator's fragmentation and for other work on the device.
        budget = int(0.8 * free_memory(device)) if budget is None else budget
        return choose_block_batch(config, H, W, dtype, budget, batch)
    if not isinstance(block_batch, int) or block_batch < 1:
        raise ValueError(f"block_batch must be 'auto' or a positive integer, got {block_batch!r}")
    return block_batch


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
