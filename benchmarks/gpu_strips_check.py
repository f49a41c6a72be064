"""Strips on a GPU: two ranks sharing one CUDA device (gloo, as `infdit_core.launch` picks when a
machine has fewer GPUs than ranks) against one process on the same device.

    python benchmarks/gpu_strips_check.py [--size 768x512] [--steps 2] [--memory-sizes 2048,4096]

Without CUDA it prints "skipped: no CUDA" and exits 0. With CUDA, two parts:

1. Pixels: a small random model at the official block geometry (patch 4, 128-px blocks; 2 layers,
   width 128), TF32 off. For fp32 and bf16 it samples the same seed in one process and in two
   spawned ranks (gloo on 127.0.0.1; the strip-edge K/V go GPU -> host -> GPU; each rank is handed
   only its strip of the concat canvas) and prints the largest difference; it also prints the CUDA
   fp32 result against the CPU fp32 result (kernels differ, so this is reported, not judged).
2. Memory at the released geometry (28 layers, width 1280, bf16, random weights; one network call,
   steps=1, block batch 1, offload off) for each of --memory-sizes: the peak device memory
   (torch.cuda.max_memory_allocated, weights included) of one process and of each of two ranks,
   every one a spawned process of its own, next to plan(..., world).total; and the two-rank image
   against the one-process image. The ratio is reported, not judged.

Exit status: 0 when every two-rank image equals its single-process image to 1e-5, else 1.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core import InfDiT, InfDiTConfig, plan, sample  # noqa: E402
from infdit_core.pipeline import strip_of  # noqa: E402

SMALL = InfDiTConfig(num_layers=2, hidden_size=128, num_heads=2, patch_size=4, block_size=128, image_size=512)
RELEASED = InfDiTConfig()
TOLERANCE = 1e-5
SEED = 7
GB = 1e9


def build_model(config: InfDiTConfig, device, dtype, weights_device) -> InfDiT:
    """Deterministic random weights drawn on `weights_device` (fast for the released size on a GPU;
    the same numbers on every device they are moved to): norm weights around 1, all else ~N(0, 0.05)."""
    with torch.device(weights_device):
        model = InfDiT(config)
    model = model.eval().requires_grad_(False)
    g = torch.Generator(device=weights_device).manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and name.endswith(".weight") and ("norm" in name or "_ln" in name)
            p.copy_(torch.randn(p.shape, generator=g, device=weights_device) * 0.05 + (1.0 if norm_weight else 0.0))
    return model.to(device, dtype)


def make_inputs(h: int, w: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(concat_lr=torch.rand(1, 3, h, w, generator=g) * 2 - 1,
                lr=torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1,
                clip_vector=torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1))


def run(config, device: str, dtype, h: int, w: int, steps: int, group=None,
        weights_device: str = "cuda") -> tuple[torch.Tensor, int]:
    """The sampled image (rank 0; None on other ranks) and this process's peak device bytes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_model(config, device, dtype, weights_device)
    inputs = make_inputs(h, w)
    if group is not None:  # each rank keeps only its strip of the concat canvas, as upscale does
        inputs["concat_lr"] = strip_of(inputs["concat_lr"], config.block_size, group)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    x = sample(model, **inputs, steps=steps, seed=SEED, block_batch=1, offload="off", group=group)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return (None if x is None else x.cpu()), peak


def _process(rank, world, port, device, config, dtype, h, w, steps, out):
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = dist.group.WORLD
    try:
        x, peak = run(config, device, dtype, h, w, steps, group=group, weights_device=device)
        torch.save({"x": x, "peak": peak}, f"{out}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def spawned(device, config, dtype, h, w, steps, world) -> tuple[torch.Tensor, list[int]]:
    """Rank 0's image and every process's peak device bytes, `world` fresh processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_process, args=(world, port, device, config, dtype, h, w, steps, out), nprocs=world, join=True)
        results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]
    return results[0]["x"], [r["peak"] for r in results]


def judge(single: torch.Tensor, split: torch.Tensor) -> tuple[bool, str]:
    diff = (single - split).abs().max().item()
    good = diff <= TOLERANCE and bool(torch.isfinite(single).all())
    return good, f"max |diff| {diff:.3g}  bit-identical {torch.equal(single, split)}  {'ok' if good else 'FAIL'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="768x512", help="output HxW of the pixel check (multiples of 128)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--memory-sizes", default="2048,4096",
                        help="square output sides of the released-geometry memory check ('' to skip)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run of the logic
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    h, w = (int(v) for v in args.size.split("x"))
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else device}  torch {torch.__version__}  output {h}x{w}, {args.steps} steps")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        single, _ = spawned(device, SMALL, dtype, h, w, args.steps, world=1)
        split, _ = spawned(device, SMALL, dtype, h, w, args.steps, world=2)
        good, verdict = judge(single, split)
        ok &= good
        print(f"{str(dtype):15s} 2 ranks on one GPU vs 1 process: {verdict}")
        if dtype == torch.float32:
            cpu, _ = run(SMALL, "cpu", dtype, h, w, args.steps, weights_device=device)
            print(f"{'':15s} CUDA vs CPU (fp32, reported): max |diff| {(single - cpu).abs().max().item():.3g}")

    sizes = [int(v) for v in args.memory_sizes.split(",") if v]
    if sizes:
        print(f"\nreleased geometry ({RELEASED.num_layers} layers, width {RELEASED.hidden_size}), bf16, one network "
              "call, block batch 1, offload off; peak device GB (weights included) per process")
        print(f"{'output':>7} {'1 process':>10} {'rank 0':>8} {'rank 1':>8} {'rank/1 proc':>11} "
              f"{'plan 1':>7} {'plan 2':>7} {'plan ratio':>10}  pixels")
    for size in sizes:
        single, (peak1,) = spawned(device, RELEASED, torch.bfloat16, size, size, 1, world=1)
        split, peaks = spawned(device, RELEASED, torch.bfloat16, size, size, 1, world=2)
        good, verdict = judge(single, split)
        ok &= good
        plan1, plan2 = (plan(RELEASED, size, size, 1, torch.bfloat16, world=n).total for n in (1, 2))
        print(f"{size:>7} {peak1 / GB:10.2f} {peaks[0] / GB:8.2f} {peaks[1] / GB:8.2f} {max(peaks) / max(peak1, 1):10.2f}x "
              f"{plan1 / GB:7.2f} {plan2 / GB:7.2f} {plan2 / plan1:9.2f}x  {verdict}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
