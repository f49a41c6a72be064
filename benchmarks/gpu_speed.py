"""Speed of the block sweep on one GPU: eager vs the compiled fast path (vs fp8 weights where the
GPU supports them), with the share of the card's dense bf16 peak, and the bf16-vs-fp32 gaps on the
goldens that bound the fast path's exactness.

    python benchmarks/gpu_speed.py [--layers 28] [--block-batches 1,8,64,max] [--repeats 2] [--out DIR]

Without CUDA it prints "skipped: no CUDA" and exits 0 (--smoke runs the logic on the CPU with the
tiny golden geometry: not a measurement). With CUDA: random weights (seeded) at the released
geometry (InfDiTConfig(): width 1280, 16 heads of 80, 128-px blocks; --layers of its 28), bf16.

Per mode (eager; fast = fast.CompiledLayers with the sweep's calls replayed from CUDA graphs,
graphs.py; "fast, no graphs" = the compiled layers alone; fp8 = fast with e4m3 weights, on compute
capability >= 8.9 only) and block batch m (1, 8, 64 and `max`, the largest whose planned memory
fits 24 GB): one denoiser call (a sweep) over a grid of max(32, 2m) blocks as warm-up (for `fast`
it compiles), then --repeats timed sweeps (torch.cuda.synchronize around them; no empty_cache in
between, so no allocator growth is timed). A timed sweep captures its graph in its first call and
replays it in the others, so at block batch 1 the capture is one call in 32 (in a 4096² job, one
in 1024). Printed: ms per block per network call, TFLOP/s (block_flops: the
matrix products of one block's network call, counted by hand below) and % of the dense bf16 peak
(PEAK_BF16_TFLOPS by device name; unknown devices get TFLOP/s only), the SDPA backend the fast
path's attention ran, and the projected 1024->4096 and 2048->8192 job times (blocks x 39 network
calls x the best warm ms per block that fits 24 GB).

Exactness (the bound the fast path is held to): on the tiny and released-geometry goldens
(tests/data), the largest |difference| to the official fp32 output of eager fp32, eager bf16, fast
bf16 (and fp8), and of fast bf16 at block batch 1 vs the whole image in one call.

--out DIR writes gpu_speed.json and gpu_speed.md there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
from infdit_core import BlockSweepDenoiser, InfDiTConfig, load_model, plan  # noqa: E402
from infdit_core import fast as fast_path  # noqa: E402
from infdit_core.graphs import call_graphs_for  # noqa: E402
from infdit_core.config import LR_PATCH, NUM_SLOTS  # noqa: E402
from infdit_core.sampling import DEFAULT_STEPS, network_calls  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_offload_check import build_model  # noqa: E402  (the same random weights as the offload check)

SIGMA = 2.0
BUDGET = 24e9  # "fits 24 GB": the planned device total (weights included) of the sweep
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets: H100 SXM and
# H200 989 (datasheets: 1,979 with sparsity), H100 PCIe 756 (1,513 sparse), A100 312, L40S 362
# (733 sparse), RTX 4090 165 (Ada whitepaper: 165.2 with fp32 accumulate, 330 with fp16
# accumulate; torch accumulates bf16 products in fp32). Matched by substring of the device name,
# first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("RTX 4090", 165.0)]
JOBS = {"1024->4096": 4096, "2048->8192": 8192}
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, block_size=32, image_size=64)


def block_flops(config: InfDiTConfig) -> int:
    """Floating-point operations (2 per multiply-add) of the matrix products of ONE block in one
    network call: per layer the QKV, output and MLP projections (24 T D^2) and the attention over
    the 4 neighbour slots (QK^T and AV: 2 x 2 T (4T) D); layer 0 adds the LR cross-attention over
    L = (3k)^2 window tokens (q and out projections 4 T D^2, K/V projection 4 L D^2, attention
    4 T L D) and the LR patch embedding (2 L D 12); plus the patch embedding (2 T D C p^2) and the
    final linear (2 T D p^2 C_out). Element-wise work (norms, RoPE, GELU, softmax) is not counted."""
    T, D, L = config.block_tokens ** 2, config.hidden_size, (3 * config.lr_block_tokens) ** 2
    p = config.patch_size
    per_layer = 24 * T * D * D + 2 * 2 * T * (NUM_SLOTS * T) * D
    cross = 4 * T * D * D + 4 * L * D * D + 4 * T * L * D + 2 * L * D * 3 * LR_PATCH ** 2
    embed = 2 * T * D * config.in_channels * p * p + 2 * T * D * p * p * config.out_channels
    return config.num_layers * per_layer + cross + embed


def peak_tflops(name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class Timing:
    mode: str
    block_batch: int
    blocks: int
    ms_per_block: Optional[float] = None
    tflops: Optional[float] = None
    peak_percent: Optional[float] = None
    backend: str = ""
    first_call_s: Optional[float] = None
    note: str = ""


@dataclass
class Report:
    device: str
    layers: int
    dtype: str
    peak_bf16_tflops: Optional[float]
    block_gflop: float
    timings: list = field(default_factory=list)
    projections: dict = field(default_factory=dict)
    exactness: dict = field(default_factory=dict)


def grid_inputs(config: InfDiTConfig, blocks: int) -> dict:
    """A 1-row canvas of `blocks` blocks (the sweep's geometry does not change a call's cost)."""
    s = config.block_size
    g = torch.Generator().manual_seed(blocks)
    concat_lr = torch.rand(1, 3, s, s * blocks, generator=g) * 2 - 1
    return dict(x=concat_lr + SIGMA * torch.randn(concat_lr.shape, generator=g), concat_lr=concat_lr,
                lr=torch.rand(1, 3, s // 4, s * blocks // 4, generator=g) * 2 - 1,
                clip_vector=torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(model, runner, graphs, block_batch: int, blocks: int, repeats: int) -> tuple[float, float]:
    """(seconds of the warm-up call, warm seconds per network call per block)."""
    inp = grid_inputs(model.config, blocks)
    device = model.device
    denoiser = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=inp["concat_lr"].to(device),
                                  clip_vector=inp["clip_vector"], block_batch=block_batch, layer_runner=runner,
                                  call_graphs=graphs)
    x = inp["x"].to(device)
    sync(device)
    start = time.perf_counter()
    denoiser(x, SIGMA)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        denoiser(x, SIGMA)
    sync(device)
    return first, (time.perf_counter() - start) / (repeats * blocks)


def largest_batch(config: InfDiTConfig, dtype, budget: float = BUDGET) -> int:
    """Largest block batch whose planned device total for a 4096² job fits the budget."""
    m = 1
    while plan(config, 4096, 4096, 2 * m, dtype).total <= budget and 2 * m <= 1024:
        m *= 2
    lo, hi = m, min(2 * m, 1024)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(config, 4096, 4096, mid, dtype).total <= budget else (lo, mid - 1)
    return lo


def attention_backend(model, block_batch: int) -> str:
    cfg, device = model.config, model.device
    shape = (block_batch, cfg.num_heads, cfg.block_tokens ** 2, cfg.head_dim)
    q = torch.randn(shape, device=device, dtype=model.dtype)
    kv = torch.randn(shape[:2] + (NUM_SLOTS * shape[2], shape[3]), device=device, dtype=model.dtype)
    return fast_path.attention_backend_used(q, kv, kv)


def exactness(device, dtypes, smoke: bool, fp8: bool) -> dict:
    """max |out - official fp32 output| per golden and path (fast at block batch 1 too; fp8 weights
    through the fast path where the GPU supports them)."""
    from safetensors.torch import load_file

    data = os.path.join(REPO, "tests", "data")
    results = {}
    goldens = [("tiny", os.path.join(data, "golden", "tiny_model.safetensors"),
                os.path.join(data, "golden", "denoise_sq_2x2blocks.safetensors"), "")]
    if not smoke:
        goldens.append(("released geometry (3 layers)", None,
                        os.path.join(data, "golden_full", "a_sq256_sigma40_sigma0p5.safetensors"), "sigma0p5."))
    for name, weights, case_file, call in goldens:
        case = load_file(case_file)
        if weights is None:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from test_conformance_full import regenerate
            recipe = json.load(open(os.path.join(data, "golden_full", "weights_recipe.json")))
            state = regenerate(recipe)
        else:
            state = load_file(weights)
        inputs = dict(lr=case["in.lr_image"], concat_lr=case["in.concat_lr_image"].to(device),
                      clip_vector=case["in.clip_vector"])
        x, sigma, expected = case[call + "in.x_noised"].to(device), case[call + "in.sigma"], case[call + "out.denoised"]
        row = {}
        for label, dtype, runner, block_batch in [("eager fp32", torch.float32, None, 10 ** 6)] + [
                item for dt in dtypes for item in (
                    (f"eager {dt}", dtypes[dt], None, 10 ** 6),
                    (f"fast {dt}", dtypes[dt], fast_path.COMPILED_LAYERS, 10 ** 6),
                    (f"fast {dt} block batch 1", dtypes[dt], fast_path.COMPILED_LAYERS, 1))] + (
                [("fast fp8 weights", torch.float8_e4m3fn, fast_path.COMPILED_LAYERS, 10 ** 6)] if fp8 else []):
            model = load_model(dict(state), dtype=dtype, device=device)
            out = BlockSweepDenoiser(model, block_batch=block_batch, layer_runner=runner,
                                     call_graphs=call_graphs_for(runner, device), **inputs)(x, sigma)
            row[label] = (out.float().cpu() - expected).abs().max().item()
            del model
        results[name] = row
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--block-batches", default="1,8,64,max")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="folder for gpu_speed.json and gpu_speed.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny geometry, fp32: the script's logic only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("skipped: no CUDA (torch.cuda.is_available() is False); nothing was measured")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = InfDiTConfig(**TINY) if args.smoke else InfDiTConfig(num_layers=args.layers)
    name = "cpu (smoke run, not a measurement)" if args.smoke else torch.cuda.get_device_name(device)
    peak = None if args.smoke else peak_tflops(name)
    flops = block_flops(config)
    report = Report(device=name, layers=config.num_layers, dtype=str(dtype).replace("torch.", ""),
                    peak_bf16_tflops=peak, block_gflop=flops / 1e9)
    print(f"device: {name}; {config.num_layers} layers, {report.dtype}; {flops / 1e12:.3f} TFLOP per block per call; "
          f"dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (TFLOP/s only)'}")
    model = build_model(config, device, dtype)
    graphs = call_graphs_for(fast_path.COMPILED_LAYERS, device)
    modes = [("eager", None), ("fast", fast_path.COMPILED_LAYERS)]
    if graphs is not None:
        modes.append(("fast, no graphs", fast_path.COMPILED_LAYERS))
    if fp8_supported(device):
        modes.append(("fp8", "fp8"))
    else:
        print(f"fp8: not run ({'CPU' if device.type == 'cpu' else 'compute capability < 8.9'})")
    batches = []
    for item in args.block_batches.split(","):
        batches.append(largest_batch(config, dtype) if item == "max" else int(item))
    fp8_model = None
    for mode, runner in modes:
        for m in batches:
            blocks = max(32, 2 * m)
            timing = Timing(mode, m, blocks)
            try:
                net = model
                if runner == "fp8":
                    if fp8_model is None:
                        from infdit_core.fp8 import quantize_model
                        fp8_model = quantize_model(build_model(config, device, dtype))
                    net, runner_used = fp8_model, fast_path.COMPILED_LAYERS
                else:
                    runner_used = runner
                first, per_block = time_calls(net, runner_used, None if mode in ("eager", "fast, no graphs") else graphs,
                                              m, blocks, args.repeats)
                timing.first_call_s = first
                timing.ms_per_block = per_block * 1e3
                timing.tflops = flops / per_block / 1e12
                timing.peak_percent = 100 * timing.tflops / peak if peak else None
                timing.backend = attention_backend(net, m) if runner_used is not None else "sdpa default"
            except torch.OutOfMemoryError:
                timing.note = "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()  # between runs only, never inside a timed one
            report.timings.append(timing)
            share = f"{timing.peak_percent:5.1f} % of peak" if timing.peak_percent is not None else ""
            if timing.ms_per_block is None:
                print(f"{mode:15s} block batch {m:4d}: {timing.note}")
            else:
                print(f"{mode:15s} block batch {m:4d}: {timing.ms_per_block:8.2f} ms/block/call  "
                      f"{timing.tflops:7.1f} TFLOP/s {share}  attention {timing.backend}  "
                      f"(first call {timing.first_call_s:.1f} s)")
    fitting = [t for t in report.timings if t.ms_per_block is not None]
    if fitting:
        for mode in dict.fromkeys(t.mode for t in fitting):
            best = min((t for t in fitting if t.mode == mode), key=lambda t: t.ms_per_block)
            for job, side in JOBS.items():
                blocks = math.ceil(side / config.block_size) ** 2
                seconds = blocks * network_calls(DEFAULT_STEPS) * best.ms_per_block / 1e3
                report.projections[f"{job} {mode}"] = seconds
                print(f"projected {job} ({blocks} blocks x {network_calls(DEFAULT_STEPS)} calls) {mode:15s} at block batch "
                      f"{best.block_batch}: {seconds / 60:.1f} min")
    dtypes = {"fp32" if args.smoke else "bf16": dtype}
    report.exactness = exactness(device, dtypes, args.smoke, fp8_supported(device))
    for golden, row in report.exactness.items():
        print(f"exactness, {golden}: max |out - official fp32| " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_speed.json"), "w") as f:
            json.dump(asdict(report), f, indent=2)
        with open(os.path.join(args.out, "gpu_speed.md"), "w") as f:
            f.write(markdown(report))
        print(f"wrote {args.out}/gpu_speed.json and gpu_speed.md")
    return 0


def markdown(report: Report) -> str:
    lines = [f"# gpu_speed: {report.device}", "",
             f"{report.layers} layers, {report.dtype}, {report.block_gflop:.0f} GFLOP per block per network call.", "",
             "| mode | block batch | ms/block/call | TFLOP/s | % of dense bf16 peak | attention | first call (s) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for t in report.timings:
        def cell(value, fmt):
            return fmt.format(value) if value is not None else "-"
        lines.append(f"| {t.mode} | {t.block_batch} | {cell(t.ms_per_block, '{:.2f}')} | {cell(t.tflops, '{:.1f}')} | "
                     f"{cell(t.peak_percent, '{:.1f}')} | {t.backend or t.note} | {cell(t.first_call_s, '{:.1f}')} |")
    lines += ["", "| projected job | minutes |", "|---|---:|"]
    lines += [f"| {job} | {seconds / 60:.1f} |" for job, seconds in report.projections.items()]
    lines += ["", "| golden | path | max abs vs official fp32 |", "|---|---|---:|"]
    lines += [f"| {golden} | {path} | {value:.2e} |" for golden, row in report.exactness.items()
              for path, value in row.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
