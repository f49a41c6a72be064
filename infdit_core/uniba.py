"""UniBA block geometry: neighbour slots, the per-layer K/V cache and the block inputs of a call.

Within one denoiser call, layer l of block (i, j) reads the layer-l keys/values of its top-left,
left and top neighbours (clamped at the border, so a border block sees duplicates of itself or of
its one existing neighbour). Every dependency points up or left, so sweeping the blocks line by
line (strips.py) while caching each layer's K/V reproduces the whole-image computation exactly,
with memory for one line of blocks instead of the whole image.
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .config import LR_PATCH, NUM_SLOTS, InfDiTConfig
from .model import BlockInputs
from .offload import HostSlots, Placement
from .strips import Block, StripSchedule


def neighbour_slots(block: Block) -> tuple[Block, Block, Block, Block]:
    """Slots in re_pos_embed order: self, top-left, left, top; out-of-range indices clamp to 0
    (official quirk 8.1-4: duplicates, not masked)."""
    b, i, j = block
    up, left = max(i - 1, 0), max(j - 1, 0)
    return block, Block(b, up, left), Block(b, i, left), Block(b, up, j)


def _own(block: torch.Tensor) -> torch.Tensor:
    """One block's slice of a call's K or V, to cache: the slice itself when it is the whole
    tensor (a one-block call), otherwise a copy, so one cached block does not keep the whole
    call's tensor alive."""
    whole = block.untyped_storage().nbytes() == block.numel() * block.element_size()
    return block if whole else block.clone()


def chunks(order: list[Block], size: int) -> Iterator[list[Block]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class KVCache:
    """Neighbour source for a sweep of `order` in calls of `block_batch` blocks.

    Per layer it keeps the K/V (post-LN, post-RoPE, before the slot offset) of blocks that a later
    call still reads, and frees each one in the call that reads it last. A neighbour inside the
    current call comes straight from the call's fresh K/V. Blocks swept by another rank enter
    through `put` and have arrived by the time their layer is placed (the exchange puts only blocks
    the next call reads); the K/V of the `outgoing` blocks are packed per call for the next rank,
    one [2, heads, tokens, head_dim] tensor per layer (see `take_outbox`). With a placement that
    spills K/V, each layer's store keeps on the compute device the blocks the next call reads plus
    `kv_device_slots` more (soonest read first) and the rest in host memory."""

    def __init__(self, order: list[Block], block_batch: int, num_layers: int, *,
                 placement: Optional[Placement] = None, outgoing: tuple[Block, ...] | list[Block] = ()):
        self.call_of = {block: index // block_batch for index, block in enumerate(order)}
        self.reads: dict[Block, list[int]] = {}  # source -> the calls reading it, ascending
        for block in order:
            call = self.call_of[block]
            for source in neighbour_slots(block):
                calls = self.reads.setdefault(source, [])
                if not calls or calls[-1] != call:
                    calls.append(call)
        self.last_reader = {source: calls[-1] for source, calls in self.reads.items()}
        self.num_layers = num_layers
        self.stores: list[dict[Block, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]
        self.spilled: list[set[Block]] = [set() for _ in range(num_layers)]
        self.placement = placement if placement is not None and placement.spills_kv else None
        self.host = HostSlots(placement) if self.placement is not None else None
        self.outgoing = set(outgoing)
        self.outbox: dict[Block, list[torch.Tensor]] = {}
        self.peak_blocks = 0  # most blocks held by one layer's store at any time
        self.peak_device_blocks = 0  # of those, most on the compute device
        self.call = -1
        self.blocks: list[Block] = []
        self.position: dict[Block, int] = {}

    def begin_call(self, blocks: list[Block]):
        self.call = self.call_of[blocks[0]]
        self.blocks = blocks
        self.position = {block: m for m, block in enumerate(blocks)}

    def put(self, block: Block, layers: list[Callable[[], torch.Tensor]]):
        """K/V of a block computed elsewhere: per layer, a function that returns them as one
        [2, heads, tokens, head_dim] tensor, waiting for them if they are still in transit. It is
        called when the layer is first read, so a transfer overlaps the layers before it."""
        for store, arrival in zip(self.stores, layers, strict=True):
            store[block] = arrival

    def _entry(self, layer: int, source: Block) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.stores[layer][source]
        if callable(entry):
            kv = entry()
            entry = self.stores[layer][source] = (kv[0], kv[1])
        return entry

    def take_outbox(self) -> list[tuple[Block, list[torch.Tensor]]]:
        """The packed K/V of this call's outgoing blocks (per layer), in sweep order."""
        return [(block, self.outbox.pop(block)) for block in self.blocks if block in self.outbox]

    def gather(self, layer, k, v):
        store = self.stores[layer]

        def pick(source):
            m = self.position.get(source)
            return (k[m], v[m]) if m is not None else self._entry(layer, source)

        # Written straight into the layout attention reads, [M, heads, slots, tokens, head_dim]:
        # the slot offsets are then added in place and the slots flattened without a copy.
        M, H, T, d = k.shape
        keys, values = k.new_empty(M, H, NUM_SLOTS, T, d), v.new_empty(M, H, NUM_SLOTS, T, d)
        for m, block in enumerate(self.blocks):
            for slot, source in enumerate(neighbour_slots(block)):
                key, value = pick(source)
                keys[m, :, slot].copy_(key)
                values[m, :, slot].copy_(value)
        for source in [s for s in store if self.last_reader[s] <= self.call]:
            if source in self.spilled[layer]:
                self.spilled[layer].remove(source)
                for host in store[source]:
                    self.host.release(host)
            del store[source]
        for m, block in enumerate(self.blocks):
            if block in self.outgoing:
                # Packed for the next rank; the cache keeps views of the same memory, so the block
                # waiting to be sent costs nothing beyond its cache entry. One tensor per layer, as
                # every cache entry, so each layer is freed once its last reader has gathered it.
                packed = torch.stack([k[m], v[m]])
                self.outbox.setdefault(block, []).append(packed)
                if self.last_reader[block] > self.call:
                    store[block] = (packed[0], packed[1])
            elif self.last_reader[block] > self.call:
                store[block] = (_own(k[m]), _own(v[m]))
        self.peak_blocks = max(self.peak_blocks, len(store))
        if self.placement is not None:
            self._place(layer)
        self.peak_device_blocks = max(self.peak_device_blocks, len(store) - len(self.spilled[layer]))
        return keys, values

    def _next_read(self, source: Block) -> int:
        calls = self.reads[source]
        return calls[bisect.bisect_right(calls, self.call)]

    def _place(self, layer: int):
        """Keep on the device what the next call reads (and the soonest-read others the slots
        allow); move the rest of this layer's store to the host."""
        store, spilled = self.stores[layer], self.spilled[layer]
        next_read = {source: self._next_read(source) for source in store}
        ranked = sorted(store, key=next_read.get)
        needed = sum(1 for call in next_read.values() if call == self.call + 1)
        keep = set(ranked[:needed + self.placement.kv_device_slots])
        for source, (key, value) in store.items():
            if source in keep and source in spilled:
                store[source] = (self.host.fetch(key), self.host.fetch(value))
                spilled.remove(source)
            elif source not in keep and source not in spilled:
                store[source] = (self.host.spill(key), self.host.spill(value))
                spilled.add(source)


class BlockCanvas:
    """Cuts one denoiser call's inputs for a list of blocks out of a strip's canvases (concat_lr:
    the whole canvas or already the strip).

    The strip's own pixels live on the placement's canvas device; the LR image is kept for the
    strip plus one block on each side, since a block's cross-attention window spans its 3x3-block
    neighbourhood."""

    def __init__(self, config: InfDiTConfig, lr: torch.Tensor, concat_lr: torch.Tensor,
                 schedule: StripSchedule, placement: Placement):
        self.config = config
        self.placement = placement
        s = config.block_size
        self.origin = schedule.origin()
        whole = schedule.batch, 3, schedule.rows * s, schedule.cols * s
        strip = schedule.crop(concat_lr, s) if tuple(concat_lr.shape) == whole else concat_lr
        # A strip of a larger canvas is copied so the whole canvas is not kept alive by it.
        self.concat_lr = strip.to(placement.canvas, torch.float32,
                                  copy=strip.numel() != concat_lr.numel())
        k = config.lr_block_tokens
        step = k * LR_PATCH  # one block in LR pixels
        # Pad the LR pixels by one block's worth of tokens on every side; the window tokens that
        # fall there are zeroed after the convolution (see BlockInputs.lr_valid).
        lr_padded = F.pad(lr.to(placement.canvas, torch.float32), [step] * 4)
        halo = schedule.span.start * step, (len(schedule.span) + 2) * step
        self.lr_padded = lr_padded.narrow(schedule.axis, *halo).clone()
        self.lr_token_hw = (lr.shape[-2] // LR_PATCH, lr.shape[-1] // LR_PATCH)

    def pixels(self, image: torch.Tensor, block: Block) -> torch.Tensor:
        """The block's pixels in a strip canvas [B, C, H, W]."""
        s = self.config.block_size
        i, j = block.i - self.origin[0], block.j - self.origin[1]
        return image[block.b, :, i * s:(i + 1) * s, j * s:(j + 1) * s]

    def inputs(self, blocks: list[Block], x: torch.Tensor) -> BlockInputs:
        """The blocks' inputs on the compute device; `z` is the raw concat(x, concat LR), not yet
        scaled by c_in."""
        cfg, dev = self.config, self.placement.compute
        k, t = cfg.lr_block_tokens, cfg.block_tokens
        z = torch.stack([torch.cat([self.pixels(x, blk), self.pixels(self.concat_lr, blk)]) for blk in blocks])
        step = k * LR_PATCH  # one block in LR pixels; a window spans 3 of them
        oi, oj = self.origin
        lr_windows = torch.stack([
            self.lr_padded[blk.b, :, (blk.i - oi) * step:(blk.i - oi + 3) * step,
                           (blk.j - oj) * step:(blk.j - oj + 3) * step]
            for blk in blocks])
        span = torch.arange(3 * k, device=dev)
        block_i = torch.tensor([blk.i for blk in blocks], device=dev)[:, None]
        block_j = torch.tensor([blk.j for blk in blocks], device=dev)[:, None]
        tok_r, tok_c = (block_i - 1) * k + span, (block_j - 1) * k + span
        valid_r = (tok_r >= 0) & (tok_r < self.lr_token_hw[0])
        valid_c = (tok_c >= 0) & (tok_c < self.lr_token_hw[1])
        in_block = torch.arange(t, device=dev)
        rows = (block_i * t + in_block)[:, :, None].expand(-1, t, t).flatten(1)
        cols = (block_j * t + in_block)[:, None, :].expand(-1, t, t).flatten(1)
        return BlockInputs(z=self.placement.to_compute(z), lr_windows=self.placement.to_compute(lr_windows),
                           lr_valid=valid_r[:, :, None] & valid_c[:, None, :], rows=rows, cols=cols,
                           batch_index=torch.tensor([blk.b for blk in blocks], device=dev))
