"""Strips on a GPU: two ranks sharing one CUDA device (gloo, as `infdit_core.launch` picks when a
machine has fewer GPUs than ranks) against one process on the same device.

    python benchmarks/gpu_strips_check.py [--size 768x512] [--steps 2]

Without CUDA it prints "skipped: no CUDA" and exits 0. With CUDA: a small random model at the
official block geometry (patch 4, 128-px blocks; 2 layers, width 128), TF32 off. For fp32 and bf16
it samples the same seed in one process and in two spawned ranks (gloo on 127.0.0.1; the strip-edge
K/V go GPU -> host -> GPU; each rank is handed only its strip of the concat canvas) and prints the
largest difference; it also prints the CUDA fp32 result
against the CPU fp32 result (kernels differ, so this is reported, not judged).

Exit status: 0 when both precisions give the single-process pixels on two ranks to 1e-5, else 1.
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
from infdit_core import InfDiT, InfDiTConfig, sample  # noqa: E402
from infdit_core.pipeline import strip_of  # noqa: E402

CONFIG = InfDiTConfig(num_layers=2, hidden_size=128, num_heads=2, patch_size=4, block_size=128, image_size=512)
TOLERANCE = 1e-5
SEED = 7


def build_model(device, dtype) -> InfDiT:
    model = InfDiT(CONFIG).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and name.endswith(".weight") and ("norm" in name or "_ln" in name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if norm_weight else 0.0))
    return model.to(device, dtype)


def make_inputs(h: int, w: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(concat_lr=torch.rand(1, 3, h, w, generator=g) * 2 - 1,
                lr=torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1,
                clip_vector=torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1))


def run(device: str, dtype, h: int, w: int, steps: int, group=None) -> torch.Tensor:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_model(device, dtype)
    inputs = make_inputs(h, w)
    if group is not None:  # each rank keeps only its strip of the concat canvas, as upscale does
        inputs["concat_lr"] = strip_of(inputs["concat_lr"], CONFIG.block_size, group)
    return sample(model, **inputs, steps=steps, seed=SEED, block_batch=1, offload="off", group=group)


def _rank(rank, world, port, dtype, h, w, steps, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = run("cuda", dtype, h, w, steps, group=dist.group.WORLD)
        if rank == 0:
            torch.save(x.cpu(), out)
    finally:
        dist.destroy_process_group()


def two_ranks(dtype, h, w, steps) -> torch.Tensor:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "x.pt")
        mp.spawn(_rank, args=(2, port, dtype, h, w, steps, out), nprocs=2, join=True)
        return torch.load(out, weights_only=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="768x512", help="output HxW (multiples of 128)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    h, w = (int(v) for v in args.size.split("x"))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  output {h}x{w}, {args.steps} steps")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        single = run("cuda", dtype, h, w, args.steps).cpu()
        split = two_ranks(dtype, h, w, args.steps)
        diff = (single - split).abs().max().item()
        good = diff <= TOLERANCE and bool(torch.isfinite(single).all())
        ok &= good
        print(f"{str(dtype):15s} 2 ranks on one GPU vs 1 process: max |diff| {diff:.3g}"
              f"  bit-identical {torch.equal(single, split)}  {'ok' if good else 'FAIL'}")
        if dtype == torch.float32:
            cpu = run("cpu", dtype, h, w, args.steps)
            print(f"{'':15s} CUDA vs CPU (fp32, reported): max |diff| {(single - cpu).abs().max().item():.3g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
