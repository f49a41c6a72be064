"""Offload: canvases and K/V in host memory change where tensors live, never the pixels.

Spilled and unspilled runs agree bit for bit (torch.equal) for every placement, block batch, batch
and odd grid, in one denoiser call and in a full `sample`. The compute device here is the CPU:
Placement.for_mode('all', 'cpu') still spills every K/V block it does not keep through
Placement.spill()/fetch() into host buffers, the code path a CUDA run takes (without pinned
memory and streams). 'canvas' on a CPU compute device keeps the canvases where they already are,
so there it only checks that the mode runs; where canvases go with a compute device other than the
host is checked with the meta device. Also: the planner's device/host split against a hand
computation, what `auto` picks as the budget shrinks (without touching CUDA), the refusal of a job
that exceeds host memory, and the order of the out-of-memory back-off.
"""
import warnings

import pytest
import torch

from conftest import OutOfMemoryInjector, random_inputs
from infdit_core import BlockSweepDenoiser, InfDiTConfig, load_model, plan, sample
from infdit_core import memory
from infdit_core.memory import HostMemoryError, resolve_execution
from infdit_core.offload import HOST, HostSlots, Placement
from infdit_core.pipeline import OutOfMemory, _BackoffDenoiser
from infdit_core.strips import StripSchedule
from infdit_core.uniba import BlockCanvas

BLOCK = 32  # the tiny golden model's block size in pixels


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def kv_block_bytes(config, elem=4):
    """K and V of every layer for one block: layers x 2 x tokens x hidden x element size."""
    return config.num_layers * 2 * config.block_tokens ** 2 * config.hidden_size * elem


class SpillCounter:
    """Counts Placement.spill/fetch calls (the host copies of K/V blocks)."""

    def __init__(self, monkeypatch):
        self.spills = self.fetches = 0
        spill, fetch = Placement.spill, Placement.fetch

        def counting_spill(placement, t, host):
            self.spills += 1
            return spill(placement, t, host)

        def counting_fetch(placement, t, into=None):
            self.fetches += 1
            return fetch(placement, t, into)
        monkeypatch.setattr(Placement, "spill", counting_spill)
        monkeypatch.setattr(Placement, "fetch", counting_fetch)


# The placements under test; the first is the unspilled reference.
PLACEMENTS = [("off", 0), ("canvas", 0), ("all", 0), ("all", 2)]
# Tall with lines of 3 blocks, wide (swept column by column) with lines of 3, tall with lines of 5.
GRIDS = [(5, 3), (3, 7), (6, 5)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("rows,cols", GRIDS)
@pytest.mark.parametrize("block_batch", [1, 3, "all"])
def test_one_denoiser_call_spilled_equals_unspilled(model, monkeypatch, rows, cols, batch, block_batch):
    inp = random_inputs(batch, rows, cols, seed=rows * 10 + cols)
    blocks = batch * rows * cols
    m = blocks if block_batch == "all" else block_batch
    sigma = torch.tensor([1.7, 0.4][:batch])
    counter = SpillCounter(monkeypatch)
    kv_block = kv_block_bytes(model.config)
    reference = None
    for mode, slots in PLACEMENTS:
        placement = Placement.for_mode(mode, "cpu", slots)
        sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                   block_batch=m, placement=placement)
        before = counter.spills
        out = sweep(inp["x"], sigma)
        cache, spills = sweep.last_cache, counter.spills - before
        # The canvases (the result, the concat LR, the LR halo) live on the placement's canvas device.
        assert out.device == sweep.canvas.concat_lr.device == sweep.canvas.lr_padded.device == placement.canvas
        if reference is None:
            reference = out
            assert spills == 0 and cache.peak_device_blocks == cache.peak_blocks
            continue
        assert torch.equal(out, reference), (mode, slots, (out - reference).abs().max().item())
        assert not cache.held and all(not s for s in cache.spilled)
        if mode != "all":
            assert spills == 0 and cache.peak_device_blocks == cache.peak_blocks
            continue
        if m >= blocks:
            assert cache.peak_blocks == 0 and spills == 0  # one call for everything: nothing is cached
            continue
        # The device keeps the next call's neighbours (m + 2 at most) plus the extra slots; every
        # block beyond that went through spill().
        assert cache.peak_device_blocks <= m + 2 + slots
        assert cache.capacity == cache.peak_device_blocks  # the pool holds the device's share only
        if m + 2 + slots < cache.peak_blocks:
            assert spills > 0 and cache.peak_device_blocks < cache.peak_blocks
        else:
            assert spills == 0
        predicted = plan(model.config, rows * BLOCK, cols * BLOCK, m, torch.float32, batch, offload="all",
                         kv_device_slots=slots)
        assert cache.peak_device_blocks * kv_block <= predicted.kv_cache
        assert cache.peak_blocks * kv_block <= predicted.kv_cache + predicted.kv_host


def test_kv_spill_keeps_only_the_next_calls_neighbours(model, monkeypatch):
    inp = random_inputs(1, 6, 6, seed=3)
    counter = SpillCounter(monkeypatch)
    for slots, on_device in [(0, 3), (1, 4), (2, 5)]:
        sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                   block_batch=1, placement=Placement.for_mode("all", "cpu", slots))
        sweep(inp["x"], 1.0)
        cache = sweep.last_cache
        # One line of 6 blocks plus one is cached; block (i, j+1) reads (i-1, j), (i-1, j+1) and (i, j).
        assert (cache.peak_blocks, cache.peak_device_blocks) == (7, on_device)
    assert counter.spills > 0 and counter.fetches > 0  # spilled blocks come back before they are read


@pytest.mark.parametrize("block_batch", [1, 3, "all"])
def test_sample_spilled_equals_unspilled(model, monkeypatch, block_batch):
    inp = random_inputs(2, 3, 5, seed=21)  # batch 2, wide 3x5 blocks
    m = 2 * 3 * 5 if block_batch == "all" else block_batch
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=2, seed=5,
                  block_batch=m)
    counter = SpillCounter(monkeypatch)
    reference = sample(model, offload="off", **common)
    assert counter.spills == 0
    for offload in ["canvas", "all", "auto", Placement.for_mode("canvas", "cpu"),
                    Placement.for_mode("all", "cpu", 0), Placement.for_mode("all", "cpu", 2)]:
        out = sample(model, offload=offload, **common)
        assert out.device == HOST
        assert torch.equal(out, reference), (offload, (out - reference).abs().max().item())
    # Lines of 3 blocks: with one block per call, 'all' (no extra slots) spilled some K/V.
    assert (counter.spills > 0) == (block_batch == 1)


def test_sample_takes_a_placement_with_auto_block_batch(model):
    # sample() resolves the block batch for a given Placement through its mode.
    inp = random_inputs(1, 2, 3, seed=22)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=1, seed=5,
                  block_batch="auto")
    reference = sample(model, offload="off", **common)
    for mode, slots in PLACEMENTS:
        assert torch.equal(sample(model, offload=Placement.for_mode(mode, "cpu", slots), **common), reference)


@pytest.mark.parametrize("mode", ["off", "canvas"])
def test_canvases_live_where_the_placement_puts_them(model, mode):
    # A compute device other than the host, without running the network: the meta device.
    placement = Placement.for_mode(mode, "meta")
    inp = random_inputs(2, 3, 5, seed=2)
    canvas = BlockCanvas(model.config, inp["lr"], inp["concat_lr"], StripSchedule(2, 3, 5), placement)
    expected = torch.device("meta") if mode == "off" else HOST
    assert placement.canvas == expected
    assert canvas.concat_lr.device == canvas.lr_padded.device == expected
    blocks = StripSchedule(2, 3, 5).order[4:7]
    x = inp["x"].to(expected)
    staged = canvas.inputs(blocks, x)
    # Only the blocks of one call go to the compute device.
    assert staged.z.device.type == staged.lr_windows.device.type == "meta"
    assert staged.z.shape == (3, 6, BLOCK, BLOCK)


# --- the planner's device/host split, by hand ------------------------------------------------------

def test_planner_split_by_hand(model):
    config = model.config
    assert (config.num_layers, config.hidden_size, config.block_size, config.patch_size) == (2, 64, 32, 4)
    weights = sum(p.numel() for p in model.parameters()) * 4  # float32
    # 160 x 96 pixels, batch 2: 5 rows x 3 columns of 32-px blocks; lines of 3 blocks.
    H, W, B = 160, 96, 2
    block = 8 * 8 * 64 * 4  # block_tokens² x hidden x 4 bytes = 16384
    kv_block = 2 * 2 * block  # layers x (K, V) = 65536
    cached = (3 + 1) * kv_block  # one line plus one block
    scratch = kv_block  # with nothing spilled: the slot a call's uncached blocks may need (uniba._Ledger)
    canvases = 5 * B * 3 * H * W * 4  # x, concat LR, estimate, derivative, Euler point (memory.CANVASES)
    assert canvases == 1_843_200 and memory.CANVASES == 5
    lr = B * 3 * (H // 4) * (W // 4) * 4  # the LR image, 40 x 24
    halo = B * 3 * (40 + 2 * 8) * (24 + 2 * 8) * 4  # padded by one block (8 LR pixels) on every side
    canvases += lr + halo
    act = 18 * block  # the calibrated activation factor per block in flight (memory.ACTIVATION_FACTOR)
    assert memory.ACTIVATION_FACTOR == 18
    staging = (6 + 3 + 3) * 32 * 32 * 4  # one block's input (6 ch), network output and result (3 + 3), float32

    def split(offload, m=1, slots=0, world=1):
        p = plan(config, H, W, m, torch.float32, B, world, offload, slots)
        assert p.weights == weights and p.total == p.weights + p.kv_cache + p.activations + p.canvases + p.boundary
        return p.kv_cache, p.activations, p.canvases, p.boundary, p.kv_host, p.canvases_host

    #                   device: K/V            activations         canvases  boundary   host: K/V     canvases
    assert split("off") == (cached + scratch, act, canvases, 0, 0, 0)
    assert split("canvas") == (cached + scratch, act + staging, 0, 0, 0, canvases)
    # The next call (one block) reads two blocks of the previous line and its left neighbour.
    assert split("all") == (3 * kv_block, act + staging, 0, 0, kv_block, canvases)
    assert split("all", slots=1) == (cached, act + staging, 0, 0, 0, canvases)
    assert split("all", m=2) == (cached, 2 * (act + staging), 0, 0, 0, canvases)
    assert split("all", m=30) == (0, 30 * (act + staging), 0, 0, 0, canvases)  # one call: no cache
    assert split("off", m=30) == (0, 30 * act, canvases, 0, 0, 0)
    # Two ranks: strips of 2 and 1 columns; the larger one plans for 2 columns plus the received
    # edge block, and three K/V messages at its edge: a send in flight, the copy being packed for
    # the next send, and the receive buffers of the block arriving (memory.EDGE_BUFFERS).
    strip_canvases = 5 * B * 3 * H * 64 * 4 + lr + B * 3 * (40 + 16) * (16 + 16) * 4  # halo of a 2-column strip
    assert split("all", world=2) == (3 * kv_block, act + staging, 0, 3 * kv_block, kv_block, strip_canvases)
    assert split("off", world=2) == ((2 + 1 + 1) * kv_block, act, strip_canvases, 3 * kv_block, 0, 0)


def test_planner_released_model_by_hand():
    config = InfDiTConfig()
    kv_block = 28 * 2 * 32 ** 2 * 1280 * 2  # bf16: 146.8 MB
    p = plan(config, 8192, 8192, 1, torch.bfloat16, offload="all")
    assert p.kv_cache == 3 * kv_block and p.kv_host == (64 + 1 - 3) * kv_block
    assert p.canvases == 0 and p.canvases_host == 5 * 3 * 8192 * 8192 * 4 + 3 * 2048 ** 2 * 4 + 3 * (2048 + 64) ** 2 * 4
    assert p.activations == 18 * 32 ** 2 * 1280 * 2 + 12 * 128 * 128 * 4


# --- resolve_execution -----------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    """Fails the test if anything asks CUDA (or the OS) about memory."""
    def touched(*args, **kwargs):
        raise AssertionError("CUDA or free memory was queried")
    for name in ("mem_get_info", "memory_reserved", "memory_allocated", "is_available", "device_count",
                 "current_device", "synchronize", "empty_cache", "init", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(memory, "free_memory", touched)
    was_initialized = torch.cuda.is_initialized()
    yield
    assert torch.cuda.is_initialized() == was_initialized


def test_auto_placement_as_the_budget_shrinks(model, no_cuda):
    config, H, W = model.config, 192, 192  # 6 x 6 blocks, lines of 6
    kv_block = kv_block_bytes(config)

    def working(mode, slots=0):
        return plan(config, H, W, 1, torch.float32, offload=mode, kv_device_slots=slots).working

    def auto(budget):
        m, placement, p = resolve_execution("auto", "auto", config, H, W, torch.float32, "cuda",
                                            budget=budget, host_budget=1 << 40)
        assert placement.compute == torch.device("cuda") and p.block_batch == m and p.offload == placement.mode
        return m, placement

    assert working("off") > working("canvas") > working("all")
    m, placement = auto(working("off"))
    assert placement.mode == "off" and placement.canvas == torch.device("cuda") and m >= 1
    m, placement = auto(working("off") - 1)
    assert placement.mode == "canvas" and placement.canvas == HOST and not placement.spills_kv
    m, placement = auto(working("canvas") - 1)
    # canvas: 7 cached and the slot for uncached blocks (nothing spilled); all: 3 needed, 4 spare.
    assert placement.mode == "all" and placement.kv_device_slots == 4 and m == 1
    m, placement = auto(working("all") + 2 * kv_block + 5)
    assert placement.mode == "all" and placement.kv_device_slots == 2 and m == 1
    m, placement = auto(0)  # nothing fits: everything that can go to the host goes there
    assert (placement.mode, placement.kv_device_slots, m) == ("all", 0, 1)
    # An explicit mode is kept; a CPU compute device has nothing to spill to.
    assert resolve_execution(1, "canvas", config, H, W, torch.float32, "cuda", budget=0,
                             host_budget=1 << 40)[1].mode == "canvas"
    assert resolve_execution(1, "auto", config, H, W, torch.float32, "cpu", budget=0,
                             host_budget=1 << 40)[1].mode == "off"


def test_host_memory_error_gives_the_numbers(no_cuda):
    config = InfDiTConfig()
    kv_block = 28 * 2 * 32 ** 2 * 1280 * 2
    canvases = 5 * 3 * 8192 * 8192 * 4 + 3 * 2048 ** 2 * 4 + 3 * 2112 ** 2 * 4  # x, ..., the LR and its halo: 4.13 GB
    kv_host = 62 * kv_block  # 65 cached, 3 on the device: 9.10 GB
    need = canvases + kv_host  # 13.23 GB
    common = (config, 8192, 8192, torch.bfloat16, "cuda")
    with pytest.raises(HostMemoryError) as caught:
        resolve_execution(1, "all", *common, budget=100 << 30, host_budget=8 * 10 ** 9)
    message = str(caught.value)
    for text in ["8192x8192", f"{need / 1e9:.2f} GB of host memory", f"canvases {canvases / 1e9:.2f} GB",
                 f"spilled K/V {kv_host / 1e9:.2f} GB", "8.00 GB is available"]:
        assert text in message, (text, message)
    assert "13.23 GB" in message
    resolve_execution(1, "all", *common, budget=100 << 30, host_budget=need)  # exactly enough
    # auto on a small card ends at 'all' and is refused the same way.
    with pytest.raises(HostMemoryError):
        resolve_execution("auto", "auto", *common, budget=2 << 30, host_budget=8 * 10 ** 9)
    # Nothing in host memory with offload off: never refused for the host on a GPU.
    resolve_execution(1, "off", *common, budget=100 << 30, host_budget=0)


def test_cpu_compute_counts_the_working_set_as_host_memory(model, no_cuda):
    p = plan(model.config, 192, 192, 1, torch.float32)
    with pytest.raises(HostMemoryError, match="working set"):
        resolve_execution(1, "off", model.config, 192, 192, torch.float32, "cpu", budget=1 << 40,
                          host_budget=p.working - 1)


# --- out-of-memory back-off ------------------------------------------------------------------------

def backoff_warnings(caught):
    return [str(w.message) for w in caught if "out of memory" in str(w.message)]


HALVED = ["Inf-DiT: out of memory, retrying with block_batch=2", "Inf-DiT: out of memory, retrying with block_batch=1",
          "Inf-DiT: out of memory at block_batch 1, retrying with the K/V cache in host memory"]


def test_backoff_halves_the_block_batch_then_spills_kv(model):
    inp = random_inputs(1, 3, 3, seed=30)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=2, seed=2)
    reference = sample(model, block_batch=1, offload="all", **common)
    with OutOfMemoryInjector(model, limit=1, until_spilled=True) as injector, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sample(model, block_batch=4, offload="off", **common)
    assert backoff_warnings(caught) == HALVED  # 4 -> 2 -> 1, then the K/V spill, which sticks
    assert injector.failures == 3
    assert torch.equal(out, reference)


@pytest.mark.parametrize("offload", ["off", "all"])
def test_backoff_ends_in_out_of_memory(model, offload):
    inp = random_inputs(1, 3, 3, seed=31)
    with OutOfMemoryInjector(model, limit=0), warnings.catch_warnings(record=True) as caught, \
            pytest.raises(OutOfMemory) as error:
        warnings.simplefilter("always")
        sample(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=1,
               block_batch=4, offload=offload)
    # With 'all' the K/V is already spilled: no spill step.
    assert backoff_warnings(caught) == (HALVED if offload == "off" else HALVED[:2])
    message = str(error.value)
    final = Placement.for_mode(offload, "cpu").with_kv_spill()  # what the back-off ends with
    assert f"block_batch 1 and offload '{final.mode}'" in message and "Lower the output size" in message
    assert ("offload all" in message) == (final.mode != "all")


@pytest.mark.parametrize("mode", ["off", "canvas", "all"])
def test_out_of_memory_without_retry_advises_offload_all_unless_all(model, mode):
    # Ranks of a distributed job cannot retry alone: the advice names the placement they ran with.
    inp = random_inputs(1, 2, 2, seed=32)
    denoiser = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                  block_batch=1, placement=Placement.for_mode(mode, "cpu"))
    with OutOfMemoryInjector(model, limit=0), pytest.raises(OutOfMemory) as error:
        _BackoffDenoiser(denoiser, retry=False)(inp["x"], 1.0)
    # The message names the placement as Placement.mode does (on a CPU compute device 'canvas' is
    # the 'off' placement: the canvases are already on the host).
    named = Placement.for_mode(mode, "cpu").mode
    assert f"offload '{named}'" in str(error.value)
    assert ("(offload all)" in str(error.value)) == (named != "all")


class _FakeCudaDenoiser:
    """Enough of a BlockSweepDenoiser for _BackoffDenoiser: every call runs out of memory."""

    def __init__(self, placement):
        self.model = type("Model", (), {"device": torch.device("cuda")})()
        self.placement, self.block_batch, self.num_blocks = placement, 1, 4

    def __call__(self, x, sigma):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# Backing off from 'off' spills the K/V cache only: the canvases are still on the device.
def test_out_of_memory_after_backoff_from_off_on_a_gpu_still_advises_offload_all():
    with warnings.catch_warnings(), pytest.raises(OutOfMemory) as error:
        warnings.simplefilter("ignore")
        _BackoffDenoiser(_FakeCudaDenoiser(Placement.for_mode("off", "cuda")))(None, 1.0)
    assert "offload all" in str(error.value)


# --- benchmarks/gpu_offload_check.py -----------------------------------------------------------------

def gpu_check_script():
    import importlib.util
    import pathlib
    import sys

    if "gpu_offload_check" not in sys.modules:  # its dataclass needs the module registered
        path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_offload_check.py"
        spec = importlib.util.spec_from_file_location("gpu_offload_check", path)
        sys.modules["gpu_offload_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_offload_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the check would really run")
def test_gpu_check_skips_without_cuda(capsys):
    assert gpu_check_script().main([]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA")


def test_gpu_check_runs_where_open_clip_is_not_installed():
    # A freshly lent GPU machine has torch, einops and safetensors but not open_clip: the engine
    # imports CLIP's classes only when a CLIP is built.
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys, runpy; sys.modules['open_clip'] = None; sys.argv = ['gpu_offload_check.py']; "
            "runpy.run_path('benchmarks/gpu_offload_check.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("skipped: no CUDA"), result.stderr[-2000:]


def test_gpu_check_logic_on_cpu_with_the_tiny_model(capsys):
    assert gpu_check_script().main(["--device", "cpu", "--tiny", "--sizes", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE RUN on the CPU" in out
    assert "equality: 6 of 6 spilled runs bit-equal to their unspilled reference" in out
    assert "auto@tiny budget       all         1" in out  # the small budget made auto spill


def test_host_slots_carve_power_of_two_slabs_and_reuse_buffers():
    # torch rounds pinned allocations up to a power of two: slabs of that size waste < one buffer.
    host = HostSlots(Placement.for_mode("all", "cpu"))
    t = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)  # 120 bytes
    copies = [host.spill(t + n) for n in range(70)]
    # 64 x 120 = 7680 bytes -> 8192: a slab of 68 buffers (8160 bytes, which the allocator rounds to 8192).
    assert host.slab_bytes == 2 * 68 * 120
    assert all(torch.equal(c, t + n) for n, c in enumerate(copies))
    assert len({c.data_ptr() for c in copies}) == 70  # live buffers never share memory
    back = host.fetch(copies[3])
    assert torch.equal(back, t + 3) and back.data_ptr() != copies[3].data_ptr()
    again = host.spill(t * 0)  # takes the buffer the fetch gave back, no new slab
    assert again.data_ptr() == copies[3].data_ptr() and host.slab_bytes == 2 * 68 * 120
