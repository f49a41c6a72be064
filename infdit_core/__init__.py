"""Inf-DiT engine: the official denoiser, checkpoint loading, block-sweep sampling. No ComfyUI here."""
from .config import InfDiTConfig
from .model import InfDiT
from .denoiser import BlockSweepDenoiser, denoise
