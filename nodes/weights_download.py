"""The download entry of Load Inf-DiT Model: fetching the official weights when the user picks it.

The entry is listed only while models/infdit holds no weights file, and nothing is fetched unless it
is picked. It stays a valid choice afterwards (see InfDiTModelLoader.VALIDATE_INPUTS), so a saved
workflow that picked it keeps working: the next run finds the verified file and just loads it.
"""
from __future__ import annotations

from typing import Optional

from ..infdit_core.checkpoint import OFFICIAL_WEIGHTS_URL
from ..infdit_core.download import download_official
from . import comfy_bridge as bridge

DOWNLOAD_ENTRY = "download official weights (≈2 GB)"


def model_choices() -> list[str]:
    return bridge.list_files(bridge.INFDIT_FOLDER) or [DOWNLOAD_ENTRY]


class _ByteProgress:
    """ComfyUI's progress bar in bytes. Every chunk is an interrupt point; an interrupt leaves the
    partial file in place, so picking the entry again resumes it."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: Optional[int]):
        bridge.throw_if_interrupted()
        if total:  # ComfyUI's bar needs a total: a server that sends no size gets no bar
            if self.bar is None:
                self.bar = bridge.progress_bar(total, unit="bytes")
            self.bar.update_absolute(done, total)


def download_weights() -> str:
    """Path of the official weights converted to bf16 in ComfyUI's models/infdit, fetched (or
    resumed) first when they are not already there and verified."""
    # The URL is looked up here, not bound as a default, so tests can point it at a local server.
    return download_official(bridge.download_dir(bridge.INFDIT_FOLDER), url=OFFICIAL_WEIGHTS_URL,
                             progress=_ByteProgress(), say=bridge.log.info)
