"""From an image to an upscaled image: resizing, padding to the block grid, sampling, cropping back.

`sample` runs an EDM sampler (the official Heun by default, see sampling.SAMPLERS) over the
block-sweep denoiser with progress hooks and out-of-memory back-off; `upscale` prepares the inputs
for any size, scale, batch and channel count.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .config import SR_SCALE
from .denoiser import BlockSweepDenoiser, canvas_shape
from .distributed import (AUTO, StripExchange, broadcast_from_first, cpu_group, gather_strips, resolve_group,
                          world_and_rank)
from .fast import parse_fast, resolve_fast
from .fp8 import check_supported as check_fp8_supported, is_fp8
from .graphs import call_graphs_for
from .memory import choose_block_batch, default_budget, empty_cache, is_out_of_memory, resolve_execution
from .model import InfDiT
from .offload import Placement
from .resume import StateStore, job_key, remove_job
from .sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, get_sampler, initial_state, karras_sigmas, strip_noise
from .strips import StripSchedule

log = logging.getLogger("infdit")

MAX_FACTOR = 4.0
# callback(step, total_steps, blocks_done, blocks_total, preview): step is the 0-based sampler step,
# blocks are counted over the whole run (every network call sweeps all blocks once), preview is the
# current x0 estimate [B, 3, H, W] in [-1, 1], filled block by block.
ProgressCallback = Callable[[int, int, int, int, torch.Tensor], None]


class OutOfMemory(RuntimeError):
    """Raised when even one block per network call, with the K/V cache spilled, does not fit."""


@dataclass(frozen=True)
class Resume:
    """Where and how often a job's sampler state is checkpointed (see resume.py)."""
    directory: str
    interval: float = 60.0  # seconds between saves; 0 = after every step
    max_bytes: Optional[int] = None  # cap on the folder: the oldest checkpoints are pruned
    # A chained pass keeps its final state until the whole chain is done, so a rerun after an
    # interrupt in a later pass restores it instead of redoing it; `key` is then its job key.
    keep_result: bool = False
    key: Optional[str] = None


def out_of_memory_advice(placement: Placement) -> str:
    advice = "Lower the output size or the batch, use weight dtype bf16/fp16, or free the device (close other models)"
    if placement.mode != "all":
        advice += ", or keep the canvases and the K/V cache in host memory (offload all)"
    return advice + "."


class _BackoffDenoiser:
    """Retries a denoiser call that ran out of memory with half the block batch, then with the
    K/V cache spilled to host memory. Only in one process: ranks of a distributed job cannot redo
    a call alone (its K/V messages are already on their way), so there an out-of-memory is fatal."""

    def __init__(self, denoiser: BlockSweepDenoiser, retry: bool = True):
        self.denoiser = denoiser
        self.retry = retry
        self.calls_done = 0

    def __call__(self, x, sigma):
        denoiser = self.denoiser
        while True:
            try:
                out = denoiser(x, sigma)
                self.calls_done += 1
                return out
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(error):
                    raise
                empty_cache(denoiser.model.device)
                if not self.retry or (denoiser.block_batch <= 1 and denoiser.placement.spills_kv):
                    raise OutOfMemory(f"Out of memory with block_batch {denoiser.block_batch} and offload "
                                      f"'{denoiser.placement.mode}'. {out_of_memory_advice(denoiser.placement)}"
                                      ) from error
                if denoiser.block_batch > 1:
                    denoiser.block_batch = max(1, min(denoiser.block_batch, denoiser.num_blocks) // 2)
                    warnings.warn(f"Inf-DiT: out of memory, retrying with block_batch={denoiser.block_batch}")
                else:
                    denoiser.placement = denoiser.placement.with_kv_spill()
                    warnings.warn("Inf-DiT: out of memory at block_batch 1, retrying with the K/V cache in host memory")


def _execution(model: InfDiT, block_batch, offload, H: int, W: int, batch: int, world: int,
               canvases: int) -> tuple[int, Placement]:
    """Blocks per network call and the placement: resolved by the planner, or a given Placement."""
    if not isinstance(offload, Placement):
        chosen, placement, _ = resolve_execution(block_batch, offload, model.config, H, W, model.dtype,
                                                 model.device, batch, world, canvases=canvases)
        return chosen, placement
    if block_batch != "auto":
        return block_batch, offload
    return choose_block_batch(model.config, H, W, model.dtype, default_budget(model.device), batch, world,
                              offload.mode, offload.kv_device_slots or 0, canvases=canvases), offload


def _report_progress(callback: ProgressCallback, denoiser: BlockSweepDenoiser, resilient: _BackoffDenoiser,
                     state: dict, steps: int, total_calls: int, share: int):
    """Call `callback` after every block batch with the blocks done over all ranks, read off this
    rank's strip (`share` = blocks of the whole grid; the strips differ by one block at most)."""
    scale = share / max(1, denoiser.num_blocks)

    def on_blocks(done, total, estimate):
        blocks = round((resilient.calls_done * total + done) * scale)
        callback(state["step"], steps, blocks, round(total_calls * total * scale), estimate)
    denoiser.on_blocks = on_blocks
    if resilient.calls_done:
        on_blocks(0, denoiser.num_blocks, denoiser.canvas.concat_lr)  # a resumed run shows where it starts


def sample(model: InfDiT, *, lr, concat_lr, clip_vector, steps: int = DEFAULT_STEPS,
           sampler: str = DEFAULT_SAMPLER, noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
           lr_noise_init: bool = True,
           block_batch: Union[int, str] = "auto", callback: Optional[ProgressCallback] = None,
           offload: Union[str, Placement] = "auto", group=AUTO, resume: Optional[Resume] = None,
           fast: Union[str, bool] = "auto") -> Optional[torch.Tensor]:
    """x at sigma = 0, [B, 3, H, W] in [-1, 1] (float32). `noise` is the unit Gaussian eps of the
    whole canvas; when None it is drawn block by block from `seed` (0 if None). Over several ranks,
    concat_lr may be each rank's strip of the canvas (see strip_of), so no rank holds it whole.

    offload: auto/off/canvas/all or a Placement (offload.py). group: the process group whose ranks
    share the image in strips (strips.py): by default the initialised default group, if any; None
    for this process alone. Every rank calls sample with the same arguments; rank 0 returns the
    image, the other ranks None. resume: checkpoint the state and continue a job found there.
    sampler: a name of sampling.SAMPLERS (steps counts its steps; see network_calls).
    fast: compile the network's layers (fast.py): True, False, or auto (on CUDA, for jobs large
    enough to repay the compile time); the same image either way, to float rounding."""
    method = get_sampler(sampler)
    fast = parse_fast(fast)
    if is_fp8(model):
        check_fp8_supported(model.device)
    group = resolve_group(group)
    world, rank = world_and_rank(group)
    shape = canvas_shape(lr, concat_lr, world)
    B, _, H, W = shape
    s = model.config.block_size
    seed = 0 if seed is None else seed
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have the shape of the whole canvas {shape}, got {tuple(noise.shape)}")
    schedule = StripSchedule(B, H // s, W // s, world, rank)
    if world > 1 and rank == 0 and not schedule.strips[-1]:
        warnings.warn(f"Inf-DiT: {world} ranks for {len([p for p in schedule.strips if p])} strips of blocks: "
                      "the extra ranks stay idle")
    batch, placement = _execution(model, block_batch, offload, H, W, B, world, method.canvases)
    store = None
    if resume is not None:
        if resume.key is None and tuple(concat_lr.shape) != shape:
            raise ValueError("resume needs Resume.key (job_key of the whole canvas) when concat_lr is one rank's strip")
        key = resume.key or job_key(model, lr=lr, concat_lr=concat_lr, clip_vector=clip_vector, steps=steps,
                                    seed=seed, noise=noise, lr_noise_init=lr_noise_init, sampler=sampler)
        store = StateStore(resume.directory, key, schedule, s, shape, resume.interval,
                           group=cpu_group(group) if group is not None else None, max_bytes=resume.max_bytes)
    runner = resolve_fast(fast, model.device, block_evaluations=method.calls(steps) * len(schedule.order))
    denoiser = BlockSweepDenoiser(model, lr=lr, concat_lr=concat_lr, clip_vector=clip_vector, block_batch=batch,
                                  schedule=schedule, placement=placement, reuse_output=True, layer_runner=runner,
                                  call_graphs=call_graphs_for(runner, model.device))
    sigmas = karras_sigmas(steps).to(placement.canvas)
    start, x, history = 0, None, {}
    if store is not None and (found := store.load()) is not None:
        start, x = found[0] + 1, found[1].to(placement.canvas)
        history = {name: h.to(placement.canvas) for name, h in found[2].items()}
        del found  # the loaded state, if it was moved to the device
        log.info("Inf-DiT: resuming from step %d of %d (checkpoint in %s)", start, steps, resume.directory)
    if x is None:
        eps = strip_noise(schedule, seed, s) if noise is None else schedule.crop(noise, s)
        x = initial_state(denoiser.canvas.concat_lr, eps.to(placement.canvas), sigmas[0], lr_noise_init)
        del eps
    step_calls = method.step_calls(steps)
    resilient = _BackoffDenoiser(denoiser, retry=world == 1)
    resilient.calls_done = sum(step_calls[:start])
    if world > 1:
        denoiser.exchange = StripExchange(schedule, group, model)
    state = {"step": start}
    if callback is not None:
        _report_progress(callback, denoiser, resilient, state, steps, sum(step_calls), share=B * (H // s) * (W // s))

    def on_step(i):
        state["step"] = i

    # Handed over with no reference kept here, so the starting canvases go once the sampler drops them.
    begin, carried = [x], [history]
    del x, history
    last: dict = {}  # the final step's history, for a chained pass's kept state
    try:
        if store is None:
            step_end = None
        else:
            def step_end(i, x_i, history_i):
                last["history"] = history_i
                store.after_step(i, x_i, start, history_i)
        x = method.run(resilient, begin.pop(), sigmas, on_step=on_step, start=start, on_step_end=step_end,
                       history=carried.pop())
    except BaseException:
        if store is not None:
            store.save_unsaved()  # an interrupt keeps the last finished step
        raise
    if denoiser.exchange is not None:
        denoiser.exchange.close()
    if store is not None and resume.keep_result:
        store.keep(steps - 1, x, last.get("history"))
    if world > 1:
        x = gather_strips(x, schedule, s, group, shape)
    if store is not None and not resume.keep_result:
        store.finish()
    return x


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
    # One whole canvas at a time where possible (3.2 GB at 16384², on every rank of a split job):
    # the clamp runs in place on a fresh resize, and a canvas already on the block grid is not padded.
    resized = _resize(image, out_hw)
    resized = resized.clamp_(-1, 1) if resized is not image else resized.clamp(-1, 1)
    concat = resized if (Ht, Wt) == (Hp, Wp) else _pad_to(resized, (Hp, Wp))
    del resized
    if Ht % SR_SCALE == 0 and Wt % SR_SCALE == 0:
        # As the official 4x (identity) and 2x paths: the LR resized straight to target/4.
        lr = _pad_to(_resize(image, (Ht // SR_SCALE, Wt // SR_SCALE)), (Hp // SR_SCALE, Wp // SR_SCALE))
    else:
        # target/4 is fractional: derive it from the padded canvas so both stay pixel-aligned.
        lr = _resize(concat, (Hp // SR_SCALE, Wp // SR_SCALE))
    return concat, lr


def strip_of(canvas: torch.Tensor, block_size: int, group=AUTO) -> torch.Tensor:
    """This rank's strip of a whole canvas [B, C, H, W] (a copy), or the canvas itself for one
    process: what `sample` over several ranks needs of concat_lr, so the whole can be freed."""
    group = resolve_group(group)
    world, rank = world_and_rank(group)
    if world == 1:
        return canvas
    B, _, H, W = canvas.shape
    return StripSchedule(B, H // block_size, W // block_size, world, rank).crop(canvas, block_size).clone()


def _upscale_rgb(model, rgb, out_hw, *, resume: Optional[Resume], keep: list, **options):
    concat, lr = prepare_condition(rgb * 2 - 1, out_hw, model.config.block_size)
    if resume is not None and (resume.keep_result or resume.key is None):
        # Keyed on the whole canvas, before each rank keeps only its strip of it.
        resume = replace(resume, key=job_key(model, lr=lr, concat_lr=concat, clip_vector=options["clip_vector"],
                                             steps=options["steps"], seed=options["seed"], noise=None,
                                             lr_noise_init=options["lr_noise_init"], sampler=options["sampler"]))
    if resume is not None and resume.keep_result:
        keep.append(resume.key)
    concat = strip_of(concat, model.config.block_size, options["group"])
    x = sample(model, lr=lr, concat_lr=concat, resume=resume, **options)
    return None if x is None else ((x[:, :, :out_hw[0], :out_hw[1]] + 1) / 2).clamp(0, 1)


def upscale(model: InfDiT, image: torch.Tensor, *, scale: float = 4.0, clip_vector=None,
            steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, seed: int = 0, lr_noise_init: bool = True,
            block_batch: Union[int, str] = "auto", callback: Optional[ProgressCallback] = None,
            offload: str = "auto", group=AUTO, resume: Optional[Resume] = None,
            fast: Union[str, bool] = "auto") -> Optional[torch.Tensor]:
    """Upscale `image` [B, C, h, w] in [0, 1] (C = 1, 3 or 4) to [B, C, round(h*scale), round(w*scale)].

    Scales above 4 run as a chain of passes (`chain_factors`). Alpha is resized bicubically on its
    own; grayscale (one channel, or three equal ones) runs as RGB and is averaged back.
    `clip_vector` [B, vector_dim] is the semantic embedding of the input (see clip.py); without one
    a zero vector is used, with a warning. sampler, offload, group, resume and fast as in `sample`:
    over several ranks, rank 0 returns the image and the others None."""
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
    group = resolve_group(group)
    factors = chain_factors(scale)
    kept: list[str] = []  # job keys of finished passes whose results a rerun may need
    done = 1.0
    for n, factor in enumerate(factors):
        done *= factor
        out_hw = output_size(h, w, done)
        last = n + 1 == len(factors)
        rgb = _upscale_rgb(model, rgb.float(), out_hw, clip_vector=clip_vector, steps=steps, sampler=sampler, seed=seed,
                           lr_noise_init=lr_noise_init, block_batch=block_batch, callback=callback,
                           offload=offload, group=group, keep=kept, fast=fast,
                           resume=resume if resume is None or last else replace(resume, keep_result=True))
        if group is not None and not last:
            rgb = broadcast_from_first(rgb, (B, 3, *out_hw), group)  # the next pass starts from it everywhere
    if world_and_rank(group)[1] == 0:
        for key in kept:
            remove_job(resume.directory, key)
    if rgb is None:
        return None
    out_hw = tuple(rgb.shape[-2:])
    if gray:
        rgb = rgb.mean(dim=1, keepdim=True)
        if C == 1:
            return rgb
        rgb = rgb.expand(-1, 3, -1, -1).contiguous()
    if alpha is not None:
        rgb = torch.cat([rgb, _resize(alpha.float().to(rgb.device), out_hw).clamp(0, 1)], dim=1)
    return rgb
