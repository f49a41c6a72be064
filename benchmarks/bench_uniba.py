"""Block sweep vs whole image: time and peak memory of one denoiser call, and the planner's error;
then the sweep's share of this machine's matmul rate at the released width.

    python benchmarks/bench_uniba.py [--sizes 256x256,512x512,...] [--device cpu|cuda]
                                     [--share-size 256x256] [--share-layers 3] [--share-repeat 5]

A small random model with the official geometry (patch 4, 128-px blocks, head dim 80) and a few
layers. Everything is measured in this one run and printed as ratios to the whole-image call:
- time: one denoiser call (a warm-up call first);
- memory: peak during one denoiser call above what was held just before it (model and inputs);
- planner: peak of a two-step `sample` (three network calls) above the steady state after loading the model, next to
  `plan(...).working` for the same block batch.
On CPU, memory is the process's peak RSS (reset through /proc/self/clear_refs); the script re-runs
itself with a fixed malloc mmap threshold so freed tensors really leave the RSS.

The share: the released width (1280, 16 heads of 80) cut to `--share-layers` layers, random weights,
warm denoiser calls at block batch 1 and at auto. Their FLOPs are counted op by op (matmuls,
convolutions and attention, torch.utils.flop_counter) and divided by the time; the reference is a
plain torch.mm of each of a layer's four linear shapes (QKV, attention output, MLP in and out) with
the call's rows. `--share-repeat` calls are timed, the matmul rate before the first and after each,
and each call's share is taken against the mean of the rates just before and after it (a slow spell
of a shared machine then slows both sides); it prints the medians and the range of the shares.
On CPU the share is measured twice, in the process's own memory allocator, before the table's
fixed mmap threshold is set: first as it starts (glibc's default), then with glibc told to keep
freed memory for reuse (no fresh pages for every large tensor: what jemalloc or tcmalloc do, and
what MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ give a CPU user; see docs/performance.md).
An empty --sizes or --share-size skips that part.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core import BlockSweepDenoiser, InfDiT, InfDiTConfig, plan, sample  # noqa: E402
from infdit_core.memory import resolve_execution  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

CONFIG = InfDiTConfig(num_layers=4, hidden_size=160, num_heads=2, patch_size=4, block_size=128, image_size=512)
DEFAULT_SIZES = "256x256,512x512,1024x512,2048x512,1024x1024,512x2048"


class PeakMemory:
    """Peak bytes above the level at `start()`: CUDA allocator stats, or RSS on Linux."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def inputs(B, H, W, device):
    g = torch.Generator().manual_seed(0)
    return dict(concat_lr=(torch.rand(B, 3, H, W, generator=g) * 2 - 1).to(device),
                lr=(torch.rand(B, 3, H // 4, W // 4, generator=g) * 2 - 1).to(device),
                clip_vector=torch.nn.functional.normalize(torch.randn(B, 768, generator=g), dim=-1).to(device))


def denoiser_call(model, inp, block_batch, meter):
    x = inp["concat_lr"] + torch.randn_like(inp["concat_lr"])
    denoiser = BlockSweepDenoiser(model, block_batch=block_batch, **inp)
    meter.start()
    start = time.perf_counter()
    denoiser(x, 2.0)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, meter.peak()


def sampler_peak(model, H, W, block_batch, meter, device):
    meter.start()  # steady state: model loaded, nothing else
    inp = inputs(1, H, W, device)
    sample(model, steps=2, seed=0, block_batch=block_batch, **inp)  # Heun step + final Euler
    return meter.peak()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mm_rate(rows: int, width: int, device, dtype, repeats: int = 3) -> float:
    """FLOP/s of a plain torch.mm over a layer's four linear shapes with `rows` rows (best of
    `repeats` for each shape)."""
    total_flops = total_time = 0.0
    for inner, outer in [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]:
        a = torch.randn(rows, inner, device=device, dtype=dtype)
        b = torch.randn(inner, outer, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        total_flops += 2 * rows * inner * outer
        total_time += best
    return total_flops / total_time


# torch.utils.flop_counter knows the CUDA attention kernels; the CPU one is counted the same way.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                   lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def sweep_share(H, W, layers, device, dtype, repeat: int, allocator: str):
    """Print the sweep's FLOP rate as a share of mm_rate, at block batch 1 and auto."""
    config = dataclasses.replace(InfDiTConfig(), num_layers=layers)
    torch.manual_seed(0)
    model = InfDiT(config).to(device, dtype).eval()
    inp = inputs(1, H, W, device)
    x = inp["concat_lr"] + torch.randn_like(inp["concat_lr"])
    blocks = (H // config.block_size) * (W // config.block_size)
    auto = resolve_execution("auto", "off", config, H, W, dtype, device)[0]
    print(f"\nshare of the matmul rate: released width {config.hidden_size} ({config.num_heads} heads of "
          f"{config.head_dim}), {layers} layers, {H}x{W} ({blocks} blocks), {device}, "
          f"{torch.get_num_threads()} threads, allocator: {allocator}; medians of {repeat} calls")
    header = (f"{'mode':>12} {'GFLOP':>8} {'time s':>7} {'GFLOP/s':>8} {'mm GFLOP/s':>10} {'share':>6} "
              f"{'range':>9}")
    print(header)
    print("-" * len(header))
    for name, bb in [("sweep bb=1", 1), (f"auto ={auto}", auto)]:
        denoiser = BlockSweepDenoiser(model, block_batch=bb, **inp)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            denoiser(x, 2.0)  # also the warm-up
        flops = counter.get_total_flops()
        rows = min(bb, blocks) * config.block_tokens ** 2
        rates, times, shares = [mm_rate(rows, config.hidden_size, device, dtype)], [], []
        for _ in range(repeat):
            synchronize(device)
            start = time.perf_counter()
            denoiser(x, 2.0)
            synchronize(device)
            times.append(time.perf_counter() - start)
            rates.append(mm_rate(rows, config.hidden_size, device, dtype))
            # Each call against the matmul rate measured just before and just after it, so a slow
            # spell of the machine slows both sides of the ratio.
            shares.append(flops / times[-1] / ((rates[-2] + rates[-1]) / 2))
        elapsed, reference, share = statistics.median(times), statistics.median(rates), statistics.median(shares)
        print(f"{name:>12} {flops / 1e9:8.1f} {elapsed:7.2f} {flops / elapsed / 1e9:8.1f} "
              f"{reference / 1e9:10.1f} {share:6.0%} {min(shares):4.0%}-{max(shares):.0%}")


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no mmap of its own for each large tensor
    (whose pages the kernel must fault in and zero on every allocation) and no returning of the
    heap's top to the system. False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def table(sizes, device, dtype, dtype_name):
    """The sweep vs whole-image table (time, memory, planner) of the small model."""
    torch.manual_seed(0)
    model = InfDiT(CONFIG).to(device, dtype).eval()
    meter = PeakMemory(device)
    denoiser_call(model, inputs(1, 256, 256, device), 4, meter)  # warm-up

    print(f"model: {CONFIG.num_layers} layers, width {CONFIG.hidden_size}, head dim {CONFIG.head_dim}, "
          f"{CONFIG.block_size}-px blocks; device {device}, {dtype_name}, {torch.get_num_threads()} threads")
    print("memory = peak during one denoiser call above the memory held before it; "
          "planner = two-step sample() peak vs plan().working\n")
    header = f"{'output':>10} {'blocks':>6} {'mode':>12} {'time s':>7} {'time x':>7} {'mem MB':>8} {'mem x':>6} " \
             f"{'plan MB':>8} {'sample MB':>9} {'plan err':>8}"
    print(header)
    print("-" * len(header))
    sweep_memory = {}
    for size in sizes.split(","):
        H, W = map(int, size.split("x"))
        blocks = (H // CONFIG.block_size) * (W // CONFIG.block_size)
        inp = inputs(1, H, W, device)
        whole_time, whole_mem = denoiser_call(model, inp, blocks, meter)
        modes = [("whole image", blocks)] + [(f"sweep bb={b}", b) for b in (1, 2, 4) if b < blocks]
        auto = resolve_execution("auto", "off", CONFIG, H, W, dtype, device)[0]
        modes.append((f"auto ={auto}", auto))
        for name, bb in modes:
            t, mem = (whole_time, whole_mem) if bb == blocks else denoiser_call(model, inp, bb, meter)
            predicted = plan(CONFIG, H, W, bb, dtype).working
            measured = sampler_peak(model, H, W, bb, meter, device)
            print(f"{size:>10} {blocks:>6} {name:>12} {t:7.2f} {t / whole_time:7.2f} {mem / 2**20:8.1f} "
                  f"{mem / whole_mem:6.2f} {predicted / 2**20:8.1f} {measured / 2**20:9.1f} "
                  f"{predicted / measured - 1:+8.0%}")
            if bb == 1:
                sweep_memory[(H, W)] = mem
        print()
    for (H, W), mem in sweep_memory.items():
        if (2 * H, W) in sweep_memory:
            print(f"O(N) check: sweep bb=1 memory {2 * H}x{W} / {H}x{W} = {sweep_memory[(2 * H, W)] / mem:.2f}")


# Set in the process that re-runs this script for the memory table alone (see main).
TABLE_ONLY = "INFDIT_BENCH_TABLE_ONLY"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="HxW list, comma separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--share-size", default="256x256", help="HxW of the matmul-share run")
    parser.add_argument("--share-layers", type=int, default=3, help="layers of the released-width model")
    parser.add_argument("--share-repeat", type=int, default=5, help="timed calls of each share mode")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.share_size and not os.environ.get(TABLE_ONLY):
        H, W = map(int, args.share_size.split("x"))
        if device.type == "cuda":
            sweep_share(H, W, args.share_layers, device, dtype, args.share_repeat, "CUDA caching allocator")
        else:
            sweep_share(H, W, args.share_layers, device, dtype, args.share_repeat, "glibc default")
            if keep_freed_memory():
                sweep_share(H, W, args.share_layers, device, dtype, args.share_repeat, "freed memory kept")
    if args.sizes:
        if device.type == "cpu" and sys.platform.startswith("linux") and not os.environ.get(TABLE_ONLY):
            # The table measures RSS: large tensors must live in their own mappings, returned to the
            # OS when freed. malloc reads that setting at start-up, so the table runs in a new process.
            sys.stdout.flush()
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **{TABLE_ONLY: "1"})
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
        table(args.sizes, device, dtype, args.dtype)


if __name__ == "__main__":
    main()
