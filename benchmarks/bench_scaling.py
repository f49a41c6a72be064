"""Scaling out: one image over 1 and 2 ranks (torch.distributed, gloo on loopback), one thread each.

    python benchmarks/bench_scaling.py [--size 1024] [--steps 2] [--repeat 1]

A small random model at the official block geometry (patch 4, 128-px blocks, image_size 512;
2 layers, width 128, 2 heads of 64; weights drawn in-process from a fixed seed) samples a
1024x1024 output (8x8 = 64 blocks) with the same seed twice: in one process, and split in two
strips over two spawned processes (gloo, 127.0.0.1). Every process runs torch.set_num_threads(1),
so the two-rank run uses two cores where the one-rank run uses one. Both run one block per network
call (block_batch=1), the only setting under which the planner predicts no whole-image K/V.

Measured:
- time: wall time of `sample(...)` (steps=2: a Heun step and the final Euler step, 3 network
  calls), from a barrier just before the call to the return on every rank; the job's time is the
  slowest rank's (rank 0, which gathers the image). Model building, process start and a warm-up
  sample (a 256x256 image, this process alone) are outside the timing. Next to it: the process's
  CPU seconds during the call, and "comm", the seconds spent in the strip exchange (blocked on
  receives, posting and bounding sends) and in the final gather. A process whose wall time exceeds
  its CPU and comm time by more than 10% was starved by other load, and the script says so.
- memory: each process's peak resident set above what it held with the model loaded (VmHWM reset
  through /proc/self/clear_refs before the condition inputs are built, minus VmRSS at that moment;
  the script re-runs itself with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the RSS).
  It counts the inputs and everything `sample` allocates. Each rank builds the whole concat canvas
  and keeps only its strip (`strip_of`, as `upscale` does); the single process keeps it whole. The
  processes' whole peak RSS (ru_maxrss, dominated by the torch runtime) is printed too.
- the planner's per-rank prediction: plan(config, H, W, 1, float32, world=W).working (what a run
  needs above the loaded weights, comparable with the RSS growth) and .total.
- the pixels: the two-rank image against the one-rank image (max abs difference).

Then predictions for the released model (28 layers, width 1280, bf16) on GPUs, from the strip
pipeline formula, the planner and the per-block time measured on one H200 (gpu_offload_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infdit_core.distributed as distributed  # noqa: E402
import infdit_core.pipeline as pipeline  # noqa: E402
from infdit_core import InfDiT, InfDiTConfig, plan, sample  # noqa: E402
from infdit_core.memory import block_kv_bytes  # noqa: E402
from infdit_core.sampling import network_calls  # noqa: E402
from infdit_core.strips import StripSchedule  # noqa: E402

CONFIG = InfDiTConfig(num_layers=2, hidden_size=128, num_heads=2, patch_size=4, block_size=128, image_size=512)
RELEASED = InfDiTConfig()  # 28 layers, width 1280, 16 heads
WEIGHT_SEED, SEED = 1234, 7
TARGET_SPEEDUP, TARGET_MEMORY = 1.7, 0.6
# Measured with benchmarks/gpu_offload_check.py on one NVIDIA H200 (bf16, random weights at the
# released geometry): one network call over a 4096² output at block batch 1, offload off, took
# 25.2 s for 1024 blocks (at a block batch of 1024, 10.3 s). A later lease took 29.9 s and 11.1 s
# with the same script: times vary between machines of the same kind. Not measurable on this CPU machine.
H200_BLOCK_SECONDS = 25.2 / 1024
H200_WHOLE_CALL_BLOCK_SECONDS = 10.3 / 1024


def build_model() -> InfDiT:
    """The small model with deterministic random weights (norm weights around 1, all else ~N(0, 0.05))."""
    model = InfDiT(CONFIG).eval()
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and name.endswith(".weight") and ("norm" in name or "_ln" in name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if norm_weight else 0.0))
    return model


def make_inputs(size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(concat_lr=torch.rand(1, 3, size, size, generator=g) * 2 - 1,
                lr=torch.rand(1, 3, size // 4, size // 4, generator=g) * 2 - 1,
                clip_vector=torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


class Waits:
    """Seconds a rank spends blocked on the strip exchange and in the final gather (wrappers around
    the engine's functions, installed in the benchmark's processes only)."""

    def __init__(self):
        self.receive = self.send = self.close = self.gather = 0.0

    def install(self):
        def timed(function, field):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - start)
            return wrapper
        distributed.StripExchange.receive = timed(distributed.StripExchange.receive, "receive")
        # Receives are waited for inside the network call, layer by layer, when the cache reads them.
        distributed.StripExchange._arrived = timed(distributed.StripExchange._arrived, "receive")
        distributed.StripExchange.send = timed(distributed.StripExchange.send, "send")
        distributed.StripExchange.close = timed(distributed.StripExchange.close, "close")
        pipeline.gather_strips = timed(pipeline.gather_strips, "gather")


def _rank_main(rank, world, port, size, steps, block_batch, out_dir):
    torch.set_num_threads(1)
    waits = Waits()
    waits.install()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = build_model()
        sample(model, **make_inputs(256), steps=1, seed=SEED, block_batch=block_batch, group=None)  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status("VmRSS")
        inputs = make_inputs(size)
        # Each rank keeps only its strip of the concat canvas, as upscale does (the whole is freed).
        inputs["concat_lr"] = pipeline.strip_of(inputs["concat_lr"], CONFIG.block_size)
        waits.__init__()
        if world > 1:
            dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        result = sample(model, **inputs, steps=steps, seed=SEED, block_batch=block_batch)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        growth = _status("VmHWM") - base
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "image.pt"))
        else:
            assert result is None
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            json.dump(dict(time=elapsed, cpu=cpu, growth=growth, maxrss=maxrss,
                           receive=waits.receive, send=waits.send, close=waits.close, gather=waits.gather,
                           threads=torch.get_num_threads()), f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args) -> dict:
    """One job over `world` spawned processes: per-rank measurements and rank 0's image."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        port = free_port()
        processes = [context.Process(target=_rank_main,
                                     args=(r, world, port, args.size, args.steps, args.block_batch, out_dir))
                     for r in range(world)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=args.timeout)
        codes = [p.exitcode for p in processes]
        for p in processes:
            if p.is_alive():
                p.kill()
        if codes != [0] * world:
            raise SystemExit(f"{world}-rank run failed: exit codes {codes}")
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
        image = torch.load(os.path.join(out_dir, "image.pt"), weights_only=True)
    return dict(ranks=ranks, time=max(r["time"] for r in ranks), image=image)


def exchange(rank: dict) -> float:
    """Seconds a rank spent in the strip exchange (blocked on receives, posting and bounding sends,
    draining them at the end) and in the final gather."""
    return rank["receive"] + rank["send"] + rank["close"] + rank["gather"]


def pipeline_time(calls: int, lines: int, world: int, strip: int, t_block: float, across_calls: bool) -> float:
    """Wall time of the strip pipeline: every rank sweeps `lines` lines of `strip` blocks per call;
    rank r starts a line one strip-line after rank r-1. Without pipelining across calls the fill of
    world-1 strip-lines is paid every call; with it (no barrier between calls), once."""
    t_line = strip * t_block
    return (calls * lines + world - 1) * t_line if across_calls else calls * (lines + world - 1) * t_line


def block_flops(cfg: InfDiTConfig) -> float:
    """Forward FLOPs of one block in one network call (matmuls and attention; 2 per multiply-add)."""
    T, D, X = cfg.block_tokens ** 2, cfg.hidden_size, (3 * cfg.lr_block_tokens) ** 2
    per_layer = 2 * T * D * (3 * D + D + 8 * D) + 4 * T * (4 * T) * D  # qkv, dense, MLP; 4-slot attention
    cross = 2 * T * D * 2 * D + 4 * X * D * D + 4 * T * X * D  # layer 0: query, dense, K/V, attention
    embed = 2 * T * D * cfg.in_channels * cfg.patch_size ** 2 + 2 * T * D * cfg.out_channels * cfg.patch_size ** 2
    return cfg.num_layers * per_layer + cross + embed


def fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def predictions():
    e = torch.bfloat16
    t_block = H200_BLOCK_SECONDS
    kv = block_kv_bytes(RELEASED, e)
    print(f"\nPredictions for the released model (28 layers, width 1280, bf16, block batch 1), 20 steps = "
          f"{network_calls(20)} network calls.")
    print(f"Per-block time: {t_block * 1e3:.1f} ms per block per network call at block batch 1, measured on one "
          f"NVIDIA H200 (gpu_offload_check.py, 4096^2); one block is {block_flops(RELEASED) / 1e12:.2f} TFLOP per "
          f"call, so {block_flops(RELEASED) / t_block / 1e12:.0f} TFLOP/s. For comparison, one GPU with enough "
          f"memory runs a whole 4096^2 call at once at {H200_WHOLE_CALL_BLOCK_SECONDS * 1e3:.1f} ms per block: "
          f"1024->4096 in {fmt_time(network_calls(20) * 1024 * H200_WHOLE_CALL_BLOCK_SECONDS)} (a 39.6 GB peak).")
    print(f"Interconnect: per strip edge, per line of each call, one block's K/V of all layers "
          f"(28 x 2 x 1024 tokens x 1280 x 2 bytes = {kv / 1e6:.0f} MB) crosses to the next rank; it must arrive "
          f"within one strip-line of that rank (strip blocks x per-block time).")
    header = (f"{'job':>14} {'GPUs':>4} {'ranks used':>10} {'strip':>5} {'no x-call pipe':>14} {'pipelined':>10} "
              f"{'speed-up':>8} {'per-rank plan GB':>16} {'link GB/s':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for job, (h, out) in {"1024->4096": (1024, 4096), "4096->16384": (4096, 16384)}.items():
        blocks = out // RELEASED.block_size  # square: lines = strips' width in total
        calls = network_calls(20)
        single = calls * blocks * blocks * t_block
        for gpus in (1, 8, 64):
            used = min(gpus, blocks)
            strip = math.ceil(blocks / used)
            no_pipe = pipeline_time(calls, blocks, used, strip, t_block, across_calls=False)
            piped = pipeline_time(calls, blocks, used, strip, t_block, across_calls=True)
            memory = plan(RELEASED, out, out, 1, e, world=gpus).total
            link = f"{kv / (strip * t_block) / 1e9:9.2f}" if used > 1 else f"{'-':>9}"
            print(f"{job:>14} {gpus:>4} {used:>10} {strip:>5} {fmt_time(no_pipe):>14} {fmt_time(piped):>10} "
                  f"{single / piped:7.1f}x {memory / 1e9:16.1f} {link}")
    print("ranks used: the strips are whole block columns, so at most one rank per column (a 4096 output "
          "has 32); the others stay idle.\nlink GB/s: what each rank receives from its left neighbour "
          "(and sends to its right one) while the pipeline runs; a block's layers arrive while the layers "
          "before them compute, so the link has to keep up with this rate, and each strip line waits only "
          f"for the first layer's message ({kv / RELEASED.num_layers / 1e6:.1f} MB) and the link's latency. "
          "The final gather moves the whole float32 image to rank 0 once "
          "(0.2 GB at 4096^2, 3.2 GB at 16384^2).")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels (square)")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps (2 steps = 3 network calls)")
    parser.add_argument("--block-batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (alternating); the fastest counts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one job may take")
    args = parser.parse_args()
    world = 2
    s = CONFIG.block_size
    lines = cols = args.size // s
    calls = network_calls(args.steps)
    strip = StripSchedule(1, lines, cols, world, 0).span.stop  # the wider strip
    print(f"model: {CONFIG.num_layers} layers, width {CONFIG.hidden_size}, {CONFIG.num_heads} heads of "
          f"{CONFIG.head_dim}, patch {CONFIG.patch_size}, {s}-px blocks, image_size {CONFIG.image_size}; "
          f"random weights (seed {WEIGHT_SEED}); fp32 on CPU")
    print(f"job: {args.size}x{args.size} output = {lines}x{cols} = {lines * cols} blocks, steps={args.steps} "
          f"({calls} network calls), seed {SEED}, block_batch={args.block_batch}; 1 thread per process; "
          f"2 ranks = gloo on 127.0.0.1, strips of {strip} block columns; load average before: "
          f"{os.getloadavg()[0]:.2f}")

    runs = {1: [], world: []}
    for _ in range(args.repeat):
        for w in runs:
            runs[w].append(run(w, args))
            print(f"  {w} rank{'s' if w > 1 else ''}: {runs[w][-1]['time']:.2f} s", flush=True)
    one = min(runs[1], key=lambda r: r["time"])
    two = min(runs[world], key=lambda r: r["time"])
    diff = (one["image"] - two["image"]).abs().max().item()

    t_block = one["time"] / (calls * lines * cols)
    speedup = one["time"] / two["time"]
    ideal_call = lines * world / (lines + world - 1)
    ideal_piped = calls * lines * world / (calls * lines + world - 1)
    predicted_two = pipeline_time(calls, lines, world, strip, t_block, across_calls=True)
    plans = {w: plan(CONFIG, args.size, args.size, args.block_batch, torch.float32, world=w) for w in (1, world)}
    single_growth = one["ranks"][0]["growth"]
    rank_growth = max(r["growth"] for r in two["ranks"])
    memory_ratio = rank_growth / single_growth
    MB = 2 ** 20

    print(f"\nper-block time (1 rank): {t_block * 1e3:.0f} ms per block per call "
          f"({block_flops(CONFIG) / 1e9:.1f} GFLOP: {block_flops(CONFIG) / t_block / 1e9:.0f} GFLOP/s on one core)")
    header = (f"{'run':>12} {'time s':>7} {'speed-up':>8} {'CPU s':>6} {'comm s':>6} {'gather s':>8} "
              f"{'RSS growth MB':>13} {'x single':>8} {'plan working MB':>15} {'plan total MB':>13} "
              f"{'peak RSS MB':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    rows = [("1 rank", one["ranks"][0], one["time"], plans[1])]
    rows += [(f"2 ranks: r{r}", rank, two["time"] if r == 0 else rank["time"], plans[world])
             for r, rank in enumerate(two["ranks"])]
    for name, rank, elapsed, p in rows:
        print(f"{name:>12} {elapsed:7.2f} {one['time'] / elapsed:7.2f}x {rank['cpu']:6.2f} {exchange(rank):6.2f} "
              f"{rank['gather']:8.2f} "
              f"{rank['growth'] / MB:13.1f} {rank['growth'] / single_growth:8.2f} {p.working / MB:15.1f} "
              f"{p.total / MB:13.1f} {rank['maxrss'] / MB:11.0f}")
    print(f"\nspeed-up on 2 ranks: {speedup:.2f}x; ideal for the strip pipeline (R = {lines} block lines, "
          f"W = {world}): "
          f"R*W/(R+W-1) = {ideal_call:.2f}x without pipelining across calls, C*R*W/(C*R+W-1) = {ideal_piped:.2f}x "
          f"with it (C = {calls} calls; -> W = {world} for many calls). Pipeline formula with the measured "
          f"per-block time: {predicted_two:.2f} s predicted, {two['time']:.2f} s measured. CPU seconds of the "
          f"busiest rank: {max(r['cpu'] for r in two['ranks']) / one['ranks'][0]['cpu']:.2f}x the single process's.")
    print(f"per-rank memory: {rank_growth / MB:.1f} MB (largest rank) vs {single_growth / MB:.1f} MB single = "
          f"{memory_ratio:.2f}x; planner: {plans[world].working / MB:.1f} vs {plans[1].working / MB:.1f} MB working "
          f"= {plans[world].working / plans[1].working:.2f}x, total with weights {plans[world].total / MB:.1f} vs "
          f"{plans[1].total / MB:.1f} MB = {plans[world].total / plans[1].total:.2f}x")
    a, b = plans[1], plans[world]
    print("planner parts, 1 rank -> each of 2 (MB): " + ", ".join(
        f"{name} {getattr(a, field) / MB:.1f} -> {getattr(b, field) / MB:.1f}" for name, field in
        [("canvases", "canvases"), ("K/V line", "kv_cache"), ("activations", "activations"),
         ("edge K/V buffers", "boundary"), ("weights", "weights")]))
    starved = [name for name, rank, _, _ in rows if rank["time"] - rank["cpu"] - exchange(rank) > 0.1 * rank["time"]]
    if starved:
        print(f"WARNING: {', '.join(starved)} got less than 90% of a core outside the exchange (other load on the "
              "machine): the times are not representative; re-run when the machine is quiet.")
    same = "bit-identical" if torch.equal(one["image"], two["image"]) else "differ"
    print(f"2-rank image vs 1-rank image: max abs diff {diff:.3g} ({same})")
    print(f"targets: speed-up >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'} "
          f"({speedup:.2f}x); per-rank peak <= {TARGET_MEMORY}x single: "
          f"{'met' if memory_ratio <= TARGET_MEMORY else 'NOT met'} ({memory_ratio:.2f}x); "
          f"load average after: {os.getloadavg()[0]:.2f}")
    predictions()


if __name__ == "__main__":
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Large tensors then live in their own mappings, returned to the OS when freed; the spawned
        # ranks inherit the setting.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    main()
