"""Training and fine-tuning Inf-DiT with the paper's recipe (spec section 5, training-side facts).

EDM preconditioning exactly as the sampler uses it (denoiser.edm_precondition), noise levels
ln sigma ~ N(P_mean, P_std^2) and the EDM loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2;
random crops of whole 4x4-block grids with random flips; the LR made by bicubic downscaling (optionally
through a light blur / noise / JPEG chain); the CLIP embedding of the LR (or the zero vector) with
embedding dropout; AdamW with warm-up and gradient clipping; an EMA of the weights, which is what the
checkpoint holds. A crop runs through `InfDiT.forward_blocks` as one whole-image call, every block
reading its neighbours through `GridNeighbours`, so training shares every line of the math the
sampler runs.

Everything random comes from one CPU generator whose state is saved with the run, so `resume`
continues a run exactly: the same weights, bit for bit, as a run that was never interrupted.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ROPE_PREFIX, build_model, read_state_dict
from .config import LR_PATCH, SR_SCALE, InfDiTConfig
from .denoiser import SIGMA_DATA, edm_precondition
from .model import BlockInputs, InfDiT
from .strips import Block
from .uniba import neighbour_slots

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
STATE_FILE = "train_state.safetensors"
MODEL_FILE = "model.safetensors"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


class TrainingError(ValueError):
    """Unusable training input; the message says what to do."""


@dataclass(frozen=True)
class TrainSettings:
    data: str
    output: str
    steps: int = 10_000
    batch: int = 4
    crop: int = 0  # HR crop side in pixels; 0 = 4x4 blocks (the paper's 512 px for 128-px blocks)
    scale: float = 4.0  # LR = HR downscaled by this factor
    degrade: bool = False  # light real-world chain on the LR: blur, noise, JPEG
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 500
    grad_clip: float = 1.0
    ema: float = 0.999
    p_mean: float = -1.0
    p_std: float = 1.4
    clip_dropout: float = 0.1  # share of samples trained with the zero vector instead of the CLIP embedding
    seed: int = 0
    save_every: int = 500
    log_every: int = 10
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank only (needs a checkpoint to start from)
    lora_alpha: Optional[float] = None
    checkpointing: Optional[bool] = None  # activation checkpointing per layer; None = on CUDA only
    autocast: Optional[bool] = None  # bf16 autocast; None = on CUDA only

    def resolved_crop(self, config: InfDiTConfig) -> int:
        crop = self.crop or 4 * config.block_size
        if crop % config.block_size:
            raise TrainingError(f"crop {crop} px is not a multiple of the model's {config.block_size}-px block: "
                                f"use a multiple such as {max(1, round(crop / config.block_size)) * config.block_size}")
        return crop


# --- data ------------------------------------------------------------------------------------------

def find_images(folder: str) -> list[str]:
    """Image files (PNG / JPEG / WebP) under `folder`, recursively, in a fixed order."""
    if not os.path.isdir(folder):
        raise TrainingError(f"training data folder {folder} does not exist: give a folder of PNG/JPEG/WebP images")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise TrainingError(f"no training images in {folder}: put PNG, JPEG or WebP files in it (subfolders count)")
    return paths


def _read_rgb(path: str) -> torch.Tensor:
    from PIL import Image  # ships with torchvision

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same user problem
        raise TrainingError(f"cannot read training image {path} ({type(e).__name__}: {e}); remove or replace it") \
            from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # [3, h, w] uint8


class PhotoCrops:
    """Random HR crops (side `crop`) with random horizontal flips from a folder of photos, kept in
    memory as uint8. Images smaller than one crop are skipped with a warning; none usable is an error."""

    def __init__(self, folder: str, crop: int):
        self.crop = crop
        self.images, small = [], []
        for path in find_images(folder):
            image = _read_rgb(path)
            (self.images if min(image.shape[-2:]) >= crop else small).append((path, image))
        if small:
            listing = ", ".join(f"{os.path.basename(p)} ({im.shape[-1]}x{im.shape[-2]})" for p, im in small[:5])
            message = (f"{len(small)} training image(s) smaller than the {crop}-px crop: {listing}"
                       f"{' ...' if len(small) > 5 else ''}")
            if not self.images:
                raise TrainingError(f"{message}. Use a smaller --crop (a multiple of the block size) or larger images.")
            warnings.warn(f"{message}; they are skipped.")

    def __len__(self):
        return len(self.images)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[batch, 3, crop, crop] in [-1, 1], float32."""
        out = []
        for _ in range(batch):
            _, image = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
            h, w = image.shape[-2:]
            top = int(torch.randint(h - self.crop + 1, (1,), generator=generator))
            left = int(torch.randint(w - self.crop + 1, (1,), generator=generator))
            tile = image[:, top:top + self.crop, left:left + self.crop]
            if bool(torch.rand(1, generator=generator) < 0.5):
                tile = tile.flip(-1)
            out.append(tile)
        return torch.stack(out).float() / 127.5 - 1


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    # Bicubic with antialias, as the upscaler prepares its inputs (pipeline.prepare_condition).
    return F.interpolate(image, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as img:
        decoded = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1


def degrade(hr: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """A light real-world chain: Gaussian blur, bicubic downscale, Gaussian noise, JPEG."""
    out = []
    for image in hr:
        sigma = 0.2 + 1.3 * float(torch.rand(1, generator=generator))
        radius = math.ceil(3 * sigma)
        taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma ** 2))
        taps = taps / taps.sum()
        blurred = F.conv2d(F.pad(image[:, None], [radius] * 4, mode="replicate"), taps.view(1, 1, 1, -1))
        blurred = F.conv2d(blurred, taps.view(1, 1, -1, 1))[:, 0]
        size = [round(v / scale) for v in image.shape[-2:]]
        lr = _resize(blurred[None], size)[0]
        lr = lr + torch.randn(lr.shape, generator=generator) * 0.04 * float(torch.rand(1, generator=generator))
        out.append(_jpeg(lr, 60 + int(torch.randint(36, (1,), generator=generator))))
    return torch.stack(out)


def make_pair(hr: torch.Tensor, scale: float, generator: torch.Generator, degraded: bool = False):
    """concat LR [B,3,S,S] (the LR upsampled back, clamped) and cross-attention LR [B,3,S/4,S/4],
    from HR crops [B,3,S,S] in [-1,1]: what `pipeline.prepare_condition` makes of the LR image."""
    S = hr.shape[-1]
    small = [round(S / scale)] * 2
    lr_image = degrade(hr, scale, generator) if degraded else _resize(hr, small)
    concat = _resize(lr_image, (S, S)).clamp_(-1, 1)
    lr = lr_image if tuple(small) == (S // SR_SCALE,) * 2 else _resize(lr_image, (S // SR_SCALE,) * 2)
    return concat, lr


# --- one crop through the network ------------------------------------------------------------------

class GridNeighbours:
    """Neighbour source for a whole grid of blocks in one call (every block's neighbours are in the
    call): slots gathered with one differentiable index per layer, in forward_blocks' layout."""

    def __init__(self, order: list[Block], device):
        position = {block: m for m, block in enumerate(order)}
        self.index = torch.tensor([[position[s] for s in neighbour_slots(block)] for block in order], device=device)

    def gather(self, layer, k, v):
        # k, v [M, H, T, d] -> [M, H, 4, T, d]: new tensors (the model adds the slot offsets in place).
        return k[self.index].transpose(1, 2).contiguous(), v[self.index].transpose(1, 2).contiguous()


def crop_inputs(config: InfDiTConfig, z: torch.Tensor, lr: torch.Tensor, offset: tuple[int, int]):
    """BlockInputs and block order of whole crops: z [B, 6, S, S] (scaled by c_in), lr [B, 3, S/4, S/4];
    token positions start at `offset` (the paper's random starting point)."""
    B, C, S, _ = z.shape
    s, t, k = config.block_size, config.block_tokens, config.lr_block_tokens
    n = S // s
    order = [Block(b, i, j) for b in range(B) for i in range(n) for j in range(n)]
    blocks = z.view(B, C, n, s, n, s).permute(0, 2, 4, 1, 3, 5).reshape(B * n * n, C, s, s)
    step = k * LR_PATCH  # one block in LR pixels; a window spans 3 of them
    padded = F.pad(lr, [step] * 4)
    windows = torch.stack([padded[:, :, i * step:(i + 3) * step, j * step:(j + 3) * step]
                           for i in range(n) for j in range(n)], dim=1).flatten(0, 1)
    dev = z.device
    grid = torch.arange(n, device=dev)
    span = torch.arange(3 * k, device=dev)
    tokens = (grid[:, None] - 1) * k + span  # [n, 3k] window token index along one axis
    valid = (tokens >= 0) & (tokens < n * k)
    valid = (valid[:, None, :, None] & valid[None, :, None, :]).reshape(n * n, 3 * k, 3 * k).repeat(B, 1, 1)
    in_block = torch.arange(t, device=dev)
    along = grid[:, None] * t + in_block  # [n, t]
    rows = (along[:, None, :, None] + offset[0]).expand(n, n, t, t).reshape(n * n, t * t).repeat(B, 1)
    cols = (along[None, :, None, :] + offset[1]).expand(n, n, t, t).reshape(n * n, t * t).repeat(B, 1)
    batch_index = torch.arange(B, device=dev).repeat_interleave(n * n)
    return BlockInputs(z=blocks, lr_windows=windows, lr_valid=valid, rows=rows, cols=cols,
                       batch_index=batch_index), order


def denoise_crops(model: InfDiT, x, sigma, concat_lr, lr, clip_vector, offset=(0, 0),
                  checkpoint_layers: bool = False) -> torch.Tensor:
    """D(x; sigma) of whole crops [B, 3, S, S] with gradients: the sampler's denoiser math
    (float32 preconditioning, c_in on both halves of the input) in one call over every block."""
    B, _, S, _ = x.shape
    c_skip, c_out, c_in, c_noise = (c.view(B, 1, 1, 1) for c in edm_precondition(sigma))
    cond = model.conditioning(c_noise.flatten(), clip_vector)
    inputs, order = crop_inputs(model.config, torch.cat([x, concat_lr], dim=1) * c_in, lr, offset)
    net = model.forward_blocks(inputs, cond, GridNeighbours(order, x.device), checkpoint_layers=checkpoint_layers)
    n, s = S // model.config.block_size, model.config.block_size
    net = net.float().view(B, n, n, -1, s, s).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, S, S)
    return c_skip * x + c_out * net


def edm_loss(model: InfDiT, hr, concat_lr, lr, clip_vector, generator: torch.Generator,
             settings: TrainSettings, checkpoint_layers: bool = False, autocast: bool = False) -> torch.Tensor:
    """The weighted EDM loss of one batch; every random draw from `generator` (on the CPU)."""
    B, dev = hr.shape[0], hr.device
    sigma = (torch.randn(B, generator=generator) * settings.p_std + settings.p_mean).exp().to(dev)
    eps = torch.randn(hr.shape, generator=generator).to(dev)
    tokens = hr.shape[-1] // model.config.patch_size
    room = max(1, model.config.rope_size - tokens + 1)
    offset = tuple(int(v) for v in torch.randint(room, (2,), generator=generator))
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        denoised = denoise_crops(model, hr + sigma.view(B, 1, 1, 1) * eps, sigma, concat_lr, lr, clip_vector,
                                 offset, checkpoint_layers)
    return (weight * (denoised.float() - hr).pow(2).mean(dim=(1, 2, 3))).mean()


# --- checkpoints -----------------------------------------------------------------------------------

def official_state_dict(model: InfDiT) -> dict[str, torch.Tensor]:
    """The weights under the official keys (RoPE tables left out: they are regenerated), float32."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(ROPE_PREFIX)}


def _atomic_save(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_model_file(model: InfDiT, path: str, metadata: dict[str, str], dtype: Optional[torch.dtype] = None) -> None:
    """The model in the official state-dict layout as safetensors (loadable by load_model strictly)."""
    sd = official_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    meta = {"format": "infdit", "config": json.dumps(model.config.to_dict()), **metadata}
    _atomic_save(sd, path, meta)


# --- the loop --------------------------------------------------------------------------------------

@dataclass
class RunState:
    model: InfDiT
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: dict[str, torch.nn.Parameter]
    generator: torch.Generator
    step: int = 0
    history: list = field(default_factory=list)  # (step, loss, seconds) per logged step


def _trainable(model: InfDiT, settings: TrainSettings) -> dict[str, torch.nn.Parameter]:
    if settings.lora_rank > 0:
        from .lora import attach_lora

        generator = torch.Generator().manual_seed(settings.seed + 1)
        return attach_lora(model, settings.lora_rank, settings.lora_alpha, generator=generator)
    model.requires_grad_(True)
    # Read by nothing in the forward pass, so they get no gradient: leave them out.
    return {k: p for k, p in model.named_parameters()
            if not k.startswith(("transformer.position_embeddings.", "mixins.adaln_layer.k_layer_norm."))}


def _learning_rate(settings: TrainSettings, step: int) -> float:
    return settings.lr * min(1.0, (step + 1) / max(1, settings.warmup))


def _ema_update(ema: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter], decay: float, step: int):
    # The usual warm-up of the decay, so early averages are not dominated by the random init.
    d = min(decay, (1 + step) / (10 + step))
    for name, p in trainable.items():
        ema[name].mul_(d).add_(p.detach(), alpha=1 - d)


def _state_tensors(run: RunState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in run.trainable.items()}
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in run.ema.items()})
    names = list(run.trainable)
    opt = run.optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{names[index]}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng"] = run.generator.get_state()
    return tensors, {"step": str(run.step), "param_groups": json.dumps(opt["param_groups"])}


def _load_state(run: RunState, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = list(run.trainable)
    expected = {f"param.{k}" for k in names}
    if not expected <= set(tensors):
        missing = sorted(expected - set(tensors))[:5]
        raise TrainingError(f"{path} is not a training state of this run's model (missing {', '.join(missing)}); "
                            "start a new output folder or drop --resume")
    with torch.no_grad():
        for k, p in run.trainable.items():
            p.copy_(tensors[f"param.{k}"])
            run.ema[k].copy_(tensors[f"ema.{k}"])
    state = {}
    for index, name in enumerate(names):
        entry = {key.rsplit(".", 1)[1]: v for key, v in tensors.items()
                 if key.startswith(f"opt.{name}.") and key.count(".") == name.count(".") + 2}
        if entry:
            state[index] = entry
    run.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    run.generator.set_state(tensors["rng"])
    run.step = int(meta["step"])


def _model_metadata(settings: TrainSettings, step: int, clip: str) -> dict[str, str]:
    return {"trained_steps": str(step), "clip": clip, "train_settings": json.dumps(asdict(settings))}


class _Progress:
    """One status line: step, loss (smoothed), images/s, ETA."""

    def __init__(self, total: int, batch: int, start: int, stream=sys.stderr):
        self.total, self.batch, self.start, self.stream = total, batch, start, stream
        self.t0 = time.monotonic()
        self.smooth = None

    def __call__(self, step: int, loss: float):
        self.smooth = loss if self.smooth is None else 0.95 * self.smooth + 0.05 * loss
        elapsed = time.monotonic() - self.t0
        rate = (step - self.start) * self.batch / max(elapsed, 1e-9)
        eta = (self.total - step) * self.batch / max(rate, 1e-9)
        self.stream.write(f"\rstep {step}/{self.total} loss {self.smooth:.4f} {rate:.1f} img/s "
                          f"ETA {int(eta // 60)}m{int(eta % 60):02d}s ")
        if step >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _write_log(path: str, history: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "seconds"])
        writer.writerows(history)
    os.replace(tmp, path)


def _read_log(path: str, up_to: int) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(int(s), float(loss), float(t)) for s, loss, t in rows if int(s) <= up_to]


def plot_loss(history: list, path: str, width: int = 640, height: int = 360) -> None:
    """A PNG of the loss (log scale, raw and smoothed) over the steps, drawn with PIL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(history) >= 2:
        steps = np.array([h[0] for h in history], dtype=np.float64)
        logs = np.log10(np.maximum([h[1] for h in history], 1e-12))
        smooth = np.copy(logs)
        for i in range(1, len(smooth)):
            smooth[i] = 0.9 * smooth[i - 1] + 0.1 * logs[i]
        lo, hi = float(np.floor(logs.min() * 2) / 2), float(np.ceil(logs.max() * 2) / 2)
        hi = hi if hi > lo else lo + 0.5

        def xy(s, v):
            return (left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left),
                    bottom - (v - lo) / (hi - lo) * (bottom - top))
        draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=(170, 190, 230), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        tick = lo
        while tick <= hi + 1e-9:
            y = xy(steps[0], tick)[1]
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((4, y - 6), f"{10 ** tick:.3g}", fill="black")
            tick += 0.5
        draw.text((left, bottom + 6), f"{int(steps[0])}", fill="black")
        draw.text((right - 40, bottom + 6), f"{int(steps[-1])}", fill="black")
    draw.text((left + 8, top + 6), "training loss (EDM-weighted MSE, log scale) vs step", fill="black")
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


def train(settings: TrainSettings, *, config: Optional[InfDiTConfig] = None, init: Optional[str] = None,
          clip=None, device="cpu", resume: bool = False, progress: bool = True,
          on_step: Optional[Callable[[int, float], None]] = None) -> InfDiT:
    """Train (from `config`, random init) or fine-tune (from the checkpoint `init`) and write, in
    settings.output: model.safetensors (EMA weights, official layout; LoRA runs: lora.safetensors),
    train_state.safetensors (everything `resume` needs), loss.csv and loss.png. `clip` is a
    ClipEmbedder (or None: the zero vector). Returns the trained model (raw weights)."""
    device = torch.device(device)
    if (config is None) == (init is None):
        raise TrainingError("give either a config (train from scratch) or a checkpoint to start from, not both")
    if settings.lora_rank > 0 and init is None:
        raise TrainingError("--lora trains adapters on a loaded checkpoint: give --init CHECKPOINT")
    if init is not None:
        sd, metadata = read_state_dict(init)
        model = build_model(sd, dtype=torch.float32, device=device, name=init, metadata=metadata)
        del sd
    else:
        generator = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = initialise(InfDiT(config), generator).to(device)
    config = model.config
    crop = settings.resolved_crop(config)
    data = PhotoCrops(settings.data, crop)
    os.makedirs(settings.output, exist_ok=True)
    trainable = _trainable(model, settings)
    model.train()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay, eps=1e-8)
    run = RunState(model, {k: p.detach().clone() for k, p in trainable.items()}, optimizer, trainable,
                   torch.Generator().manual_seed(settings.seed))
    state_path = os.path.join(settings.output, STATE_FILE)
    if resume:
        if not os.path.isfile(state_path):
            raise TrainingError(f"--resume: no {STATE_FILE} in {settings.output}; drop --resume to start a new run")
        _load_state(run, state_path)
        run.history = _read_log(os.path.join(settings.output, LOSS_CSV), run.step)
    cuda = device.type == "cuda"
    checkpoint_layers = cuda if settings.checkpointing is None else settings.checkpointing
    autocast = cuda if settings.autocast is None else settings.autocast
    clip_name = "none" if clip is None else "given"
    bar = _Progress(settings.steps, settings.batch, run.step) if progress else None
    started = time.monotonic()
    while run.step < settings.steps:
        hr = data.sample(settings.batch, run.generator)
        concat, lr = make_pair(hr, settings.scale, run.generator, settings.degrade)
        vectors = torch.zeros(settings.batch, config.vector_dim)
        if clip is not None:
            with torch.no_grad():
                vectors = clip.embed_image(((lr + 1) / 2).to(clip.device, clip.dtype)).float().cpu()
        keep = torch.rand(settings.batch, generator=run.generator) >= settings.clip_dropout
        vectors = vectors * keep[:, None]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, run.step)
        loss = edm_loss(model, hr.to(device), concat.to(device), lr.to(device), vectors.to(device), run.generator,
                        settings, checkpoint_layers, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), settings.grad_clip)
        optimizer.step()
        _ema_update(run.ema, trainable, settings.ema, run.step)
        run.step += 1
        value = loss.detach().item()
        if run.step % settings.log_every == 0 or run.step == settings.steps:
            run.history.append((run.step, value, round(time.monotonic() - started, 3)))
        if bar is not None:
            bar(run.step, value)
        if on_step is not None:
            on_step(run.step, value)
        if run.step % settings.save_every == 0 or run.step == settings.steps:
            _save_run(run, settings, clip_name)
    return model


def _save_run(run: RunState, settings: TrainSettings, clip_name: str) -> None:
    out = settings.output
    tensors, meta = _state_tensors(run)
    _atomic_save(tensors, os.path.join(out, STATE_FILE), meta)
    metadata = _model_metadata(settings, run.step, clip_name)
    if settings.lora_rank > 0:
        from .lora import save_lora

        save_lora(os.path.join(out, "lora.safetensors"), {k: v.clone() for k, v in run.ema.items()},
                  rank=settings.lora_rank, alpha=settings.lora_alpha, config=run.model.config)
    else:
        with torch.no_grad():
            raw = {k: p.detach().clone() for k, p in run.trainable.items()}
            for k, p in run.trainable.items():
                p.copy_(run.ema[k])
            save_model_file(run.model, os.path.join(out, MODEL_FILE), metadata)
            for k, p in run.trainable.items():
                p.copy_(raw[k])
    _write_log(os.path.join(out, LOSS_CSV), run.history)
    plot_loss(run.history, os.path.join(out, LOSS_PNG))


def initialise(model: InfDiT, generator: torch.Generator) -> InfDiT:
    """A fresh model ready to train: DiT-style init (Xavier linears, zero-initialised output layer
    and adaLN modulations so every layer starts near the identity) from `generator`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.endswith("weight"):
                fan_out, fan_in = p.shape[0], p[0].numel()
                bound = math.sqrt(6 / (fan_in + fan_out))
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            elif name.endswith("bias"):
                p.zero_()
        adaln = model.mixins.adaln_layer
        for m in list(adaln.adaLN_modulations) + [model.mixins.final_layer.adaLN_modulation]:
            m[1].weight.zero_()
            m[1].bias.zero_()
        model.mixins.final_layer.linear.weight.zero_()
        model.cond_embed.map_vector[2].weight.zero_()  # zero-initialised at training start (spec 3.1)
        for ln in list(adaln.q_layer_norm) + list(adaln.k_layer_norm) + [
                adaln.post_cross_attention_layernorm, adaln.cross_q_ln, adaln.cross_k_ln]:
            ln.weight.fill_(1)
            ln.bias.zero_()
        adaln.re_pos_embed.zero_()
        adaln.lr_query_position_embedding.normal_(0, 0.02, generator=generator)
        adaln.lr_key_position_embedding.normal_(0, 0.02, generator=generator)
        model.transformer.position_embeddings.weight.normal_(0, 0.02, generator=generator)
    return model


def config_from_args(layers: int, width: int, heads: int, block_size: int) -> InfDiTConfig:
    try:
        return InfDiTConfig(num_layers=layers, hidden_size=width, num_heads=heads, block_size=block_size)
    except ValueError as e:
        raise TrainingError(f"model configuration: {e}") from None

