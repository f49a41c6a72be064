"""UniBA block geometry: the block grid, neighbour slots, sweep order and the per-layer K/V cache.

Within one denoiser call, layer l of block (i, j) reads the layer-l keys/values of its top-left,
left and top neighbours (clamped at the border, so a border block sees duplicates of itself or of
its one existing neighbour). Every dependency points up or left, so sweeping the blocks in raster
order while caching each layer's K/V reproduces the whole-image computation exactly, with memory
for one row of blocks instead of the whole image.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .config import LR_PATCH, NUM_SLOTS, InfDiTConfig
from .model import BlockInputs


class Block(NamedTuple):
    b: int  # image in the batch
    i: int  # block row
    j: int  # block column


def neighbour_slots(block: Block) -> tuple[Block, Block, Block, Block]:
    """Slots in re_pos_embed order: self, top-left, left, top; out-of-range indices clamp to 0
    (official quirk 8.1-4: duplicates, not masked)."""
    b, i, j = block
    up, left = max(i - 1, 0), max(j - 1, 0)
    return block, Block(b, up, left), Block(b, i, left), Block(b, up, j)


def sweep_order(batch: int, rows: int, cols: int) -> list[Block]:
    """Raster order, or column-major for wide images: the cache then holds one block column
    instead of one block row. Both orders visit every neighbour before the blocks reading it."""
    if cols > rows:
        return [Block(b, i, j) for b in range(batch) for j in range(cols) for i in range(rows)]
    return [Block(b, i, j) for b in range(batch) for i in range(rows) for j in range(cols)]


def chunks(order: list[Block], size: int) -> Iterator[list[Block]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class KVCache:
    """Neighbour source for a sweep of `order` in calls of `block_batch` blocks.

    Per layer it keeps the K/V (post-LN, post-RoPE, before the slot offset) of blocks that a later
    call still reads, and frees each one in the call that reads it last. A neighbour inside the
    current call comes straight from the call's fresh K/V."""

    def __init__(self, order: list[Block], block_batch: int, num_layers: int):
        self.call_of = {block: index // block_batch for index, block in enumerate(order)}
        self.last_reader: dict[Block, int] = {}
        for block in order:
            for source in neighbour_slots(block):
                self.last_reader[source] = max(self.last_reader.get(source, -1), self.call_of[block])
        self.stores: list[dict[Block, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]
        self.peak_blocks = 0  # most blocks held by one layer's store at any time
        self.call = -1
        self.blocks: list[Block] = []
        self.position: dict[Block, int] = {}

    def begin_call(self, blocks: list[Block]):
        self.call = self.call_of[blocks[0]]
        self.blocks = blocks
        self.position = {block: m for m, block in enumerate(blocks)}

    def gather(self, layer, k, v):
        store = self.stores[layer]

        def pick(source):
            m = self.position.get(source)
            return (k[m], v[m]) if m is not None else store[source]

        keys, values = zip(*(pick(s) for block in self.blocks for s in neighbour_slots(block)))
        M = len(self.blocks)
        keys = torch.stack(keys).view(M, NUM_SLOTS, *k.shape[1:])
        values = torch.stack(values).view(M, NUM_SLOTS, *v.shape[1:])
        for source in [s for s in store if self.last_reader[s] <= self.call]:
            del store[source]
        for m, block in enumerate(self.blocks):
            if self.last_reader[block] > self.call:
                # A copy, so the call's whole K/V tensor is not kept alive by one cached block.
                store[block] = (k[m].clone(), v[m].clone())
        self.peak_blocks = max(self.peak_blocks, len(store))
        return keys, values


class BlockCanvas:
    """Cuts one denoiser call's inputs for a list of blocks out of whole-image tensors."""

    def __init__(self, config: InfDiTConfig, lr: torch.Tensor, concat_lr: torch.Tensor):
        self.config = config
        self.concat_lr = concat_lr
        k = config.lr_block_tokens
        # Pad the LR pixels by one block's worth of tokens on every side; the window tokens that
        # fall there are zeroed after the convolution (see BlockInputs.lr_valid).
        self.lr_padded = F.pad(lr, [k * LR_PATCH] * 4)
        self.lr_token_hw = (lr.shape[-2] // LR_PATCH, lr.shape[-1] // LR_PATCH)

    def pixels(self, image: torch.Tensor, block: Block) -> torch.Tensor:
        s = self.config.block_size
        return image[block.b, :, block.i * s:(block.i + 1) * s, block.j * s:(block.j + 1) * s]

    def inputs(self, blocks: list[Block], x: torch.Tensor, c_in: torch.Tensor) -> BlockInputs:
        cfg = self.config
        k, t = cfg.lr_block_tokens, cfg.block_tokens
        batch_index = torch.tensor([blk.b for blk in blocks], device=x.device)
        # Official quirk (8.1-3): c_in scales the LR concat channels as well as the noisy image.
        z = torch.stack([torch.cat([self.pixels(x, blk), self.pixels(self.concat_lr, blk)]) for blk in blocks])
        z = z * c_in[batch_index][:, None, None, None]
        step = k * LR_PATCH  # one block in LR pixels; a window spans 3 of them
        lr_windows = torch.stack([
            self.lr_padded[blk.b, :, blk.i * step:(blk.i + 3) * step, blk.j * step:(blk.j + 3) * step]
            for blk in blocks])
        span = torch.arange(3 * k, device=x.device)
        block_i = torch.tensor([blk.i for blk in blocks], device=x.device)[:, None]
        block_j = torch.tensor([blk.j for blk in blocks], device=x.device)[:, None]
        tok_r, tok_c = (block_i - 1) * k + span, (block_j - 1) * k + span
        valid_r = (tok_r >= 0) & (tok_r < self.lr_token_hw[0])
        valid_c = (tok_c >= 0) & (tok_c < self.lr_token_hw[1])
        in_block = torch.arange(t, device=x.device)
        rows = (block_i * t + in_block)[:, :, None].expand(-1, t, t).flatten(1)
        cols = (block_j * t + in_block)[:, None, :].expand(-1, t, t).flatten(1)
        return BlockInputs(z=z, lr_windows=lr_windows, lr_valid=valid_r[:, :, None] & valid_c[:, None, :],
                           rows=rows, cols=cols, batch_index=batch_index)
