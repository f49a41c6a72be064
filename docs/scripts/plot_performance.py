"""The scaling and speed plots of docs/performance.md, from the figures printed there.

    python docs/scripts/plot_performance.py   # writes docs/images/scaling.png and docs/images/speed.png

scaling.png: job time and parallel efficiency against ranks. The lines are the strip pipeline's formula
C·R·W / (C·R + W − 1) (C network calls, R block lines, W ranks; docs/big-jobs.md) for the released
model's 20-step jobs (C = 39); the dots are the two-rank CPU runs of benchmarks/bench_scaling.py
(C = 3, R = 8 and 16; 2026-11-30) next to the formula for their own C and R. Job times use
24.6 ms per block per call at block batch 1, measured on one H200 (2026-11-29).

speed.png: time per block per network call on one NVIDIA H200, from the `ms/net` and `bb` columns
of benchmarks/gpu_offload_check.py (2026-11-30).
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "images"
CALLS = 39  # 20 Heun steps, the last one Euler
BLOCK_SECONDS = 0.0246  # one block of one network call, block batch 1, on one H200 (gpu_offload_check.py)
MEASURED_SCALING = [  # (output, block lines, network calls, measured 2-rank speed-up)
    ("1024² CPU run", 8, 3, 1.92),
    ("2048² CPU run", 16, 3, 2.00),
]
JOBS = [("1024→4096, released model", 32, "#1f77b4"), ("4096→16384, released model", 128, "#ff7f0e")]
H200 = {  # mode at one output side: [(block batch, ms per network call)], gpu_offload_check.py
    "2048², offload off": [(1, 23.6), (69, 604.3), (256, 2370.1)],
    "4096², offload off": [(1, 29.2), (19, 181.6), (1024, 11113.6)],
    "2048², offload all": [(1, 35.1)],
    "4096², offload all": [(1, 38.1)],
}


def pipeline(calls, lines, ranks):
    return calls * lines * ranks / (calls * lines + ranks - 1)


def scaling():
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    ranks = [2 ** k for k in range(0, 8)]
    for label, lines, colour in JOBS:
        used = [w for w in ranks if w <= lines]  # a strip is at least one block line wide
        one_rank = CALLS * lines * lines * BLOCK_SECONDS / 60
        left.plot(used, [one_rank / pipeline(CALLS, lines, w) for w in used], color=colour, marker="o", label=label)
        right.plot(used, [pipeline(CALLS, lines, w) / w for w in used], color=colour, marker="o",
                   label=f"{label}: predicted")
    for (label, lines, calls, measured), colour in zip(MEASURED_SCALING, ("#2ca02c", "#d62728")):
        right.plot([2], [measured / 2], "D", color=colour, markeredgecolor="black", markersize=7,
                   label=f"{label}: measured (formula {pipeline(calls, lines, 2) / 2:.2f})")
    left.set_yscale("log")
    left.set_yticks([0.5, 1, 2, 5, 10, 30, 60, 120, 270], ["0.5", "1", "2", "5", "10", "30", "60", "120", "270"])
    left.set_ylabel("predicted job time, minutes")
    left.set_title(f"20 steps, block batch 1, {BLOCK_SECONDS * 1000:.1f} ms per block", fontsize=10)
    right.set_ylim(0.85, 1.02)
    right.set_ylabel("speed-up / ranks")
    right.set_title("parallel efficiency", fontsize=10)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("ranks (GPUs), one strip each")
        ax.grid(True, linewidth=0.4, alpha=0.5)
        ax.legend(fontsize=7.5, loc="lower left" if ax is right else "upper right")
    fig.tight_layout()
    return fig


def speed():
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for (label, points), marker in zip(H200.items(), "osD^"):
        xs = [bb for bb, _ in points]
        ax.plot(xs, [ms / bb for bb, ms in points], marker=marker, markeredgecolor="black", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16, 64, 256, 1024], ["1", "4", "16", "64", "256", "1024"])
    ax.set_ylim(0, 42)
    ax.set_xlabel("block batch (blocks per network call)")
    ax.set_ylabel("ms per block per network call")
    ax.set_title("Released geometry, bf16, one NVIDIA H200", fontsize=11)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("scaling", scaling), ("speed", speed)):
        target = OUT / f"{name}.png"
        make().savefig(target)
        print(f"{target.relative_to(REPO)}  ({target.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
