"""From an image to an upscaled image: resizing, padding to the block grid, sampling, cropping back.

`sample` runs the EDM sampler over the block-sweep denoiser with progress hooks and out-of-memory
back-off; `upscale` prepares the inputs for any size, scale, batch and channel count.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .config import SR_SCALE
from .denoiser import BlockSweepDenoiser
from .memory import empty_cache, is_out_of_memory, resolve_block_batch
from .model import InfDiT
from .sampling import DEFAULT_STEPS, initial_state, karras_sigmas, network_calls, sample_heun, unit_noise

MAX_FACTOR = 4.0
# callback(step, total_steps, blocks_done, blocks_total, preview): step is the 0-based Heun step,
# blocks are counted over the whole run (every network call sweeps all blocks once), preview is the
# current x0 estimate [B, 3, H, W] in [-1, 1], filled block by block.
ProgressCallback = Callable[[int, int, int, int, torch.Tensor], None]


class OutOfMemory(RuntimeError):
    """Raised when even one block per network call does not fit."""


class _BackoffDenoiser:
    """Retries a denoiser call that ran out of memory with half the block batch."""

    def __init__(self, denoiser: BlockSweepDenoiser):
        self.denoiser = denoiser
        self.calls_done = 0

    def __call__(self, x, sigma):
        while True:
            try:
                out = self.denoiser(x, sigma)
                self.calls_done += 1
                return out
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(error):
                    raise
                empty_cache(self.denoiser.model.device)
                if self.denoiser.block_batch <= 1:
                    raise OutOfMemory(
                        "Out of memory with one block per network call. Lower the output size or the "
                        "batch, use weight dtype bf16/fp16, or free the device (close other models).") from error
                self.denoiser.block_batch = max(1, min(self.denoiser.block_batch, self.denoiser.num_blocks) // 2)
                warnings.warn(f"Inf-DiT: out of memory, retrying with block_batch={self.denoiser.block_batch}")


def sample(model: InfDiT, *, lr, concat_lr, clip_vector, steps: int = DEFAULT_STEPS,
           noise: Optional[torch.Tensor] = None, seed: Optional[int] = None, lr_noise_init: bool = True,
           block_batch: Union[int, str] = "auto", callback: Optional[ProgressCallback] = None) -> torch.Tensor:
    """x at sigma = 0, [B, 3, H, W] in [-1, 1] (float32). `noise` is the unit Gaussian eps with the
    shape of concat_lr; when None it is drawn from `seed` (0 if None)."""
    B, _, H, W = concat_lr.shape
    if noise is None:
        noise = unit_noise(concat_lr.shape, 0 if seed is None else seed)
    elif noise.shape != concat_lr.shape:
        raise ValueError(f"noise must have the shape of concat_lr {tuple(concat_lr.shape)}, got {tuple(noise.shape)}")
    batch = resolve_block_batch(block_batch, model.config, H, W, model.dtype, model.device, B)
    sigmas = karras_sigmas(steps).to(model.device)
    total_calls = network_calls(steps)
    state = {"step": 0}
    denoiser = BlockSweepDenoiser(model, lr=lr, concat_lr=concat_lr, clip_vector=clip_vector, block_batch=batch)
    resilient = _BackoffDenoiser(denoiser)
    if callback is not None:
        def on_blocks(done, total, estimate):
            callback(state["step"], steps, resilient.calls_done * total + done, total_calls * total, estimate)
        denoiser.on_blocks = on_blocks

    def on_step(i):
        state["step"] = i

    x = initial_state(concat_lr.to(model.device), noise.to(model.device), sigmas[0], lr_noise_init)
    del noise  # one canvas less for the whole run
    return sample_heun(resilient, x, sigmas, on_step=on_step)


def chain_factors(scale: float, max_factor: float = MAX_FACTOR) -> list[float]:
    """Factors of at most `max_factor` whose product is `scale`: as many 4x passes as needed,
    then the remainder (e.g. 16 -> [4, 4], 8 -> [4, 2], 6 -> [4, 1.5])."""
    if not scale > 1:
        raise ValueError(f"scale must be > 1, got {scale}")
    factors = []
    while scale > max_factor + 1e-9:
        factors.append(max_factor)
        scale /= max_factor
    return factors + [scale]


def output_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The exact output size of `upscale`: round(h * scale) x round(w * scale)."""
    return round(h * scale), round(w * scale)


def _resize(image, size):
    # Bicubic with antialias: what the official torchvision Resize does (Keys a = -0.5).
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)


def _pad_to(image, size):
    # Replicate, not reflect: reflect cannot pad more than the image itself (inputs smaller than a
    # block) and mirrors content the model would attend to as if it were real.
    H, W = image.shape[-2:]
    return F.pad(image, (0, size[1] - W, 0, size[0] - H), mode="replicate")


def prepare_condition(image: torch.Tensor, out_hw: tuple[int, int], block_size: int):
    """concat LR [B,3,Hp,Wp] and cross-attention LR [B,3,Hp/4,Wp/4] in [-1,1] for an RGB image in
    [-1,1], with the canvas padded to the block grid (content at the top-left)."""
    Ht, Wt = out_hw
    Hp, Wp = (math.ceil(v / block_size) * block_size for v in out_hw)
    concat = _pad_to(_resize(image, out_hw).clamp(-1, 1), (Hp, Wp))
    if Ht % SR_SCALE == 0 and Wt % SR_SCALE == 0:
        # As the official 4x (identity) and 2x paths: the LR resized straight to target/4.
        lr = _pad_to(_resize(image, (Ht // SR_SCALE, Wt // SR_SCALE)), (Hp // SR_SCALE, Wp // SR_SCALE))
    else:
        # target/4 is fractional: derive it from the padded canvas so both stay pixel-aligned.
        lr = _resize(concat, (Hp // SR_SCALE, Wp // SR_SCALE))
    return concat, lr


def _upscale_rgb(model, rgb, out_hw, *, clip_vector, steps, seed, lr_noise_init, block_batch, callback):
    concat, lr = prepare_condition(rgb * 2 - 1, out_hw, model.config.block_size)
    x = sample(model, lr=lr, concat_lr=concat, clip_vector=clip_vector, steps=steps, seed=seed,
               lr_noise_init=lr_noise_init, block_batch=block_batch, callback=callback)
    return ((x[:, :, :out_hw[0], :out_hw[1]] + 1) / 2).clamp(0, 1)


def upscale(model: InfDiT, image: torch.Tensor, *, scale: float = 4.0, clip_vector=None,
            steps: int = DEFAULT_STEPS, seed: int = 0, lr_noise_init: bool = True,
            block_batch: Union[int, str] = "auto", callback: Optional[ProgressCallback] = None) -> torch.Tensor:
    """Upscale `image` [B, C, h, w] in [0, 1] (C = 1, 3 or 4) to [B, C, round(h*scale), round(w*scale)].

    Scales above 4 run as a chain of passes (`chain_factors`). Alpha is resized bicubically on its
    own; grayscale (one channel, or three equal ones) runs as RGB and is averaged back. `clip_vector` [B, vector_dim] is the semantic
    embedding of the input (see clip.py); without one a zero vector is used, with a warning."""
    B, C, h, w = image.shape
    if C not in (1, 3, 4):
        raise ValueError(f"image must have 1, 3 or 4 channels, got {C}")
    if clip_vector is None:
        warnings.warn("Inf-DiT: no CLIP embedding given, using a zero vector (results lose global "
                      "semantics; load a CLIP model to compute one).")
        clip_vector = torch.zeros(B, model.config.vector_dim)
    rgb = image[:, :3] if C != 1 else image.expand(B, 3, h, w)
    alpha = image[:, 3:] if C == 4 else None
    # A grayscale picture stored as RGB (ComfyUI's Load Image does this) must come back gray: the
    # model adds chroma of its own, so equal input channels are averaged back to equal outputs.
    gray = C == 1 or bool((rgb == rgb[:, :1]).all())
    done = 1.0
    for factor in chain_factors(scale):
        done *= factor
        out_hw = output_size(h, w, done)
        rgb = _upscale_rgb(model, rgb.float(), out_hw, clip_vector=clip_vector, steps=steps, seed=seed,
                           lr_noise_init=lr_noise_init, block_batch=block_batch, callback=callback)
    out_hw = tuple(rgb.shape[-2:])
    if gray:
        rgb = rgb.mean(dim=1, keepdim=True)
        if C == 1:
            return rgb
        rgb = rgb.expand(-1, 3, -1, -1).contiguous()
    if alpha is not None:
        rgb = torch.cat([rgb, _resize(alpha.float().to(rgb.device), out_hw).clamp(0, 1)], dim=1)
    return rgb
