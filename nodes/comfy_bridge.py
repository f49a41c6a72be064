"""Everything the nodes need from ComfyUI, in one place, with plain fallbacks.

This is the only module that imports `comfy.*` or `folder_paths`, always lazily inside a function,
so the pack imports and runs without ComfyUI (tests, CLI). Outside ComfyUI: model files are looked
up under $INFDIT_MODELS_DIR (laid out like ComfyUI's models/ folder, default ./models), the compute
device is CUDA when available, progress goes to the log and nothing is interrupted.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("infdit")

INFDIT_FOLDER = "infdit"
CLIP_FOLDER = "clip_vision"
LORA_FOLDER = "infdit_lora"
MODELS_DIR_ENV = "INFDIT_MODELS_DIR"
# ComfyUI's supported_pt_extensions, for when ComfyUI is absent.
FALLBACK_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
PREVIEW_MAX_SIZE = 512
PREVIEW_INTERVAL_S = 1.0


def _optional_import(name: str):
    """The ComfyUI module `name`, or None when ComfyUI is not installed (errors inside it still raise)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            return None
        raise


def in_comfyui() -> bool:
    return _optional_import("folder_paths") is not None


# ---------------------------------------------------------------------------------------------
# Model files


def register_model_folder(folder: str = INFDIT_FOLDER) -> None:
    """models/<folder> (infdit, infdit_lora) with ComfyUI's checkpoint extensions. Paths already
    registered (from extra_model_paths.yaml, which main.py loads before custom nodes) are kept;
    without this, a yaml-only entry would have an empty extension set and list every file."""
    folder_paths = _optional_import("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, folder)
    paths = list(folder_paths.folder_names_and_paths.get(folder, ([], None))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[folder] = (paths, folder_paths.supported_pt_extensions)


def folder_dirs(folder: str) -> list[str]:
    """Directories searched for `folder` ("infdit", "clip_vision")."""
    folder_paths = _optional_import("folder_paths")
    if folder_paths is not None:
        return list(folder_paths.get_folder_paths(folder))
    return [os.path.join(os.environ.get(MODELS_DIR_ENV, "models"), folder)]


def download_dir(folder: str) -> str:
    """Where a download for `folder` goes: ComfyUI's own models/<folder> (not a path from
    extra_model_paths.yaml, which may be a shared read-only store), else the fallback folder."""
    folder_paths = _optional_import("folder_paths")
    if folder_paths is not None:
        return os.path.join(folder_paths.models_dir, folder)
    return folder_dirs(folder)[0]


def resume_dir() -> str:
    """Where the upscaler keeps resume checkpoints: ComfyUI's temp folder (emptied when ComfyUI
    starts, so a checkpoint lives for one session: enough for cancel → queue again), else the
    system's temp folder."""
    folder_paths = _optional_import("folder_paths")
    base = folder_paths.get_temp_directory() if folder_paths is not None else tempfile.gettempdir()
    return os.path.join(base, "infdit_resume")


def list_files(folder: str) -> list[str]:
    """Model files of `folder`, relative to its directories, sorted (subfolders with '/')."""
    folder_paths = _optional_import("folder_paths")
    if folder_paths is not None:
        return list(folder_paths.get_filename_list(folder))
    found = set()
    for root in folder_dirs(folder):
        for directory, _, names in os.walk(root, followlinks=True):
            for name in names:
                if os.path.splitext(name)[1].lower() in FALLBACK_EXTENSIONS:
                    found.add(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
    return sorted(found)


def find_file(folder: str, filename: str) -> Optional[str]:
    """Full path of `filename` in `folder`, or None."""
    folder_paths = _optional_import("folder_paths")
    if folder_paths is not None:
        return folder_paths.get_full_path(folder, filename)
    for root in folder_dirs(folder):
        path = os.path.join(root, filename)
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# Devices, dtypes and memory


def compute_device() -> torch.device:
    mm = _optional_import("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    mm = _optional_import("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE tensors between nodes live."""
    mm = _optional_import("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 (the dtype Inf-DiT was trained in) where the device runs it fast, else fp16 on an
    accelerator, else fp32 (bf16 on a CPU works but is very slow)."""
    mm = _optional_import("comfy.model_management")
    if mm is not None:
        if mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float16 if mm.should_use_fp16(device) else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ModelHolder(torch.nn.Module):
    """What a ModelPatcher manages. The patcher assigns attributes (`device`, its load bookkeeping)
    on its module; InfDiT exposes `device` as a read-only property and open_clip's modules are not
    ours to extend, so the patcher gets this plain container instead."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model


class ManagedModel:
    """A model (the DiT, or the CLIP embedder's module) plus, inside ComfyUI, the ModelPatcher
    through which ComfyUI's memory manager loads, evicts and accounts for it like any other model
    (so an SDXL UNet in the same graph makes room first, and can evict it in turn)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload: torch.device):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload
        patcher_module = _optional_import("comfy.model_patcher")
        self.patcher = (patcher_module.ModelPatcher(ModelHolder(model), load_device=load_device, offload_device=offload)
                        if patcher_module is not None else None)

    def load(self, memory_required: int) -> torch.nn.Module:
        """The model on the compute device, with `memory_required` working bytes freed for the run."""
        if self.patcher is not None:
            mm = _optional_import("comfy.model_management")
            # force_full_load: our layers are plain nn.Modules without ComfyUI's lowvram casting.
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        else:
            self.model.to(self.load_device)
        return self.model


def soft_empty_cache() -> None:
    mm = _optional_import("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


class InfDiTOutOfMemory(torch.OutOfMemoryError):
    """A final out-of-memory error with our advice; a torch.OutOfMemoryError so ComfyUI treats it
    as one (it unloads all models and adds its own tip)."""


def throw_if_interrupted() -> None:
    mm = _optional_import("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------
# Progress and previews


def preview_image(estimate: torch.Tensor, out_hw: tuple[int, int], max_size: int = PREVIEW_MAX_SIZE):
    """PIL image of the first sample of an x0 estimate [B,3,Hp,Wp] in [-1,1] (padded canvas),
    cropped to the output and downsized so its longer side is at most `max_size`."""
    from PIL import Image

    x = estimate[:1, :3, :out_hw[0], :out_hw[1]].detach().float()
    longer = max(out_hw)
    if longer > max_size:
        size = (max(1, round(out_hw[0] * max_size / longer)), max(1, round(out_hw[1] * max_size / longer)))
        x = F.interpolate(x, size=size, mode="area")
    pixels = ((x[0] + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


class _LogProgress:
    """Stand-in for comfy.utils.ProgressBar outside ComfyUI: a log line every 10%."""

    def __init__(self, total: int, unit: str):
        self.total, self.unit = total, unit
        self._logged = -1

    def update_absolute(self, value, total=None, preview=None):
        self.total = total or self.total
        tenth = 10 * value // max(1, self.total)
        if tenth != self._logged:
            self._logged = tenth
            log.info("Inf-DiT: %d/%d %s", value, self.total, self.unit)


def progress_bar(total: int, unit: str = "blocks"):
    """comfy.utils.ProgressBar (each update is also an interrupt point) or a logging stand-in that
    names its `unit`."""
    utils = _optional_import("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _LogProgress(total, unit)


class ProgressReporter:
    """The engine's progress callback: advances a progress bar after every block batch (counted in
    blocks over the whole run) and attaches a preview of the current estimate at most every
    PREVIEW_INTERVAL_S seconds. Every call is an interrupt point."""

    def __init__(self, out_hw: tuple[int, int], clock=time.monotonic):
        self.out_hw = out_hw
        self.clock = clock
        self.bar = None
        self._last_preview = None

    def __call__(self, step, total_steps, blocks_done, blocks_total, estimate):
        throw_if_interrupted()
        if self.bar is None:
            self.bar = progress_bar(blocks_total)
        preview = None
        now = self.clock()
        if self._last_preview is None or now - self._last_preview >= PREVIEW_INTERVAL_S:
            self._last_preview = now
            preview = ("JPEG", preview_image(estimate, self.out_hw), PREVIEW_MAX_SIZE)
        self.bar.update_absolute(blocks_done, blocks_total, preview)


# ---------------------------------------------------------------------------------------------
# IMAGE tensors


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> float32 [B,C,H,W] (a view or a copy: never written to)."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE [batch, height, width, 1/3/4 channels], got shape {tuple(image.shape)}")
    return image.movedim(-1, -3).float()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> IMAGE [B,H,W,C] in [0,1] on ComfyUI's intermediate device."""
    return x.movedim(-3, -1).clamp(0, 1).to(intermediate_device(), torch.float32).contiguous()
