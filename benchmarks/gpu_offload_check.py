"""Offload on a GPU: the peak device memory of one denoiser call against the planner, the time per
network call with and without spilling, and spilled == unspilled.

    python benchmarks/gpu_offload_check.py [--layers 28] [--sizes 2048,4096] [--time-limit 240]

Without CUDA it prints "skipped: no CUDA" and exits 0. With CUDA: random weights (seeded) at the
released geometry, InfDiTConfig() (width 1280, 16 heads, 128-px blocks, patch 4) with --layers of
its 28 layers (default all 28), bf16, batch 1, outputs 2048² and 4096². The planner is asked about
the same configuration. Per size, in this order:

  off           block batch 1, everything on the device: the unspilled reference
  all           block batch 1, canvases and K/V in host memory, no extra K/V slots (cold pinned cache)
  auto@8GiB     what offload auto / block_batch auto pick for an 8 GiB card (budget 0.8 x (8 GiB -
                weights)), and `off` at the same block batch as its reference
  auto          what they pick on this GPU (0.8 x the free memory after the weights)
  all (warm)    `all` again, with torch's pinned-memory cache warm

Each run is ONE denoiser call (sigma 2): peak device memory (torch.cuda.max_memory_allocated after
reset_peak_memory_stats; weights, inputs and canvases included) next to plan(...).total, which
predicts a sampler step's peak (7 canvases; one call holds about 3 of them in `off`), the time of
the call and per network call, the peak of torch's pinned host allocator next to plan(...).kv_host,
and the largest absolute difference to the unspilled reference with the same block batch (1e-6 is
allowed on a GPU; torch.equal is reported too). A run that would start after
--time-limit seconds is skipped and reported, so the whole check stays under 5 minutes.

Exit status: 0 when every spilled run is within 1e-6 of its reference (or CUDA is absent), 1 when
one is not or an output is not finite. The planner's error is reported, not judged.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core import BlockSweepDenoiser, InfDiT, InfDiTConfig, plan  # noqa: E402
from infdit_core.memory import block_kv_bytes, resolve_execution  # noqa: E402
from infdit_core.offload import Placement  # noqa: E402

GB = 1e9
GiB = 2 ** 30
TOLERANCE = 1e-6
SIGMA = 2.0
# --tiny (a CPU smoke run of this script's logic, not a measurement): the golden tests' geometry.
TINY = InfDiTConfig(num_layers=2, hidden_size=64, num_heads=4, block_size=32, image_size=64)


@dataclass
class Run:
    size: int
    label: str
    mode: str
    slots: int
    block_batch: int
    seconds: Optional[float] = None
    calls: int = 0
    peak: Optional[int] = None  # device bytes
    pinned: Optional[int] = None  # pinned host bytes (torch's host allocator, rounded sizes)
    planned: Optional[int] = None  # plan(...).total
    planned_kv_host: Optional[int] = None
    diff: Optional[float] = None  # max |out - reference|
    equal: Optional[bool] = None
    note: str = ""


def build_model(config: InfDiTConfig, device: torch.device, dtype: torch.dtype) -> InfDiT:
    """Deterministic random weights (norm weights around 1, everything else ~N(0, 0.02))."""
    with torch.device(device):
        model = InfDiT(config)
    model = model.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and name.endswith(".weight") and ("norm" in name or "_ln" in name)
            noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02
            p.copy_(noise + (1.0 if norm_weight else 0.0))
    return model


def make_inputs(size: int) -> dict:
    g = torch.Generator().manual_seed(size)
    concat_lr = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    return dict(concat_lr=concat_lr, x=concat_lr + SIGMA * torch.randn(1, 3, size, size, generator=g),
                lr=torch.rand(1, 3, size // 4, size // 4, generator=g) * 2 - 1,
                clip_vector=torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1))


def host_pinned_peak() -> Optional[int]:
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - older torch: not reported
        return None
    return stats.get("active_bytes.peak", stats.get("allocated_bytes.peak"))


def one_call(model, inp, block_batch: int, placement: Placement):
    """One denoiser call; returns (output on the host, seconds, peak device bytes, pinned peak)."""
    cuda = placement.compute.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            torch.cuda.reset_peak_host_memory_stats()
        except Exception:  # noqa: BLE001
            pass
    # The canvases go where the placement keeps them (the sampler would hold them there too).
    x, concat_lr = inp["x"].to(placement.canvas), inp["concat_lr"].to(placement.canvas)
    denoiser = BlockSweepDenoiser(model, lr=inp["lr"], concat_lr=concat_lr, clip_vector=inp["clip_vector"],
                                  block_batch=block_batch, placement=placement)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = denoiser(x, SIGMA)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    pinned = host_pinned_peak() if cuda else None
    out = out.cpu()
    del denoiser, x, concat_lr
    return out, seconds, peak, pinned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28, help="layers of the released geometry to keep (default 28)")
    parser.add_argument("--sizes", default=None, help="output sides, comma-separated (default 2048,4096)")
    parser.add_argument("--card-gib", type=float, default=8.0, help="the small card auto is asked about (GiB)")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="no run starts that would end after this many seconds (default 240: the check "
                             "stays under 5 minutes)")
    # A smoke run of this script on the CPU with the tiny test geometry: no memory is measured.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (torch.cuda.is_available() is False); nothing was measured")
        return 0
    started = time.perf_counter()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    if args.tiny:
        config = TINY
        sizes = [int(s) for s in (args.sizes or "128,256").split(",")]
    else:
        config = InfDiTConfig(num_layers=args.layers)
        sizes = [int(s) for s in (args.sizes or "2048,4096").split(",")]
    s = config.block_size
    if any(size % s for size in sizes):
        parser.error(f"sizes must be multiples of the block size {s}")

    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if cuda else device}")
    if not cuda:
        print("SMOKE RUN on the CPU: checks this script's logic and the equality of spilled and unspilled "
              "outputs; no device memory is measured and the timings say nothing about a GPU.")
    print(f"config: {config.num_layers} layers (released: 28), width {config.hidden_size}, {config.num_heads} heads, "
          f"{s}-px blocks, {str(dtype).replace('torch.', '')}, random weights (seed 0)")
    model = build_model(config, device, dtype)
    weights = plan(config, s, s, 1, dtype).weights
    print(f"weights {weights / GB:.2f} GB; model built in {time.perf_counter() - started:.1f} s")

    # Warm-up (kernels, cuBLAS handles): one small call unspilled and spilled, not reported.
    warm = make_inputs(4 * s)
    for mode in ("off", "all"):
        one_call(model, warm, 1, Placement.for_mode(mode, device))

    runs: list[Run] = []
    per_block: Optional[float] = None  # seconds per block of the last `off` run, for the time limit
    failed = False
    for size in sizes:
        inp = make_inputs(size)
        blocks = (size // s) ** 2
        outputs: dict[tuple[str, int], torch.Tensor] = {}  # (mode, block batch) -> output, references are 'off'

        def execute(label, mode, slots, block_batch, reference_key=None):
            nonlocal per_block, failed
            run = Run(size, label, mode, slots, block_batch, calls=math.ceil(blocks / block_batch))
            p = plan(config, size, size, block_batch, dtype, offload=mode, kv_device_slots=slots)
            run.planned, run.planned_kv_host = p.total, p.kv_host
            elapsed = time.perf_counter() - started
            guess = (per_block or 0) * blocks * (2 if mode != "off" else 1)
            if elapsed + guess > args.time_limit:
                run.note = (f"skipped: {elapsed:.0f} s elapsed + {guess:.0f} s expected > "
                            f"--time-limit {args.time_limit:.0f}")
                runs.append(run)
                return
            try:
                out, run.seconds, run.peak, run.pinned = one_call(model, inp, block_batch,
                                                                  Placement.for_mode(mode, device, slots))
            except torch.OutOfMemoryError as error:
                run.note = f"out of memory: {str(error).splitlines()[0][:120]}"
                if cuda:
                    torch.cuda.empty_cache()
                runs.append(run)
                return
            if mode == "off" and block_batch == 1:
                per_block = run.seconds / blocks
            if not torch.isfinite(out).all():
                run.note = "NOT FINITE"
                failed = True
            if mode == "off":
                outputs.setdefault((mode, block_batch), out)  # the first one stays the reference
            reference = outputs.get(("off", block_batch)) if reference_key is None else outputs.get(reference_key)
            if reference is not None and reference is not out:
                run.diff = (out - reference).abs().max().item()
                run.equal = torch.equal(out, reference)
                if mode != "off" and not run.diff <= TOLERANCE:
                    failed = True
            runs.append(run)

        def tried_off(block_batch):
            return any(r.size == size and r.mode == "off" and r.block_batch == block_batch for r in runs)

        execute("off", "off", 0, 1)
        execute("all", "all", 0, 1)
        # auto for a small card (resolved for a CUDA device string: the planner alone, nothing is queried).
        if args.tiny:
            # The tiny model fits any card: a budget with room for one extra K/V block, so auto spills.
            budget = plan(config, size, size, 1, dtype, offload="all").working + block_kv_bytes(config, dtype)
            card_label = "auto@tiny budget"
        else:
            budget = int(0.8 * (args.card_gib * GiB - weights))
            card_label = f"auto@{args.card_gib:g}GiB"
        m, placement, _ = resolve_execution("auto", "auto", config, size, size, dtype, "cuda",
                                            budget=budget, host_budget=1 << 50)
        slots = placement.kv_device_slots if placement.spills_kv else 0
        if placement.mode != "off" and not tried_off(m):
            execute(f"off (reference, bb {m})", "off", 0, m)
        execute(card_label, placement.mode, slots, m)
        # auto on this device, as a run here would resolve it.
        m, placement, _ = resolve_execution("auto", "auto", config, size, size, dtype, device)
        mode = placement.mode if cuda else "off"
        slots = placement.kv_device_slots if placement.spills_kv else 0
        if mode != "off" and not tried_off(m):
            execute(f"off (reference, bb {m})", "off", 0, m)
        execute("auto (this device)", mode, slots, m, reference_key=None if mode != "off" else ("off", 1))
        execute("all (warm)", "all", 0, 1)
        # Free this size's tensors before the next size allocates its own (rebound, not deleted: the
        # closures above name them).
        inp = None
        outputs.clear()

    header = (f"{'output':>7} {'run':<22} {'offload':<7} {'slots':>5} {'bb':>5} {'calls':>6} {'call s':>8} "
              f"{'ms/net':>8} {'peak GB':>8} {'plan GB':>8} {'peak/plan':>9} {'pinned GB':>9} {'planK/V GB':>10} "
              f"{'max|diff|':>10} {'equal':>6}")
    print("\n" + header + "\n" + "-" * len(header))

    def num(value, scale=1.0, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value / scale)

    for r in runs:
        ms = None if r.seconds is None else 1000 * r.seconds / r.calls
        ratio = None if r.peak is None else r.peak / r.planned
        line = (f"{r.size:>7} {r.label:<22} {r.mode:<7} {r.slots:>5} {r.block_batch:>5} {r.calls:>6} "
                f"{num(r.seconds):>8} {num(ms, fmt='{:.1f}'):>8} {num(r.peak, GB):>8} {num(r.planned, GB):>8} "
                f"{num(ratio):>9} {num(r.pinned, GB):>9} {num(r.planned_kv_host, GB):>10} "
                f"{num(r.diff, fmt='{:.1e}'):>10} {'-' if r.equal is None else str(r.equal):>6}")
        print(line + (f"  {r.note}" if r.note else ""))

    spilled = [r for r in runs if r.mode != "off" and r.diff is not None]
    measured = [r for r in runs if r.peak is not None]
    print()
    if spilled:
        worst = max(r.diff for r in spilled)
        print(f"equality: {sum(r.equal for r in spilled)} of {len(spilled)} spilled runs bit-equal to their unspilled "
              f"reference; largest difference {worst:.1e} (allowed {TOLERANCE:g})")
    if measured:
        over = [r for r in measured if r.peak > r.planned]
        print(f"planner: measured peak <= plan.total in {len(measured) - len(over)} of {len(measured)} runs; "
              f"peak/plan from {min(r.peak / r.planned for r in measured):.2f} to "
              f"{max(r.peak / r.planned for r in measured):.2f}")
    skipped = [r for r in runs if r.note.startswith(("skipped", "out of memory"))]
    if skipped:
        print(f"not measured: {len(skipped)} runs (see notes)")
    print(f"total {time.perf_counter() - started:.0f} s; {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
