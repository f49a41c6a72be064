"""Predicted peak memory of a block sweep, the block-batch and placement chooser, and out-of-memory
detection.

The prediction counts the weights, the per-layer K/V cache (one line of blocks along the shorter
side of the rank's strip), the activations of one network call, the sampler's canvases and, across
ranks, the K/V messages at strip edges; each on the compute device or in host memory as the
placement (offload.py) puts it. The activation factor was calibrated with benchmarks/bench_uniba.py
(which prints the planner's error next to the measured peak).
"""
from __future__ import annotations

import functools
import logging
import math
import sys
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import SR_SCALE, InfDiTConfig
from .distributed import MAX_PENDING
from .model import InfDiT
from .offload import HOST, MODES, Placement

log = logging.getLogger("infdit")

# Hidden-sized tensors ([blocks, tokens, width]) alive at the peak of one network call, per block:
# the 4-slot keys and values gathered straight into the attention layout (8), the layer's fresh K
# and V and their row in the K/V pool they are gathered from (2 + 2, uniba.KVCache), q, the
# residual stream, RoPE tables and allocator slack; every sub-layer input is freed once projected
# (model.py). Calibrated with benchmarks/bench_uniba.py (CPU fp32), which prints the planner's
# error against the measured sample peak (-2 to +5 % at 512x512 for block batch 1 to the whole
# image; 16 before the pool's row was added left the whole image 12 % short).
ACTIVATION_FACTOR = 18
# Float32 canvases [B, 3, H, W] the sampler holds at once in a Heun step: x, the concat LR, the
# estimate (each network call writes over the previous one), the derivative and the Euler point
# (which the step turns into the result in place; see sampling.heun_step). Other samplers hold
# other counts (sampling.Sampler.canvases), passed as `canvases`.
CANVASES = 5
# K/V messages a rank holds at a strip edge beyond its cache (a block's K/V of every layer each):
# the sends in flight and the copy of the edge block being packed for the next one (a pool slot is
# written again once its last reader is done, so a send cannot share it), and the receive buffers
# of the block arriving from the previous rank (all its layers are posted at once; each is freed
# when the call first reading it has copied it into the pool).
EDGE_BUFFERS = MAX_PENDING + 2


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes of one rank's sweep: on the compute device and in host memory."""
    weights: int
    kv_cache: int  # cached K/V on the device
    activations: int
    canvases: int  # sampler canvases on the device
    block_batch: int
    blocks: int  # blocks this rank sweeps (the whole batch for one rank)
    boundary: int = 0  # K/V messages at strip edges (world > 1)
    kv_host: int = 0  # spilled K/V in host memory
    canvases_host: int = 0  # sampler canvases in host memory
    world: int = 1
    offload: str = "off"

    @property
    def total(self) -> int:
        """Device bytes at the peak."""
        return self.weights + self.kv_cache + self.activations + self.canvases + self.boundary

    @property
    def working(self) -> int:
        """What a run needs on the device beyond the loaded weights."""
        return self.total - self.weights

    @property
    def host(self) -> int:
        """Host bytes the placement adds (spilled K/V and canvases)."""
        return self.kv_host + self.canvases_host


@functools.lru_cache(maxsize=None)
def parameter_count(config: InfDiTConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in InfDiT(config).parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers: what plan()'s `weights` is for a model
    whose weights are all in its dtype, and less for fp8 weights (fp8.py: one byte per weight plus a
    float32 scale per output channel, where plan() counts the bf16 the activations run in)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def block_kv_bytes(config: InfDiTConfig, dtype: torch.dtype) -> int:
    """K and V of every layer for one block."""
    e = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * config.block_tokens ** 2 * config.hidden_size * e


def plan(config: InfDiTConfig, H: int, W: int, block_batch: int, dtype: torch.dtype = torch.bfloat16,
         batch: int = 1, world: int = 1, offload: str = "off", kv_device_slots: int = 0,
         canvases: int = CANVASES) -> MemoryPlan:
    """Predicted peak bytes of sampling an H x W (padded to the block grid) output, per rank of
    `world` (the largest strip), with the placement `offload` (off, canvas or all, or kv: the K/V
    cache alone spilled, as the out-of-memory back-off does; see offload.py)."""
    if offload not in ("off", "canvas", "all", "kv"):
        raise ValueError(f"plan() takes offload off, canvas, all or kv, got {offload!r}")
    canvas_on_device = offload in ("off", "kv")
    e = torch.empty((), dtype=dtype).element_size()
    s = config.block_size
    rows, cols = math.ceil(H / s), math.ceil(W / s)
    short, long = min(rows, cols), max(rows, cols)
    strip = math.ceil(short / min(world, short))  # the first strips take the remainder
    blocks = batch * long * strip
    m = max(1, min(block_batch, blocks))
    block_bytes = config.block_tokens ** 2 * config.hidden_size * e
    kv_block = block_kv_bytes(config, dtype)
    # The store peaks at one line of the strip plus one block (plus the edge block received from
    # the previous rank); the fresh K/V of the blocks in flight are counted with the activations.
    cached = 0 if m >= blocks and world == 1 else (strip + 1 + (world > 1)) * kv_block
    # A sweep whose calls all run the same ops (one rank, nothing spilled) writes a call's uncached
    # blocks into a free slot, at most one more (uniba._Ledger).
    scratch = kv_block if cached and world == 1 and offload in ("off", "canvas") else 0
    kv_device = cached + scratch
    if offload in ("all", "kv"):
        # The next call's neighbours and the extra slots stay on the device; the rest of the line
        # waits on the host. m consecutive blocks read up to m + 1 blocks of the previous line (top
        # and top-left) and the left neighbour of the first one, which this call computed.
        kv_device = min(cached, (kv_device_slots + m + 2) * kv_block)
    # The canvases, the whole LR image and its copy padded by one block (the halo of the strip) that
    # the cross-attention windows are cut from.
    lr_block = s // SR_SCALE
    canvas_bytes = (canvases * batch * 3 * long * s * strip * s * 4 + batch * 3 * rows * cols * lr_block ** 2 * 4
                    + batch * 3 * (long + 2) * (strip + 2) * lr_block ** 2 * 4)
    # Block inputs and outputs staged for one call when the canvases live on the host.
    staging = 0 if canvas_on_device else m * (6 + 3 + 3) * s * s * 4
    return MemoryPlan(
        weights=parameter_count(config) * e,
        kv_cache=kv_device,
        activations=ACTIVATION_FACTOR * m * block_bytes + staging,
        canvases=canvas_bytes if canvas_on_device else 0,
        block_batch=m,
        blocks=blocks,
        boundary=EDGE_BUFFERS * kv_block if world > 1 else 0,
        kv_host=cached + scratch - kv_device,
        canvases_host=0 if canvas_on_device else canvas_bytes,
        world=world,
        offload=offload,
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


def default_budget(device) -> int:
    """Working memory a run may plan for: free memory less headroom for the allocator's
    fragmentation and for other work on the device."""
    return int(0.8 * free_memory(device))


def choose_block_batch(config: InfDiTConfig, H: int, W: int, dtype: torch.dtype, budget: int,
                       batch: int = 1, world: int = 1, offload: str = "off", kv_device_slots: int = 0,
                       canvases: int = CANVASES) -> int:
    """Largest block batch whose working memory (weights already loaded) fits `budget` bytes."""
    def working(m):
        return plan(config, H, W, m, dtype, batch, world, offload, kv_device_slots, canvases).working

    whole = plan(config, H, W, sys.maxsize, dtype, batch, world, offload, kv_device_slots, canvases)
    if whole.working <= budget:
        return whole.blocks  # the whole image at once needs no K/V cache
    # Below the whole image, working memory grows with the block batch: bisect.
    low, high = 1, max(1, whole.blocks - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if working(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


class HostMemoryError(MemoryError):
    """The job would exhaust host memory; raised before anything runs."""


def resolve_execution(block_batch: Union[int, str], offload: str, config: InfDiTConfig, H: int, W: int,
                      dtype: torch.dtype, device, batch: int = 1, world: int = 1,
                      budget: Optional[int] = None, host_budget: Optional[int] = None,
                      canvases: int = CANVASES) -> tuple[int, Placement, MemoryPlan]:
    """The block batch and placement a run uses, and the plan they give.

    offload auto keeps everything on the device when it fits (at block batch 1), otherwise puts the
    canvases in host memory, otherwise the K/V cache too, keeping as many K/V blocks on the device
    as fit. A job whose host share exceeds the available host memory is refused up front."""
    device = torch.device(device)
    if offload not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, got {offload!r}")
    if block_batch != "auto" and (not isinstance(block_batch, int) or block_batch < 1):
        raise ValueError(f"block_batch must be 'auto' or a positive integer, got {block_batch!r}")
    if budget is None:
        budget = default_budget(device)
    smallest = 1 if block_batch == "auto" else block_batch
    mode, slots = offload, 0
    if offload == "auto":
        if device.type != "cuda":
            mode = "off"  # the compute device is host memory: nothing to spill to
        else:
            mode = next((m for m in ("off", "canvas")
                         if plan(config, H, W, smallest, dtype, batch, world, m, canvases=canvases).working <= budget),
                        "all")
            if mode == "all":
                spare = budget - plan(config, H, W, smallest, dtype, batch, world, "all", canvases=canvases).working
                slots = max(0, spare // block_kv_bytes(config, dtype))
            log.info("Inf-DiT: offload auto chose '%s' for a %dx%d output (%.2f GB free on %s)%s", mode, W, H,
                     budget / 1e9, device, f", {slots} K/V blocks kept on the device" if mode == "all" else "")
    chosen = block_batch if block_batch != "auto" else choose_block_batch(
        config, H, W, dtype, budget, batch, world, mode, slots, canvases)
    result = plan(config, H, W, chosen, dtype, batch, world, mode, slots, canvases)
    # On a CPU compute device the working set is host memory too.
    host_need = result.host + (result.working if device.type == "cpu" else 0)
    host_free = free_memory(HOST) if host_budget is None else host_budget
    if host_need > host_free:
        raise HostMemoryError(
            f"Inf-DiT: a {W}x{H} output needs about {host_need / 1e9:.2f} GB of host memory "
            f"(canvases {result.canvases_host / 1e9:.2f} GB, spilled K/V {result.kv_host / 1e9:.2f} GB"
            + (f", working set {result.working / 1e9:.2f} GB" if device.type == "cpu" else "")
            + f") but {host_free / 1e9:.2f} GB is available. Lower the output size or the batch, or spread "
            "the image over several machines (torchrun, see the README).")
    return chosen, Placement.for_mode(mode, device, slots), result


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
