"""What a resume checkpoint costs against a Heun step of the released model.

    python benchmarks/bench_resume.py [--sizes 4096,8192] [--repeat 3] [--dir FOLDER]

A checkpoint is the canvas x after a finished step, float32 [1, 3, H, W] (201 MB at 4096²,
805 MB at 8192²), written by `StateStore.save`: SHA-256 of the tensor, safetensors file, fsync,
rename, fsync of the folder. Measured here, on this machine's CPU and disk (--dir, default a
temporary folder under the current one, not /tmp, which may be memory):
- save: the whole `StateStore.save` (the best and the median of --repeat runs), and its parts
  timed apart: the SHA-256, the safetensors write (into the page cache) and the fsync;
- restore: `StateStore.load` (read, checks, SHA-256) of the file just written;
- memory: growth of the process's peak RSS during one save (VmHWM reset through clear_refs).
On a GPU the canvas is first copied to host memory (805 MB at ~20 GB/s: some 40 ms more).

The step time cannot be measured here (no GPU). It comes from benchmarks/gpu_offload_check.py on one
NVIDIA H200 (bf16, random weights at the released geometry): a whole 4096² network call, 1024
blocks of 128 px at once, took 10.3 s, so 10 ms per block per network call, and a Heun step (2
network calls) is 2 x blocks x 10 ms (21 s at 4096², 82 s at 8192²). That is the fastest way
measured (block batch 1 took 25 ms per block), so the ratios below are the worst case; a GPU twice
as fast doubles them.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core.resume import StateStore, _tensor_bytes  # noqa: E402
from infdit_core.strips import StripSchedule  # noqa: E402

BLOCK = 128
SECONDS_PER_BLOCK_CALL = 10.3 / 1024  # measured on an H200, see above
DEFAULT_INTERVAL = 60.0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_growth(fn) -> int:
    """Bytes the peak RSS grows above the RSS at the start while fn runs (Linux), or -1."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return -1
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024


def step_seconds(size: int) -> float:
    return 2 * (size // BLOCK) ** 2 * SECONDS_PER_BLOCK_CALL


def saves_per_step(step: float, interval: float) -> float:
    """Saves per step with `after_step`: a save once `interval` seconds passed since the last one."""
    if interval <= 0 or step >= interval:
        return 1.0
    return 1.0 / -(-interval // step)  # every ceil(interval / step) steps


def bench(size: int, repeat: int, folder: str) -> dict:
    shape = (1, 3, size, size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(size))
    store = StateStore(folder, "0" * 40, StripSchedule(1, size // BLOCK, size // BLOCK), BLOCK, shape, interval=0)
    saves, hashes, writes, syncs = [], [], [], []
    from safetensors.torch import save_file
    for n in range(repeat):
        started = time.perf_counter()
        store.save(n, x)
        saves.append(time.perf_counter() - started)
        # The parts, on a scratch file that takes the place of the checkpoint that save just dropped.
        started = time.perf_counter()
        hashlib.sha256(_tensor_bytes(x)).hexdigest()
        hashes.append(time.perf_counter() - started)
        scratch = os.path.join(folder, "scratch.bin")
        started = time.perf_counter()
        save_file({"x": x}, scratch)
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        with open(scratch, "rb+") as f:
            os.fsync(f.fileno())
        syncs.append(time.perf_counter() - started)
        os.remove(scratch)
    memory = peak_growth(lambda: store.save(repeat, x))
    started = time.perf_counter()
    step, restored, _ = store.load()
    load = time.perf_counter() - started
    assert step == repeat and torch.equal(restored, x)
    store.finish()
    return dict(bytes=x.numel() * 4, save=min(saves), save_median=statistics.median(saves), sha=min(hashes),
                write=min(writes), fsync=min(syncs), load=load, memory=memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,8192", help="square output sizes in pixels (multiples of 128)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=".", help="where the checkpoint folder is made (the disk under test)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench_resume_", dir=args.dir)
    try:
        print(f"checkpoints in {os.path.abspath(folder)}; torch threads {torch.get_num_threads()}; "
              f"best of {args.repeat}")
        print(f"step time: 2 network calls x blocks x {SECONDS_PER_BLOCK_CALL * 1e3:.1f} ms (measured on one "
              f"H200 with gpu_offload_check.py: a whole 4096^2 call; not measured on this machine)\n")
        header = (f"{'canvas':>10} {'x MB':>6} {'save s':>7} {'median':>7} {'sha256':>7} {'write':>7} "
                  f"{'fsync':>7} {'load s':>7} {'peak+MB':>8} {'step s':>7} {'save/step':>9} {'overhead@60s':>12}")
        print(header + "\n" + "-" * len(header))
        for size in (int(s) for s in args.sizes.split(",")):
            r = bench(size, args.repeat, folder)
            step = step_seconds(size)
            overhead = r["save"] * saves_per_step(step, DEFAULT_INTERVAL) / step
            print(f"{f'{size}²':>10} {r['bytes'] / 1e6:6.0f} {r['save']:7.2f} {r['save_median']:7.2f} "
                  f"{r['sha']:7.2f} {r['write']:7.2f} {r['fsync']:7.2f} {r['load']:7.2f} "
                  f"{r['memory'] / 1e6 if r['memory'] >= 0 else float('nan'):8.0f} {step:7.0f} "
                  f"{r['save'] / step:9.2%} {overhead:12.2%}")
        print("\nsave s: the whole StateStore.save (SHA-256, write, fsync, rename); sha256, write (into the page "
              "cache) and fsync: its parts, timed apart on a scratch file; load s: StateStore.load with its checks; peak+MB: "
              "peak RSS growth during a save; save/step: with --resume-interval 0 (a save after every step); "
              f"overhead@60s: the default interval ({DEFAULT_INTERVAL:g} s: a save every "
              "ceil(60 s / step) steps).")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
