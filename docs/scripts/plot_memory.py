"""Device memory against output size for the released model: whole image, block sweep, offload.

    python docs/scripts/plot_memory.py        # writes docs/images/memory.png

The lines are the planner's prediction (infdit_core.plan: bf16, 28 layers, width 1280, weights
included, one image, square outputs). The marks are peaks measured on one NVIDIA H200 with random
weights at the released geometry, one bf16 denoiser call each:
benchmarks/gpu_offload_check.py (2048² and 4096², 2026-11-30) and
benchmarks/gpu_strips_check.py (one process at 8192², 2026-11-30); their output is in
docs/performance.md.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from infdit_core import InfDiTConfig, plan  # noqa: E402

GB = 1e9
SIZES = [1024 * 2 ** (k / 4) for k in range(0, 17)]  # 1024 .. 16384, four points per doubling
MEASURED = {  # mode: [(output side, peak GB)] as printed by the benchmarks named above
    "whole": [(2048, 11.10), (4096, 39.64)],
    "sweep": [(2048, 4.27), (4096, 7.08), (8192, 13.69)],
    "all": [(2048, 2.06), (4096, 2.06)],
}
MODES = {  # mode: (label, colour, block batch as a function of the block count, offload)
    "whole": ("whole image at once (block batch = all blocks)", "#d62728", lambda blocks: blocks, "off"),
    "sweep": ("block sweep, block batch 1 (offload off)", "#1f77b4", lambda blocks: 1, "off"),
    "all": ("block sweep + offload all, block batch 1", "#2ca02c", lambda blocks: 1, "all"),
}


def main():
    config = InfDiTConfig()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for mode, (label, colour, batch_of, offload) in MODES.items():
        sides = [int(round(s / 128) * 128) for s in SIZES]
        peaks = [plan(config, s, s, batch_of(math.ceil(s / 128) ** 2), torch.bfloat16, offload=offload).total / GB
                 for s in sides]
        ax.plot(sides, peaks, color=colour, label=label)
        xs, ys = zip(*MEASURED[mode])
        ax.plot(xs, ys, "o", color=colour, markersize=7, markeredgecolor="black")
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="dots: measured on one H200")
    ax.plot([], [], color="black", label="lines: planned (infdit_core.plan)")
    for card in (8, 12, 24, 48, 80):
        ax.axhline(card * 2 ** 30 / GB, color="#999999", linewidth=0.6, linestyle=":")
        ax.text(1030, card * 2 ** 30 / GB * 1.04, f"{card} GiB card", fontsize=7, color="#666666")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1024, 2048, 4096, 8192, 16384], ["1024²", "2048²", "4096²", "8192²", "16384²"])
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100, 200, 500], ["1", "2", "5", "10", "20", "50", "100", "200", "500"])
    ax.set_xlabel("output size (pixels)")
    ax.set_ylabel("device peak, GB (weights included)")
    ax.set_title("Inf-DiT device memory, released model in bf16", fontsize=11)
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    target = REPO / "docs" / "images" / "memory.png"
    os.makedirs(target.parent, exist_ok=True)
    fig.savefig(target)
    print(f"{target.relative_to(REPO)}  ({target.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
