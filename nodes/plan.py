"""Inf-DiT Memory Plan: the planner's prediction for an upscale, before running it."""
from __future__ import annotations

import math
from dataclasses import replace

from ..infdit_core.fp8 import is_fp8
from ..infdit_core.memory import HOST, free_memory, resolve_execution, weight_bytes
from ..infdit_core.offload import MODES
from ..infdit_core.pipeline import output_size
from ..infdit_core.sampling import DEFAULT_STEPS, get_sampler, resolve_sampler
from .loaders import CATEGORY, InfDiTModel
from .upscale import DEFAULT_PRESET, SAMPLER_CHOICES, SCALE_WIDGET

GB = 2 ** 30


def memory_report(model: InfDiTModel, width: int, height: int, scale: float, block_batch: int = 0,
                  batch: int = 1, steps: int = DEFAULT_STEPS, offload: str = "auto", sampler: str = "heun") -> str:
    """Text report of predicted memory (and work) for upscaling a width x height batch by `scale`
    with `sampler` (a preset, or a sampler name run for `steps` steps)."""
    config, network = model.model.config, model.model
    sampler, steps = resolve_sampler(sampler, steps)
    method = get_sampler(sampler)
    out_h, out_w = output_size(height, width, scale)
    device = model.managed.load_device
    _, placement, p = resolve_execution(block_batch if block_batch > 0 else "auto", offload, config, out_h, out_w,
                                        network.dtype, device, batch, canvases=method.canvases)
    p = replace(p, weights=weight_bytes(network))  # the weights as loaded (fp8 ones are smaller)
    dtype = str(network.dtype).replace("torch.", "") + (" activations, fp8 weights" if is_fp8(network) else "")
    calls = method.calls(steps) * math.ceil(p.blocks / p.block_batch)
    chosen = f"{placement.mode} (auto)" if offload == "auto" else placement.mode
    lines = [
        f"{width}x{height} -> {out_w}x{out_h} (x{scale:g}), batch {batch}, {dtype}",
        f"blocks {p.blocks}, block batch {p.block_batch}{' (auto)' if block_batch <= 0 else ''}, "
        f"{calls} network calls for {sampler} {steps} steps, offload {chosen}",
        f"device: weights {p.weights / GB:.2f} GB + K/V cache {p.kv_cache / GB:.2f} GB + activations "
        f"{p.activations / GB:.2f} GB + canvases {p.canvases / GB:.2f} GB",
        f"predicted peak {p.total / GB:.2f} GB (free now on {device}: {free_memory(device) / GB:.1f} GB)",
        f"host: canvases {p.canvases_host / GB:.2f} GB + spilled K/V {p.kv_host / GB:.2f} GB = {p.host / GB:.2f} GB "
        f"(available: {free_memory(HOST) / GB:.1f} GB)",
    ]
    return "\n".join(lines)


class InfDiTMemoryPlan:
    DESCRIPTION = ("Predicts the memory an Inf-DiT UniBA Upscale will need for a size, and the block batch 'auto' "
                   "would pick, without running it. Connect the STRING output to a text display node.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The prediction as text.",)
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 1, "max": 32768, "step": 1}
        return {
            "required": {
                "model": ("INFDIT_MODEL", {"tooltip": "From Load Inf-DiT Model (its dtype sets the memory)."}),
                "width": ("INT", dict(size, tooltip="Input width in pixels (ignored when image is connected).")),
                "height": ("INT", dict(size, tooltip="Input height in pixels (ignored when image is connected).")),
                "scale": ("FLOAT", dict(SCALE_WIDGET, tooltip="Upscale factor of the planned run.")),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 200,
                                  "tooltip": "Sampler steps of the planned run, with a sampler chosen by name (a "
                                             "preset brings its own); they set the number of network calls."}),
                "block_batch": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Blocks per network call; 0 = what auto would pick now."}),
                "offload": (list(MODES), {"default": "auto",
                                          "tooltip": "Placement of the planned run, as in Inf-DiT UniBA Upscale."}),
                "sampler": (SAMPLER_CHOICES, {"default": DEFAULT_PRESET,
                                              "tooltip": "The planned run's preset or sampler, as in Inf-DiT UniBA "
                                                         "Upscale: it sets the network calls and the canvases held."}),
            },
            "optional": {"image": ("IMAGE", {"tooltip": "Plan for this image batch instead of width x height."})},
        }

    def report(self, model, width, height, scale, steps, block_batch, offload="auto", sampler="heun", image=None):
        batch = 1
        if image is not None:
            batch, height, width = image.shape[0], image.shape[1], image.shape[2]
        text = memory_report(model, width, height, scale, block_batch, batch, steps, offload, sampler)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"InfDiTMemoryPlan": InfDiTMemoryPlan}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTMemoryPlan": "Inf-DiT Memory Plan"}
