"""The strip schedule: which blocks one process sweeps, in which order, and what crosses its edges.

The block grid is swept line by line, where a line runs along the image's shorter side (a row of
blocks for tall or square images, a column for wide ones), so the K/V cache holds one short line.
Across W processes (ranks) the lines are cut into W contiguous strips, one per rank: a strip runs
along the longer side and every rank sweeps its own strip line by line. Layer l of block (i, j)
reads only the K/V of (i-1, j-1), (i, j-1) and (i-1, j), so the only data that crosses a strip
edge is, per line, the per-layer K/V of the previous strip's last block of that line: rank r reads
it as the left (and, one line later, the top-left) neighbour of its first block. Dependencies point
from rank r-1 to rank r only, so the ranks form a pipeline and never wait on each other in a cycle.

With one rank the schedule is the whole grid: the single-device sweep is the W = 1 case.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Block(NamedTuple):
    b: int  # image in the batch
    i: int  # block row
    j: int  # block column


def split(n: int, parts: int) -> list[range]:
    """n items in `parts` contiguous ranges whose sizes differ by at most one (the first ranges get
    the extra items; ranges past n are empty)."""
    base, extra = divmod(n, parts)
    starts = [r * base + min(r, extra) for r in range(parts + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(parts)]


class StripSchedule:
    """One rank's share of a [batch, rows, cols] block grid."""

    def __init__(self, batch: int, rows: int, cols: int, world: int = 1, rank: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.batch, self.rows, self.cols = batch, rows, cols
        self.world, self.rank = world, rank
        # Lines along the shorter side: the cache then holds min(rows, cols) blocks.
        self.wide = cols > rows
        self.lines = cols if self.wide else rows
        self.strips = split(rows if self.wide else cols, world)
        self.span = self.strips[rank]

    def block(self, b: int, line: int, across: int) -> Block:
        return Block(b, across, line) if self.wide else Block(b, line, across)

    @property
    def axis(self) -> int:
        """The canvas axis the strips cut: columns (-1) for tall images, rows (-2) for wide ones."""
        return -2 if self.wide else -1

    @property
    def order(self) -> list[Block]:
        """This rank's blocks in sweep order: image by image, line by line, along the strip."""
        return [self.block(b, line, a) for b in range(self.batch) for line in range(self.lines) for a in self.span]

    def _edge(self, across: int) -> list[Block]:
        return [self.block(b, line, across) for b in range(self.batch) for line in range(self.lines)]

    @property
    def incoming(self) -> list[Block]:
        """Blocks of the previous rank this rank reads, in the order that rank computes them."""
        return self._edge(self.span.start - 1) if self.span and self.span.start > 0 else []

    @property
    def outgoing(self) -> list[Block]:
        """Blocks of this rank the next rank reads, in sweep order."""
        following = self.strips[self.rank + 1] if self.rank + 1 < self.world else range(0)
        return self._edge(self.span.stop - 1) if self.span and following else []

    def pixel_span(self, block_size: int) -> tuple[int, int]:
        """[start, stop) of this strip in pixels along `axis`."""
        return self.span.start * block_size, self.span.stop * block_size

    def canvas_shape(self, block_size: int, channels: int = 3) -> tuple[int, int, int, int]:
        """[batch, channels, H, W] of this strip's canvas."""
        lines, across = self.lines * block_size, len(self.span) * block_size
        return (self.batch, channels) + ((across, lines) if self.wide else (lines, across))

    def crop(self, canvas: torch.Tensor, block_size: int) -> torch.Tensor:
        """This strip of a whole-image canvas [..., H, W] (a view)."""
        start, stop = self.pixel_span(block_size)
        return canvas.narrow(self.axis, start, stop - start)

    def origin(self) -> tuple[int, int]:
        """(row, column) in blocks of the strip's top-left block."""
        return (self.span.start, 0) if self.wide else (0, self.span.start)
