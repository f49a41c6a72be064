"""The sampler plot of docs/samplers.md, from the JSON that `benchmarks/quality.py --sweep --json` writes.

    python docs/scripts/plot_samplers.py [docs/data/samplers_demo.json]   # writes docs/images/samplers.png

Left: PSNR (Y) difference from the official sampler (Heun, 20 steps, 39 network calls) against the
network calls, one line per sampler, with the balanced (-0.05 dB) and fast (-0.15 dB) limits and
the presets starred; the axis shows -0.5 ... +0.35 dB, and a sampler leaving it is labelled with its
range.
Right: how close each output is to the official sampler's image (PSNR Y between the two), which
tells a sampler that follows the official trajectory from one that scores by smoothing.
Matplotlib is a development dependency (requirements-dev.txt).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from infdit_core.sampling import PRESETS  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "docs" / "data" / "samplers_demo.json"
OUT = REPO / "docs" / "images" / "samplers.png"
LIMITS = [(-0.05, "balanced: -0.05 dB, <= 20 calls", 20), (-0.15, "fast: -0.15 dB, <= 10 calls", 10)]
LOW, HIGH = -0.5, 0.35


def main(path: Path = DEFAULT, out: Path = OUT) -> None:
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in samplers:
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["calls"])
        calls = [r["calls"] for r in mine]
        deltas = [r["d_psnr_y"] for r in mine]
        line, = left.plot(calls, deltas, marker="o", markersize=4, label=name)
        outside = [(c, d) for c, d in zip(calls, deltas) if not LOW <= d <= HIGH]
        if outside:
            c, d = outside[-1]
            left.annotate(f"{name}: {min(deltas):+.2f} ... {max(deltas):+.2f} dB, off the axis",
                          (c, HIGH if d > HIGH else LOW), textcoords="offset points",
                          xytext=(-60, -12 if d > HIGH else 6),
                          fontsize=7, color=line.get_color())
        for preset, (sampler, steps) in PRESETS.items():
            row = next((r for r in mine if r["sampler"] == sampler and r["steps"] == steps), None)
            if row is not None:
                left.plot(row["calls"], row["d_psnr_y"], marker="*", markersize=14, color=line.get_color(),
                          markeredgecolor="black")
                left.annotate(preset, (row["calls"], row["d_psnr_y"]), textcoords="offset points", xytext=(6, 6),
                              fontsize=8)
        close = [(r["calls"], r["psnr_y_to_official"]) for r in mine if r["psnr_y_to_official"] is not None]
        right.plot([c for c, _ in close], [p for _, p in close], marker="o", label=name)
    for level, label, calls in LIMITS:
        left.plot([0, calls], [level, level], linestyle="--", color="grey", linewidth=1)
        left.annotate(label, (0.5, level), textcoords="offset points", xytext=(0, -9), fontsize=7, color="grey")
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xlabel("network calls per job")
    left.set_ylabel("PSNR Y minus the official sampler's (dB)")
    left.set_title("Quality against the ground truth")
    left.set_ylim(LOW, HIGH)
    right.set_xlabel("network calls per job")
    right.set_ylabel("PSNR Y against the official output (dB)")
    right.set_title("Closeness to the official sampler's image")
    for ax in (left, right):
        ax.set_xlim(0, 41)
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, loc="lower right")
    crop = f", centre {data['crop']}x{data['crop']}" if data.get("crop") else ""
    fig.suptitle(f"Samplers with the demo model (not the released weights): {', '.join(data['photos'])}{crop}, "
                 f"4x, seed {data['seed']}, {data['started']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
