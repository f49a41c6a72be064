"""CUDA graphs of a sweep's network calls (the fast path on CUDA).

At block batch 1 a network call of the released model is about a thousand small kernels, and their
launches, not their math, set its pace on a GPU; a captured graph replays them all with one launch.

A call can be replayed when it runs the same ops on the same memory as the call it was captured
from. Within a sweep that holds for its calls of one block count (uniba.KVCache.fixed_calls): the
block inputs are cut from the same canvases, the K/V pool stays put, and what changes from call to
call, where the blocks are and which pool rows they read and write, reaches the device in buffers
written in place before each call (uniba.StagingBuffers). So in each sweep the first call of a
block count is captured and later ones replay it, once that block count has run in this process
for this model: the first such call runs as it is, since it compiles the fast path's graphs and
measures its attention backend (work that cannot run inside a capture). A sweep's graphs share
one memory pool (they run one after another) and go with the sweep; capturing synchronises with
the device once per graph.

A capture that fails for any reason other than running out of memory turns graphs off for the
process, with a warning, and the call runs as it is.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Callable, Optional

import torch

log = logging.getLogger("infdit")

# record(call, pool) -> (replay, pool): captures call(), leaves its effects done exactly once, and
# returns the function that replays it and the memory pool the sweep's next capture shares.
Recorder = Callable[[Callable[[], None], Optional[tuple]], tuple[Callable[[], None], Optional[tuple]]]


def record_cuda_graph(call, pool):
    stream = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: CUDA calls of other threads (a UI's) neither break the capture nor fail.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            call()
    except BaseException:
        torch.cuda.set_stream(stream)  # a capture that fails to end leaves its own stream current
        raise
    graph.replay()  # a capture records the kernels without running them: this is the call itself
    return graph.replay, graph.pool()


class SweepGraphs:
    """The graphs of one sweep, one per block count."""

    def __init__(self, owner: "CallGraphs", warm: set):
        self.owner = owner
        self.warm = warm  # block counts that ran once in this process for this model
        self.replays: dict[int, Callable[[], None]] = {}
        self.pool: Optional[tuple] = None

    def run(self, blocks: int, call: Callable[[], None]) -> None:
        """Do one network call of `blocks` blocks: call() itself, or a replay of its graph."""
        replay = self.replays.get(blocks)
        if replay is not None:
            replay()
            self.owner.replays += 1
            return
        if not self.owner.enabled or blocks not in self.warm:
            call()
            self.warm.add(blocks)
            return
        try:
            replay, self.pool = self.owner.record(call, self.pool)
        except torch.OutOfMemoryError:
            raise  # the caller's out-of-memory back-off handles it
        except RuntimeError as error:
            self.owner.turn_off(error)
            call()
            return
        self.replays[blocks] = replay
        self.owner.captures += 1


class CallGraphs:
    """Per model, which block counts are warm, and the recorder (tests give a CPU stand-in)."""

    def __init__(self, record: Optional[Recorder] = None):
        self.record = record or record_cuda_graph
        self.enabled = True
        self.warm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> set of block counts
        self.captures = self.replays = 0  # counts, for tests and reports

    def sweep(self, model) -> SweepGraphs:
        return SweepGraphs(self, self.warm.setdefault(model, set()))

    def turn_off(self, error: Exception) -> None:
        self.enabled = False
        message = f"Inf-DiT fast path: CUDA graphs off for this process, a capture failed ({error})"
        log.warning(message)
        warnings.warn(message)


CUDA_GRAPHS = CallGraphs()


def call_graphs_for(layer_runner, device: torch.device) -> Optional[CallGraphs]:
    """The graphs that go with a layer runner: the fast path's on CUDA, none otherwise (the eager
    path stays as it is; a CPU has no graphs)."""
    return CUDA_GRAPHS if layer_runner is not None and torch.device(device).type == "cuda" else None
