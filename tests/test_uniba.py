"""Block sweep vs whole image, the K/V cache bound, the sampler, progress hooks and OOM back-off."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import OutOfMemoryInjector, random_inputs
from infdit_core import BlockSweepDenoiser, InfDiT, InfDiTConfig, denoise, karras_sigmas, load_model, plan, sample
from infdit_core.memory import CANVASES, choose_block_batch
from infdit_core.pipeline import OutOfMemory
from infdit_core.sampling import heun_step, network_calls, unit_noise


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


GRIDS = [(1, 1), (1, 5), (4, 1), (3, 2), (4, 4)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("rows,cols", GRIDS)
def test_block_sweep_equals_whole_image(model, rows, cols, batch):
    inp = random_inputs(batch, rows, cols, seed=rows * 10 + cols)
    sigma = torch.tensor([2.5, 0.3][:batch])
    reference = denoise(model, inp["x"], sigma, lr=inp["lr"], concat_lr=inp["concat_lr"],
                        clip_vector=inp["clip_vector"])
    blocks = batch * rows * cols
    for block_batch in [1, 2, 3, blocks]:
        sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"],
                                   clip_vector=inp["clip_vector"], block_batch=block_batch)
        out = sweep(inp["x"], sigma)
        assert rel_l2(out, reference) <= 1e-5, (block_batch, rel_l2(out, reference))


@pytest.mark.parametrize("name", ["sq_2x2blocks", "rect_3wide_2high", "batch2_2wide_4high"])
def test_block_sweep_reproduces_official_full_mode(golden_dir, model, name):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    case = load_file(golden_dir / manifest["cases"][name]["file"])
    sweep = BlockSweepDenoiser(model, lr=case["in.lr_image"], concat_lr=case["in.concat_lr_image"],
                               clip_vector=case["in.clip_vector"], block_batch=1)
    assert rel_l2(sweep(case["in.x_noised"], case["in.sigma"]), case["out.denoised"]) <= 1e-5


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 2), (2, 5), (6, 3), (1, 5)])
@pytest.mark.parametrize("block_batch", [1, 2, 3])
def test_cache_holds_at_most_one_row_plus_block_batch(model, rows, cols, block_batch):
    inp = random_inputs(1, rows, cols)
    sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"],
                               clip_vector=inp["clip_vector"], block_batch=block_batch)
    sweep(inp["x"], 1.0)
    cache = sweep.last_cache
    assert cache.peak_blocks <= cols + block_batch  # the bound: blocks per row + block batch
    # Wide images sweep column-major, so the cache holds one column instead of one row.
    assert cache.peak_blocks <= min(rows, cols) + block_batch
    assert not cache.held, "every cached block must be freed by the end"
    assert cache.pool is None  # the pool goes with the sweep
    # The pool has a slot for each block the sweep ever holds at once, and at most one more: the
    # slot a call's uncached blocks are written into when no other is free.
    assert cache.peak_blocks <= cache.capacity <= cache.peak_blocks + 1
    if rows * cols > 2 * block_batch:
        assert cache.peak_blocks >= min(rows, cols), "a row of K/V must really be cached"


@pytest.mark.parametrize("block_batch", [2, 4])
def test_sample_is_independent_of_block_batch(model, block_batch):
    inp = random_inputs(1, 2, 3, seed=5)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=3, seed=42)
    reference = sample(model, block_batch=1, **common)
    out = sample(model, block_batch=block_batch, **common)
    assert rel_l2(out, reference) <= 1e-5


def test_seed_and_explicit_noise_agree(model):
    inp = random_inputs(1, 1, 2, seed=6)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=2, block_batch=1)
    by_seed = sample(model, seed=7, **common)
    by_noise = sample(model, noise=unit_noise(inp["concat_lr"].shape, 7, 32), **common)
    assert torch.equal(by_seed, by_noise)
    assert not torch.allclose(by_seed, sample(model, seed=8, **common))


@pytest.mark.parametrize("lr_noise_init", [True, False])
def test_one_step_is_one_denoiser_call_from_the_initial_state(model, lr_noise_init):
    inp = random_inputs(1, 2, 2, seed=9)
    eps = unit_noise(inp["concat_lr"].shape, 3, 32)
    out = sample(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=1,
                 noise=eps, lr_noise_init=lr_noise_init, block_batch=2)
    sigma_max = karras_sigmas(1)[0]  # 40 up to float32 rounding of the rho-power
    x_T = sigma_max * eps + (inp["concat_lr"] if lr_noise_init else 0)
    den = denoise(model, x_T, sigma_max, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"])
    # One Euler step to sigma 0 lands on D(x_T); written as the step to keep float32 rounding alike.
    # x_T is ~40 and D ~0.1: one ulp of x_T (4e-6) is already 4e-5 of D, so block-batch-level
    # differences in D can round either way: 3e-5 is the noise floor of this comparison.
    assert rel_l2(out, x_T - sigma_max * (x_T - den) / sigma_max) <= 3e-5
    assert rel_l2(out, den) <= 1e-4


def test_heun_then_final_euler(model):
    inp = random_inputs(1, 1, 2, seed=10)
    eps = unit_noise(inp["concat_lr"].shape, 4, 32)
    cond = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"])
    out = sample(model, steps=2, noise=eps, block_batch=1, **cond)
    s0, s1 = karras_sigmas(2)[:2]  # a 2-step Karras schedule is just the two ends, 40 and 0.002
    D = lambda x, s: denoise(model, x, s, **cond)  # noqa: E731
    x0 = inp["concat_lr"] + s0 * eps
    d0 = (x0 - D(x0, s0)) / s0
    x_e = x0 + (s1 - s0) * d0
    x1 = x0 + (s1 - s0) * (d0 + (x_e - D(x_e, s1)) / s1) / 2
    x2 = x1 + (0 - s1) * (x1 - D(x1, s1)) / s1  # last step: Euler to sigma = 0
    assert rel_l2(out, x2) <= 1e-5


def test_heun_step_in_place_is_the_formula_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g) * 10
    before = x.clone()
    D = lambda x, s: torch.tanh(x * 0.3) * (1 + s) / 2  # noqa: E731 - any nonlinear denoiser
    s, s_next = torch.tensor(2.5), torch.tensor(0.7)
    d = (x - D(x, s)) / s
    x_e = x + (s_next - s) * d
    assert torch.equal(heun_step(D, x, s, s_next), x + (s_next - s) * (d + (x_e - D(x_e, s_next)) / s_next) / 2)
    assert torch.equal(heun_step(D, x, s, torch.tensor(0.0)), x + (0 - s) * d)  # Euler to sigma 0
    assert torch.equal(x, before)  # the state it starts from is never written to


def test_reused_output_is_written_over_and_equals_a_fresh_one(model):
    inp = random_inputs(1, 2, 3, seed=21)
    cond = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], block_batch=2)
    concat = inp["concat_lr"].clone()
    reusing, fresh = BlockSweepDenoiser(model, reuse_output=True, **cond), BlockSweepDenoiser(model, **cond)
    first = reusing(inp["x"], 3.0)
    expected_first = fresh(inp["x"], 3.0)
    assert torch.equal(first, expected_first) and torch.equal(inp["concat_lr"], concat)  # the LR is not written
    x2 = inp["x"] * 0.5
    second = reusing(x2, 1.0)
    assert second.data_ptr() == first.data_ptr()  # the previous result's memory
    assert torch.equal(second, fresh(x2, 1.0))
    assert fresh(x2, 1.0).data_ptr() != expected_first.data_ptr()  # without reuse each call is new
    # Fed its own result, it does not write over what it is reading.
    again = reusing(second, 0.5)
    assert again.data_ptr() != second.data_ptr() and torch.equal(again, fresh(second, 0.5))


def test_sampler_holds_at_most_the_planned_canvases(model):
    # Every tensor with a canvas-sized storage alive while the network runs (the caller's inputs
    # included), counted once per storage: what memory.CANVASES tells the planner.
    import gc

    inp = random_inputs(1, 2, 3, seed=22)
    canvas_bytes = inp["concat_lr"].numel() * 4
    del inp["x"]

    def canvas_storages():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on every object wakes deprecated module attributes
            # Plain tensors only: compiled graphs of other tests leave FakeTensors, which have no storage.
            tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
        return {t.untyped_storage().data_ptr() for t in tensors
                if t.dtype == torch.float32 and t.dim() == 4 and t.untyped_storage().nbytes() >= canvas_bytes}

    gc.collect()
    # Large tensors other tests keep alive (module fixtures) are not this sampler's.
    elsewhere = canvas_storages() - {inp["concat_lr"].untyped_storage().data_ptr()}

    def canvases():
        return len(canvas_storages() - elsewhere)

    seen = []
    sample(model, steps=3, seed=0, block_batch=1, callback=lambda *a: seen.append(canvases()), **inp)
    assert len(seen) == network_calls(3) * 6
    assert max(seen) == CANVASES == 5  # x, concat LR, estimate, derivative, Euler point


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at once (an op's output
    that shares memory with one of its inputs, a view, is not new)."""

    def __init__(self):
        super().__init__()
        self.alive = {}  # storage address -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                self.alive.setdefault(storage.data_ptr(), (storage._weak_ref(), storage.nbytes()))
        self.alive = {k: v for k, v in self.alive.items() if not torch.UntypedStorage._expired(v[0])}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


def test_one_block_network_call_holds_only_the_accounted_activations(monkeypatch):
    # The official block geometry (patch 4, 128-px blocks: 1024 tokens per block, a 48x48-token
    # LR window), small width: 2 layers, width 128, 2 heads of 64.
    config = InfDiTConfig(num_layers=2, hidden_size=128, num_heads=2, patch_size=4, block_size=128, image_size=512)
    model = InfDiT(config).eval()
    peaks = []
    forward = InfDiT.forward_blocks

    def tracked(self, *args, **options):
        with LiveTensorBytes() as live:
            result = forward(self, *args, **options)
        peaks.append(live.peak)
        return result

    monkeypatch.setattr(InfDiT, "forward_blocks", tracked)
    inp = random_inputs(1, 2, 3, seed=3, block=128)
    sweep = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                               block_batch=1)
    sweep(inp["x"], 1.0)
    assert len(peaks) == 6
    unit = 1024 * 128 * 4  # one hidden-sized tensor of one block, float32
    # The peak is a layer's K/V gather: the residual stream 1, q 1, this layer's fresh K and V 2,
    # the 4-slot keys and values 8, RoPE cos and sin 1 (2 x head_dim / width). Every other input of
    # a sub-layer (the modulated and normalised inputs, the QKV projection, the LR tokens) is gone
    # by then; keeping them would add 5 or more. The cached K/V live in the pool, allocated once by
    # the first call: per layer a slot (K and V: 2) for each block held at once (one line of 2
    # blocks plus one), and one row for the call's fresh K/V (2), shared by the layers.
    pool = (config.num_layers * sweep.last_cache.capacity * 2 + 2) * unit
    assert sweep.last_cache.capacity == 3
    assert max(peaks[1:]) == pytest.approx(13 * unit, rel=0.01)
    assert peaks[0] == pytest.approx(13 * unit + pool, rel=0.01)


def test_karras_schedule_is_the_official_one(golden_dir):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    assert torch.equal(karras_sigmas(20), torch.tensor(manifest["sigma_schedule"], dtype=torch.float32))


def test_progress_callback_counts_every_block_batch(model):
    inp = random_inputs(1, 2, 3, seed=11)
    calls = []
    sample(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=3, seed=0,
           block_batch=4, callback=lambda *a: calls.append(a[:4]))
    per_call = 2  # 6 blocks in batches of 4 -> 2 network calls per denoiser evaluation
    assert len(calls) == network_calls(3) * per_call
    assert calls[-1][2:] == (network_calls(3) * 6, network_calls(3) * 6)
    assert [c[2] for c in calls] == sorted(c[2] for c in calls)
    assert sorted({c[0] for c in calls}) == [0, 1, 2] and all(c[1] == 3 for c in calls)


def test_preview_fills_in_block_order(model):
    inp = random_inputs(1, 1, 2, seed=12)
    previews = []
    sample(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=1, seed=0,
           block_batch=1, callback=lambda *a: previews.append(a[4].clone()))
    first = previews[0]
    # After the first block only the left block changed; the right one still shows the bicubic LR.
    assert not torch.equal(first[..., :32], inp["concat_lr"][..., :32])
    assert torch.equal(first[..., 32:], inp["concat_lr"][..., 32:])


def test_exception_in_callback_stops_and_model_stays_usable(model):
    inp = random_inputs(1, 2, 2, seed=13)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=2, seed=1,
                  block_batch=1)
    seen = []

    def interrupt(step, total, done, blocks_total, preview):
        seen.append(done)
        if done == 3:
            raise KeyboardInterrupt("user pressed cancel")

    with pytest.raises(KeyboardInterrupt):
        sample(model, callback=interrupt, **common)
    assert seen == [1, 2, 3]
    torch.testing.assert_close(sample(model, **common), sample(model, **common), rtol=0, atol=0)


def test_out_of_memory_halves_block_batch_and_gives_same_pixels(model):
    inp = random_inputs(1, 2, 4, seed=14)
    common = dict(lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=2, seed=3)
    reference = sample(model, block_batch=8, **common)
    with OutOfMemoryInjector(model, limit=2) as flaky, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sample(model, block_batch=8, **common)
    assert [str(w.message) for w in caught] == [f"Inf-DiT: out of memory, retrying with block_batch={n}"
                                                for n in (4, 2)]
    assert flaky.failures == 2  # 8 -> 4 -> 2, then the smaller batch sticks for later calls
    assert rel_l2(out, reference) <= 1e-5


def one_step(model, seed, block_batch):
    inp = random_inputs(1, 1, 2, seed=seed)
    return sample(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"], steps=1,
                  block_batch=block_batch)


def test_cpu_allocator_failure_is_treated_as_out_of_memory(model):
    with OutOfMemoryInjector(model, limit=1, error=RuntimeError), pytest.warns(UserWarning):
        one_step(model, 15, block_batch=2)


def test_out_of_memory_at_one_block_says_what_to_do(model):
    with OutOfMemoryInjector(model, limit=0), pytest.raises(OutOfMemory, match="Lower the output size"):
        one_step(model, 16, block_batch=1)


def test_other_errors_are_not_retried(model):
    with OutOfMemoryInjector(model, limit=0, error=ValueError), pytest.raises(ValueError):
        one_step(model, 17, block_batch=2)


def test_planner_and_auto_block_batch(model):
    config = model.config
    whole = plan(config, 512, 512, 10 ** 6, torch.float32)
    small = plan(config, 512, 512, 1, torch.float32)
    assert whole.kv_cache == 0 and small.kv_cache > 0
    assert small.total < whole.total
    assert plan(config, 512, 512, 4, torch.float32).activations == 4 * small.activations
    budget = plan(config, 512, 512, 7, torch.float32).working
    assert choose_block_batch(config, 512, 512, torch.float32, budget) == 7
    assert choose_block_batch(config, 512, 512, torch.float32, 0) == 1
    everything = plan(config, 512, 512, 256, torch.float32).working  # 16x16 blocks of 32 px, no cache
    assert choose_block_batch(config, 512, 512, torch.float32, everything) == 256
