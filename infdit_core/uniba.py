"""UniBA block geometry: neighbour slots, the per-layer K/V cache and the block inputs of a call.

Within one denoiser call, layer l of block (i, j) reads the layer-l keys/values of its top-left,
left and top neighbours (clamped at the border, so a border block sees duplicates of itself or of
its one existing neighbour). Every dependency points up or left, so sweeping the blocks line by
line (strips.py) while caching each layer's K/V reproduces the whole-image computation exactly,
with memory for one line of blocks instead of the whole image.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Callable, Iterator, NamedTuple, Optional

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


def chunks(order: list[Block], size: int) -> Iterator[list[Block]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class StagingBuffers:
    """Device tensors that small tensors built on the host are copied into, one per shape, written
    again call after call: the copy does not stall the device (pinned memory, non-blocking, on
    CUDA; a copy from pageable memory waits for the device to drain), and a CUDA graph captured
    over a call (graphs.py) reads each later call's values from the same addresses. Safe without
    waiting: a copy is queued on the stream behind the kernels still reading the last values."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def load(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        key = tuple(host.shape), host.dtype, device
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = torch.empty(host.shape, dtype=host.dtype, device=device)
        buffer.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
        return buffer


class _CallPlan(NamedTuple):
    """What one network call does to the K/V pool: the same for every layer."""
    sources: list[int]  # per block and neighbour slot: a pool slot (>= 0), or -1 - m for the call's block m
    arrivals: list[tuple[Block, int]]  # blocks of another rank first read in this call, and their slots
    spills: list[tuple[Block, int]]  # cached blocks moved to host memory after the gather, from their slots
    fetches: list[tuple[Block, int]]  # spilled blocks brought back, into these slots, for the next call
    writes: list[tuple[int, int]]  # (m, slot): the call's blocks cached on the device
    spilled_now: list[tuple[Block, int]]  # (block, m): the call's blocks cached straight in host memory
    held: int  # blocks cached once the call is done
    on_device: int  # of those, in the pool


class _Ledger:
    """Which cached block sits in which pool slot, call by call: bookkeeping only, no tensors, so a
    sweep can be played through ahead of time to size the pool.

    A block is cached from the call that computes it (or, for a block of another rank, from the call
    that first reads it) until the call that reads it last has gathered it. A slot given up in a
    call (its block read for the last time, or spilled) is written again in the same call only after
    the gather, so each layer reads the old block before it is replaced.

    With `scratch`, every call writes all its blocks into the pool, the ones no later call reads
    into a slot free at that moment (taken for the call, given back after it): each call of a sweep
    then runs the same ops, whichever of its blocks are cached (what a CUDA graph replays)."""

    def __init__(self, cache: "KVCache", scratch: bool):
        self.cache = cache
        self.scratch = scratch
        self.cached_any = False  # whether any block was cached (not counting scratch writes)
        self.slot: dict[Block, Optional[int]] = {}  # cached blocks in caching order: slot, None if spilled
        self.free: deque[int] = deque()  # the ring: slots given up go to the back, new blocks take the front
        self.capacity = 0  # slots ever needed at once

    def _take(self) -> int:
        if not self.free:
            self.free.append(self.capacity)
            self.capacity += 1
        return self.free.popleft()

    def advance(self, call: int, blocks: list[Block]) -> _CallPlan:
        cache = self.cache
        position = {block: m for m, block in enumerate(blocks)}
        wanted = [source for block in blocks for source in neighbour_slots(block)]
        arrivals = []
        for source in sorted({s for s in wanted if s not in position and s not in self.slot}):
            if source in cache.call_of:
                raise RuntimeError(f"block {source} is read before it is computed")
            self.slot[source] = self._take()
            arrivals.append((source, self.slot[source]))
        sources = [-1 - position[s] if s in position else self.slot[s] for s in wanted]
        if None in sources:
            raise RuntimeError("a spilled K/V block was not fetched before the call reading it")
        for source in cache.last_read_by.get(call, ()):
            if source in self.slot:  # (the call's own blocks never are)
                self.free.append(self.slot.pop(source))
        new = {}  # the call's blocks a later call reads -> m
        for m, block in enumerate(blocks):
            if cache.last_reader[block] > call:
                new[block] = m
                self.slot[block] = None
        held = len(self.slot)
        spills, fetches, spilled_now = [], [], []
        if cache.placement is not None:
            # Keep on the device what the next call reads (and the soonest-read others the slots
            # allow); the rest of the store goes to host memory.
            next_read = {source: cache.next_read(source, call) for source in self.slot}
            ranked = sorted(self.slot, key=next_read.get)
            needed = sum(1 for c in next_read.values() if c == call + 1)
            keep = set(ranked[:needed + cache.placement.kv_device_slots])
            for source, slot in self.slot.items():
                if source in new:
                    if source not in keep:
                        spilled_now.append((source, new.pop(source)))
                elif source in keep and slot is None:
                    self.slot[source] = self._take()
                    fetches.append((source, self.slot[source]))
                elif source not in keep and slot is not None:
                    self.slot[source] = None
                    self.free.append(slot)
                    spills.append((source, slot))
        writes = []
        for block, m in new.items():
            self.slot[block] = self._take()
            writes.append((m, self.slot[block]))
        self.cached_any |= bool(writes)
        scratch = None
        if self.scratch and len(writes) < len(blocks):
            scratch = self._take()
            cached = dict(writes)
            writes = [(m, cached.get(m, scratch)) for m in range(len(blocks))]
        on_device = self.capacity - len(self.free)  # every slot is free or holds a (cached or scratch) block
        if scratch is not None:
            self.free.appendleft(scratch)
        return _CallPlan(sources, arrivals, spills, fetches, writes, spilled_now, held, on_device)


class KVCache:
    """Neighbour source for a sweep of `order` in calls of `block_batch` blocks.

    The K/V (post-LN, post-RoPE, before the slot offset) of blocks that a later call still reads
    live in a pool allocated once per sweep: per layer a ring of slots, as many as the sweep ever
    holds at once (about one line of blocks plus one), each slot one block's [2, heads, tokens,
    head_dim], and behind the layers' rings one row per block of a call, where each layer's fresh
    K/V are written. A call's neighbour slots are then one gather per layer through an index built
    once per call, straight into the [M, heads, 4, tokens, head_dim] layout attention reads, and
    the call's blocks that a later call reads are copied into their slots in one more op. Which
    block holds which slot is the same for every layer (see _Ledger).

    Blocks swept by another rank enter through `put` and are copied into their slot, layer by
    layer, when the call first reading them gathers that layer; the K/V of the `outgoing` blocks
    are packed per call for the next rank, one [2, heads, tokens, head_dim] tensor per layer (see
    `take_outbox`). With a placement that spills K/V, the pool keeps the blocks the next call
    reads plus `kv_device_slots` more (soonest read first) and the rest wait in host memory."""

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
        self.last_read_by: dict[int, list[Block]] = {}  # call -> the blocks it reads for the last time
        for source, call in self.last_reader.items():
            self.last_read_by.setdefault(call, []).append(source)
        self.num_layers = num_layers
        self.placement = placement if placement is not None and placement.spills_kv else None
        self.host = HostSlots(placement) if self.placement is not None else None
        self.spilled: list[dict[Block, torch.Tensor]] = [{} for _ in range(num_layers)]  # host copies
        self.outgoing = set(outgoing)
        self.outbox: dict[Block, list[torch.Tensor]] = {}
        self.arriving: dict[Block, list[Callable[[], torch.Tensor]]] = {}
        # Whether every call of the same block count can run the same ops on the same memory (what
        # a CUDA graph replays, graphs.py): no block enters from or leaves for another rank, none
        # is spilled to host memory. Then every call writes all its blocks into the pool (see
        # _Ledger), unless no block is ever cached (a sweep of one call per image).
        self.fixed_calls = (self.placement is None and not self.outgoing
                            and all(source in self.call_of for source in self.reads))
        # Sized ahead by playing the sweep through.
        rehearsal = _Ledger(self, scratch=self.fixed_calls)
        for call, blocks in enumerate(chunks(order, block_batch)):
            rehearsal.advance(call, blocks)
        self.capacity = rehearsal.capacity if rehearsal.cached_any else 0  # pool slots per layer
        self.call_blocks = min(block_batch, len(order))
        self.ledger = _Ledger(self, scratch=self.fixed_calls and rehearsal.cached_any)
        self.staging = StagingBuffers()
        self.pool: Optional[torch.Tensor] = None  # [layers * capacity + call_blocks, 2, heads, tokens, head_dim]
        self.peak_blocks = 0  # most blocks cached at once (per layer)
        self.peak_device_blocks = 0  # of those, most in the pool
        self.call = -1
        self.blocks: list[Block] = []
        self.plan: Optional[_CallPlan] = None
        self.packed: Optional[torch.Tensor] = None  # the call's index as copied from the host
        self.index: Optional[tuple[torch.Tensor, ...]] = None  # and as the gathers read it
        self.sending: list[tuple[int, Block]] = []

    @property
    def held(self) -> dict[Block, Optional[int]]:
        """The blocks cached now, and their pool slots (None: in host memory)."""
        return self.ledger.slot

    def begin_call(self, blocks: list[Block]):
        self.call = self.call_of[blocks[0]]
        self.blocks = blocks
        self.plan = self.ledger.advance(self.call, blocks)
        self.peak_blocks = max(self.peak_blocks, self.plan.held)
        self.peak_device_blocks = max(self.peak_device_blocks, self.plan.on_device)
        # The index reaches the device here if the pool is there already (allocate), else with the
        # call's first gather, which knows the layout; the gathers' form of it is computed from it
        # on the device by the call's first gather.
        self.packed = self._load_index() if self.pool is not None else None
        self.index = None
        self.sending = [(m, block) for m, block in enumerate(blocks) if block in self.outgoing]

    def allocate(self, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        """Allocate the pool now rather than in the first gather (before a CUDA graph is captured,
        so the pool is not memory of the graph's own)."""
        self.pool = torch.empty(self.num_layers * self.capacity + self.call_blocks, 2, heads, tokens, head_dim,
                                dtype=dtype, device=device)

    def close(self):
        """Free the pool once the sweep is done (the bookkeeping stays for inspection)."""
        self.pool = None
        self.packed = self.index = None

    def put(self, block: Block, layers: list[Callable[[], torch.Tensor]]):
        """K/V of a block computed elsewhere: per layer, a function that returns them as one
        [2, heads, tokens, head_dim] tensor, waiting for them if they are still in transit. It is
        called when the layer is first read, so a transfer overlaps the layers before it."""
        if len(layers) != self.num_layers:
            raise ValueError(f"put {block}: {len(layers)} layers for a {self.num_layers}-layer cache")
        self.arriving[block] = list(layers)

    def take_outbox(self) -> list[tuple[Block, list[torch.Tensor]]]:
        """The packed K/V of this call's outgoing blocks (per layer), in sweep order."""
        return [(block, self.outbox.pop(block)) for block in self.blocks if block in self.outbox]

    def next_read(self, source: Block, call: int) -> int:
        calls = self.reads[source]
        return calls[bisect.bisect_right(calls, call)]

    def _load_index(self) -> torch.Tensor:
        """The call's gather and write indices, built on the host and copied to the pool's device
        in one copy: per block and neighbour slot the pool row it reads (slot s of a layer's ring:
        s, for the layer to offset; the call's block m: its fresh row) and whether that is a ring
        slot, then the slot and the call's block of each write (with fixed_calls: all of the call's
        blocks, or none; see _Ledger)."""
        plan, S = self.plan, self.capacity
        rows = [source if source >= 0 else self.num_layers * S - 1 - source for source in plan.sources]
        in_ring = [int(source >= 0) for source in plan.sources]
        host = torch.tensor(rows + in_ring + [slot for _, slot in plan.writes] + [m for m, _ in plan.writes],
                            dtype=torch.long)
        return self.staging.load(host, self.pool.device)

    def _gather_index(self, heads: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The gather index of every layer and the write slots, from the call's packed index.

        The gather reads the pool as rows of one head's K or V ([tokens * head_dim] values): row
        ((r * 2 + kv) * heads + h) for pool row r, so one index_select yields keys and values in
        the layout attention reads. Pool row of slot s in layer l: l * capacity + s; of the call's
        block m: layers * capacity + m (its fresh K/V). The written blocks are None where they are
        all of the call's, in order (no selection)."""
        S, M, device = self.capacity, len(self.blocks), self.packed.device
        n, w = M * NUM_SLOTS, len(self.plan.writes)
        rows, in_ring, write_slots, write_m = self.packed.split([n, n, w, w])
        every = [m for m, _ in self.plan.writes] == list(range(M))
        layer = torch.arange(self.num_layers, device=device)[:, None]
        kv = torch.arange(2, device=device).view(1, 2, 1, 1, 1)
        head = torch.arange(heads, device=device).view(1, 1, 1, heads, 1)
        layer_rows = (rows + layer * S * in_ring).view(self.num_layers, 1, M, 1, NUM_SLOTS)
        gather = ((layer_rows * 2 + kv) * heads + head).flatten(1)  # [layers, 2 * M * heads * 4]
        return gather, write_slots, None if every else write_m

    def gather(self, layer, k, v):
        M, H, T, d = k.shape
        S, plan = self.capacity, self.plan
        if self.pool is None:
            self.allocate(H, T, d, k.dtype, k.device)
        if self.packed is None:
            self.packed = self._load_index()
        if self.index is None:
            self.index = self._gather_index(H)
        gather, write_slots, write_m = self.index
        ring = self.pool[layer * S:(layer + 1) * S]
        for source, slot in plan.arrivals:
            arrivals = self.arriving[source]
            ring[slot].copy_(arrivals[layer]())
            arrivals[layer] = None  # the received buffer is free once copied
            if layer == self.num_layers - 1:
                del self.arriving[source]
        fresh = self.pool[self.num_layers * S:self.num_layers * S + M]
        fresh[:, 0].copy_(k)
        fresh[:, 1].copy_(v)
        kv = self.pool.view(-1, T * d).index_select(0, gather[layer]).view(2, M, H, NUM_SLOTS, T, d)
        # Reads of this layer's slots are done: they may be spilled and written again.
        for source, slot in plan.spills:
            self.spilled[layer][source] = self.host.spill(ring[slot])
        for source, slot in plan.fetches:
            self.host.fetch(self.spilled[layer].pop(source), into=ring[slot])
        if plan.writes:
            ring.index_copy_(0, write_slots, fresh if write_m is None else fresh.index_select(0, write_m))
        for source, m in plan.spilled_now:
            self.spilled[layer][source] = self.host.spill(fresh[m])
        for m, block in self.sending:
            # A copy: the slot is written again once its last reader is done, which may be before
            # the next rank has received it.
            self.outbox.setdefault(block, []).append(fresh[m].clone())
        return kv[0], kv[1]


class BlockIndex(NamedTuple):
    """The blocks of a call as index tensors: (image, block row, block column) within the strip on
    the canvas device, and (block row, block column, image) in the whole image on the compute device."""
    canvas: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    compute: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
        self.staging = StagingBuffers()

    def locate(self, blocks: list[Block]) -> BlockIndex:
        """Where the blocks are, from one host-to-device copy (see StagingBuffers)."""
        oi, oj = self.origin
        host = torch.tensor([[blk.i for blk in blocks], [blk.j for blk in blocks], [blk.b for blk in blocks],
                             [blk.i - oi for blk in blocks], [blk.j - oj for blk in blocks]])
        compute, canvas = self.placement.compute, self.placement.canvas
        on_compute = self.staging.load(host, compute)
        on_canvas = on_compute if canvas == compute else self.staging.load(host, canvas)
        return BlockIndex(on_canvas[2:].unbind(), on_compute[:3].unbind())

    def _blocks_of(self, image: torch.Tensor) -> torch.Tensor:
        """A strip canvas [B, C, H, W] as a grid of blocks [B, C, rows, s, cols, s] (a view)."""
        s = self.config.block_size
        return image.unflatten(3, (-1, s)).unflatten(2, (-1, s))

    def write(self, image: torch.Tensor, where: BlockIndex, values: torch.Tensor):
        """Write the blocks' pixels [M, C, s, s] into a strip canvas, in one op."""
        b, i, j = where.canvas
        self._blocks_of(image)[b, :, i, :, j, :] = values

    def inputs(self, blocks: list[Block], x: torch.Tensor, where: Optional[BlockIndex] = None) -> BlockInputs:
        """The blocks' inputs on the compute device; `z` is the raw concat(x, concat LR), not yet
        scaled by c_in. The ops do not depend on the number of blocks: each input is cut for all
        of them at once."""
        cfg, dev = self.config, self.placement.compute
        k, t = cfg.lr_block_tokens, cfg.block_tokens
        if where is None:
            where = self.locate(blocks)
        b, i, j = where.canvas
        z = torch.cat([self._blocks_of(x)[b, :, i, :, j, :], self._blocks_of(self.concat_lr)[b, :, i, :, j, :]], 1)
        step = k * LR_PATCH  # one block in LR pixels; a window spans 3 of them
        windows = self.lr_padded.unfold(2, 3 * step, step).unfold(3, 3 * step, step)  # [B, 3, rows, cols, 3s, 3s]
        lr_windows = windows[b, :, i, j]
        block_i, block_j, batch_index = where.compute
        block_i, block_j = block_i[:, None], block_j[:, None]
        span = torch.arange(3 * k, device=dev)
        tok_r, tok_c = (block_i - 1) * k + span, (block_j - 1) * k + span
        valid_r = (tok_r >= 0) & (tok_r < self.lr_token_hw[0])
        valid_c = (tok_c >= 0) & (tok_c < self.lr_token_hw[1])
        in_block = torch.arange(t, device=dev)
        rows = (block_i * t + in_block)[:, :, None].expand(-1, t, t).flatten(1)
        cols = (block_j * t + in_block)[:, None, :].expand(-1, t, t).flatten(1)
        return BlockInputs(z=self.placement.to_compute(z), lr_windows=self.placement.to_compute(lr_windows),
                           lr_valid=valid_r[:, :, None] & valid_c[:, None, :], rows=rows, cols=cols,
                           batch_index=batch_index)
