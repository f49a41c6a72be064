"""EDM-preconditioned denoiser D(x; sigma) of Inf-DiT (spec 4.2), whole-image or by block sweep.

Preconditioning and the output mix run in float32 whatever the model dtype; only the network
itself runs in the model's dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .config import SR_SCALE
from .model import InfDiT
from .uniba import BlockCanvas, KVCache, chunks, sweep_order

SIGMA_DATA = 0.5

# Called after each network call: (blocks_done, blocks_total, denoised canvas filled so far).
BlockHook = Callable[[int, int, torch.Tensor], None]


def edm_precondition(sigma: torch.Tensor):
    """c_skip, c_out, c_in, c_noise for sigma_data = 0.5 (EDM "F" parameterisation)."""
    var = sigma ** 2 + SIGMA_DATA ** 2
    c_skip = SIGMA_DATA ** 2 / var
    c_out = sigma * SIGMA_DATA / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def check_inputs(model: InfDiT, lr, concat_lr, clip_vector):
    B, C, H, W = concat_lr.shape
    s = model.config.block_size
    if H % s or W % s:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {s}-px block: pad it first "
                         "(infdit_core.upscale pads and crops back for you)")
    if C != 3:
        raise ValueError(f"concat_lr must be RGB [B, 3, H, W], got {tuple(concat_lr.shape)}")
    if tuple(lr.shape) != (B, 3, H // SR_SCALE, W // SR_SCALE):
        raise ValueError(f"lr must be [B, 3, H/4, W/4] = {(B, 3, H // SR_SCALE, W // SR_SCALE)}, "
                         f"got {tuple(lr.shape)}")
    if tuple(clip_vector.shape) != (B, model.config.vector_dim):
        raise ValueError(f"clip_vector must be [B, {model.config.vector_dim}], got {tuple(clip_vector.shape)}")


class BlockSweepDenoiser:
    """D(x; sigma) computed `block_batch` blocks per network call, holding K/V for about one
    block row. With block_batch >= the number of blocks it is the whole-image forward."""

    def __init__(self, model: InfDiT, *, lr, concat_lr, clip_vector, block_batch: int = 1,
                 on_blocks: Optional[BlockHook] = None):
        check_inputs(model, lr, concat_lr, clip_vector)
        self.model = model
        dev = model.device
        self.canvas = BlockCanvas(model.config, lr.to(dev, torch.float32), concat_lr.to(dev, torch.float32))
        self.clip_vector = clip_vector.to(dev, torch.float32)
        B, _, H, W = concat_lr.shape
        s = model.config.block_size
        self.order = sweep_order(B, H // s, W // s)
        self.block_batch = block_batch
        self.on_blocks = on_blocks
        self.last_cache: Optional[KVCache] = None  # kept for inspection (tests, benchmarks)
        # Blocks not yet denoised in the current call show the previous estimate (at first the
        # upsampled LR), so a preview of the canvas fills in block by block.
        self._estimate = self.canvas.concat_lr

    @property
    def num_blocks(self) -> int:
        return len(self.order)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: Union[torch.Tensor, float]) -> torch.Tensor:
        model = self.model
        if x.shape != self.canvas.concat_lr.shape:
            raise ValueError(f"x {tuple(x.shape)} must have the shape of concat_lr {tuple(self.canvas.concat_lr.shape)}")
        x = x.to(model.device, torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_precondition(sigma)
        cond = model.conditioning(c_noise, self.clip_vector)
        batch = max(1, min(self.block_batch, self.num_blocks))
        cache = self.last_cache = KVCache(self.order, batch, model.config.num_layers)
        out = self._estimate.clone()
        done = 0
        for blocks in chunks(self.order, batch):
            cache.begin_call(blocks)
            net = model.forward_blocks(self.canvas.inputs(blocks, x, c_in), cond, cache).float()
            for m, blk in enumerate(blocks):
                self.canvas.pixels(out, blk).copy_(
                    c_skip[blk.b] * self.canvas.pixels(x, blk) + c_out[blk.b] * net[m])
            done += len(blocks)
            if self.on_blocks is not None:
                self.on_blocks(done, self.num_blocks, out)
        self._estimate = out
        return out


def denoise(model: InfDiT, x, sigma, *, lr, concat_lr, clip_vector) -> torch.Tensor:
    """Whole-image D(x; sigma): every block in one network call (the official "full" mode).

    x, concat_lr: [B, 3, H, W] in [-1, 1], H and W multiples of the block size; lr: [B, 3, H/4, W/4];
    sigma: [B] or a scalar; clip_vector: [B, vector_dim]. Returns [B, 3, H, W] float32."""
    denoiser = BlockSweepDenoiser(model, lr=lr, concat_lr=concat_lr, clip_vector=clip_vector)
    denoiser.block_batch = denoiser.num_blocks
    return denoiser(x, sigma)
