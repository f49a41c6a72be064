"""The storage policy: where the sampler's canvases and the cached K/V live while the network runs.

`off` keeps everything on the compute device. `canvas` keeps the sampler state (x, the estimate,
the concat LR, the noise, the Heun temporaries) in host memory: each network call moves only its
blocks' inputs to the device and its outputs back, and the pixel-local Heun update runs on the host
(a few element-wise passes over the canvas per step: about a second at 8192² on one CPU core,
against minutes of network calls per step, so moving it to the device would only buy a second
copy of the canvases there). `all` also spills the per-layer K/V cache: the device keeps the blocks
the next call reads (plus `kv_device_slots` more, the soonest needed first) and the rest of the row
waits in host memory. Placement changes where tensors live, never the arithmetic.

Copies run on the compute stream as non-blocking copies through pinned host memory. Stream order
guarantees that a spilled block is never read before its copy completes, and torch's pinned-memory
allocator does not hand a host buffer out again while a copy into or out of it is pending. They
overlap the host-side work of the sweep (gathering the next call's inputs), not the kernels.
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
        if t.device == self.compute:
            return t
        if self._pinned():
            t = t.pin_memory()
        return t.to(self.compute, non_blocking=True)

    def to_canvas(self, t: torch.Tensor) -> torch.Tensor:
        """A compute-side result on the canvas device (synchronous: the sampler reads it next)."""
        return t.to(self.canvas)

    def spill(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a cached K/V tensor."""
        host = torch.empty(t.shape, dtype=t.dtype, device=HOST, pin_memory=self._pinned())
        return host.copy_(t, non_blocking=True)

    def fetch(self, t: torch.Tensor) -> torch.Tensor:
        """A spilled K/V tensor back on the compute device."""
        return t.to(self.compute, non_blocking=True, copy=True)
