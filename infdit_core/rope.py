"""2D rotary position embedding as the official model uses it.

Per head of d channels: the first d/2 encode the token row, the last d/2 the column. Within each
half, frequency theta_j = 10000^(-2j/(d/2)) drives the adjacent channel pair (2j, 2j+1)
(interleaved-pair convention, not half-split). Positions wrap modulo the table size.

The official model keeps [T, T, d] cos/sin tables as persistent buffers (2 x 335 MB in fp32 for
the real model). They are a pure function of (T, d), so we compute the angles for the positions a
call needs and only materialise the tables when a state dict is written, keeping checkpoint keys
identical to the official ones.
"""
from __future__ import annotations

import torch
from torch import nn

THETA = 10000.0


def axis_frequencies(head_dim: int) -> torch.Tensor:
    """Per-channel frequency of one axis half (head_dim/2 values, each pair shares one)."""
    half = head_dim // 2
    theta = THETA ** (-torch.arange(0, half, 2, dtype=torch.float32) / half)
    return theta.repeat_interleave(2)


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, modulo: int) -> torch.Tensor:
    """Angles [..., head_dim] in float32 for integer positions (taken modulo `modulo`)."""
    freqs = axis_frequencies(head_dim).to(rows.device)
    rows = (rows % modulo).to(torch.float32)
    cols = (cols % modulo).to(torch.float32)
    return torch.cat([rows[..., None] * freqs, cols[..., None] * freqs], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs: (a, b) -> (a cos - b sin, b cos + a sin)."""
    pairs = t.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return t * cos + rotated * sin


class RotaryTable(nn.Module):
    """Stands in for the official `rope` submodule: no stored tensors, official state-dict keys."""

    KEYS = ("freqs_cos", "freqs_sin")

    def __init__(self, head_dim: int, size: int):
        super().__init__()
        self.head_dim = head_dim
        self.size = size
        # Empty, non-persistent: follows .to(dtype/device) so tables are written in the model's dtype.
        self.register_buffer("_probe", torch.empty(0), persistent=False)

    def tables(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        pos = torch.arange(self.size)
        angles = rope_angles(pos[:, None].expand(-1, self.size), pos[None, :].expand(self.size, -1),
                             self.head_dim, self.size)
        return {"freqs_cos": angles.cos().to(dtype), "freqs_sin": angles.sin().to(dtype)}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Same dtype as the rest of the model, as the official buffers are cast with it.
        for name, table in self.tables(self._probe.dtype).items():
            destination[prefix + name] = table

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The tables are optional (regenerated on demand); when present they must be the official
        # ones, since their size sets the position modulo.
        expected = (self.size, self.size, self.head_dim)
        for name in self.KEYS:
            table = state_dict.get(prefix + name)
            if table is None:
                continue
            if tuple(table.shape) != expected:
                error_msgs.append(f"{prefix + name}: shape {tuple(table.shape)} does not match the "
                                  f"model's RoPE table {expected}")
                continue
            if not self._matches(name, table):
                error_msgs.append(f"{prefix + name}: values differ from the official 2D RoPE table")

    def _matches(self, name: str, table: torch.Tensor) -> bool:
        # Check a few rows (first, second, middle, last): a full compare would allocate the
        # whole fp32 table for nothing.
        rows = sorted({0, 1, self.size // 2, self.size - 1})
        pos_r = torch.tensor(rows)[:, None].expand(-1, self.size)
        pos_c = torch.arange(self.size)[None, :].expand(len(rows), -1)
        angles = rope_angles(pos_r, pos_c, self.head_dim, self.size)
        ref = angles.cos() if name == "freqs_cos" else angles.sin()
        got = table[rows].to(torch.float32)
        tol = 1e-5 if table.dtype == torch.float32 else 1e-2
        return bool(torch.allclose(got, ref, atol=tol, rtol=0))
