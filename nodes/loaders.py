"""Load Inf-DiT Model and Load Inf-DiT CLIP: file pickers that hand engine objects to the graph."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..infdit_core import CheckpointError, ClipEmbedder, InfDiT, load_clip
from ..infdit_core.clip import has_image_tower, no_image_tower_message
from ..infdit_core.checkpoint import (CLIP_VISUAL_PREFIX, DEMO_MODEL, OFFICIAL_WEIGHTS_URL, build_model,
                                      missing_weights_message, read_state_dict)
from ..infdit_core.fp8 import check_supported as check_fp8_supported
from . import comfy_bridge as bridge
from .weights_download import DOWNLOAD_ENTRY, download_weights, model_choices as _weights_choices

CATEGORY = "image/upscaling/Inf-DiT"
FOLDER_HINT = "ComfyUI/models/infdit"
EMBEDDED_CLIP = "embedded in the Inf-DiT checkpoint"
# The small demonstration model inside the pack (infdit_core/demo/README.md): always listed, so a
# fresh install can upscale without any download. Far below the released model.
DEMO_ENTRY = "demo: small model shipped with the pack (not the released weights)"
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8": torch.float8_e4m3fn}

bridge.register_model_folder()


@dataclass
class InfDiTModel:
    """What travels on an INFDIT_MODEL socket."""
    managed: bridge.ManagedModel
    path: str
    has_embedded_clip: bool
    # Trained with the zero vector for its semantic input (the demo model): the upscaler then needs
    # no CLIP.
    needs_clip: bool = True
    # (Lora, strength) pairs the upscaler merges into the weights for its run (nodes/lora.py); the
    # weights themselves are shared with every other output of the same loader.
    loras: tuple = ()

    @property
    def model(self) -> InfDiT:
        return self.managed.model


@dataclass
class InfDiTClip:
    """What travels on an INFDIT_CLIP socket: the embedder, its weights managed like the DiT's."""
    managed: bridge.ManagedModel
    embedder: ClipEmbedder


def _searched(folder: str) -> str:
    return ", ".join(bridge.folder_dirs(folder)) or "(no folder registered)"


def model_choices() -> list[str]:
    return _weights_choices() + [DEMO_ENTRY]


def _model_path(model_name: str):
    if model_name == DOWNLOAD_ENTRY:
        return download_weights()
    if model_name == DEMO_ENTRY:
        return DEMO_MODEL
    return bridge.find_file(bridge.INFDIT_FOLDER, model_name)


def load_infdit(model_name: str, weight_dtype: str = "auto") -> InfDiTModel:
    path = _model_path(model_name)
    if path is None:
        raise FileNotFoundError(missing_weights_message(
            model_name, f"{FOLDER_HINT} (searched: {_searched(bridge.INFDIT_FOLDER)})"))
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    device, offload = bridge.compute_device(), bridge.offload_device()
    dtype = WEIGHT_DTYPES[weight_dtype] or bridge.auto_dtype(device)
    if weight_dtype == "fp8":
        check_fp8_supported(device)  # before reading gigabytes for nothing
    try:
        sd, metadata = read_state_dict(path)
        # Built on the offload device: ComfyUI's memory manager moves it when a run needs it.
        model = build_model(sd, dtype=dtype, device=offload, name=path, metadata=metadata)
    except CheckpointError as error:
        raise CheckpointError(f"{error}\nFile: {model_name} in {os.path.dirname(path)}. Inf-DiT weights are the "
                              f"official checkpoint from {OFFICIAL_WEIGHTS_URL} (or a .safetensors converted "
                              "from it); put them in " + FOLDER_HINT + ".") from None
    has_clip = any(k.startswith(CLIP_VISUAL_PREFIX) for k in sd)
    return InfDiTModel(bridge.ManagedModel(model, device, offload), path, has_clip,
                       needs_clip=metadata.get("clip") != "none")


def load_infdit_clip(clip_name: str, infdit_model: InfDiTModel | None = None) -> InfDiTClip:
    device, offload = bridge.compute_device(), bridge.offload_device()
    if clip_name == EMBEDDED_CLIP:
        if infdit_model is None:
            raise ValueError(f"'{EMBEDDED_CLIP}' needs the Load Inf-DiT Model output connected to this node's "
                             "infdit_model input, or pick a CLIP file instead.")
        if not infdit_model.has_embedded_clip:
            raise ValueError(no_image_tower_message(infdit_model.path))
        path = infdit_model.path
    else:
        path = bridge.find_file(bridge.CLIP_FOLDER, clip_name) or bridge.find_file(bridge.INFDIT_FOLDER, clip_name)
        if path is None:
            # load_clip's own error names the expected folder and where to download the file.
            path = os.path.join(bridge.folder_dirs(bridge.CLIP_FOLDER)[0], clip_name)
    # Built on the offload device: ComfyUI's memory manager moves it when an embedding is computed.
    embedder = load_clip(path, dtype=bridge.auto_dtype(device), device=offload)
    return InfDiTClip(bridge.ManagedModel(embedder.module, device, offload), embedder)


def clip_choices() -> list[str]:
    """Files of models/clip_vision and models/infdit that can hold CLIP weights. A safetensors file
    without an image tower (a DiT-only Inf-DiT file, another kind of CLIP vision model) is left out,
    told from its header alone; pickles (.pt/.bin) cannot be checked without loading them whole,
    and files whose header does not read are kept so that loading says what is wrong with them."""
    choices = [name for folder in (bridge.CLIP_FOLDER, bridge.INFDIT_FOLDER) for name in bridge.list_files(folder)
               if has_image_tower(bridge.find_file(folder, name)) is not False]
    return list(dict.fromkeys(choices))


class InfDiTModelLoader:
    DESCRIPTION = ("Loads Inf-DiT weights (the official mp_rank_00_model_states.pt or a converted .safetensors) "
                   "from models/infdit. ComfyUI's memory manager moves the model to the GPU only while it runs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INFDIT_MODEL",)
    OUTPUT_TOOLTIPS = ("The Inf-DiT diffusion upscaler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {
                "tooltip": "Inf-DiT checkpoint in ComfyUI/models/infdit (official .pt or converted .safetensors). "
                           f"While there is none, '{DOWNLOAD_ENTRY}' fetches the official one there (progress "
                           "bar; cancel keeps the partial file, the next run resumes it) and converts it to bf16."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "auto",
                "tooltip": "Precision of the weights. auto: bf16 (what Inf-DiT was trained in) where the GPU supports "
                           "it, else fp16, fp32 on CPU. bf16/fp16 halve the memory of fp32. fp8: the transformer's weights in "
                           "e4m3 with per-channel scales (about half the memory of bf16, not faster; GPUs of compute "
                           "capability 8.9+ only, no LoRAs)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        # Replaces ComfyUI's list check for model_name: the download entry, once used, is no longer
        # listed but must stay valid for the workflows that picked it.
        if model_name in (DOWNLOAD_ENTRY, DEMO_ENTRY) or model_name in bridge.list_files(bridge.INFDIT_FOLDER):
            return True
        return f"'{model_name}' is not in {FOLDER_HINT} (searched: {_searched(bridge.INFDIT_FOLDER)})"

    def load(self, model_name, weight_dtype):
        return (load_infdit(model_name, weight_dtype),)


class InfDiTClipLoader:
    DESCRIPTION = ("Loads the CLIP image encoder Inf-DiT is conditioned on: the image tower stored inside the "
                   "Inf-DiT checkpoint, or the full open_clip ViT-L-14 DataComp-XL file (needed for the text nudge).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("INFDIT_CLIP",)
    OUTPUT_TOOLTIPS = ("CLIP for Inf-DiT CLIP Semantic Embed or the upscaler's clip input.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"clip_name": ([EMBEDDED_CLIP] + clip_choices(), {
                "tooltip": "Where the CLIP weights come from: the image tower inside the Inf-DiT checkpoint "
                           "(connect infdit_model), or an open_clip ViT-L-14 DataComp-XL file from "
                           "models/clip_vision (the full file also has the text tower for the text nudge). "
                           ".safetensors files without a CLIP image tower are not listed."})},
            "optional": {"infdit_model": ("INFDIT_MODEL", {
                "tooltip": "Needed only for 'embedded in the Inf-DiT checkpoint'."})},
        }

    def load(self, clip_name, infdit_model=None):
        return (load_infdit_clip(clip_name, infdit_model),)


NODE_CLASS_MAPPINGS = {"InfDiTModelLoader": InfDiTModelLoader, "InfDiTClipLoader": InfDiTClipLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTModelLoader": "Load Inf-DiT Model", "InfDiTClipLoader": "Load Inf-DiT CLIP"}
