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

import functools

import torch
from torch import nn

THETA = 10000.0


def official_frequencies(head_dim: int, theta: float = THETA) -> torch.Tensor:
    """The official (EVA) base frequencies of one axis half, float32: head_dim/4 values,
    `1 / theta ** (arange(0, d, 2)[: d // 2].float() / d)` with d = head_dim/2, op for op."""
    d = head_dim // 2
    return 1 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)


def axis_frequencies(head_dim: int) -> torch.Tensor:
    """Per-channel frequency of one axis half (head_dim/2 values, each pair shares one)."""
    return official_frequencies(head_dim).repeat_interleave(2)


@functools.lru_cache(maxsize=None)
def _frequencies_on(head_dim: int, device: torch.device) -> torch.Tensor:
    """axis_frequencies on `device`, copied there once: a copy from host memory per network call
    would make the host wait for the device."""
    return axis_frequencies(head_dim).to(device)


def table_positions(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Integer positions as the official table holds them: `p / size * size` in float32 (equal to p
    for a power-of-two size, possibly off by one rounding otherwise), after wrapping modulo size."""
    return (positions % size).to(torch.float32) / size * size


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, modulo: int) -> torch.Tensor:
    """Angles [..., head_dim] in float32 for integer positions (taken modulo `modulo`), equal to the
    official table's angles at (row, col)."""
    freqs = _frequencies_on(head_dim, rows.device)
    rows = table_positions(rows, modulo)
    cols = table_positions(cols, modulo)
    return torch.cat([rows[..., None] * freqs, cols[..., None] * freqs], dim=-1)


def official_angles(rows, size: int, head_dim: int, theta: float = THETA) -> torch.Tensor:
    """Rows `rows` of the official angle table [len(rows), size, head_dim], float32, computed as the
    official code does: positions `arange(size) / size * size`, `f = einsum('t,f->tf', positions,
    freqs)` with each frequency repeated on two adjacent channels, `angle[r, c] = cat(f[r], f[c])`."""
    t = torch.arange(size) / size * size
    f = torch.einsum("t,f->tf", t, official_frequencies(head_dim, theta)).repeat_interleave(2, dim=-1)
    rows = torch.as_tensor(rows, dtype=torch.long)
    return torch.cat([f[rows][:, None, :].expand(-1, size, -1), f[None].expand(len(rows), -1, -1)], dim=-1)


def table_tolerance(angles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-entry tolerance for a stored cos/sin table against cos/sin of `angles` (float32).

    Float32 angles carry a rounding error of about |angle| * 2^-24 per operation (frequency, position,
    product), and other ways of computing them (float64, another device's pow) differ by a few of those:
    2^-20 * (|angle| + 1) allows 16, about 1e-3 at the released table's largest angle (1023 rad).
    Plus one epsilon of the table's dtype for the rounding of the stored values (<= eps/2 for |v| <= 1).
    A wrong table (other theta, half-split pairs, row/column halves swapped) differs by O(1) somewhere."""
    return 2.0 ** -20 * (angles.abs() + 1) + torch.finfo(dtype).eps


def value_precision(table: torch.Tensor) -> torch.dtype:
    """The dtype whose rounding the values carry: a wider table whose values are all exactly bf16 (or
    fp16) values was up-cast from one (e.g. the bf16 release converted to float32)."""
    for narrow in (torch.bfloat16, torch.float16):
        if table.dtype.itemsize > narrow.itemsize and torch.equal(table.to(narrow).to(table.dtype), table):
            return narrow
    return table.dtype


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
        angles = official_angles(range(self.size), self.size, self.head_dim)
        return {"freqs_cos": angles.cos().to(dtype), "freqs_sin": angles.sin().to(dtype)}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Same dtype as the rest of the model, as the official buffers are cast with it.
        if self._probe.is_meta:  # a model being planned (the loader's key check): shapes only
            for name in self.KEYS:
                destination[prefix + name] = torch.empty((self.size, self.size, self.head_dim),
                                                         dtype=self._probe.dtype, device="meta")
            return
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
        # Check a few rows (first, second, middle, last) against the official formula: a full
        # compare would allocate the whole fp32 table for nothing.
        if not table.is_floating_point():
            return False
        rows = sorted({0, 1, self.size // 2, self.size - 1})
        angles = official_angles(rows, self.size, self.head_dim)
        ref = angles.cos() if name == "freqs_cos" else angles.sin()
        got = table[rows].cpu()
        tol = table_tolerance(angles, value_precision(got))
        return bool(((got.to(torch.float32) - ref).abs() <= tol).all())
