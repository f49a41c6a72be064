"""The K/V pool (uniba.KVCache): slots per sweep, a constant number of ops per network call, and
no host round trip inside a sweep beyond one small index copy per call.

The bits the pool gives are checked where the sweep is compared with the whole image and across
placements and ranks (test_uniba.py, test_offload.py, test_distributed.py)."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import random_inputs
from infdit_core import BlockSweepDenoiser, load_model
from infdit_core.offload import Placement
from infdit_core.strips import StripSchedule
from infdit_core.uniba import KVCache, chunks

CALL_DONE = "test: network call done"


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


@pytest.mark.parametrize("batch,rows,cols", [(1, 4, 4), (1, 3, 7), (2, 5, 3), (1, 6, 2), (2, 1, 5)])
@pytest.mark.parametrize("block_batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("slots", [None, 0, 2])  # no spill, or K/V in host memory with extra slots
def test_pool_slots_are_exclusive_and_as_many_as_the_sweep_holds(batch, rows, cols, block_batch, slots):
    order = StripSchedule(batch, rows, cols).order
    placement = None if slots is None else Placement.for_mode("all", "cpu", slots)
    cache = KVCache(order, block_batch, 2, placement=placement)
    for blocks in chunks(order, block_batch):
        cache.begin_call(blocks)  # raises if a block is read while not in the pool
        in_pool = [slot for slot in cache.held.values() if slot is not None]
        assert len(in_pool) == len(set(in_pool)) and all(0 <= slot < cache.capacity for slot in in_pool)
    assert not cache.held
    # The pool was sized ahead by playing the sweep through: exactly the most blocks the device holds,
    # counting the slot a call's uncached blocks are written into (a slot free at the time, or one more).
    assert cache.capacity == cache.peak_device_blocks
    if slots is None:
        # The planner's line of blocks plus two (memory.plan).
        assert cache.peak_blocks <= min(rows, cols) + 1
        assert cache.peak_blocks <= cache.capacity <= cache.peak_blocks + 1
    else:
        assert cache.capacity <= block_batch + 3 + slots


def ops_per_call(model, block_batch, rows=4, cols=8):
    """Profiler events (every aten op, nested ones included) of each network call of one denoiser
    call, from the end of the previous call to the end of this one."""
    inp = random_inputs(1, rows, cols, seed=1)

    def done(*_):
        with record_function(CALL_DONE):
            pass

    sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                               block_batch=block_batch, on_blocks=done)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sweep(inp["x"], 1.0)
    counts, n = [], 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if event.name == CALL_DONE:
            counts.append(n)
            n = 0
        else:
            n += 1
    assert len(counts) == -(-rows * cols // block_batch)
    return counts


def test_a_network_call_issues_the_same_ops_for_1_and_16_blocks(model):
    # 32 blocks: 32 calls of one block, or 2 calls of 16. The first call of a sweep also sets up
    # (conditioning, the pool), so the calls after it are compared.
    one = ops_per_call(model, 1)[1:]
    sixteen = ops_per_call(model, 16)[1]
    layers = model.config.num_layers
    # Calls differ by at most 3 ops per layer (whether any block of the call is cached for a later
    # one: an index_copy_ into the pool and its views) plus a dozen for the kernels torch picks by
    # size (a convolution or matmul backend: mkldnn or not, mm or bmm). Before the pool, a call of
    # 16 blocks issued about 3x the ops of a one-block call (per-block copies of every slot).
    bound = 3 * layers + 12
    assert max(one) - min(one) <= bound, (min(one), max(one))
    assert abs(sixteen - max(one)) <= bound, (sixteen, min(one), max(one))


class HostCopies(TorchDispatchMode):
    """Host-to-device copies and device-to-host reads (.item(), bool(), .tolist()) as they happen,
    with markers for the end of each network call."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._to_copy.default and tensors[0].device.type == "cpu":
            if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
                self.log.append("to device")
        elif func is torch.ops.aten.copy_.default and tensors[1].device.type == "cpu" != tensors[0].device.type:
            self.log.append("to device")
        elif func is torch.ops.aten._local_scalar_dense.default:
            self.log.append("read back")
        return func(*args, **kwargs)


def test_a_sweep_copies_one_index_tensor_per_call_and_reads_nothing_back(golden_dir, monkeypatch):
    # A compute device other than the host without running kernels: the meta device (an .item() or
    # bool() of a meta tensor would raise, and so would a copy back to the host).
    model = load_model(golden_dir / "tiny_model.safetensors").to("meta")
    built_on_device = []
    tensor = torch.tensor

    def tracking(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            built_on_device.append(device)
        return tensor(*args, device=device, **kwargs)

    monkeypatch.setattr(torch, "tensor", tracking)
    inp = random_inputs(2, 3, 4, seed=2)
    for block_batch in [1, 5]:
        copies = HostCopies()
        sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                   block_batch=block_batch, placement=Placement.for_mode("off", "meta"),
                                   on_blocks=lambda *_: copies.log.append("call done"))
        x = inp["x"].to("meta")
        with copies:
            sweep(x, 1.0)
        calls = " ".join(copies.log).split("call done")[:-1]
        assert len(calls) == -(-24 // block_batch)
        # Per call: the blocks' positions (BlockCanvas.locate) and the K/V pool's index, each built
        # on the host and moved in one copy (non-blocking through pinned memory on CUDA).
        assert all(call.split() == ["to", "device"] * 2 for call in calls[1:]), calls
        assert "read back" not in copies.log
    assert built_on_device == []
