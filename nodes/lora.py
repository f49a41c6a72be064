"""Load Inf-DiT LoRA: INFDIT_MODEL in, the same model with one more LoRA to apply out.

The weights are not touched here: the output carries the (LoRA, strength) list, and Inf-DiT UniBA
Upscale merges it into the weights for its run only (infdit_core.lora.apply_loras), so other
branches of the graph that use the input model keep the base model.
"""
from __future__ import annotations

import dataclasses
import os

from ..infdit_core.lora import LoraError, check_lora, load_lora
from . import comfy_bridge as bridge
from .loaders import CATEGORY, InfDiTModel

FOLDER_HINT = "ComfyUI/models/infdit_lora"
STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
MADE_BY = "Inf-DiT LoRAs are made with `python -m infdit_core train --lora RANK` (see docs/lora.md)."

bridge.register_model_folder(bridge.LORA_FOLDER)


def _searched() -> str:
    return ", ".join(bridge.folder_dirs(bridge.LORA_FOLDER)) or "(no folder registered)"


def load_infdit_lora(model: InfDiTModel, lora_name: str, strength: float) -> InfDiTModel:
    path = bridge.find_file(bridge.LORA_FOLDER, lora_name)
    if path is None:
        raise FileNotFoundError(f"Inf-DiT LoRA not found: {lora_name}. Put it in {FOLDER_HINT} "
                                f"(searched: {_searched()}). {MADE_BY}")
    try:
        lora = load_lora(path)
        # Checked now, so a LoRA for another model fails at this node, naming the keys, not in the run.
        check_lora(model.model, lora)
    except LoraError as error:
        raise LoraError(f"{error}\nFile: {lora_name} in {os.path.dirname(path)}; the model: {model.path}.") from None
    return dataclasses.replace(model, loras=model.loras + ((lora, float(strength)),))


class InfDiTLoraLoader:
    DESCRIPTION = ("Applies an Inf-DiT LoRA (from models/infdit_lora) to the model with a strength; chain several "
                   "to stack them. The weights change only while Inf-DiT UniBA Upscale runs with this output; "
                   "the input model stays the base model for the rest of the graph.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INFDIT_MODEL",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA (and any applied before it) to be merged while upscaling.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("INFDIT_MODEL", {"tooltip": "From Load Inf-DiT Model (or another Load Inf-DiT LoRA)."}),
            "lora_name": (bridge.list_files(bridge.LORA_FOLDER), {
                "tooltip": f"A LoRA .safetensors in {FOLDER_HINT}. {MADE_BY}"}),
            "strength": ("FLOAT", dict(STRENGTH, tooltip=(
                "How much of the LoRA to add: 1 as trained, 0 off (the base model exactly), negative to "
                "push away from it."))),
        }}

    def load(self, model, lora_name, strength):
        return (load_infdit_lora(model, lora_name, strength),)


NODE_CLASS_MAPPINGS = {"InfDiTLoraLoader": InfDiTLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTLoraLoader": "Load Inf-DiT LoRA"}
