"""Image quality of 4x upscales against ground truth: PSNR and SSIM of a model next to bicubic.

    python benchmarks/quality.py --model demo --photos <folder> [--steps 20] [--crops out.png]
    python benchmarks/quality.py --model demo --photos <folder> --sweep [--crop 256] [--json out.json]
    python benchmarks/quality.py --model demo --photos <folder> --presets [--repeat 3]

For every photo in <folder> (the held-out photos of benchmarks/demo_data.py: never seen in
training), the ground truth is the photo cropped to a multiple of 4, the input its bicubic 4x
downscale (antialiased, as the trainer makes its LR) stored as 8-bit, and each candidate's output is
quantised to 8 bits as a saved PNG would be. Metrics, with the usual super-resolution conventions:
- PSNR on RGB and on the luma Y (ITU-R BT.601: Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in
  [0, 1]), peak 255, after removing a border of 4 pixels (the scale) on every side;
- SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255), on Y and as
  the mean over R, G, B, same border.
It prints one table (per photo and the mean), the wall time of each candidate measured in the same
run, and writes side-by-side crops (ground truth | bicubic | model) as a PNG.

--sweep measures the samplers instead (infdit_core.sampling.SAMPLERS): for each sampler and each
network-call budget (39, the official 20 Heun steps, down to 6), the most steps that fit the budget;
it prints the mean scores over the photos, their difference from the official sampler's (Heun 20,
39 calls) and the wall time of each, all measured in the same run. --presets measures the official,
balanced and fast presets only. --crop N measures on the centre N x N of each photo (faster);
--repeat N runs the candidates in turn N times and reports each one's fastest time; --json writes
the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infdit_core.checkpoint import load_model, resolve_model  # noqa: E402
from infdit_core.pipeline import upscale  # noqa: E402
from infdit_core.sampling import PRESETS, SAMPLERS  # noqa: E402

SCALE = 4
BORDER = SCALE


# --- metrics (standard definitions, written out) ---------------------------------------------------

def to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] of an RGB image [h, w, 3] in [0, 255]."""
    r, g, b = (rgb[..., c].astype(np.float64) / 255 for c in range(3))
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def _shave(a: np.ndarray) -> np.ndarray:
    return a[BORDER:-BORDER, BORDER:-BORDER]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((_shave(a).astype(np.float64) - _shave(b).astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two single-channel images [h, w] in [0, 255] (valid windows only)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = _gaussian_window()
    x = torch.from_numpy(_shave(a).astype(np.float64))[None, None]
    y = torch.from_numpy(_shave(b).astype(np.float64))[None, None]
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx ** 2
    syy = F.conv2d(y * y, w) - my ** 2
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


@dataclass
class Scores:
    psnr_rgb: float
    psnr_y: float
    ssim_rgb: float
    ssim_y: float


def score(output: np.ndarray, truth: np.ndarray) -> Scores:
    """Metrics of an 8-bit RGB output [h, w, 3] against the 8-bit ground truth."""
    return Scores(psnr(output, truth), psnr(to_y(output), to_y(truth)),
                  float(np.mean([ssim_channel(output[..., c], truth[..., c]) for c in range(3)])),
                  ssim_channel(to_y(output), to_y(truth)))


# --- inputs and candidates -------------------------------------------------------------------------

def _read(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    # Rounded, as a PNG writer stores a [0, 1] image.
    return (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(image, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)


def test_pair(path: str, crop: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Ground truth (cropped to a multiple of the scale, or to its centre crop x crop) and its 8-bit
    4x-downscaled input."""
    truth = _read(path)
    if crop:
        top, left = ((v - crop) // 2 for v in truth.shape[:2])
        truth = truth[max(0, top):max(0, top) + crop, max(0, left):max(0, left) + crop]
    h, w = (v - v % SCALE for v in truth.shape[:2])
    truth = truth[:h, :w]
    lr = _to_uint8(_resize(_to_tensor(truth), (h // SCALE, w // SCALE)))
    return truth, _to_tensor(lr)


def bicubic(lr: torch.Tensor) -> torch.Tensor:
    return _resize(lr, (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE)).clamp(0, 1)


def model_candidate(model, **options) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(lr):
        return upscale(model, lr, scale=SCALE, clip_vector=torch.zeros(1, model.config.vector_dim), **options)
    return run


# --- report ----------------------------------------------------------------------------------------

def evaluate(photos: list[str], candidates: dict[str, Callable], crop: int = 0, repeat: int = 1) -> dict[str, dict]:
    """{candidate: {"scores": {photo: Scores}, "seconds": wall time over all photos}}. With repeat > 1
    the candidates run in turn `repeat` times and "seconds" is each one's fastest round (on a shared
    machine the other load only ever adds time); the outputs are the same every round."""
    pairs = {os.path.splitext(os.path.basename(p))[0]: test_pair(p, crop) for p in photos}
    results = {}
    for _ in range(repeat):
        for name, run in candidates.items():
            scores, outputs, start = {}, {}, time.perf_counter()
            for photo, (_, lr) in pairs.items():
                with torch.no_grad():
                    outputs[photo] = _to_uint8(run(lr))
            seconds = time.perf_counter() - start
            if name in results:
                results[name]["seconds"] = min(results[name]["seconds"], seconds)
                continue
            scores = {photo: score(outputs[photo], truth) for photo, (truth, _) in pairs.items()}
            results[name] = {"scores": scores, "seconds": seconds, "outputs": outputs}
    results["_truth"] = {photo: truth for photo, (truth, _) in pairs.items()}
    return results


def mean_scores(scores: dict) -> Scores:
    values = list(scores.values())
    return Scores(*(float(np.mean([getattr(v, f) for v in values])) for f in Scores.__dataclass_fields__))


def print_table(results: dict, baseline: str = "bicubic", stream=sys.stdout) -> None:
    names = [n for n in results if not n.startswith("_")]
    photos = list(results[names[0]]["scores"])
    stream.write(f"{'candidate':<28} {'photo':<10} {'PSNR RGB':>9} {'PSNR Y':>8} {'SSIM RGB':>9} {'SSIM Y':>7}"
                 f" {'dPSNR-Y':>8} {'time s':>8}\n")
    for name in names:
        rows = [(p, results[name]["scores"][p]) for p in photos] + [("mean", mean_scores(results[name]["scores"]))]
        base = results[baseline]["scores"] if baseline in results else None
        for photo, s in rows:
            ref = (mean_scores(base) if photo == "mean" else base[photo]) if base else None
            delta = f"{s.psnr_y - ref.psnr_y:+8.2f}" if ref else f"{'':>8}"
            seconds = f"{results[name]['seconds']:8.1f}" if photo == "mean" else f"{'':>8}"
            stream.write(f"{name:<28} {photo:<10} {s.psnr_rgb:9.2f} {s.psnr_y:8.2f} {s.ssim_rgb:9.4f} {s.ssim_y:7.4f}"
                         f" {delta} {seconds}\n")


def write_crops(results: dict, path: str, candidates: list[str], size: int = 96, zoom: int = 2) -> None:
    """One row per photo: the same size x size region (the most detailed one of the ground truth)
    of the ground truth and of each candidate, enlarged `zoom` x without smoothing, labelled."""
    from PIL import Image, ImageDraw

    label_h, gap = 18, 4
    truths = results["_truth"]
    columns = ["ground truth"] + candidates
    tile = size * zoom
    sheet = Image.new("RGB", (len(columns) * (tile + gap) - gap, len(truths) * (tile + label_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (photo, truth) in enumerate(truths.items()):
        y0, x0 = _detailed_region(truth, size)
        images = [truth] + [results[c]["outputs"][photo] for c in candidates]
        top = row * (tile + label_h + gap)
        for col, (label, image) in enumerate(zip(columns, images)):
            region = Image.fromarray(image[y0:y0 + size, x0:x0 + size]).resize((tile, tile), Image.NEAREST)
            left = col * (tile + gap)
            sheet.paste(region, (left, top + label_h))
            draw.text((left + 2, top + 3), f"{label} ({photo})" if col == 0 else label, fill="black")
    sheet.save(path)


def _detailed_region(image: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window with the most gradient energy (on a coarse grid)."""
    y = to_y(image)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1]
    best, corner = -1.0, (0, 0)
    step = max(8, size // 4)
    for top in range(BORDER, energy.shape[0] - size, step):
        for left in range(BORDER, energy.shape[1] - size, step):
            e = float(energy[top:top + size, left:left + size].sum())
            if e > best:
                best, corner = e, (top, left)
    return corner


# --- sampler sweep ---------------------------------------------------------------------------------

OFFICIAL = ("heun", 20)
BUDGETS = (39, 30, 24, 20, 16, 12, 10, 8, 6)


def steps_for_budget(sampler: str, budget: int) -> int:
    """The most steps of `sampler` whose network calls fit `budget` (0 if not even one step does)."""
    calls = SAMPLERS[sampler].calls
    steps = 0
    while calls(steps + 1) <= budget:
        steps += 1
    return steps


def sweep_plan(samplers, budgets) -> list[tuple[str, int]]:
    """(sampler, steps) to measure, the official sampler first, each at most once."""
    plan = [OFFICIAL]
    for sampler in samplers:
        for budget in budgets:
            steps = steps_for_budget(sampler, budget)
            if steps and (sampler, steps) not in plan:
                plan.append((sampler, steps))
    return plan


def sweep_rows(results: dict, plan: list[tuple[str, int]]) -> list[dict]:
    """One row per (sampler, steps): mean scores, their difference from the official sampler's, time."""
    official = results[plan_name(*OFFICIAL)]
    ref = mean_scores(official["scores"])
    truths = results["_truth"]
    rows = []
    for sampler, steps in plan:
        r = results[plan_name(sampler, steps)]
        m = mean_scores(r["scores"])
        # How close to the official sampler's image (8-bit, luma): a sampler can gain PSNR against
        # the ground truth by smoothing, which this shows as a departure.
        to_official = float(np.mean([psnr(to_y(r["outputs"][p]), to_y(official["outputs"][p])) for p in truths]))
        rows.append(dict(sampler=sampler, steps=steps, calls=SAMPLERS[sampler].calls(steps),
                         psnr_rgb=m.psnr_rgb, psnr_y=m.psnr_y, ssim_rgb=m.ssim_rgb, ssim_y=m.ssim_y,
                         d_psnr_rgb=m.psnr_rgb - ref.psnr_rgb, d_psnr_y=m.psnr_y - ref.psnr_y,
                         d_ssim_y=m.ssim_y - ref.ssim_y, seconds=r["seconds"],
                         psnr_y_to_official=None if (sampler, steps) == OFFICIAL else to_official,
                         time_ratio=r["seconds"] / official["seconds"],
                         per_photo={p: vars(s) for p, s in r["scores"].items()}))
    return rows


def plan_name(sampler: str, steps: int) -> str:
    return f"{sampler} {steps}"


def print_sweep(rows: list[dict], stream=sys.stdout) -> None:
    stream.write(f"{'sampler':<22} {'steps':>5} {'calls':>5} {'PSNR Y':>7} {'PSNR RGB':>8} {'SSIM Y':>7} "
                 f"{'SSIM RGB':>8} {'dPSNR Y':>8} {'dPSNR RGB':>9} {'dSSIM Y':>8} {'to off.':>7} {'time s':>7} "
                 f"{'x official':>10}\n")
    for r in rows:
        to_official = "" if r["psnr_y_to_official"] is None else f"{r['psnr_y_to_official']:.2f}"
        stream.write(f"{r['sampler']:<22} {r['steps']:5d} {r['calls']:5d} {r['psnr_y']:7.3f} {r['psnr_rgb']:8.3f} "
                     f"{r['ssim_y']:7.4f} {r['ssim_rgb']:8.4f} {r['d_psnr_y']:+8.3f} {r['d_psnr_rgb']:+9.3f} "
                     f"{r['d_ssim_y']:+8.4f} {to_official:>7} {r['seconds']:7.1f} {r['time_ratio']:10.2f}\n")


def run_sweep(model, photos, args) -> list[dict]:
    plan = sweep_plan(args.samplers, args.budgets) if args.sweep else [OFFICIAL] + [
        PRESETS[name] for name in ("balanced", "fast")]
    candidates = {plan_name(sampler, steps): model_candidate(model, sampler=sampler, steps=steps, seed=args.seed)
                  for sampler, steps in plan}
    results = evaluate(photos, candidates, args.crop, args.repeat)
    return sweep_rows(results, plan)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="Inf-DiT weights, or 'demo' (the shipped demo model)")
    parser.add_argument("--photos", required=True, help="folder of held-out photos (benchmarks/demo_data.py heldout/)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20], help="Heun step counts to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crops", help="write the side-by-side crops PNG here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--sweep", action="store_true", help="measure every sampler at every network-call budget")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS),
                        help="samplers the sweep measures")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS),
                        help="network-call budgets the sweep measures")
    parser.add_argument("--crop", type=int, default=0, help="measure on the centre crop x crop of each photo")
    parser.add_argument("--presets", action="store_true",
                        help="measure the official, balanced and fast presets only (a sweep's rows for them)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the candidates in turn this many times; time = each one's fastest round")
    parser.add_argument("--json", help="write the results (the sweep's rows) as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.model))
    photos = sorted(os.path.join(args.photos, f) for f in os.listdir(args.photos)
                    if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if args.sweep or args.presets:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = run_sweep(model, photos, args)
        print(f"model {args.model}; photos {', '.join(os.path.basename(p) for p in photos)}"
              f"{f' (centre {args.crop}x{args.crop})' if args.crop else ''}; 4x; seed {args.seed}; "
              f"torch threads {torch.get_num_threads()}; started {started}; time: fastest of {args.repeat} "
              f"round{'s' if args.repeat > 1 else ''}; means over the photos; d = minus "
              f"the official sampler (heun 20 steps, 39 calls); to off.: PSNR Y (dB) against the official sampler's "
              f"output; time: wall seconds over all photos")
        print_sweep(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "photos": [os.path.basename(p) for p in photos], "crop": args.crop,
                           "seed": args.seed, "threads": torch.get_num_threads(), "started": started,
                           "repeat": args.repeat, "command": " ".join(["python benchmarks/quality.py"] + sys.argv[1:]),
                           "rows": rows}, f, indent=1)
            print(f"wrote {args.json}")
        return
    candidates = {"bicubic": bicubic}
    for steps in args.steps:
        candidates[f"heun {steps} steps ({2 * steps - 1} calls)"] = model_candidate(model, steps=steps, seed=args.seed)
    results = evaluate(photos, candidates)
    print(f"model {args.model}; {len(photos)} photos; 4x; metrics on 8-bit outputs, {BORDER}-px border removed")
    print_table(results)
    if args.crops:
        write_crops(results, args.crops, [n for n in candidates][:2])
        print(f"wrote {args.crops}")


if __name__ == "__main__":
    main()
