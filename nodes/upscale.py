"""Inf-DiT UniBA Upscale: IMAGE in, IMAGE out, with progress, previews, interruption and
ComfyUI's memory manager; the sampling itself is infdit_core.upscale."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..infdit_core import upscale
from ..infdit_core.fast import FAST_CHOICES, parse_fast
from ..infdit_core.lora import apply_loras
from ..infdit_core.memory import is_out_of_memory, resolve_execution
from ..infdit_core.offload import MODES
from ..infdit_core.pipeline import MAX_FACTOR, OutOfMemory, Resume, output_size
from ..infdit_core.sampling import DEFAULT_STEPS, PRESETS, SAMPLERS, get_sampler, resolve_sampler
from . import comfy_bridge as bridge
from .embed import image_embedding
from .loaders import CATEGORY, InfDiTModel

MAX_SEED = 0xFFFFFFFFFFFFFFFF
# The scale widget: exactly the range that runs (the engine takes any scale above 1; the widget's
# closed range starts one step above it). VALIDATE_INPUTS checks the same range.
SCALE_STEP = 0.05
SCALE_WIDGET = {"default": 4.0, "min": 1.0 + SCALE_STEP, "max": MAX_FACTOR, "step": SCALE_STEP}
# resume auto: outputs of at least this many pixels (2048², about a minute of GPU per step at 4096²
# and far more above) checkpoint their state in ComfyUI's temp folder, so cancel → queue again
# continues where it stopped. The folder is capped; the oldest checkpoints go first.
RESUME_MIN_PIXELS = 2048 * 2048
RESUME_INTERVAL_S = 60.0
RESUME_FOLDER_CAP = 8 << 30
# The sampler combo: the presets, then the samplers by name (with those the steps widget applies).
SAMPLER_CHOICES = list(PRESETS) + list(SAMPLERS)
DEFAULT_PRESET = "official"


def _sampler_tooltip() -> str:
    presets = "; ".join(f"{name}: {sampler} {steps} steps ({get_sampler(sampler).calls(steps)} network calls)"
                        for name, (sampler, steps) in PRESETS.items())
    return (f"How the image is sampled. Presets use their own steps and ignore 'steps' ({presets}; balanced and "
            "fast were chosen for losing at most 0.05 / 0.15 dB PSNR against official, measured with the demo "
            "model: docs/samplers.md). A sampler by name (heun = the official one, euler, dpmpp_2m, unipc, and "
            "the forecasting ones, which skip some network calls) runs 'steps' steps. Time scales with the calls.")


def _check_scale(scale) -> str | None:
    if not SCALE_WIDGET["min"] <= scale <= SCALE_WIDGET["max"]:
        more = "; chain Inf-DiT UniBA Upscale nodes for more" if scale > MAX_FACTOR else ""
        return f"scale must be between {SCALE_WIDGET['min']:g} and {SCALE_WIDGET['max']:g} (got {scale}){more}."
    return None


def _embedding_for(image, embed, clip, model: InfDiTModel) -> torch.Tensor:
    if embed is None and clip is None and not model.needs_clip:
        # A model trained without CLIP (the demo model) was trained on exactly this vector.
        return torch.zeros(image.shape[0], model.model.config.vector_dim)
    if embed is None:
        if clip is None:
            raise ValueError("Inf-DiT UniBA Upscale needs the image's semantics: connect 'embed' (from Inf-DiT CLIP "
                             "Semantic Embed) or 'clip' (from Load Inf-DiT CLIP) so it is computed from the image.")
        embed = image_embedding(clip, image)
    batch = image.shape[0]
    if embed.shape[0] == 1:
        return embed.expand(batch, -1)
    if embed.shape[0] != batch:
        raise ValueError(f"the embed holds {embed.shape[0]} embeddings but the image batch has {batch} images; "
                         "compute the embed from this image batch (or from a single image).")
    return embed


def _out_of_memory_advice(out_hw, batch, dtype, offload_used: str) -> str:
    knobs = ["free the GPU (other models, other programs)"]
    if batch > 1:
        knobs.insert(0, f"upscale the {batch} images one at a time")
    if dtype == torch.float32:
        knobs.insert(0, "set weight_dtype to bf16 or fp16 in Load Inf-DiT Model")
    if offload_used != "all":
        knobs.insert(0, "set offload to all (canvases and K/V cache in host memory)")
    knobs.append("lower scale (then chain another upscale)")
    return (f"Inf-DiT ran out of memory for a {out_hw[1]}x{out_hw[0]} output even with block_batch 1 "
            f"(the smallest) and offload {offload_used}. Try: {'; '.join(knobs)}.")


def _memory_request(model: InfDiTModel, out_hw, batch: int, block_batch: int, offload: str, canvases: int) -> int:
    """Bytes beyond the weights to ask ComfyUI to free before the run."""
    network = model.model
    # The run at the given block batch or, for auto, at the batch auto picks in the memory free
    # now, with everything on the device unless offload says otherwise. auto sizes its batch when
    # the run starts, after ComfyUI has freed this much beside the weights, so it then picks that
    # batch or, if evictions freed more, a larger one; other models are evicted only when that
    # batch (at worst one block per call) does not fit. Asking for all blocks at once evicted every
    # other model whenever the whole image did not fit, for a batch barely faster than a few blocks
    # (README, Memory and speed). Evicting is preferred to spilling to host memory, which costs
    # copies in every network call: offload auto spills only what the device cannot hold even
    # then. Weights not loaded yet count as free here, so the request can exceed auto's final
    # pick by up to their size.
    _, _, need = resolve_execution(block_batch if block_batch > 0 else "auto", "off" if offload == "auto" else offload,
                                   network.config, *out_hw, network.dtype, model.managed.load_device, batch,
                                   canvases=canvases)
    return need.working


def _resume_for(resume: str, out_hw) -> Resume | None:
    if resume == "off" or out_hw[0] * out_hw[1] < RESUME_MIN_PIXELS:
        return None
    return Resume(bridge.resume_dir(), RESUME_INTERVAL_S, RESUME_FOLDER_CAP)


def run_upscale(model: InfDiTModel, image: torch.Tensor, scale: float = 4.0, steps: int = DEFAULT_STEPS,
                sampler: str = "heun", seed: int = 0, block_batch: int = 0, lr_noise_init: bool = True,
                embed=None, clip=None, offload: str = "auto", resume: str = "auto", fast: str = "auto") -> torch.Tensor:
    """IMAGE [B,H,W,C] -> IMAGE [B,round(H*scale),round(W*scale),C]; block_batch 0 = auto. sampler:
    a preset (its own steps) or a sampler name (with `steps`); a caller that names none gets the
    official Heun sampler for `steps` steps, as before the combo existed."""
    problem = _check_scale(scale)
    if problem:
        raise ValueError(problem)
    sampler, steps = resolve_sampler(sampler, steps)
    canvases = get_sampler(sampler).canvases
    clip_vector = _embedding_for(image, embed, clip, model)
    out_hw = output_size(image.shape[1], image.shape[2], scale)
    batch = image.shape[0]
    network = model.managed.load(_memory_request(model, out_hw, batch, block_batch, offload, canvases))
    # Settle auto's placement now that the weights are loaded, so the conditioning is prepared where
    # the canvases will live (host memory when they are offloaded) and the advice can say what ran.
    bb, placement, _ = resolve_execution(block_batch if block_batch > 0 else "auto", offload, network.config, *out_hw,
                                         network.dtype, network.device, batch, canvases=canvases)
    restore = apply_loras(network, model.loras)
    try:
        out = upscale(network, bridge.image_to_bchw(image).to(placement.canvas), scale=scale,
                      clip_vector=clip_vector, steps=steps, sampler=sampler, seed=seed, lr_noise_init=lr_noise_init,
                      block_batch=bb,
                      callback=bridge.ProgressReporter(out_hw), offload=placement.mode, group=None,
                      resume=_resume_for(resume, out_hw), fast=parse_fast(fast))
    except Exception as error:
        if isinstance(error, OutOfMemory) or is_out_of_memory(error):
            raise bridge.InfDiTOutOfMemory(_out_of_memory_advice(out_hw, batch, network.dtype, placement.mode)) \
                from error
        raise
    finally:
        restore()
        bridge.soft_empty_cache()
    return bridge.bchw_to_image(out)


def upscale_mask(mask: torch.Tensor | None, out_hw: tuple[int, int], batch: int) -> torch.Tensor:
    """MASK [B,H',W'] of the output size: `mask` ([B,H,W] or [H,W], any size, as Load Image gives
    1 - alpha) resized bicubically like an alpha channel and clamped to [0,1]; without one, the
    all-zero mask Load Image gives for an opaque image (one per image of the batch)."""
    if mask is None:
        return torch.zeros(batch, *out_hw, device=bridge.intermediate_device())
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    m = F.interpolate(m, size=out_hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return m[:, 0].to(bridge.intermediate_device()).contiguous()


class InfDiTUpscale:
    DESCRIPTION = ("Inf-DiT diffusion upscaling (up to 4x per node) of any size: the image is generated block by "
                   "block (UniBA) so memory stays bounded and there are no tile seams. Chain nodes for 16x.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    OUTPUT_TOOLTIPS = ("The upscaled image batch (an alpha channel is kept, resized bicubically).",
                       "The mask input resized to the output size (all zero without one). With Load Image's "
                       "MASK connected, Join Image with Alpha (this image + this mask) gives the RGBA result.")
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("INFDIT_MODEL", {"tooltip": "From Load Inf-DiT Model."}),
                "image": ("IMAGE", {
                    "tooltip": "Image batch to upscale, any size; RGB, grayscale or RGBA. Grayscale stays grayscale: "
                               "three equal channels (what Load Image makes of a gray PNG) come back equal. Load "
                               "Image passes transparency separately: connect its MASK to 'mask'."}),
                "scale": ("FLOAT", dict(SCALE_WIDGET, tooltip=(
                    f"Upscale factor, {SCALE_WIDGET['min']:g} to {MAX_FACTOR:g} (the model's native 4x is best). "
                    "Chain a second node for 16x."))),
                "steps": ("INT", {
                    "default": DEFAULT_STEPS, "min": 1, "max": 200,
                    "tooltip": "Sampler steps, used with a sampler chosen by name (a preset brings its own). 20 "
                               "Heun steps is the official setting; fewer is faster and softer."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed. The same seed gives the same image whatever the block batch or device."}),
                "block_batch": ("INT", {
                    "default": 0, "min": 0, "max": 4096,
                    "tooltip": "Blocks per network call. 0 = auto: as many as fit in free memory. Larger is faster but "
                               "needs more memory; lower it if you run out of memory (1 uses the least). "
                               "Out-of-memory is retried with half automatically."}),
                "lr_noise_init": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Start sampling from the upscaled input plus noise (official) instead of pure noise. "
                               "Keeps the colours of the input; turn off only to experiment (colour shift)."}),
                "offload": (list(MODES), {
                    "default": "auto",
                    "tooltip": "Where the sampler's canvases and K/V cache live. auto: on the GPU when they fit, else "
                               "the canvases and then the K/V cache in host memory (exact, only slower); off: GPU "
                               "only; canvas / all: force them into host memory (8192² on an 8 GB card)."}),
                "resume": (["auto", "off"], {
                    "default": "auto",
                    "tooltip": "auto: outputs of 2048² and more checkpoint their progress in ComfyUI's temp folder, "
                               "so cancelling and queueing again continues where it stopped (same image). "
                               "off: always start from the first step."}),
                # New widgets go last: ComfyUI stores widget values by position, so a workflow saved
                # with an older version keeps its values in the right widgets.
                "sampler": (SAMPLER_CHOICES, {"default": DEFAULT_PRESET, "tooltip": _sampler_tooltip()}),
                "fast": (list(FAST_CHOICES), {
                    "default": "auto",
                    "tooltip": "Compile the network's layers (torch.compile) for speed; the same image to float "
                               "rounding. auto: on a CUDA GPU for outputs large enough to repay the one-off "
                               "compile (about a minute, once per ComfyUI session); on / off: always / never."}),
            },
            "optional": {
                "embed": ("INFDIT_EMBED", {
                    "tooltip": "From Inf-DiT CLIP Semantic Embed. If absent, computed from the image with 'clip'."}),
                "clip": ("INFDIT_CLIP", {
                    "tooltip": "From Load Inf-DiT CLIP; used only when 'embed' is not connected."}),
                "mask": ("MASK", {
                    "tooltip": "Optional mask, e.g. Load Image's (1 - alpha), resized to the output size and returned "
                               "as the MASK output; it does not change the image."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, scale):
        # Declaring `scale` here makes ComfyUI skip its own min/max check for it: do it all here.
        return True if scale is None else (_check_scale(scale) or True)

    def upscale(self, model, image, scale, steps, seed, block_batch, lr_noise_init, offload="auto", resume="auto",
                sampler="heun", fast="auto", embed=None, clip=None, mask=None):
        out = run_upscale(model, image, scale, steps, sampler, seed, block_batch, lr_noise_init, embed, clip, offload,
                          resume, fast)
        return out, upscale_mask(mask, tuple(out.shape[1:3]), out.shape[0])


NODE_CLASS_MAPPINGS = {"InfDiTUpscale": InfDiTUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTUpscale": "Inf-DiT UniBA Upscale"}
