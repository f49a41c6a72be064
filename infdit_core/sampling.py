"""The official EDM sampler (spec 5): Karras schedule, deterministic Heun, last step Euler; and
faster samplers on the same schedule (Euler, DPM-Solver++(2M), UniPC-2, output forecasting).

Samplers are small functions over a denoiser callable D(x, sigma). The sampler state (x, the
derivatives, the sigmas) is float32 even when the model runs in bf16/fp16: a deliberate
improvement over the official all-bf16 loop, which rounds sigma itself (40 -> 30.125 ...).

Every sampler integrates EDM's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma with D
as the data prediction, and has the signature of `sample_heun` plus `history`: multistep samplers
carry earlier estimates from step to step, and hand them to `on_step_end(i, x, history)` so a
checkpoint holds the whole state (a resumed run continues with `start = i + 1, history`). History
tensors are canvases shaped like x and are never written to after they are handed over.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .strips import Block, StripSchedule

SIGMA_MIN = 0.002
SIGMA_MAX = 40.0
RHO = 7.0
DEFAULT_STEPS = 20

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
History = dict  # name -> canvas [B, C, H, W] shaped like x
StepEnd = Callable[[int, torch.Tensor, History], None]


def karras_sigmas(steps: int = DEFAULT_STEPS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """steps noise levels from sigma_max down to sigma_min, then a final 0 (float32).

    The ramp comes from linspace (as the official discretiser builds it): an i/(n-1) loop can
    differ by one ulp."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_state(concat_lr: torch.Tensor, noise: torch.Tensor, sigma_max: torch.Tensor,
                  lr_noise_init: bool = True) -> torch.Tensor:
    """x_T = upsampled LR + sigma_max * eps (official: it fights colour shift), or sigma_max * eps."""
    x = noise.to(torch.float32) * sigma_max
    return x + concat_lr.to(torch.float32) if lr_noise_init else x


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Heun step (no churn); plain Euler when sigma_next is 0.

    x + h * d, then x + h * (d + d_next) / 2, with the operations of those formulas in their order
    (the same bits), but in place where a canvas is no longer needed: beside x and the denoiser's
    estimate the step holds two canvases (d and the Euler point, which becomes d_next and then the
    result) instead of four. x is never written to."""
    h = sigma_next - sigma
    d = x.sub(denoiser(x, sigma)).div_(sigma)
    x_euler = d.mul(h).add_(x)
    if sigma_next == 0:
        return x_euler
    d_next = x_euler.sub_(denoiser(x_euler, sigma_next)).div_(sigma_next)
    return d_next.add_(d).mul_(h).div_(2).add_(x)


def network_calls(steps: int, sampler: str = "heun") -> int:
    """Denoiser evaluations of `sampler` over `steps` steps (Heun: two per step, one on the last)."""
    return get_sampler(sampler).calls(steps)


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                on_step: Optional[Callable[[int], None]] = None, start: int = 0,
                on_step_end: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Integrate from sigmas[start] to sigmas[-1] = 0. `on_step(i)` is called before step i,
    `on_step_end(i, x)` after it with the new state (what a resumed run starts step i + 1 from)."""
    for i in range(start, len(sigmas) - 1):
        if on_step is not None:
            on_step(i)
        x = heun_step(denoiser, x, sigmas[i], sigmas[i + 1])
        if on_step_end is not None:
            on_step_end(i, x)
    return x


# --- faster samplers: one network call per step ----------------------------------------------------
# Coefficients are Python floats computed from the float32 sigmas, so the canvas arithmetic stays
# float32 on whatever device x lives. Every step returns a new tensor: a state handed to
# on_step_end may still be waiting to be saved (resume.StateStore.latest).


def _floats(sigmas: torch.Tensor) -> list[float]:
    return sigmas.tolist()


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                 on_step: Optional[Callable[[int], None]] = None, start: int = 0,
                 on_step_end: Optional[StepEnd] = None, history: Optional[History] = None) -> torch.Tensor:
    """First-order Euler: x + (sigma_next - sigma) * (x - D) / sigma. No history."""
    s = _floats(sigmas)
    for i in range(start, len(s) - 1):
        if on_step is not None:
            on_step(i)
        d = x.sub(denoiser(x, sigmas[i])).div_(s[i])
        x = d.mul_(s[i + 1] - s[i]).add_(x)
        del d
        if on_step_end is not None:
            on_step_end(i, x, {})
    return x


def _lambda(sigma: float) -> float:
    """The log-SNR time of a VE (EDM) process: lambda = -log(sigma)."""
    return -math.log(sigma)


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                    on_step: Optional[Callable[[int], None]] = None, start: int = 0,
                    on_step_end: Optional[StepEnd] = None, history: Optional[History] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, k-diffusion's sample_dpmpp_2m): in lambda = -log(sigma),
    x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D', where D' extrapolates the data
    estimate linearly from the previous one; first order on the first step and into sigma = 0.
    History: "denoised", the previous step's estimate."""
    s = _floats(sigmas)
    old = (history or {}).get("denoised")
    for i in range(start, len(s) - 1):
        if on_step is not None:
            on_step(i)
        denoised = denoiser(x, sigmas[i])
        if s[i + 1] == 0:
            x = old = denoised.clone()  # the ODE's end point is the data estimate itself
        else:
            ratio = s[i + 1] / s[i]
            if old is None:
                x = denoised.mul(1 - ratio).add_(x, alpha=ratio)
            else:
                r = (_lambda(s[i]) - _lambda(s[i - 1])) / (_lambda(s[i + 1]) - _lambda(s[i]))
                x = denoised.mul(1 + 1 / (2 * r)).sub_(old, alpha=1 / (2 * r)).mul_(1 - ratio).add_(x, alpha=ratio)
            old = denoised.clone()  # the denoiser may write its next estimate over this one
        del denoised
        if on_step_end is not None:
            on_step_end(i, x, {"denoised": old})
    return x


# UniPC's B(h) in data prediction is bh2's expm1(-h) (diffusers' default). bh1 (B(h) = -h) lost
# 3 dB PSNR at 10 steps with the demo model on this schedule, whose first steps are long in log sigma.


def _unipc_coefficients(h: float, r1: float) -> tuple[float, float, float]:
    """(B(h), rho_0, rho_1) of UniPC-2 (bh2) in data prediction: the corrector's weights of the
    earlier difference D1 and of the new one (Zhao et al. 2023, Alg. 2; diffusers'
    multistep_uni_c_bh_update)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    b0 = h_phi_k / b_h
    b1 = (h_phi_k / hh - 0.5) * 2 / b_h
    rho0 = (b0 - b1) / (1 - r1)  # solves [[1, 1], [r1, 1]] rho = [b0, b1]
    return b_h, rho0, b0 - rho0


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                 on_step: Optional[Callable[[int], None]] = None, start: int = 0,
                 on_step_end: Optional[StepEnd] = None, history: Optional[History] = None) -> torch.Tensor:
    """UniPC with a second-order predictor (UniP-2) and corrector (UniC), bh2 variant, in data
    prediction (Zhao et al. 2023; diffusers' UniPCMultistepScheduler with predict_x0). Each call's
    estimate first corrects the point it was computed at, then predicts the next; the corrector
    reuses that estimate, so it costs no call. First order on the first step and into sigma = 0.

    The corrected point is written as the predicted one plus the difference of the two updates
    (both start from the same point and share the earlier difference), so the state between steps
    is x and the estimates m_{i-1} (history "m1") and m_{i-2} ("m2", once the predictor was of
    order 2)."""
    s = _floats(sigmas)
    history = history or {}
    m1, m2 = history.get("m1"), history.get("m2")
    for i in range(start, len(s) - 1):
        if on_step is not None:
            on_step(i)
        m0 = denoiser(x, sigmas[i]).clone()
        if s[i + 1] == 0:
            x = m0  # the predictor into sigma = 0 returns the estimate; correcting x first changes nothing
            m2, m1 = m1, m0
        else:
            if m1 is not None:  # UniC: correct the point the last step predicted, with its fresh estimate
                h = _lambda(s[i]) - _lambda(s[i - 1])
                if m2 is None:  # the last prediction was first order: rho = 1/2
                    b_h = math.expm1(-h)
                    x = m0.sub(m1).mul_(-b_h * 0.5).add_(x)
                else:
                    # x + B(h) ((1/2 - rho_0) D1 - rho_1 (m0 - m1)), D1 = (m2 - m1) / r1
                    r1 = (_lambda(s[i - 2]) - _lambda(s[i - 1])) / h
                    b_h, rho0, rho1 = _unipc_coefficients(h, r1)
                    weight = b_h * rho1
                    x = m2.sub(m1).mul_(b_h * (0.5 - rho0) / r1).add_(m0, alpha=-weight).add_(m1, alpha=weight).add_(x)
            m2 = None  # the predictor needs the last two estimates only
            # UniP: predict the next point from the estimates at sigma_i and sigma_{i-1}:
            # (sigma_next / sigma) x - phi m0 - phi / 2 * (m1 - m0) / r1, phi = B(h) = expm1(-h).
            h = _lambda(s[i + 1]) - _lambda(s[i])
            phi = math.expm1(-h)
            step = m0.mul(-phi)
            if m1 is not None:
                weight = -phi * 0.5 / ((_lambda(s[i - 1]) - _lambda(s[i])) / h)
                step.add_(m1, alpha=weight).add_(m0, alpha=-weight)
            x = step.add_(x, alpha=s[i + 1] / s[i])
            del step
            m2, m1 = m1, m0
        del m0
        if on_step_end is not None:
            on_step_end(i, x, {"m1": m1} if m2 is None else {"m1": m1, "m2": m2})
    return x


# --- output-level forecasting ---------------------------------------------------------------------


def forecast_schedule(calls: int, order: int, interval: int, last: bool = True) -> list[bool]:
    """Which of `calls` denoiser calls run the network: the first order + 1 (the polynomial needs
    them), then every `interval`-th, and the last one if `last`. That last call, at sigma_min, is
    the one step into sigma = 0: the network's share of D there is c_out ~ sigma_min, so forecasting
    it costs little."""
    first = order + 1
    computed = [k < first or (k - first + 1) % interval == 0 for k in range(calls)]
    computed[-1] = last or calls - 1 < first  # a forecast needs order + 1 computed calls before it
    return computed


def forecast_time(sigma: float) -> float:
    """The forecast's time: sigma^(1/rho), in which the Karras schedule is evenly spaced (a Taylor
    series in the step index, as TaylorSeer's). log(sigma), DPM-Solver's time, forecast worse in a
    pilot with the demo model (docs/samplers.md)."""
    return sigma ** (1 / RHO)


def extrapolate(points: Sequence[tuple[float, torch.Tensor]], t: float) -> torch.Tensor:
    """The polynomial through (t_j, E_j) evaluated at t (Lagrange form): the first/second-order
    Taylor forecast of TaylorSeer/FoCa, written with the computed estimates instead of derivatives."""
    out = None
    for j, (tj, ej) in enumerate(points):
        weight = 1.0
        for k, (tk, _) in enumerate(points):
            if k != j:
                weight *= (t - tk) / (tj - tk)
        out = ej.mul(weight) if out is None else out.add_(ej, alpha=weight)
    return out


class ForecastDenoiser:
    """A denoiser that runs the network only on the calls `computed` marks and forecasts the
    others: the polynomial of degree `order` in the calls' times through the last order + 1
    computed estimates. Only those estimates are kept (canvases: O(side) memory, no per-layer
    features).

    `call_times` are the times of the calls in order (known before the run: a function of their
    sigmas); `start_call` and `cache` resume it (cache: the kept estimates, oldest first, see
    `kept_calls`)."""

    def __init__(self, denoiser: Denoiser, call_times: Sequence[float], computed: Sequence[bool], order: int,
                 start_call: int = 0, cache: Sequence[torch.Tensor] = ()):
        self.denoiser, self.computed, self.order = denoiser, list(computed), order
        self.times = list(call_times)
        self.call = start_call
        kept = kept_calls(self.computed, order, start_call)
        if len(cache) != len(kept):
            raise ValueError(f"forecast cache holds {len(cache)} estimates, call {start_call} needs {len(kept)}")
        self.points = [(self.times[k], e) for k, e in zip(kept, cache)]

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        k = self.call
        self.call += 1
        if self.computed[k]:
            estimate = self.denoiser(x, sigma).clone()  # kept past the next network call
            self.points = (self.points + [(self.times[k], estimate)])[-(self.order + 1):]
            return estimate
        return extrapolate(self.points, self.times[k])

    def cache(self) -> list[torch.Tensor]:
        return [e for _, e in self.points]


def kept_calls(computed: Sequence[bool], order: int, start_call: int) -> list[int]:
    """The computed calls before `start_call` whose estimates a forecaster holds there."""
    return [k for k in range(start_call) if computed[k]][-(order + 1):]


# --- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: `run` has sample_euler's signature, `step_calls(steps)` says how many
    network calls each step makes (known before the run: progress, planner and resume use it),
    `canvases` how many float32 canvases it holds at its peak with the concat LR and the denoiser's
    estimate (memory.plan; measured in tests/test_sampling.py): Heun x, LR, estimate, derivative,
    Euler point; Euler x, LR, estimate, derivative (the result in place); DPM++ x, LR, estimate,
    the previous estimate, the result; UniPC two previous estimates and the corrected point more
    than Euler; forecasting adds the kept estimates (order + 1) to its base sampler's."""
    name: str
    run: Callable[..., torch.Tensor]
    step_calls: Callable[[int], list[int]]
    canvases: int
    description: str

    def calls(self, steps: int) -> int:
        return sum(self.step_calls(steps))


def _handed_over(x: torch.Tensor) -> list:
    """x in a list the callee pops: a wrapper that passed x on directly would hold the starting
    canvas for the whole run (one canvas more than the planner counts)."""
    return [x]


def _sample_heun(denoiser, x, sigmas, on_step=None, start=0, on_step_end=None, history=None):
    # The official sampler, untouched: its state is x alone.
    begin = _handed_over(x)
    del x
    return sample_heun(denoiser, begin.pop(), sigmas, on_step=on_step, start=start,
                       on_step_end=None if on_step_end is None else lambda i, x_i: on_step_end(i, x_i, {}))


def _one_call_per_step(steps: int) -> list[int]:
    return [1] * steps


def forecasting(base: Callable[..., torch.Tensor], order: int, interval: int, last: bool = True):
    """`base` (a one-call-per-step sampler) over a ForecastDenoiser: its history gains the kept
    estimates ("forecast.0" oldest, ...)."""
    def run(denoiser, x, sigmas, on_step=None, start=0, on_step_end=None, history=None):
        history = dict(history or {})
        schedule = forecast_schedule(len(sigmas) - 1, order, interval, last)
        cache = [history.pop(f"forecast.{n}") for n in range(len(kept_calls(schedule, order, start)))]
        forecaster = ForecastDenoiser(denoiser, [forecast_time(v) for v in _floats(sigmas[:-1])], schedule, order,
                                      start_call=start, cache=cache)

        def step_end(i, x_i, base_history):
            on_step_end(i, x_i, {**base_history, **{f"forecast.{n}": e for n, e in enumerate(forecaster.cache())}})
        begin = _handed_over(x)
        del x
        return base(forecaster, begin.pop(), sigmas, on_step=on_step, start=start, history=history,
                    on_step_end=None if on_step_end is None else step_end)
    return run


def _forecast_calls(order: int, interval: int, last: bool = True):
    return lambda steps: [int(c) for c in forecast_schedule(steps, order, interval, last)]


SAMPLERS = {
    "heun": Sampler("heun", _sample_heun, lambda steps: [2] * (steps - 1) + [1], 5,
                    "EDM Heun, second order, 2 calls a step (the official sampler)"),
    "euler": Sampler("euler", sample_euler, _one_call_per_step, 4, "Euler, first order, 1 call a step"),
    "dpmpp_2m": Sampler("dpmpp_2m", sample_dpmpp_2m, _one_call_per_step, 5,
                        "DPM-Solver++(2M), second-order multistep, 1 call a step"),
    "unipc": Sampler("unipc", sample_unipc, _one_call_per_step, 7,
                     "UniPC-2 (bh2) predictor-corrector, 1 call a step"),
    # Forecast settings picked in a pilot on the demo model (docs/samplers.md).
    "dpmpp_2m_forecast": Sampler(
        "dpmpp_2m_forecast", forecasting(sample_dpmpp_2m, order=1, interval=2), _forecast_calls(1, 2), 8,
        "DPM-Solver++(2M), every other call forecast (linear in the step) from the last two estimates"),
    "dpmpp_2m_forecast_end": Sampler(
        "dpmpp_2m_forecast_end", forecasting(sample_dpmpp_2m, order=2, interval=1, last=False),
        _forecast_calls(2, 1, last=False), 9,
        "DPM-Solver++(2M) whose last call (sigma_min -> 0) is forecast (quadratic in the step)"),
}


def block_noise(seed: int, block: Block, block_size: int, channels: int = 3) -> torch.Tensor:
    """eps ~ N(0, I) of one block, keyed by (seed, image, block row, block column): the same numbers
    whichever rank, device, block batch or sweep order draws them, and no process ever draws the
    whole canvas's noise."""
    digest = hashlib.sha256(f"infdit-noise:{int(seed)}:{block.b}:{block.i}:{block.j}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(channels, block_size, block_size, generator=generator, dtype=torch.float32)


def strip_noise(schedule: StripSchedule, seed: int, block_size: int, channels: int = 3) -> torch.Tensor:
    """The unit noise of a strip's canvas [B, channels, H, W] (the whole canvas for one rank)."""
    noise = torch.empty(schedule.canvas_shape(block_size, channels))
    oi, oj = schedule.origin()
    for block in schedule.order:
        i, j = (block.i - oi) * block_size, (block.j - oj) * block_size
        noise[block.b, :, i:i + block_size, j:j + block_size] = block_noise(seed, block, block_size, channels)
    return noise


def unit_noise(shape, seed: int, block_size: int) -> torch.Tensor:
    """The unit noise of a whole canvas `shape` = [B, C, H, W] (H, W multiples of block_size)."""
    B, C, H, W = shape
    return strip_noise(StripSchedule(B, H // block_size, W // block_size), seed, block_size, C)


DEFAULT_SAMPLER = "heun"
# Presets a user picks without reading papers: (sampler, steps). balanced (<= 20 network calls,
# <= 0.05 dB PSNR lost) and fast (<= 10 calls, <= 0.15 dB) are, of the samplers within those limits
# in benchmarks/quality.py --sweep with the demo model, the ones closest to the official image
# (docs/samplers.md has the table).
PRESETS = {
    "official": ("heun", DEFAULT_STEPS),  # 39 calls
    "balanced": ("dpmpp_2m_forecast", 38),  # 20 calls
    "fast": ("dpmpp_2m_forecast_end", 11),  # 10 calls
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)} "
                         f"(or a preset: {', '.join(PRESETS)})")
    return SAMPLERS[name]


def resolve_sampler(choice: str, steps: int = DEFAULT_STEPS) -> tuple[str, int]:
    """(sampler, steps) of a preset, or of an explicit sampler name with the given steps."""
    if choice in PRESETS:
        return PRESETS[choice]
    return get_sampler(choice).name, steps
