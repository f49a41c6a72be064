"""The official EDM sampler (spec 5): Karras schedule, deterministic Heun, last step Euler.

Samplers are small functions over a denoiser callable D(x, sigma). The sampler state (x, the
derivatives, the sigmas) is float32 even when the model runs in bf16/fp16: a deliberate
improvement over the official all-bf16 loop, which rounds sigma itself (40 -> 30.125 ...).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from .strips import Block, StripSchedule

SIGMA_MIN = 0.002
SIGMA_MAX = 40.0
RHO = 7.0
DEFAULT_STEPS = 20

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(steps: int = DEFAULT_STEPS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """steps noise levels from sigma_max down to sigma_min, then a final 0 (float32).

    The ramp comes from linspace (as the official discretiser builds it): an i/(n-1) loop can
    differ by one ulp."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_state(concat_lr: torch.Tensor, noise: torch.Tensor, sigma_max: torch.Tensor,
                  lr_noise_init: bool = True) -> torch.Tensor:
    """x_T = upsampled LR + sigma_max * eps (official: it fights colour shift), or sigma_max * eps."""
    x = noise.to(torch.float32) * sigma_max
    return x + concat_lr.to(torch.float32) if lr_noise_init else x


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Heun step (no churn); plain Euler when sigma_next is 0.

    x + h * d, then x + h * (d + d_next) / 2, with the operations of those formulas in their order
    (the same bits), but in place where a canvas is no longer needed: beside x and the denoiser's
    estimate the step holds two canvases (d and the Euler point, which becomes d_next and then the
    result) instead of four. x is never written to."""
    h = sigma_next - sigma
    d = x.sub(denoiser(x, sigma)).div_(sigma)
    x_euler = d.mul(h).add_(x)
    if sigma_next == 0:
        return x_euler
    d_next = x_euler.sub_(denoiser(x_euler, sigma_next)).div_(sigma_next)
    return d_next.add_(d).mul_(h).div_(2).add_(x)


def network_calls(steps: int) -> int:
    """Denoiser evaluations of `sample_heun` over `steps` steps: two per step, one on the last."""
    return 2 * steps - 1


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                on_step: Optional[Callable[[int], None]] = None, start: int = 0,
                on_step_end: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Integrate from sigmas[start] to sigmas[-1] = 0. `on_step(i)` is called before step i,
    `on_step_end(i, x)` after it with the new state (what a resumed run starts step i + 1 from)."""
    for i in range(start, len(sigmas) - 1):
        if on_step is not None:
            on_step(i)
        x = heun_step(denoiser, x, sigmas[i], sigmas[i + 1])
        if on_step_end is not None:
            on_step_end(i, x)
    return x


def block_noise(seed: int, block: Block, block_size: int, channels: int = 3) -> torch.Tensor:
    """eps ~ N(0, I) of one block, keyed by (seed, image, block row, block column): the same numbers
    whichever rank, device, block batch or sweep order draws them, and no process ever draws the
    whole canvas's noise."""
    digest = hashlib.sha256(f"infdit-noise:{int(seed)}:{block.b}:{block.i}:{block.j}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(channels, block_size, block_size, generator=generator, dtype=torch.float32)


def strip_noise(schedule: StripSchedule, seed: int, block_size: int, channels: int = 3) -> torch.Tensor:
    """The unit noise of a strip's canvas [B, channels, H, W] (the whole canvas for one rank)."""
    noise = torch.empty(schedule.canvas_shape(block_size, channels))
    oi, oj = schedule.origin()
    for block in schedule.order:
        i, j = (block.i - oi) * block_size, (block.j - oj) * block_size
        noise[block.b, :, i:i + block_size, j:j + block_size] = block_noise(seed, block, block_size, channels)
    return noise


def unit_noise(shape, seed: int, block_size: int) -> torch.Tensor:
    """The unit noise of a whole canvas `shape` = [B, C, H, W] (H, W multiples of block_size)."""
    B, C, H, W = shape
    return strip_noise(StripSchedule(B, H // block_size, W // block_size), seed, block_size, C)
