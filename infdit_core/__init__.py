"""Inf-DiT engine: the official denoiser, checkpoint loading, block-sweep sampling over one or many
processes, host-memory offload and resumable jobs. No ComfyUI here."""
from .config import InfDiTConfig
from .model import InfDiT
from .denoiser import BlockSweepDenoiser, denoise
from .clip import ClipEmbedder, load_clip
from .checkpoint import CheckpointError, convert, load_model
from .memory import MemoryPlan, choose_block_batch, plan
from .offload import Placement
from .pipeline import Resume, chain_factors, sample, upscale
from .sampling import karras_sigmas
from .strips import StripSchedule

__all__ = [
    "BlockSweepDenoiser", "CheckpointError", "ClipEmbedder", "InfDiT", "InfDiTConfig", "MemoryPlan", "Placement",
    "Resume", "StripSchedule", "chain_factors", "choose_block_batch", "convert", "denoise", "karras_sigmas",
    "load_clip", "load_model", "plan", "sample", "upscale",
]
