"""CUDA graphs of a sweep's network calls (infdit_core/graphs.py), checked on the CPU.

The recorder here captures a call the way a CUDA graph does: torch.fx's make_fx runs the call once
while recording its ops, and the record keeps every tensor the call did not create by its memory
(a later replay reads and writes that memory as it is then) and every Python value and every
tensor built on the host during the call by its value at the time. Replaying the record for a
later call therefore gives that call's bits only if everything that changes from call to call
(where the blocks are, which pool rows they read and write) reaches the call through memory
written in place before it: the property a CUDA graph needs, and what this file checks against
the eager path, bit for bit. What it cannot check is a GPU's side of capturing (which kernels may
be captured, the graph's memory pool): that needs a GPU (benchmarks/gpu_speed.py)."""
import contextlib

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from conftest import random_inputs
from infdit_core import BlockSweepDenoiser, fast, load_model
from infdit_core.graphs import CUDA_GRAPHS, CallGraphs, call_graphs_for, record_cuda_graph
from infdit_core.offload import Placement
from infdit_core.uniba import KVCache


def fx_record(call, pool):
    """A stand-in for graphs.record_cuda_graph: the call runs once as it is recorded."""
    return make_fx(call)(), pool


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def two_sweeps(model, block_batch, graphs=None, runner=None, **options):
    """Two denoiser calls (sweeps) at different noise levels over a 3 x 4 grid of blocks."""
    inp = random_inputs(1, 3, 4, seed=4)
    denoiser = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                  block_batch=block_batch, layer_runner=runner, call_graphs=graphs, **options)
    first = denoiser(inp["x"] * 3.0, 3.0).clone()
    return first, denoiser(inp["x"] * 0.7, 0.7).clone()


@pytest.mark.parametrize("block_batch,captures,replays", [
    # 12 calls a sweep. Sweep 1: the first call warms, the second is captured, 10 replay;
    # sweep 2: the first call is captured, 11 replay.
    (1, 2, 21),
    # Calls of 5, 5 and 2 blocks. Sweep 1: 5 warms, 5 is captured, 2 warms; sweep 2: both captured, 5 replays once.
    (5, 3, 1),
    # Calls of 3 (four a sweep): 1 warm + 1 capture + 2 replays, then 1 capture + 3 replays.
    (3, 2, 5),
])
def test_replayed_calls_give_the_eager_bits(tiny, block_batch, captures, replays):
    reference = two_sweeps(tiny, block_batch)
    graphs = CallGraphs(record=fx_record)
    replayed = two_sweeps(tiny, block_batch, graphs)
    assert (graphs.captures, graphs.replays) == (captures, replays)
    for out, expected in zip(replayed, reference):
        assert torch.equal(out, expected)


def test_replayed_calls_of_the_fast_path_give_its_bits(tiny, monkeypatch):
    """The fast path's layers with its measured attention, recorded and replayed. Its parts run as
    the plain functions they compile (a record cannot be made through dynamo's code on the CPU);
    the ops between them are the fast path's own."""
    monkeypatch.setattr(fast, "_COMPILED", {fn.__name__: fn for fn in (
        fast.pre_attention, fast.post_attention, fast.post_attention_first)})
    monkeypatch.setattr(fast, "_first_call_s", {})  # not the compile times of the real graphs
    reference = two_sweeps(tiny, 2, runner=fast.COMPILED_LAYERS)
    graphs = CallGraphs(record=fx_record)
    replayed = two_sweeps(tiny, 2, graphs, runner=fast.COMPILED_LAYERS)
    assert graphs.replays == 9  # 6 calls a sweep: 1 warm + 1 capture + 4, then 1 capture + 5
    for out, expected in zip(replayed, reference):
        assert torch.equal(out, expected)


def test_the_recorder_catches_an_index_that_escapes_its_buffer(tiny, monkeypatch):
    """Each call's K/V pool index copied to the device by its first gather, inside what is recorded,
    instead of by begin_call: a replay reads the recorded call's index again, and the result is
    wrong. The recorder sees that, so the tests above can fail."""
    reference = two_sweeps(tiny, 1)
    begin_call = KVCache.begin_call

    def index_copied_late(self, blocks):
        begin_call(self, blocks)
        self.packed = None

    monkeypatch.setattr(KVCache, "begin_call", index_copied_late)
    graphs = CallGraphs(record=fx_record)
    out = two_sweeps(tiny, 1, graphs)
    assert graphs.replays == 21
    assert not torch.equal(out[0], reference[0])


def test_capture_failure_turns_graphs_off_and_the_call_runs(tiny):
    def failing(call, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    reference = two_sweeps(tiny, 2)
    graphs = CallGraphs(record=failing)
    with pytest.warns(UserWarning, match="CUDA graphs off for this process, a capture failed"):
        out = two_sweeps(tiny, 2, graphs)
    assert not graphs.enabled and graphs.captures == 0
    assert all(torch.equal(a, b) for a, b in zip(out, reference))


def test_out_of_memory_while_capturing_reaches_the_back_off(tiny):
    def out_of_memory(call, pool):
        raise torch.OutOfMemoryError("CUDA out of memory")

    graphs = CallGraphs(record=out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        two_sweeps(tiny, 2, graphs)
    assert graphs.enabled


@pytest.mark.parametrize("options", [dict(placement=Placement.for_mode("all", "cpu")),
                                     dict(placement=Placement.for_mode("off", "cpu").with_kv_spill())])
def test_no_graphs_where_calls_move_memory(tiny, options):
    """K/V spilled to host memory: calls differ in their copies, so none is recorded."""
    graphs = CallGraphs(record=fx_record)
    reference = two_sweeps(tiny, 2, **options)
    out = two_sweeps(tiny, 2, graphs, **options)
    assert graphs.captures == graphs.replays == 0 and not graphs.warm
    assert all(torch.equal(a, b) for a, b in zip(out, reference))


def test_graphs_go_with_the_fast_path_on_cuda_only():
    assert call_graphs_for(fast.COMPILED_LAYERS, torch.device("cuda")) is CUDA_GRAPHS
    assert call_graphs_for(fast.COMPILED_LAYERS, "cpu") is None
    assert call_graphs_for(None, "cuda") is None  # the eager path stays as it is


class FakeCuda:
    """torch.cuda's graph API as record_cuda_graph uses it, logging what is done (no GPU here)."""

    def __init__(self, monkeypatch, fail=False):
        self.log, self.fail = [], fail
        fake = self

        class Graph:
            def replay(self):
                fake.log.append("replay")

            def pool(self):
                return ("pool", 7)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, capture_error_mode="global"):
            fake.log.append(("capture", pool, capture_error_mode))
            fake.log.append("capture stream")  # torch.cuda.graph makes its own stream current
            yield
            if fake.fail:
                raise RuntimeError("capture invalidated")
            fake.log.append("stream back")

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: "caller's stream")
        monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: fake.log.append(("set_stream", stream)))


def test_cuda_recording_runs_the_call_once_by_replaying_it(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    replay, pool = record_cuda_graph(lambda: cuda.log.append("call recorded"), ("pool", 3))
    # The capture shares the pool it is given, records the call (which a capture does not run),
    # then replays it once: that replay is the call.
    assert cuda.log == [("capture", ("pool", 3), "thread_local"), "capture stream", "call recorded", "stream back",
                        "replay"]
    assert pool == ("pool", 7)
    replay()
    assert cuda.log[-2:] == ["replay", "replay"]


def test_a_failed_cuda_capture_gives_the_caller_its_stream_back(monkeypatch):
    cuda = FakeCuda(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="capture invalidated"):
        record_cuda_graph(lambda: cuda.log.append("call recorded"), None)
    assert cuda.log[-1] == ("set_stream", "caller's stream") and "replay" not in cuda.log
