"""HiDiffusion (Zhang et al., 2024) as pure tensor functions: RAU-Net and MSW-MSA.

RAU-Net shrinks the feature maps entering the deep U-Net blocks back to about the training size
during the composition-setting first part of sampling, so a frozen SD/SDXL model stops duplicating
objects above its native size. MSW-MSA replaces global self-attention in the highest-resolution
attention level by attention inside a 2x2 grid of cyclically shifted windows.

Everything here works on plain tensors; the ComfyUI node in nodes/hidiffusion.py only wires these
functions into the model's hooks. Spec: shared/reference/hidiffusion.md.
"""
import dataclasses
import hashlib

import torch
import torch.nn.functional as F

SDXL = "sdxl"
SD = "sd"  # SD 1.x / 2.x layout

# Latent side the architecture was trained at (image px / 8).
NATIVE_LATENT = {SDXL: 128, SD: 64}
SD2_768_NATIVE_LATENT = 96

PRESET_OFFICIAL = "official"
PRESET_CONSERVATIVE = "conservative"
PRESETS = (PRESET_OFFICIAL, PRESET_CONSERVATIVE)

# The conservative preset leaves the model alone when the image is barely above native size,
# where RAU-Net has nothing to fix and only costs detail.
CONSERVATIVE_SKIP_FACTOR = 1.25


# --------------------------------------------------------------------------------------------
# RAU-Net schedule


def step_threshold(n_steps, ratio):
    """Official switching step: int(N * r) in double precision, quirks included
    (int(90 * 0.7) == 62 because 90 * 0.7 == 62.999...)."""
    return int(n_steps * ratio)


@dataclasses.dataclass(frozen=True)
class Window:
    """A phase active for start <= i < end, both given as fractions of the step count."""

    start: float
    end: float

    def contains_step(self, step, n_steps):
        return step_threshold(n_steps, self.start) <= step < step_threshold(n_steps, self.end)

    def contains_sigma(self, sigma, sigma_at):
        """Percent fallback: sigma_at maps a ratio to ComfyUI's percent_to_sigma(ratio), which is
        huge for 0 and 0 for 1, so a window starting at 0 is open at the top."""
        return sigma_at[self.end] < sigma <= sigma_at[self.start]


@dataclasses.dataclass(frozen=True)
class Phases:
    rad: bool = False  # resolution-aware downsampler (dilated stride-4 conv)
    pool: bool = False  # average-pool / bicubic-unpool around the level-1 blocks


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    rad: Window = None
    pool: Window = None

    def phases_at_step(self, step, n_steps):
        return Phases(
            rad=self.rad is not None and self.rad.contains_step(step, n_steps),
            pool=self.pool is not None and self.pool.contains_step(step, n_steps),
        )

    def phases_at_sigma(self, sigma, sigma_at):
        return Phases(
            rad=self.rad is not None and self.rad.contains_sigma(sigma, sigma_at),
            pool=self.pool is not None and self.pool.contains_sigma(sigma, sigma_at),
        )


# The official code's aggressive SDXL 2x schedule ends RAD at step int(8/50 * N).
_AGGRESSIVE_END = 8 / 50

SCHEDULES = {
    s.name: s
    for s in (
        Schedule("sd_2x", rad=Window(0.0, 0.4)),  # official key sd15_1024
        Schedule("sd_4x", rad=Window(0.0, 0.7), pool=Window(0.0, 0.3)),  # sd15_2048
        # sdxl_2048, official default for SDXL checkpoints
        Schedule("sdxl_2x_aggressive", rad=Window(0.0, _AGGRESSIVE_END), pool=Window(_AGGRESSIVE_END, 0.4)),
        # sdxl_2048 as the official code runs it for inpainting and Playground models
        Schedule("sdxl_2x", pool=Window(0.0, 0.4)),
        Schedule("sdxl_4x", rad=Window(0.0, 0.3), pool=Window(0.0, 0.7)),  # sdxl_4096
    )
}


def schedule_ratios():
    """Every ratio a schedule boundary uses (the node precomputes their sigmas)."""
    ratios = set()
    for schedule in SCHEDULES.values():
        for window in (schedule.rad, schedule.pool):
            if window is not None:
                ratios.update((window.start, window.end))
    return sorted(ratios)


def select_schedule(arch, h, w, native, preset=PRESET_OFFICIAL, aggressive=True):
    """RAU-Net schedule for a UNet input latent of h x w, or None when RAU-Net should stay off.

    The official code picks the 4x preset when the smaller side reaches 4x native size and applies
    RAU-Net even at native size; the conservative preset skips near-native sizes and uses the
    non-aggressive SDXL 2x schedule (pooling only, no RAD).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown HiDiffusion preset {preset!r}; expected one of {PRESETS}")
    if preset == PRESET_CONSERVATIVE:
        if max(h, w) <= CONSERVATIVE_SKIP_FACTOR * native:
            return None
        aggressive = False
    large = min(h, w) >= 4 * native
    if arch == SD:
        return SCHEDULES["sd_4x" if large else "sd_2x"]
    if arch == SDXL:
        if large:
            return SCHEDULES["sdxl_4x"]
        return SCHEDULES["sdxl_2x_aggressive" if aggressive else "sdxl_2x"]
    raise ValueError(f"unknown architecture {arch!r}")


def resolve_step(sample_sigmas, sigma, rel_tol=1e-5):
    """(step index, step count) of a model call at `sigma` within the executed schedule.

    sample_sigmas is the sampler's full schedule including its final value, so N = len - 1. The
    step is the last schedule point at or above sigma: intermediate evaluations (dpm_2, dpmpp_sde)
    belong to the step they sit in, a Heun corrector sitting on the next point counts as the next
    step. Counting calls instead would break when cond and uncond run as separate calls.
    Returns None when the schedule is missing or not monotone (restart sampling); callers then
    fall back to sigma-based timing.
    """
    if sample_sigmas is None:
        return None
    sigmas = [float(s) for s in torch.as_tensor(sample_sigmas).flatten()]
    n_steps = len(sigmas) - 1
    if n_steps < 1 or any(a < b for a, b in zip(sigmas, sigmas[1:])):
        return None
    threshold = float(sigma) * (1.0 - rel_tol)
    step = 0
    for j in range(n_steps):
        if sigmas[j] >= threshold:
            step = j
    return step, n_steps


def current_sigma(sigmas):
    """The sigma of this model call: ComfyUI passes one per batch item, equal in normal sampling."""
    return float(torch.as_tensor(sigmas).max())


# --------------------------------------------------------------------------------------------
# RAU-Net operators


def rad_subsample(h):
    """Even-row/even-column subsample that turns the following stride-2/pad-1 3x3 Downsample conv
    into the official stride-4/pad-2/dilation-2 conv with the same weights (output ceil(H/4))."""
    return h[:, :, 0::2, 0::2]


def pool(h):
    """2x2 average pool, ceil mode: edge windows average only the cells that exist."""
    return F.avg_pool2d(h, kernel_size=2, stride=2, ceil_mode=True)


def unpool(h, size):
    """Bicubic resize back to the exact remembered (H, W) of the matching skip."""
    return F.interpolate(h, size=tuple(size), mode="bicubic", align_corners=False)


# --------------------------------------------------------------------------------------------
# MSW-MSA


def window_size(height, width, grid=(2, 2)):
    """Window extent for a grid of windows (officially always 2x2): ceil-sized, so uneven maps get
    smaller last windows instead of being resized."""
    return -(-height // grid[0]), -(-width // grid[1])


def shift_for(height, width, k, grid=(2, 2)):
    """Official shift for draw k in {0, 1, 2, 3}: k quarter-windows along each axis."""
    wh, ww = window_size(height, width, grid)
    return k * (wh // 4), k * (ww // 4)


def shift_index(seed, step, block, block_index):
    """Deterministic draw k in {0..3} for one transformer-block call.

    The official code draws from the global RNG on every call; deriving it from
    (seed, step, block, block_index) keeps reruns identical, gives cond and uncond the same shift
    even when evaluated separately, and leaves the global RNG untouched. sha256 rather than
    hash() because Python randomises string hashes per process.
    """
    key = f"{seed}:{step}:{block[0]}:{block[1]}:{block_index}".encode()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return int(torch.randint(0, 4, (1,), generator=generator))


def _window_slices(height, width, grid):
    """Row-major (row slice, column slice) of each non-empty window."""
    wh, ww = window_size(height, width, grid)
    rows = [slice(i * wh, min((i + 1) * wh, height)) for i in range(grid[0]) if i * wh < height]
    cols = [slice(j * ww, min((j + 1) * ww, width)) for j in range(grid[1]) if j * ww < width]
    return [(r, c) for r in rows for c in cols]


def window_partition(x, height, width, shift, grid=(2, 2)):
    """Roll B x (H*W) x C tokens by -shift and cut them into windows.

    Returns a list of (group tensor, window slices): windows of equal shape are stacked along the
    batch (B * count, tokens, C), batch-major, so an uneven 2x2 grid needs at most four groups and no
    resampling.
    """
    batch, tokens, channels = x.shape
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens do not form a {height}x{width} grid")
    rolled = torch.roll(x.reshape(batch, height, width, channels), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    groups = {}
    for rows, cols in _window_slices(height, width, grid):
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        groups.setdefault(shape, []).append((rows, cols))
    partitions = []
    for shape, slices in groups.items():
        windows = torch.stack([rolled[:, r, c, :].reshape(batch, shape[0] * shape[1], channels) for r, c in slices], 1)
        partitions.append((windows.reshape(batch * len(slices), shape[0] * shape[1], channels), slices))
    return partitions


def window_merge(partitions, batch, height, width, shift):
    """Inverse of window_partition for (possibly transformed) group tensors."""
    first = partitions[0][0]
    channels = first.shape[-1]
    rolled = first.new_empty(batch, height, width, channels)
    for windows, slices in partitions:
        windows = windows.reshape(batch, len(slices), -1, channels)
        for index, (rows, cols) in enumerate(slices):
            shape = (batch, rows.stop - rows.start, cols.stop - cols.start, channels)
            rolled[:, rows, cols, :] = windows[:, index].reshape(shape)
    return torch.roll(rolled, shifts=shift, dims=(1, 2)).reshape(batch, height * width, channels)


def windowed_attention(q, k, v, height, width, shift, attention, grid=(2, 2)):
    """Shifted-window self-attention over projected q, k, v (each B x H*W x heads*dim_head).

    `attention(q, k, v)` is ordinary multi-head attention on B' x N' x C tensors; it runs once per
    group of equal-shape windows. No mask across the wrapped-around border, as in the official code.
    """
    parts = [window_partition(t, height, width, shift, grid) for t in (q, k, v)]
    outputs = [
        (attention(qw, kw, vw), slices)
        for (qw, slices), (kw, _), (vw, _) in zip(*parts)
    ]
    return window_merge(outputs, q.shape[0], height, width, shift)
