"""The compiled fast path (infdit_core/fast.py) against the eager path, on CPU in float32.

Tolerance: 1e-5 max abs on the denoised canvas (values in about [-1, 1]); both paths run the same
math, the compiled one fuses the element-wise work (other float rounding, same operations). The
compiled graphs are shared by the whole file (dynamo caches them per process), so each shape
compiles once: the tiny golden's (64 tokens, width 64) and the released geometry's (1024 tokens,
width 1280)."""
import json
import re
from dataclasses import replace
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._C._profiler import _EventType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from conftest import OutOfMemoryInjector, Recorder, load_pack, random_inputs
from infdit_core import BlockSweepDenoiser, InfDiT, fast, load_model, sample
from infdit_core.memory import plan
from infdit_core.sampling import network_calls
from infdit_core.strips import StripSchedule
from infdit_core.uniba import neighbour_slots
from test_conformance_full import CASE as FULL_CASE, check_weights, checksum, regenerate

TOL = 1e-5
ON = fast.COMPILED_LAYERS


def max_abs(a, b):
    return (a - b).abs().max().item()


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


@pytest.fixture(scope="module")
def golden_cases(golden_dir):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    return {name: load_file(golden_dir / c["file"]) for name, c in manifest["cases"].items()}


def case_inputs(case):
    return dict(lr=case["in.lr_image"], concat_lr=case["in.concat_lr_image"], clip_vector=case["in.clip_vector"])


def sweep(model, case, block_batch, runner=None, **options):
    denoiser = BlockSweepDenoiser(model, block_batch=block_batch, layer_runner=runner, **case_inputs(case), **options)
    return denoiser(case["in.x_noised"], case["in.sigma"])


# --- the option ---------------------------------------------------------------------------------

def test_fast_option_values_and_auto_rule():
    assert [fast.parse_fast(v) for v in ("auto", "on", "off", True, False)] == ["auto", True, False, True, False]
    with pytest.raises(ValueError, match="fast must be auto, on or off"):
        fast.parse_fast("yes")
    big = fast.AUTO_MIN_BLOCK_EVALUATIONS
    assert fast.resolve_fast("auto", torch.device("cpu"), 10 ** 9) is None  # never on CPU by itself
    assert fast.resolve_fast("auto", torch.device("cuda"), big) is ON
    assert fast.resolve_fast("auto", torch.device("cuda"), big - 1) is None
    assert fast.resolve_fast(True, torch.device("cpu"), 1) is ON and fast.resolve_fast("off", "cuda", big) is None
    # 4096² at 20 steps (1024 blocks x 39 calls) is repaid, 2048² (256 blocks) is not.
    assert network_calls(20) * 1024 >= big > network_calls(20) * 256


def _qkv(tokens=8, keys=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, tokens, 16, generator=g), torch.randn(2, 2, keys, 16, generator=g),
            torch.randn(2, 2, keys, 16, generator=g))


def test_cpu_attention_is_the_eager_kernel():
    # On the CPU the only timed backend is its flash kernel, the one eager SDPA runs: same bits.
    attention = fast.FastestAttention()
    q, k, v = _qkv()
    assert attention.choice(q, k, v) == SDPBackend.FLASH_ATTENTION
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert set(attention.timings[attention._key(q, k)]) == {"flash_attention"}


def test_attention_runs_the_fastest_backend_that_applies():
    timed = []

    def timer(backend, run, device):
        timed.append(backend)
        run()
        return {SDPBackend.MATH: 1.0, SDPBackend.FLASH_ATTENTION: 2.0}[backend]

    # cuDNN attention refuses CPU tensors: it is skipped, and the faster of the other two runs.
    attention = fast.FastestAttention(
        {"cpu": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]}, timer)
    q, k, v = _qkv()
    out = attention(q, k, v)
    assert attention.choice(q, k, v) == SDPBackend.MATH
    assert timed == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    assert attention.timings[attention._key(q, k)] == {"flash_attention": 2.0, "math": 1.0}
    with sdpa_kernel([SDPBackend.MATH]):
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5
    attention(*_qkv(seed=1))  # same shapes: measured once
    assert len(timed) == 2
    attention(*_qkv(keys=40))  # another key length is measured anew
    assert len(timed) == 4


def test_attention_timing_passes_out_of_memory_on(monkeypatch):
    # Out of memory while a backend is tried is not that backend refusing the inputs: it reaches the
    # sweep's back-off (which retries with fewer blocks), and nothing is chosen for the shape.
    attention = fast.FastestAttention({"cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]})
    q, k, v = _qkv()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fast.F, "scaled_dot_product_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        attention(q, k, v)
    assert attention.chosen == {}


def test_attention_without_a_usable_candidate_leaves_the_choice_to_sdpa():
    attention = fast.FastestAttention({"cpu": [SDPBackend.CUDNN_ATTENTION]})
    q, k, v = _qkv()
    assert attention.choice(q, k, v) is None
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert fast.FastestAttention({}).choice(q, k, v) is None


# --- exactness: the tiny golden -----------------------------------------------------------------

@pytest.mark.parametrize("block_batch", [1, 2, 3, "all"])
def test_tiny_golden_fast_equals_eager(tiny, golden_cases, block_batch):
    for name, case in golden_cases.items():
        m = 10 ** 6 if block_batch == "all" else block_batch
        eager, compiled = sweep(tiny, case, m), sweep(tiny, case, m, ON)
        assert max_abs(compiled, eager) <= TOL, name
        assert max_abs(compiled, case["out.denoised"]) <= 1e-4, name  # and still the official output


def test_one_graph_per_part_for_all_layers_and_calls(tiny):
    # The tiny golden's shapes with 4 layers, swept with 1 to 8 blocks per call (a sweep's last
    # call is often smaller). Each part compiles once for one-block calls and once for any other
    # block count, whatever the layer and the call: at most 6 graphs, and none once those exist.
    model = InfDiT(replace(tiny.config, num_layers=4)).eval().requires_grad_(False)  # as loaded models are
    inp = random_inputs(1, 2, 4, seed=5)
    graphs = torch._dynamo.utils.counters["stats"]

    def sweeps(*block_batches):
        before = graphs["unique_graphs"]
        for block_batch in block_batches:
            BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                               block_batch=block_batch, layer_runner=ON)(inp["x"], 2.0)
        return graphs["unique_graphs"] - before

    assert sweeps(1, 3) <= 6
    assert sweeps(2, 5, 8, 1, 3) == 0
    shape = (model.config.block_tokens ** 2, model.config.hidden_size)
    assert len([key for key in fast.compile_times() if key[3] == shape]) == 6  # each logged once


def test_pre_attention_fuses_the_modulation_into_the_layer_norm(monkeypatch):
    # The adaLN modulation is not a pass of its own: inductor emits the pre-attention part as two
    # element-wise kernels around the QKV matmul, LayerNorm + modulation, then q/k LayerNorm + RoPE.
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    codes = []
    monkeypatch.setattr(GraphLowering, "save_output_code", staticmethod(codes.append))
    M, T, D, heads = 2, 16, 48, 3
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(shape, generator=g) for shape in
            [(M, T, D), (M, 4, D), (M, T, 1, D // heads), (M, T, 1, D // heads), (3 * D, D), (3 * D,),
             (D // heads,), (D // heads,)]]

    def part(*a):  # its own code object: its own graph, whatever the other tests compiled
        return fast.pre_attention(*a, heads=heads, eps=1e-6)

    with inductor_config.patch(fx_graph_cache=False):
        got = torch.compile(part, fullgraph=True)(*args)
    for a, b in zip(got, part(*args)):
        assert (a - b).abs().max() <= 1e-5
    kernels = re.findall(r"^(cpp_fused_\w+) = ", "\n".join(codes), re.M)
    assert len(kernels) == 2, kernels
    first, second = kernels
    assert "native_layer_norm" in first and "mul" in first and "add" in first  # LN, * (1 + scale), + shift
    assert "native_layer_norm" in second and "neg" in second  # q/k LN and RoPE's rotation


# --- exactness: sampling, strips, offload ----------------------------------------------------------

def test_sample_auto_block_batch_and_offload_all(tiny):
    inp = random_inputs(1, 2, 3, seed=21)
    del inp["x"]
    for options in (dict(block_batch="auto"), dict(block_batch=2, offload="all")):
        eager = sample(tiny, steps=2, seed=4, fast=False, **inp, **options)
        compiled = sample(tiny, steps=2, seed=4, fast=True, **inp, **options)
        # The random tiny model's samples reach |x| ~ 40 and each step carries the previous
        # one's rounding: the tolerance is relative to the largest value.
        assert max_abs(compiled, eager) <= TOL * eager.abs().max().item(), options


class LocalExchange:
    """Two ranks in one process: rank 0 sweeps first and keeps what it sends in `sent`; rank 1
    receives from it (dependencies point up and left, so rank 0 never waits on rank 1)."""

    def __init__(self, schedule, sent):
        self.incoming, self.sent, self.supplied = set(schedule.incoming), sent, set()

    def begin_sweep(self):
        self.supplied.clear()

    def receive(self, cache, blocks):
        wanted = {source for block in blocks for source in neighbour_slots(block)} & self.incoming
        for source in sorted(wanted - self.supplied):
            self.supplied.add(source)
            cache.put(source, [lambda kv=kv: kv for kv in self.sent[source]])

    def send(self, packed):
        self.sent.update(packed)


def two_rank_sweep(model, inp, block_batch, runner):
    sent = {}
    out = []
    for rank in (0, 1):
        schedule = StripSchedule(1, 3, 4, 2, rank)
        denoiser = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                                      schedule=schedule, block_batch=block_batch, exchange=LocalExchange(schedule, sent),
                                      layer_runner=runner)
        out.append(denoiser(schedule.crop(inp["x"], 32), 1.5))
    return out


@pytest.mark.parametrize("block_batch", [1, 2])
def test_strips_of_two_ranks(tiny, block_batch):
    inp = random_inputs(1, 3, 4, seed=22)
    whole = BlockSweepDenoiser(tiny, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                               block_batch=block_batch)(inp["x"], 1.5)
    eager, compiled = two_rank_sweep(tiny, inp, block_batch, None), two_rank_sweep(tiny, inp, block_batch, ON)
    for rank in (0, 1):
        assert max_abs(compiled[rank], eager[rank]) <= TOL
        # and the strips are the whole image's
        strip = StripSchedule(1, 3, 4, 2, rank).crop(whole, 32)
        assert max_abs(compiled[rank], strip) <= TOL


# --- exactness and memory at the released geometry --------------------------------------------------

@pytest.fixture(scope="module")
def full(golden_full_dir):
    recipe = json.loads((golden_full_dir / "weights_recipe.json").read_text())
    sd = regenerate(recipe)
    entry = {"digest": checksum(sd), "expected": recipe["sha256_without_rope"], "model": load_model(sd)}
    del sd
    entry["case"] = load_file(golden_full_dir / FULL_CASE)
    return entry


def full_case(full, call="sigma0p5."):
    c = full["case"]
    return {"in.x_noised": c[call + "in.x_noised"], "in.sigma": c[call + "in.sigma"], "in.lr_image": c["in.lr_image"],
            "in.concat_lr_image": c["in.concat_lr_image"], "in.clip_vector": c["in.clip_vector"],
            "out.denoised": c[call + "out.denoised"]}


@pytest.fixture(scope="module")
def full_eager(full):
    """The eager whole-image call (the official "full" mode; it matches the golden to 1e-4, see
    test_conformance_full.py). Computed once: a released-geometry call costs seconds on one thread."""
    check_weights(full)
    return sweep(full["model"], full_case(full), 4)


def test_released_geometry_whole_image_fast_equals_eager(full, full_eager):
    case = full_case(full)
    compiled = sweep(full["model"], case, 4, ON)  # the 2x2-block golden in one call: what auto picks here
    assert max_abs(compiled, full_eager) <= TOL
    assert max_abs(compiled, case["out.denoised"]) <= 1e-4


@pytest.fixture(scope="module")
def two_layers(full):
    """The released-geometry golden model cut to its first 2 layers (layer 0 with the cross-attention,
    layer 1 without: both post-attention graphs), with its eager whole-image output. The shapes,
    and so the compiled graphs, are the 3-layer model's; the sweeps cost 2/3 of its time."""
    check_weights(full)
    third = ("transformer.layers.2.", "mixins.adaln_layer.adaLN_modulations.2.", "mixins.adaln_layer.q_layer_norm.2.",
             "mixins.adaln_layer.k_layer_norm.2.", "mixins.adaln_layer.rope.")
    keep = {k: v for k, v in full["model"].state_dict().items() if not k.startswith(third)}
    keep["mixins.adaln_layer.re_pos_embed"] = keep["mixins.adaln_layer.re_pos_embed"][:2]
    model = load_model(keep)
    assert model.config.num_layers == 2 and model.config.hidden_size == 1280
    return model, sweep(model, full_case(full), 4)


@pytest.mark.parametrize("block_batch", [1, 2, 3])  # 3: a sweep of a 3-block call and a 1-block one
def test_released_geometry_sweeps_fast_equal_eager(full, two_layers, block_batch):
    model, eager = two_layers
    assert max_abs(sweep(model, full_case(full), block_batch, ON), eager) <= TOL


def peak_allocated(fn):
    """Peak bytes allocated (CPU allocator, compiled kernels' buffers included) while fn runs,
    above what was allocated when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak, result


def test_planner_activations_hold_for_the_fast_path(two_layers, monkeypatch, block_batch=2):
    """One network call's peak with the fast path against the planner's activations, at the released
    width (1024-token blocks). The yardstick here is every CPU allocation (the compiled kernels'
    buffers, which no dispatch mode sees, and op workspaces), so the eager path is measured with it
    too: the planner's factor is exact for the eager path by test_uniba's count of live tensors,
    and the fast path must stay within 10 % of the plan of it."""
    model = two_layers[0]
    inp = random_inputs(1, 1, 2, seed=3, block=128)
    peaks = {}
    forward = InfDiT.forward_blocks

    def tracked(self, *args, **options):
        peak, result = peak_allocated(lambda: forward(self, *args, **options))
        peaks.setdefault(options.get("layer_runner") is not None, []).append(peak)
        return result

    def one_sweep(runner):
        BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"], clip_vector=inp["clip_vector"],
                           block_batch=block_batch, layer_runner=runner)(inp["x"], 1.0)

    if not any(key[3] == (1024, 1280) and not key[4] for key in fast.compile_times()):
        one_sweep(ON)  # compiled outside the measurement
    monkeypatch.setattr(InfDiT, "forward_blocks", tracked)
    one_sweep(None)
    one_sweep(ON)
    predicted = plan(model.config, 128, 256, block_batch, torch.float32).activations
    eager, compiled = max(peaks[False]), max(peaks[True])
    print(f"peak / planned activations: eager {eager / predicted:.3f}, fast {compiled / predicted:.3f}")
    assert abs(compiled - eager) <= 0.10 * predicted


# --- the node with fast on -------------------------------------------------------------------------

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
pack_fast = sys.modules[PACK.__name__ + ".infdit_core.fast"]
STEPS = 2


@pytest.fixture
def node_model(models_dir, monkeypatch):
    # The pack is imported as ComfyUI does, under another name, so its fast.py is a second copy
    # whose functions dynamo would compile again; it is handed this file's compiled graphs (the
    # same functions) to keep the test time down.
    monkeypatch.setattr(pack_fast, "_COMPILED", fast._COMPILED)
    return NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]


def node_image(seed=0):
    return torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(seed))


def node_embed():
    return torch.nn.functional.normalize(torch.randn(1, 768, generator=torch.Generator().manual_seed(1)), dim=-1)


def run_node(model, fast_choice="on", **kw):
    args = dict(scale=4.0, steps=STEPS, seed=0, block_batch=0, lr_noise_init=True, fast=fast_choice)
    args.update(kw)
    return NODES["InfDiTUpscale"]().upscale(model, node_image(), embed=node_embed(), **args)[0]


def test_node_widget_is_last_and_defaults_to_auto():
    required = NODES["InfDiTUpscale"].INPUT_TYPES()["required"]
    assert list(required)[-1] == "fast"
    assert required["fast"][0] == ["auto", "on", "off"] and required["fast"][1]["default"] == "auto"


@pytest.mark.parametrize("block_batch,batches", [(1, 4), (0, 1)])
def test_node_progress_and_previews_with_fast_on(node_model, monkeypatch, block_batch, batches):
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    monkeypatch.setattr(bridge, "PREVIEW_INTERVAL_S", 0.0)
    out = run_node(node_model, block_batch=block_batch)
    total = network_calls(STEPS) * 4
    assert rec.created_with == total and len(rec.updates) == network_calls(STEPS) * batches
    assert [v for v, _, _ in rec.updates] == [total * (i + 1) // len(rec.updates) for i in range(len(rec.updates))]
    fmt, pil, size = rec.updates[-1][2]
    assert (fmt, pil.size, size) == ("JPEG", (64, 64), 512)
    assert out.shape == (1, 64, 64, 3)
    # The run went through the compiled layers (for one-block calls, or for any other count).
    assert any(key[3] == (64, 64) and key[4] == (block_batch == 1) for key in pack_fast.compile_times())


def test_node_interrupt_with_fast_on_then_next_run_works(node_model, monkeypatch):
    reference = run_node(node_model, block_batch=1)
    rec = Recorder(raise_at=3)
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    with pytest.raises(KeyboardInterrupt):
        run_node(node_model, block_batch=1)
    assert len(rec.updates) == 3
    monkeypatch.setattr(bridge, "progress_bar", Recorder().factory)
    assert torch.equal(run_node(node_model, block_batch=1), reference)


def test_node_out_of_memory_back_off_with_fast_on(node_model):
    reference = run_node(node_model, block_batch=4)
    with OutOfMemoryInjector(node_model.model, limit=2) as flaky, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_node(node_model, block_batch=4)
    assert flaky.failures == 1
    assert [str(w.message) for w in caught if "out of memory" in str(w.message)] == [
        "Inf-DiT: out of memory, retrying with block_batch=2"]
    assert rel_l2(out, reference) <= 1e-5  # another block batch: the same image (as the eager back-off)


def test_node_memory_request_with_fast_on(node_model, monkeypatch):
    memory = sys.modules[PACK.__name__ + ".infdit_core.memory"]
    config, dtype = node_model.model.config, node_model.model.dtype
    two = memory.plan(config, 64, 64, 2, dtype).working
    monkeypatch.setattr(memory, "free_memory", lambda device: int(two / 0.8) + 1)
    asked = []
    load = node_model.managed.load
    monkeypatch.setattr(node_model.managed, "load", lambda need: asked.append(need) or load(need))
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    run_node(node_model, block_batch=0)
    assert len(rec.updates) == network_calls(STEPS) * 2 and asked == [two]
