"""Image files for the command line: reading any PIL image, writing 8- or 16-bit PNG atomically."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch


def read_image(path: str) -> torch.Tensor:
    """[1, C, h, w] in [0, 1]; C = 4 for images with transparency, 1 for grayscale, else 3."""
    from PIL import Image  # ships with torchvision

    with Image.open(path) as img:
        mode = "RGBA" if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info else \
            "L" if img.mode in ("L", "I;16", "I") else "RGB"
        array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of an [h, w, C] uint16 array (C = 1, 3 or 4); PIL writes 16 bits for gray only."""
    h, w, c = array.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    rows = array.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_image(image: torch.Tensor, path: str, bit_depth: int = 8):
    """Quantised by truncation, as the official script (and ComfyUI's SaveImage) do. Written to a
    temporary name and renamed when complete, so `path` is never a half-written file."""
    from PIL import Image

    if bit_depth not in (8, 16):
        raise ValueError(f"bit depth must be 8 or 16, got {bit_depth}")
    top = 2 ** bit_depth - 1
    array = (image[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy().astype(np.float64) * top).astype(
        np.uint8 if bit_depth == 8 else np.uint16)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.partial")
    try:
        if bit_depth == 16:
            with open(temporary, "wb") as f:
                f.write(_png16(array))
        else:
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
