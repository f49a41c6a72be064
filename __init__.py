"""Inf-DiT for ComfyUI: memory-efficient any-resolution diffusion upscaling.

ComfyUI imports this file and reads NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS.
The engine lives in infdit_core/ (no ComfyUI imports); nodes/ holds thin adapters.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
