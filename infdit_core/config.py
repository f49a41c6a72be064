"""Architecture configuration of Inf-DiT, with the official full-size defaults.

The official code takes these values from command-line flags; nothing in the released checkpoint
records them. `InfDiTConfig.from_state_dict` reads them back from the tensor shapes instead.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

# The LR image fed to cross-attention is always HR/4 (the model's geometry, independent of the
# user's scale factor), and proj_lr embeds it in 2x2 LR-pixel patches: one LR token = 8 HR pixels.
SR_SCALE = 4
LR_PATCH = 2
# Sinusoidal time features (cosine half, then sine half) of the EDM noise level.
TIME_CHANNELS = 192
# Neighbour slots of the UniBA key set, in the order of re_pos_embed's second axis.
NUM_SLOTS = 4


@dataclass(frozen=True)
class InfDiTConfig:
    num_layers: int = 28
    hidden_size: int = 1280
    num_heads: int = 16
    patch_size: int = 4
    block_size: int = 128  # HR pixels per side of one UniBA block ("image_block_size")
    image_size: int = 512  # sets the RoPE table size / position modulo, see rope_size
    vector_dim: int = 768  # CLIP image embedding width
    in_channels: int = 6  # noisy HR RGB + upsampled LR RGB
    out_channels: int = 3
    max_sequence_length: int = 256  # only shapes the unused SAT position table
    eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.block_size % (SR_SCALE * LR_PATCH) or self.block_size % self.patch_size:
            raise ValueError(f"block_size {self.block_size} must be a multiple of {SR_SCALE * LR_PATCH} and of patch_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def block_tokens(self) -> int:
        """Tokens per block side."""
        return self.block_size // self.patch_size

    @property
    def lr_block_tokens(self) -> int:
        """LR tokens per block side; each block's cross-attention window is 3x3 of these."""
        return self.block_size // (SR_SCALE * LR_PATCH)

    @property
    def rope_size(self) -> int:
        """RoPE table side and position modulo: 8 * image_size / patch_size (1024 officially)."""
        return 8 * self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "InfDiTConfig":
        """Infer the architecture from tensor shapes of an official-layout state dict."""
        def shape(key):
            if key not in sd:
                raise KeyError(key)
            return tuple(sd[key].shape)

        # Layers counted from any of their keys, so a layer that lacks one is reported as missing
        # that key (not as a shorter model with unexpected keys).
        indices = [int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))]
        if not indices:
            raise KeyError("transformer.layers.0.attention.query_key_value.weight")
        layers = max(indices) + 1
        hidden, in_ch, patch, _ = shape("mixins.patch_embed.proj.weight")
        _, _, heads, _ = shape("mixins.adaln_layer.re_pos_embed")
        out_ch = shape("mixins.final_layer.linear.weight")[0] // (patch * patch)
        block_tokens = math.isqrt(shape("mixins.adaln_layer.lr_query_position_embedding")[1])
        vector_dim = shape("cond_embed.map_vector.0.weight")[1]
        # The position modulo is stored nowhere but in the RoPE buffers; without them the
        # official value (image_size 512) applies.
        rope_key = "mixins.adaln_layer.rope.freqs_cos"
        image_size = shape(rope_key)[0] * patch // 8 if rope_key in sd else cls.image_size
        pos_key = "transformer.position_embeddings.weight"
        max_seq = shape(pos_key)[0] if pos_key in sd else cls.max_sequence_length
        return cls(
            num_layers=layers, hidden_size=hidden, num_heads=heads, patch_size=patch,
            block_size=block_tokens * patch, image_size=image_size, vector_dim=vector_dim,
            in_channels=in_ch, out_channels=out_ch, max_sequence_length=max_seq,
        )
