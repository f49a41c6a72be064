"""The Inf-DiT network, parameter for parameter the official model (spec sections 2-4, 8.1).

Module names reproduce the official checkpoint's keys: the SAT backbone under `transformer.`,
the SAT mixins under `mixins.<name>.`, the embedders at top level. The network always works on a
set of UniBA blocks: tokens are grouped [blocks, tokens per block, width], and a block attends to
itself and its top-left, left and top neighbours. Which blocks a call sees, and where their
neighbours' keys and values come from, is decided by the caller (see `uniba.py`), so the
whole-image denoiser and the memory-bounded block sweep share every line of the math below.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from .config import NUM_SLOTS, TIME_CHANNELS, InfDiTConfig
from .rope import RotaryTable, apply_rope, rope_angles


class Conditioning(NamedTuple):
    """Per-image adaLN parameters; depends only on sigma and the CLIP vector."""
    layer_mod: torch.Tensor  # [B, layers, 4, D]: shift_msa, scale_msa, shift_mlp, scale_mlp
    final_mod: torch.Tensor  # [B, 2, D]: shift, scale


class BlockInputs(NamedTuple):
    """Everything one network call needs about its M blocks."""
    z: torch.Tensor  # [M, in_channels, b, b] noisy HR and upsampled LR, both scaled by c_in
    lr_windows: torch.Tensor  # [M, 3, 6k, 6k] LR pixels of the 3x3-block neighbourhood (k = LR tokens per block)
    lr_valid: torch.Tensor  # [M, 3k, 3k] bool: window token lies inside the image (else it is a zero token)
    rows: torch.Tensor  # [M, T] token row of every token (whole-image coordinates)
    cols: torch.Tensor  # [M, T] token column
    batch_index: torch.Tensor  # [M] which image of the batch each block belongs to


class NeighbourSource(Protocol):
    def gather(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Given this call's fresh keys/values [M, H, T, d] of `layer`, return the four neighbour
        slots (self, top-left, left, top) as [M, H, 4, T, d] keys and values (new tensors: the
        caller adds the slot offsets in place)."""


class LayerRunner(Protocol):
    def __call__(self, model: "InfDiT", index: int, h: torch.Tensor, mods: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, neighbours: NeighbourSource, inputs: BlockInputs) -> torch.Tensor:
        """Layer `index` of `model` on the residual stream h [M, T, D], as InfDiT._layer computes it."""


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def time_features(c_noise: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of the EDM noise input: cosines first, then sines (192 values)."""
    half = TIME_CHANNELS // 2
    omega = 10000.0 ** (-torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    args = c_noise.to(torch.float32)[:, None] * omega
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _mlp(inp: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class _TimeEmbed(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = _mlp(TIME_CHANNELS, width)


class _CondEmbed(nn.Module):
    def __init__(self, vector_dim, width):
        super().__init__()
        self.map_vector = _mlp(vector_dim, width)


class _SelfAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.query_key_value = nn.Linear(width, 3 * width)  # rows: Q, K, V; head-major inside each
        self.dense = nn.Linear(width, width)


class _MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(width, 4 * width)
        self.dense_4h_to_h = nn.Linear(4 * width, width)

    def forward(self, x):
        # In place: the 4x-wide input of the GELU is the largest activation of a layer.
        return self.dense_4h_to_h(torch.ops.aten.gelu_(self.dense_h_to_4h(x), approximate="tanh"))


class _Layer(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attention = _SelfAttention(width)
        self.mlp = _MLP(width)


class _Transformer(nn.Module):
    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg.hidden_size) for _ in range(cfg.num_layers))
        # Created by SAT and saved in the checkpoint, never read (the mixin returns no position).
        self.position_embeddings = nn.Embedding(cfg.max_sequence_length, cfg.hidden_size)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class _CrossAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)  # rows: K then V
        self.dense = nn.Linear(width, width)


class _AdaLNMixin(nn.Module):
    """Per-layer modulation, QK norm, block position offsets, RoPE and the layer-0 LR cross-attention."""

    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        D, H, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.adaLN_modulations = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D)) for _ in range(cfg.num_layers))
        self.q_layer_norm = nn.ModuleList(nn.LayerNorm(d, eps=cfg.eps) for _ in range(cfg.num_layers))
        # Official quirk (8.1-1): present in the checkpoint but never used; keys use q_layer_norm.
        self.k_layer_norm = nn.ModuleList(nn.LayerNorm(d, eps=cfg.eps) for _ in range(cfg.num_layers))
        self.re_pos_embed = nn.Parameter(torch.zeros(cfg.num_layers, NUM_SLOTS, H, d))
        self.rope = RotaryTable(d, cfg.rope_size)
        self.proj_lr = nn.Conv2d(3, D, 2, stride=2)
        self.cross_attention = _CrossAttention(D)
        self.post_cross_attention_layernorm = nn.LayerNorm(D, eps=cfg.eps)
        window = 3 * cfg.lr_block_tokens
        self.lr_query_position_embedding = nn.Parameter(torch.zeros(1, cfg.block_tokens ** 2, H, d))
        self.lr_key_position_embedding = nn.Parameter(torch.zeros(1, window * window, H, d))
        self.cross_q_ln = nn.LayerNorm(d, eps=cfg.eps)
        self.cross_k_ln = nn.LayerNorm(d, eps=cfg.eps)


class _FinalLayer(nn.Module):
    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)


class _Mixins(nn.Module):
    def __init__(self, cfg: InfDiTConfig):
        super().__init__()
        self.patch_embed = _PatchEmbed(cfg)
        self.adaln_layer = _AdaLNMixin(cfg)
        self.final_layer = _FinalLayer(cfg)


class InfDiT(nn.Module):
    def __init__(self, config: InfDiTConfig = InfDiTConfig()):
        super().__init__()
        self.config = config
        self.time_embed = _TimeEmbed(config.hidden_size)
        self.cond_embed = _CondEmbed(config.vector_dim, config.hidden_size)
        self.transformer = _Transformer(config)
        self.mixins = _Mixins(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.mixins.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mixins.patch_embed.proj.weight.device

    def _ln(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=self.config.eps)

    def conditioning(self, c_noise: torch.Tensor, clip_vector: torch.Tensor) -> Conditioning:
        """adaLN parameters for every layer, computed once per denoiser call."""
        dt = self.dtype
        e = self.time_embed.mlp(time_features(c_noise).to(dt))
        e = e + self.cond_embed.map_vector(clip_vector.to(dt))
        # Official quirk (8.1-2): SiLU here AND as the first op of every modulation Sequential.
        c = F.silu(e)
        B, D = c.shape
        layer_mod = torch.stack([m(c) for m in self.mixins.adaln_layer.adaLN_modulations], dim=1)
        final_mod = self.mixins.final_layer.adaLN_modulation(c)
        return Conditioning(layer_mod.view(B, -1, 4, D), final_mod.view(B, 2, D))

    def forward_blocks(self, inputs: BlockInputs, cond: Conditioning, neighbours: NeighbourSource,
                       checkpoint_layers: bool = False, layer_runner: Optional[LayerRunner] = None) -> torch.Tensor:
        """Network output F for M blocks: [M, out_channels, b, b] in the model dtype.

        checkpoint_layers: recompute each layer's activations in the backward pass instead of
        keeping them (training: memory of one layer's activations instead of all of them).
        layer_runner: runs each layer instead of `_layer` (the compiled fast path, fast.py)."""
        cfg = self.config
        # Contiguous once here: element-wise ops keep their input's layout, so a transposed h would
        # stay transposed through every residual add, and every LayerNorm would copy it first.
        h = self.mixins.patch_embed.proj(inputs.z.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        angles = rope_angles(inputs.rows, inputs.cols, cfg.head_dim, cfg.rope_size)[:, :, None]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        del angles
        mods = cond.layer_mod[inputs.batch_index]
        run_layer = self._layer if layer_runner is None else functools.partial(layer_runner, self)
        for index in range(cfg.num_layers):
            if checkpoint_layers:
                h = torch.utils.checkpoint.checkpoint(run_layer, index, h, mods, cos, sin, neighbours, inputs,
                                                      use_reentrant=False)
            else:
                h = run_layer(index, h, mods, cos, sin, neighbours, inputs)
        shift, scale = cond.final_mod[inputs.batch_index].unbind(1)
        # Official quirk (8.1-5): SAT's final LayerNorm, then the final layer's own, both plain.
        y = self.mixins.final_layer.linear(modulate(self._ln(self._ln(h)), shift, scale))
        t, p = cfg.block_tokens, cfg.patch_size
        return rearrange(y, "m (r c) (pi pj ch) -> m ch (r pi) (c pj)", r=t, c=t, pi=p, pj=p)

    def _layer(self, index, h, mods, cos, sin, neighbours, inputs):
        """One transformer layer on the residual stream h [M, T, D]."""
        layer, adaln = self.transformer.layers[index], self.mixins.adaln_layer
        shift_msa, scale_msa, shift_mlp, scale_mlp = mods[:, index].unbind(1)
        # Sub-layer inputs are passed as temporaries, never named here: each sub-layer drops its
        # input once it is projected, so no hidden-sized input outlives its use (at the peak of
        # a layer, the attention, only the residual stream, q and the gathered K/V are alive).
        h = h + self._self_attention(index, layer, modulate(self._ln(h), shift_msa, scale_msa),
                                     cos, sin, neighbours)
        if index == 0:
            # Nearby-LR cross-attention, layer 0 only: un-modulated LN in, no gate out, and an
            # affine LN (instead of the plain one) in front of this layer's MLP.
            h = h + self._lr_cross_attention(self._ln(h), self._lr_tokens(inputs))
            mlp_norm = adaln.post_cross_attention_layernorm
        else:
            mlp_norm = self._ln
        return h + layer.mlp(modulate(mlp_norm(h), shift_mlp, scale_mlp))

    def _split(self, x, parts=1):
        """[M, T, parts*D] -> parts tensors [M, T, H, d] (rows are part-major, then head-major)."""
        M, T, _ = x.shape
        return x.view(M, T, parts, self.config.num_heads, self.config.head_dim).unbind(2)

    def _self_attention(self, index, layer, x, cos, sin, neighbours):
        M, T, D = x.shape
        q, k, v = self._split(layer.attention.query_key_value(x), 3)
        del x
        # v on its own: the projection (3x its size) is freed once q and k are normalised.
        v = v.contiguous().transpose(1, 2)
        q_norm = self.mixins.adaln_layer.q_layer_norm[index]
        # Official quirk (8.1-1): the query LayerNorm normalises the keys too.
        q = apply_rope(q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(q_norm(k), cos, sin).transpose(1, 2)
        keys, values = neighbours.gather(index, k, v)
        # The call's own K/V are in keys/values (and in the cache) now.
        del k, v
        # Each neighbour slot's keys get that slot's learned offset; values and queries get none.
        keys += self.mixins.adaln_layer.re_pos_embed[index].transpose(0, 1)[None, :, :, None, :]
        out = F.scaled_dot_product_attention(q, keys.flatten(2, 3), values.flatten(2, 3))
        del q, keys, values  # before the output projection allocates
        return layer.attention.dense(out.transpose(1, 2).reshape(M, T, D))

    def _lr_tokens(self, inputs: BlockInputs) -> torch.Tensor:
        """Embedded LR windows [M, (3k)^2, D]; tokens outside the image are exact zeros, as the
        official code zero-pads the token grid after the convolution."""
        tokens = self.mixins.adaln_layer.proj_lr(inputs.lr_windows.to(self.dtype))
        tokens = tokens * inputs.lr_valid[:, None].to(tokens.dtype)
        return tokens.flatten(2).transpose(1, 2)

    def _lr_cross_attention(self, x, lr_tokens):
        adaln = self.mixins.adaln_layer
        ca = adaln.cross_attention
        M, T, D = x.shape
        (q,) = self._split(ca.query(x))
        del x
        # The LR window has 2.25x a block's tokens (3x3 LR blocks), so its K/V are the largest
        # tensors here: the tokens are freed once projected, V is kept apart from the projection,
        # and position embeddings and bias are added in place (the same sums; F.linear would add
        # the bias to these strided tokens' product out of place, a second copy of K and V).
        q = adaln.cross_q_ln(q).add_(adaln.lr_query_position_embedding[0])
        k, v = self._split(F.linear(lr_tokens, ca.key_value.weight).add_(ca.key_value.bias), 2)
        del lr_tokens
        v = v.contiguous()
        k = adaln.cross_k_ln(k).add_(adaln.lr_key_position_embedding[0])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        del q, k, v
        return ca.dense(out.transpose(1, 2).reshape(M, T, D))
