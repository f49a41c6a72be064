"""Command line: `python -m infdit_core convert | download | upscale | train ...`."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (OFFICIAL_FILENAME, OFFICIAL_WEIGHTS_URL, CheckpointError, convert, read_state_dict,
                         resolve_model)
from .download import (CONVERT_DTYPES, DEFAULT_DIR, DEFAULT_MODEL, DownloadError, TransferMeter, download_official,
                       size_text)
from .imageio import read_image, write_image
from .integrity import forget
from .launch import start
from .lora import apply_loras, load_lora
from .fast import FAST_CHOICES, parse_fast
from .fp8 import refusal as fp8_refusal
from .offload import MODES
from .pipeline import Resume, upscale
from .sampling import DEFAULT_STEPS, PRESETS, SAMPLERS, resolve_sampler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# upscale only: fp8 is a way to run the weights (fp8.py), not a dtype to cast a file to.
RUN_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _inputs(paths):
    for path in paths:
        if os.path.isdir(path):
            yield from sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            yield path


class ProgressBar:
    def __init__(self, name: str, stream=sys.stderr):
        self.name, self.stream, self.start = name, stream, time.monotonic()

    def __call__(self, step, total_steps, done, total, preview):
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        self.stream.write(f"\r{self.name} [{'#' * filled}{'.' * (width - filled)}] step {step + 1}/{total_steps} "
                          f"blocks {done}/{total} {elapsed:6.1f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _load_vector(path: str) -> torch.Tensor:
    """A precomputed CLIP embedding: the single tensor of a .safetensors file, or a .npy array."""
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, allow_pickle=False)).float().reshape(1, -1)
    sd, _ = read_state_dict(path)
    return next(iter(sd.values())).float().reshape(1, -1)


def _embedder(args, dtype, device):
    from .clip import has_image_tower, load_clip

    choice = args.clip
    if choice is None and has_image_tower(args.model):
        choice = "embedded"  # a converted official file carries CLIP's image tower: use it by default
    if not choice:
        return None
    return load_clip(args.model if choice == "embedded" else choice, dtype=dtype, device=device)


def _default_model() -> str:
    """--model omitted: the file `download` writes, or an error naming the command that fetches it."""
    if not os.path.isfile(DEFAULT_MODEL):
        raise SystemExit(f"No --model given, and the default weights {DEFAULT_MODEL} are not in {os.getcwd()}. "
                         "Fetch them once with:\n  python -m infdit_core download\nor pass --model FILE.")
    return DEFAULT_MODEL


def lora_argument(text: str) -> tuple[str, float]:
    """--lora FILE[:strength]; a colon not followed by a number belongs to the path (C:\\...)."""
    path, _, strength = text.rpartition(":")
    try:
        value = float(strength)
    except ValueError:
        return text, 1.0
    if not path or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--lora {text}: expected FILE or FILE:STRENGTH with a finite number")
    return path, value


def cmd_upscale(args):
    launch = start(args.device, args.timeout)
    try:
        _upscale_all(args, launch)
    except Exception as error:
        if launch.world == 1:
            raise
        # Name this rank; torchrun then tears the group down, exits non-zero and names the rank that
        # failed first in its summary (a killed rank cannot speak for itself).
        lost_peer = isinstance(error, dist.DistError) or "Connection" in str(error)
        print(f"infdit: rank {launch.rank} of {launch.world} "
              + ("stopped: a neighbouring rank is gone" if lost_peer else "failed")
              + f" ({type(error).__name__}: {str(error)[:300]})", file=sys.stderr, flush=True)
        raise SystemExit(1)
    finally:
        launch.close()


def _sampler_and_steps(args) -> tuple[str, int]:
    """--preset (its own steps), or --sampler with --steps (default: heun, the official sampler)."""
    if args.preset and (args.sampler or args.steps is not None):
        raise SystemExit("--preset brings its own sampler and steps: give either --preset or --sampler/--steps")
    return resolve_sampler(args.preset or args.sampler or "heun", DEFAULT_STEPS if args.steps is None else args.steps)


def _parallel_mode(args, paths, world) -> str:
    if world == 1:
        return "single"
    if args.parallel == "auto":
        # Whole images per rank while there are enough to go round; else every rank shares each image.
        return "images" if len(paths) >= world else "strips"
    return args.parallel


def _upscale_all(args, launch):
    from .checkpoint import load_model

    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING, format="%(message)s")
    dtype, device = RUN_DTYPES[args.dtype], launch.device
    if args.dtype == "fp8" and (problem := fp8_refusal(device)):
        raise SystemExit(f"error: {problem}")  # before loading the weights
    args.model = resolve_model(args.model) if args.model else _default_model()
    model = load_model(args.model, dtype=dtype, device=device)
    apply_loras(model, [(load_lora(path), strength) for path, strength in args.lora], backup=False)
    block_batch = "auto" if args.block_batch == "auto" else int(args.block_batch)
    sampler, steps = _sampler_and_steps(args)
    fixed_vector = _load_vector(args.clip_vector) if args.clip_vector else None
    clip = None if fixed_vector is not None else _embedder(args, torch.bfloat16 if args.dtype == "fp8" else dtype,
                                                           device)
    paths = list(_inputs(args.inputs))
    if not paths:
        raise SystemExit("no input images found")
    mode = _parallel_mode(args, paths, launch.world)
    mine = paths[launch.rank::launch.world] if mode == "images" else paths
    single_file_out = len(paths) == 1 and os.path.splitext(args.output)[1].lower() in IMAGE_EXTENSIONS
    if not single_file_out:
        os.makedirs(args.output, exist_ok=True)
    resume = Resume(args.resume, args.resume_interval) if args.resume else None
    for path in mine:
        image = read_image(path)
        rgb = image[:, :3] if image.shape[1] != 1 else image.expand(-1, 3, -1, -1)
        # Without a CLIP (none given, none inside --model) upscale() warns and uses the zero vector.
        vector = fixed_vector.expand(image.shape[0], -1) if fixed_vector is not None else \
            clip.embed_image(rgb) if clip is not None else None
        name = os.path.basename(path).split(".")[0]
        # Progress from one process only: rank 0 (its strip paces the pipeline) or, with whole
        # images per rank, rank 0's own images.
        progress = ProgressBar(name) if launch.rank == 0 else None
        result = upscale(model, image, scale=args.scale, clip_vector=vector, steps=steps, sampler=sampler,
                         seed=args.seed, lr_noise_init=not args.no_lr_init, block_batch=block_batch, callback=progress,
                         offload=args.offload, group=launch.group if mode == "strips" else None, resume=resume,
                         fast=parse_fast(args.fast))
        if result is None:
            continue  # a strip rank other than 0: rank 0 writes the image
        target = args.output if single_file_out else os.path.join(args.output, f"{name}_x{args.scale:g}.png")
        write_image(result, target, args.bit_depth)
        print(f"{path} -> {target} ({result.shape[-1]}x{result.shape[-2]}, {args.bit_depth}-bit)", flush=True)


def cmd_convert(args):
    meta = convert(args.source, args.destination, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {args.destination} (CLIP image tower included: {meta['clip_visual']}, "
          f"source sha256 {meta['source_sha256'][:12]}...)")


def cmd_download(args):
    meter = TransferMeter()
    pickle = os.path.join(args.to, OFFICIAL_FILENAME)
    try:
        path = download_official(args.to, url=args.url, convert_to=args.convert, progress=meter, say=meter.say)
    except (DownloadError, CheckpointError) as error:
        meter.say(f"error: {error}")
        raise SystemExit(1)
    except KeyboardInterrupt:
        kept = f": what arrived is kept in {pickle}.part, and the same command resumes it" \
            if os.path.exists(pickle + ".part") else ""
        meter.say(f"interrupted{kept}.")
        raise SystemExit(130)
    if path != pickle and os.path.isfile(pickle):
        size = size_text(os.path.getsize(pickle))
        if args.delete_pickle is None and sys.stdin.isatty():
            answer = input(f"{path} holds everything the upscaler needs. Delete the official {pickle} ({size})? [y/N] ")
            args.delete_pickle = answer.strip().lower() in ("y", "yes")
        if args.delete_pickle:
            forget(pickle)
            print(f"deleted {pickle}", file=sys.stderr)
        else:
            print(f"kept {pickle} ({size}); --delete-pickle removes it after converting.", file=sys.stderr)
    model = "" if path == DEFAULT_MODEL else f" --model {path}"
    print(f"ready: {path}\nupscale with: python -m infdit_core upscale photo.png -o out/{model}")


def cmd_train(args):
    from .train import TrainingError, TrainSettings, config_from_args, train

    settings = TrainSettings(
        data=args.data, output=args.output, steps=args.steps, batch=args.batch, crop=args.crop, scale=args.scale,
        degrade=args.degrade, lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip, ema=args.ema,
        clip_dropout=args.clip_dropout, p_mean=args.p_mean, p_std=args.p_std, seed=args.seed, save_every=args.save_every, lora_rank=args.lora or 0,
        lora_alpha=args.lora_alpha)
    try:
        init = resolve_model(args.init) if args.init else None
        config = None if init else config_from_args(args.layers, args.width, args.heads, args.block_size)
        clip = None
        if args.clip:
            from .clip import load_clip
            clip = load_clip(init if args.clip == "embedded" else args.clip, device=args.device)
        train(settings, config=config, init=init, clip=clip, device=args.device, resume=args.resume)
    except TrainingError as error:
        raise SystemExit(f"error: {error}")
    weights = "lora.safetensors" if settings.lora_rank else "model.safetensors"
    print(f"wrote {os.path.join(args.output, weights)} (and train_state.safetensors, loss.csv, loss.png beside it)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m infdit_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="official .pt -> .safetensors (DiT + CLIP image tower, RoPE tables dropped)")
    c.add_argument("source")
    c.add_argument("destination")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    c.set_defaults(run=cmd_convert)

    d = sub.add_parser("download", help="fetch the official checkpoint (~2 GB; resumable, verified), then convert it")
    d.add_argument("--to", default=DEFAULT_DIR, help=f"folder to put it in (default {DEFAULT_DIR})")
    d.add_argument("--convert", choices=[*CONVERT_DTYPES, "none"], default="bf16",
                   help="also write infdit_<dtype>.safetensors (default bf16); none keeps only the official .pt")
    d.add_argument("--url", default=OFFICIAL_WEIGHTS_URL, help="where to fetch it from (a mirror); default: the "
                                                               "link in the THUDM/Inf-DiT README")
    keep = d.add_mutually_exclusive_group()
    keep.add_argument("--delete-pickle", dest="delete_pickle", action="store_true",
                      help="delete the official .pt once converted (asked when run in a terminal)")
    keep.add_argument("--keep-pickle", dest="delete_pickle", action="store_false", help="keep it, without asking")
    d.set_defaults(run=cmd_download, delete_pickle=None)

    u = sub.add_parser("upscale", help="upscale images or folders of images")
    u.add_argument("inputs", nargs="+", help="image files and/or folders")
    u.add_argument("-o", "--output", required=True, help="output folder (or a file name for one input)")
    u.add_argument("--model", help=f"Inf-DiT weights (.safetensors or official .pt), or 'demo' for the small "
                                   f"demonstration model that ships with the pack; default {DEFAULT_MODEL}, "
                                   "which `python -m infdit_core download` writes")
    u.add_argument("--scale", type=float, default=4.0, help="upscale factor; above 4 runs chained passes")
    u.add_argument("--steps", type=int, help=f"sampler steps (default {DEFAULT_STEPS})")
    u.add_argument("--sampler", choices=list(SAMPLERS),
                   help="sampler by name, run for --steps steps (default heun, the official sampler)")
    u.add_argument("--preset", choices=list(PRESETS),
                   help="; ".join(f"{name}: {s} {n} steps" for name, (s, n) in PRESETS.items())
                   + " (docs/samplers.md: their measured quality and speed)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--block-batch", default="auto", help="'auto' or blocks per network call (1 = least memory)")
    u.add_argument("--no-lr-init", action="store_true", help="start from pure noise instead of LR + noise")
    u.add_argument("--dtype", choices=sorted(RUN_DTYPES), default="fp32" if not torch.cuda.is_available() else "bf16",
                   help="weights: fp32, bf16, fp16, or fp8 (e4m3 with per-channel scales, bf16 activations; "
                        "GPUs of compute capability 8.9+)")
    u.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    u.add_argument("--clip", help="CLIP weights (open_clip_pytorch_model.bin / .safetensors), or 'embedded' "
                                  "to use the image tower inside --model (the default when a .safetensors "
                                  "--model has one)")
    u.add_argument("--clip-vector", help="a precomputed 768-d embedding (.safetensors or .npy)")
    u.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bits per channel (16 for print work)")
    u.add_argument("--offload", choices=MODES, default="auto",
                   help="keep canvases (canvas) or canvases and K/V cache (all) in host memory; auto: only if needed")
    u.add_argument("--fast", choices=list(FAST_CHOICES), default="auto",
                   help="compile the network's layers (torch.compile): auto = on CUDA for large jobs (see "
                        "docs/fast-path.md), on, off (the eager path)")
    u.add_argument("--parallel", choices=("auto", "images", "strips"), default="auto",
                   help="under torchrun: whole images per rank, or every image split in strips over the ranks; "
                        "auto: images when there are at least as many as ranks")
    u.add_argument("--timeout", type=float, default=1800, help="seconds a rank waits on another before failing")
    u.add_argument("--resume", metavar="DIR", help="checkpoint the sampler state in DIR and continue a job found there")
    u.add_argument("--resume-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between checkpoints (0 = after every step)")
    u.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (from `train --lora`) with this strength (default 1); repeat to stack several")
    u.set_defaults(run=cmd_upscale)

    t = sub.add_parser("train", help="train from scratch or fine-tune (full or LoRA) on a folder of photos")
    t.add_argument("data", help="folder of high-resolution PNG/JPEG/WebP images (searched recursively)")
    t.add_argument("-o", "--output", required=True, help="run folder: checkpoints, loss.csv, loss.png")
    t.add_argument("--init", help="checkpoint to fine-tune (official .pt, .safetensors, or 'demo'); "
                                  "without it a new model is built from --layers/--width/--heads/--block-size")
    t.add_argument("--layers", type=int, default=28)
    t.add_argument("--width", type=int, default=1280)
    t.add_argument("--heads", type=int, default=16)
    t.add_argument("--block-size", type=int, default=128, help="UniBA block side in HR pixels")
    t.add_argument("--steps", type=int, default=10_000, help="optimiser steps in all (a resumed run goes on to it)")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--crop", type=int, default=0, help="HR crop side, a multiple of the block size (default 4 blocks)")
    t.add_argument("--scale", type=float, default=4.0, help="LR = HR downscaled by this factor")
    t.add_argument("--degrade", action="store_true", help="light real-world degradation of the LR: blur, noise, JPEG")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    t.add_argument("--warmup", type=int, default=500, help="steps of linear learning-rate warm-up")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    t.add_argument("--p-mean", type=float, default=-1.0, help="noise levels: ln sigma ~ N(p_mean, p_std^2)")
    t.add_argument("--p-std", type=float, default=1.4)
    t.add_argument("--clip", help="CLIP weights for the LR's semantic embedding, or 'embedded' (in --init); "
                                  "default: the zero vector")
    t.add_argument("--clip-dropout", type=float, default=0.1, help="share of samples given the zero vector")
    t.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank on --init, save only them")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.set_defaults(run=cmd_train)

    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        args.run(args)


if __name__ == "__main__":
    main()
