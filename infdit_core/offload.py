"""The storage policy: where the sampler's canvases and the cached K/V live while the network runs.

`off` keeps everything on the compute device. `canvas` keeps the sampler's canvases (x, the
estimate, the concat LR, the Heun step's derivative and Euler point) in host memory: each network
call moves only its blocks' inputs to the device and its outputs back, and the pixel-local Heun
update runs on the host (a few element-wise passes over the canvas per step: about a second at 8192²
on one CPU core, against minutes of network calls per step, so moving it to the device would only
buy a second copy of the canvases there). `all` also spills the per-layer K/V cache: the device
keeps the blocks the next call reads (plus `kv_device_slots` more, the soonest needed first) and the
rest of the row waits in host memory. Placement changes where tensors live, never the arithmetic.

Copies run on the compute stream as non-blocking copies through pinned host memory. Stream order
guarantees that a spilled block is never read before its copy completes, and that a host buffer
handed out again (HostSlots reuses them; torch's allocator does the same for the pinned staging of
block inputs) is written only after the copy out of it. They overlap the host-side work of the
sweep (gathering the next call's inputs), not the kernels. The canvases themselves stay in pageable
memory: block inputs are gathered into a fresh tensor anyway, which is pinned on its way to the
device, and pinning gigabytes of canvases would only take memory away from the rest of the system.
On a CPU compute device the same code path runs with host-to-host copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("auto", "off", "canvas", "all")
HOST = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    compute: torch.device
    canvas: torch.device  # where the sampler's canvases live
    kv_device_slots: Optional[int] = None  # None: the K/V cache stays on the compute device
    # off, canvas or all; "kv" for the K/V-only spill the out-of-memory back-off adds to off. Kept
    # by name: on a CPU compute device every mode has the same devices.
    mode: str = "off"

    @classmethod
    def for_mode(cls, mode: str, compute, kv_device_slots: int = 0) -> "Placement":
        compute = torch.device(compute)
        if mode == "off":
            return cls(compute, compute)
        if mode == "canvas":
            return cls(compute, HOST, mode="canvas")
        if mode == "all":
            return cls(compute, HOST, kv_device_slots, mode="all")
        raise ValueError(f"offload must be one of {', '.join(MODES)} (auto is resolved by the planner), got {mode!r}")

    @property
    def spills_kv(self) -> bool:
        return self.kv_device_slots is not None

    def with_kv_spill(self) -> "Placement":
        if self.spills_kv:
            return self
        return Placement(self.compute, self.canvas, 0, "all" if self.mode == "canvas" else "kv")

    def _pinned(self) -> bool:
        return self.compute.type == "cuda"

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        """A freshly gathered canvas-side tensor on the compute device."""
        if t.device.type != HOST.type or not self._pinned():
            # Already on a device (a no-op, whether the compute device is named "cuda" or "cuda:0"),
            # or host to host.
            return t.to(self.compute)
        return t.pin_memory().to(self.compute, non_blocking=True)

    def to_canvas(self, t: torch.Tensor) -> torch.Tensor:
        """A compute-side result on the canvas device (synchronous: the sampler reads it next)."""
        return t.to(self.canvas)

    def spill(self, t: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """`host` (a buffer of t's shape in host memory) holding a copy of the K/V tensor t."""
        return host.copy_(t, non_blocking=True)

    def fetch(self, t: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A spilled K/V tensor back on the compute device: a new tensor, or copied `into` one."""
        if into is None:
            return t.to(self.compute, non_blocking=True, copy=True)
        return into.copy_(t, non_blocking=True)


class HostSlots:
    """Host buffers for spilled K/V, carved out of a few large allocations.

    torch's pinned-memory allocator rounds every allocation up to a power of two, so one layer's K
    of one block (2.6 MB for the released model) would take 4 MiB. A slab of a power-of-two size
    holds at least SLOTS_PER_SLAB buffers and wastes less than one. A buffer goes back to the free
    list once its block is fetched; a later spill into it is ordered after that fetch because all
    copies run on the compute stream, and the host never reads these buffers itself."""

    SLOTS_PER_SLAB = 64

    def __init__(self, placement: Placement):
        self.placement = placement
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.slab_bytes = 0  # host memory held in slabs

    def spill(self, t: torch.Tensor) -> torch.Tensor:
        free = self.free.setdefault((tuple(t.shape), t.dtype), [])
        if not free:
            size = t.numel() * t.element_size()
            slots = (1 << (self.SLOTS_PER_SLAB * size - 1).bit_length()) // size
            slab = torch.empty((slots, *t.shape), dtype=t.dtype, device=HOST, pin_memory=self.placement._pinned())
            self.slab_bytes += slab.numel() * slab.element_size()
            free.extend(slab.unbind(0))
        return self.placement.spill(t, free.pop())

    def fetch(self, host: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        on_device = self.placement.fetch(host, into)
        self.release(host)
        return on_device

    def release(self, host: torch.Tensor):
        self.free[(tuple(host.shape), host.dtype)].append(host)
