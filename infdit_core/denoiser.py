"""EDM-preconditioned denoiser D(x; sigma) of Inf-DiT (spec 4.2), whole-image or by block sweep.

Preconditioning and the output mix run in float32 whatever the model dtype; only the network
itself runs in the model's dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Union

import torch

from .config import SR_SCALE
from .graphs import CallGraphs
from .model import InfDiT, LayerRunner
from .offload import Placement
from .strips import Block, StripSchedule
from .uniba import BlockCanvas, KVCache, chunks

SIGMA_DATA = 0.5

# Called after each network call: (blocks_done, blocks_total, denoised canvas filled so far).
BlockHook = Callable[[int, int, torch.Tensor], None]


class NeighbourExchange(Protocol):
    """Moves the K/V of strip-edge blocks between ranks (see distributed.py)."""

    def begin_sweep(self) -> None:
        """A new network call (a sweep over the strip) starts."""

    def receive(self, cache: KVCache, blocks: list[Block]) -> None:
        """Put into `cache` every block of the previous rank that `blocks` read (see KVCache.put)."""

    def send(self, packed: list[tuple[Block, list[torch.Tensor]]]) -> None:
        """Hand the K/V of this rank's edge blocks (one tensor per layer) to the next rank."""


def edm_precondition(sigma: torch.Tensor):
    """c_skip, c_out, c_in, c_noise for sigma_data = 0.5 (EDM "F" parameterisation)."""
    var = sigma ** 2 + SIGMA_DATA ** 2
    c_skip = SIGMA_DATA ** 2 / var
    c_out = sigma * SIGMA_DATA / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def canvas_shape(lr, concat_lr, world: int = 1) -> tuple[int, int, int, int]:
    """[B, 3, H, W] of the whole canvas. Over several ranks concat_lr may be one rank's strip of
    it, and the size comes from lr, which is always the whole image at a quarter of the size."""
    B, C, H, W = concat_lr.shape
    if world == 1:
        return B, C, H, W
    return B, C, SR_SCALE * lr.shape[-2], SR_SCALE * lr.shape[-1]


def check_inputs(model: InfDiT, lr, concat_lr, clip_vector, schedule: Optional[StripSchedule] = None):
    B, C, H, W = canvas_shape(lr, concat_lr, schedule.world if schedule else 1)
    s = model.config.block_size
    if H % s or W % s:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {s}-px block: pad it first "
                         "(infdit_core.upscale pads and crops back for you)")
    if C != 3:
        raise ValueError(f"concat_lr must be RGB [B, 3, H, W], got {tuple(concat_lr.shape)}")
    if tuple(lr.shape) != (B, 3, H // SR_SCALE, W // SR_SCALE):
        raise ValueError(f"lr must be [B, 3, H/4, W/4] = {(B, 3, H // SR_SCALE, W // SR_SCALE)}, "
                         f"got {tuple(lr.shape)}")
    strip = schedule.canvas_shape(s, C) if schedule else (B, C, H, W)
    if tuple(concat_lr.shape) not in ((B, C, H, W), strip):
        raise ValueError(f"concat_lr {tuple(concat_lr.shape)} is neither the whole canvas {(B, C, H, W)} "
                         f"(4 x lr) nor this rank's strip of it {strip}")
    if tuple(clip_vector.shape) != (B, model.config.vector_dim):
        raise ValueError(f"clip_vector must be [B, {model.config.vector_dim}], got {tuple(clip_vector.shape)}")


class BlockSweepDenoiser:
    """D(x; sigma) computed `block_batch` blocks per network call, holding K/V for about one
    line of blocks. With block_batch >= the number of blocks it is the whole-image forward.

    lr and clip_vector are whole-image tensors, concat_lr the whole canvas or the schedule's strip of
    it; x and the result are the canvases of the schedule's strip (the whole image unless the work
    is split over ranks), on the placement's canvas device.

    layer_runner: how each network layer runs (None: eagerly; fast.CompiledLayers: compiled).
    call_graphs: replay the network calls from CUDA graphs where a sweep's calls repeat (graphs.py):
    with one rank, nothing moved to host memory.

    reuse_output: each call writes its result into the memory of the previous call's result
    (which is then no longer valid), saving one canvas; for a caller that consumes each estimate
    before the next call, as the Heun sampler does."""

    def __init__(self, model: InfDiT, *, lr, concat_lr, clip_vector, block_batch: int = 1,
                 on_blocks: Optional[BlockHook] = None, schedule: Optional[StripSchedule] = None,
                 placement: Optional[Placement] = None, exchange: Optional[NeighbourExchange] = None,
                 reuse_output: bool = False, layer_runner: Optional[LayerRunner] = None,
                 call_graphs: Optional[CallGraphs] = None):
        check_inputs(model, lr, concat_lr, clip_vector, schedule)
        if schedule is None:
            B, _, H, W = concat_lr.shape
            schedule = StripSchedule(B, H // model.config.block_size, W // model.config.block_size)
        self.model = model
        self.schedule = schedule
        self.placement = placement if placement is not None else Placement.for_mode("off", model.device)
        self.canvas = BlockCanvas(model.config, lr, concat_lr, self.schedule, self.placement)
        self.clip_vector = clip_vector.to(model.device, torch.float32)
        self.order = self.schedule.order
        self.block_batch = block_batch
        self.on_blocks = on_blocks
        self.exchange = exchange
        self.reuse_output = reuse_output
        self.layer_runner = layer_runner
        self.call_graphs = call_graphs
        self.last_cache: Optional[KVCache] = None  # kept for inspection (tests, benchmarks)
        # Blocks not yet denoised in the current call show the previous estimate (at first the
        # upsampled LR), so a preview of the canvas fills in block by block.
        self._estimate = self.canvas.concat_lr

    @property
    def num_blocks(self) -> int:
        return len(self.order)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: Union[torch.Tensor, float]) -> torch.Tensor:
        model, placement = self.model, self.placement
        if x.shape != self.canvas.concat_lr.shape:
            raise ValueError(f"x {tuple(x.shape)} must have the shape of concat_lr {tuple(self.canvas.concat_lr.shape)}")
        x = x.to(placement.canvas, torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=model.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in edm_precondition(sigma))
        cond = model.conditioning(c_noise.flatten(), self.clip_vector)
        batch = max(1, min(self.block_batch, self.num_blocks))
        cache = self.last_cache = KVCache(self.order, batch, model.config.num_layers, placement=placement,
                                          outgoing=self.schedule.outgoing)
        if self.exchange is not None:
            self.exchange.begin_sweep()
        # The previous result is written over unless it is still read: the LR, or x itself.
        owned = (self.reuse_output and self._estimate is not self.canvas.concat_lr
                 and self._estimate.data_ptr() != x.data_ptr())
        out = self._estimate if owned else self._estimate.clone()
        graphs = None
        # (fixed_calls: one rank, no K/V spilled; the canvases on the compute device: no copies.)
        if self.call_graphs is not None and cache.fixed_calls and placement.canvas == placement.compute:
            cfg = model.config
            # The pool must not be memory of the first graph's own.
            cache.allocate(cfg.num_heads, cfg.block_tokens ** 2, cfg.head_dim, model.dtype, model.device)
            graphs = self.call_graphs.sweep(model)
        done = 0
        for blocks in chunks(self.order, batch):
            if self.exchange is not None:
                self.exchange.receive(cache, blocks)
            cache.begin_call(blocks)
            where = self.canvas.locate(blocks)

            def network_call():
                # What a CUDA graph records: device work only, reading what changes from call to
                # call (where, the cache's index) from the buffers begin_call and locate wrote.
                inputs = self.canvas.inputs(blocks, x, where)
                image = inputs.batch_index
                skip = c_skip[image] * inputs.z[:, :3]
                # Official quirk (8.1-3): c_in scales the LR concat channels as well as the noisy
                # image. In place: the fresh block inputs are not needed unscaled once the skip
                # term is taken.
                inputs.z.mul_(c_in[image])
                net = model.forward_blocks(inputs, cond, cache, layer_runner=self.layer_runner).float()
                self.canvas.write(out, where, placement.to_canvas(skip + c_out[image] * net))

            if graphs is None:
                network_call()
            else:
                graphs.run(len(blocks), network_call)
            if self.exchange is not None:
                self.exchange.send(cache.take_outbox())
            done += len(blocks)
            if self.on_blocks is not None:
                self.on_blocks(done, self.num_blocks, out)
        cache.close()
        self._estimate = out
        return out


def denoise(model: InfDiT, x, sigma, *, lr, concat_lr, clip_vector) -> torch.Tensor:
    """Whole-image D(x; sigma): every block in one network call (the official "full" mode).

    x, concat_lr: [B, 3, H, W] in [-1, 1], H and W multiples of the block size; lr: [B, 3, H/4, W/4];
    sigma: [B] or a scalar; clip_vector: [B, vector_dim]. Returns [B, 3, H, W] float32."""
    denoiser = BlockSweepDenoiser(model, lr=lr, concat_lr=concat_lr, clip_vector=clip_vector)
    denoiser.block_batch = denoiser.num_blocks
    return denoiser(x, sigma)
