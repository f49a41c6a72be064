"""The samplers (sampling.SAMPLERS): their order on an analytic ODE, their network-call counts and
canvases, the forecaster, presets, resume and the per-image noise key."""
import hashlib
import logging
import math
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import condition
from infdit_core import load_model, sample
from infdit_core import memory, sampling
from infdit_core.pipeline import Resume
from infdit_core.resume import StateStore, job_key
from infdit_core.sampling import (PRESETS, SAMPLERS, ForecastDenoiser, extrapolate, forecast_schedule, karras_sigmas,
                                  network_calls, resolve_sampler, sample_heun, strip_noise)
from infdit_core.strips import StripSchedule

MULTISTEP = ["dpmpp_2m", "unipc", "dpmpp_2m_forecast", "dpmpp_2m_forecast_end"]


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


# --- order on an analytic ODE -------------------------------------------------------------------
# Data x0 ~ N(MU, S2) per pixel: D(x, sigma) = MU + S2 / (S2 + sigma^2) (x - MU) exactly, and the
# probability-flow ODE carries x(sigma_max) to MU + (x - MU) sqrt(S2 + sigma^2) / sqrt(S2 + sigma_max^2).

MU, S2 = 0.3, 0.25


def gaussian_denoiser(x, sigma):
    return MU + S2 / (S2 + float(sigma) ** 2) * (x - MU)


def ode_error(sampler: str, steps: int) -> float:
    """Max error at sigma_min of `steps` Karras steps in float64 (the step into sigma = 0 left out:
    it is one first-order step of length sigma_min for every sampler)."""
    sigmas = karras_sigmas(steps).double()[:-1]
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    exact = MU + (x - MU) * math.sqrt(S2 + float(sigmas[-1]) ** 2) / math.sqrt(S2 + float(sigmas[0]) ** 2)
    return (SAMPLERS[sampler].run(gaussian_denoiser, x.clone(), sigmas) - exact).abs().max().item()


# The expected order: UniPC's corrector raises its second-order predictor by one (Zhao et al. 2023,
# Thm 3.3); forecasting every other estimate linearly keeps DPM-Solver++(2M)'s second order.
ORDERS = {"heun": 2, "euler": 1, "dpmpp_2m": 2, "unipc": 3, "dpmpp_2m_forecast": 2, "dpmpp_2m_forecast_end": 2}


def test_every_sampler_has_an_order_test():
    assert set(ORDERS) == set(SAMPLERS)


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_error_falls_by_two_to_the_order_when_steps_double(sampler):
    errors = [ode_error(sampler, n) for n in (32, 64, 128)]
    observed = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    # Tolerance: the observed order within [order - 0.25, order + 0.5] on both doublings (measured:
    # Euler 0.99/1.00, Heun 2.09/2.05, DPM++ 2.14/2.07, UniPC 3.11/3.06, forecast 2.34/2.17, 2.12/2.07).
    order = ORDERS[sampler]
    assert all(order - 0.25 <= o <= order + 0.5 for o in observed), (sampler, errors, observed)


# --- the official sampler is untouched ------------------------------------------------------------


def test_heun_through_the_registry_is_sample_heun_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 8, 8, generator=g) * 40
    weights = torch.randn(1, 3, 8, 8, generator=g)

    def denoiser(x, sigma):
        return torch.tanh(x * weights / (1 + sigma))

    sigmas = karras_sigmas(6)
    ends = []
    out = SAMPLERS["heun"].run(denoiser, x, sigmas, on_step_end=lambda i, x_i, h: ends.append((i, h)))
    assert torch.equal(out, sample_heun(denoiser, x, sigmas))
    assert ends == [(i, {}) for i in range(6)]  # its state is x alone
    assert sampling.DEFAULT_SAMPLER == "heun" and PRESETS["official"] == ("heun", 20) and network_calls(20) == 39


# --- network calls known before the run ----------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 12])
def test_network_calls_are_known_before_the_run(sampler, steps):
    calls, step = [], [None]

    def denoiser(x, sigma):
        calls.append(step[0])
        return x * 0.5

    SAMPLERS[sampler].run(denoiser, torch.ones(1, 3, 4, 4), karras_sigmas(steps),
                          on_step=lambda i: step.__setitem__(0, i))
    assert len(calls) == network_calls(steps, sampler) == SAMPLERS[sampler].calls(steps)
    assert [calls.count(i) for i in range(steps)] == SAMPLERS[sampler].step_calls(steps)


def test_presets_fit_their_call_budgets():
    assert set(PRESETS) == {"official", "balanced", "fast"}
    calls = {name: network_calls(steps, sampler) for name, (sampler, steps) in PRESETS.items()}
    assert calls["official"] == 39 and calls["balanced"] <= 20 and calls["fast"] <= 10
    assert resolve_sampler("fast", 99) == PRESETS["fast"]  # a preset brings its own steps
    assert resolve_sampler("unipc", 7) == ("unipc", 7)
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*or a preset: official, balanced, fast"):
        resolve_sampler("nope")


# --- the forecaster --------------------------------------------------------------------------------


def test_forecast_schedule():
    assert forecast_schedule(8, 1, 2) == [True, True, False, True, False, True, False, True]
    assert forecast_schedule(6, 2, 1, last=False) == [True] * 5 + [False]
    assert forecast_schedule(3, 2, 1, last=False) == [True] * 3  # too few calls before the last to forecast it


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_is_exact_for_a_polynomial_estimate_and_counts_real_calls(order):
    # An estimate that is a polynomial of degree `order` in the time: the forecast reproduces it.
    g = torch.Generator().manual_seed(order)
    coefficients = [torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(order + 1)]
    real = []

    def denoiser(x, t):
        real.append(t)
        return sum(c * t ** n for n, c in enumerate(coefficients))

    times = [0.1 * k + 0.05 * k * k for k in range(9)]
    computed = forecast_schedule(9, order, 3)
    forecaster = ForecastDenoiser(denoiser, times, computed, order)
    for t in times:
        torch.testing.assert_close(forecaster(None, t), denoiser(None, t), rtol=1e-9, atol=1e-9)
        real.pop()  # the reference evaluation above is not the forecaster's
    assert len(real) == sum(computed) < 9
    assert len(forecaster.cache()) == order + 1  # what it keeps: order + 1 canvases, nothing per layer


def test_extrapolate_is_lagrange():
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    assert torch.equal(extrapolate([(0.0, a), (1.0, b)], 2.0), torch.tensor([5.0]))


# --- canvases: what the planner counts ------------------------------------------------------------


class LiveCanvases(TorchDispatchMode):
    """Peak count of canvas-sized storages alive at once, over every op run inside the mode: the
    ones created there and the ones registered with `track` (an op's output that shares memory
    with one of its inputs, a view or an in-place result, is not new)."""

    def __init__(self, canvas_bytes: int):
        super().__init__()
        self.canvas_bytes, self.alive, self.peak = canvas_bytes, {}, 0

    def track(self, t: torch.Tensor):
        storage = t.untyped_storage()
        known = self.alive.get(storage.data_ptr())
        if known is None or torch.UntypedStorage._expired(known):  # new, or new memory at a freed address
            self.alive[storage.data_ptr()] = storage._weak_ref()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs \
                    and t.untyped_storage().nbytes() >= self.canvas_bytes:
                self.track(t)
        self.alive = {k: v for k, v in self.alive.items() if not torch.UntypedStorage._expired(v)}
        self.peak = max(self.peak, len(self.alive))
        return out


class ReusingDenoiser:
    """Writes every estimate into one buffer, as BlockSweepDenoiser(reuse_output=True) does, with
    no canvas-sized temporaries of its own."""

    def __init__(self, like):
        self.buffer = torch.empty_like(like)

    def __call__(self, x, sigma):
        return torch.mul(x, 0.5, out=self.buffer).add_(float(sigma) * 1e-3)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_holds_the_canvases_the_planner_counts(sampler):
    # The peak over every operation of a run (the network calls and the arithmetic between them):
    # x, the denoiser's estimate and what the sampler allocates, plus the concat LR the pipeline
    # holds beside them: Sampler.canvases, which memory.plan counts.
    x = torch.randn(1, 3, 64, 96)
    denoiser = ReusingDenoiser(x)
    with LiveCanvases(x.numel() * 4) as live:
        live.track(x)
        live.track(denoiser.buffer)
        begin = [x]
        del x
        SAMPLERS[sampler].run(denoiser, begin.pop(), karras_sigmas(6))
    assert live.peak + 1 == SAMPLERS[sampler].canvases, live.peak + 1


def test_planner_counts_the_samplers_canvases(model):
    config = model.config
    five = memory.plan(config, 256, 256, 4, torch.float32)
    seven = memory.plan(config, 256, 256, 4, torch.float32, canvases=7)
    assert five.canvases == memory.plan(config, 256, 256, 4, torch.float32, canvases=memory.CANVASES).canvases
    assert seven.canvases - five.canvases == 2 * 3 * 256 * 256 * 4
    budget = memory.plan(config, 256, 256, 8, torch.float32).working
    assert memory.choose_block_batch(config, 256, 256, torch.float32, budget) == 8
    assert memory.choose_block_batch(config, 256, 256, torch.float32, budget, canvases=8) < 8


# --- resume, with the history a multistep sampler carries -----------------------------------------


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("interval", [0, 60])
@pytest.mark.parametrize("sampler", MULTISTEP)
def test_interrupted_run_resumes_bit_for_bit(model, tmp_path, caplog, sampler, interval):
    steps, k = 6, 3  # interrupted in step 3: steps 0 .. 2 finished (the multistep history is full)
    case = dict(condition(1, 2, 3, seed=4), steps=steps, sampler=sampler, seed=5, block_batch=2)
    reference = sample(model, **case)
    resume = Resume(str(tmp_path), interval)

    def cancel(step, *_):
        if step == k:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(model, **case, callback=cancel, resume=resume)
    assert os.listdir(tmp_path), "the interrupt left a checkpoint"
    caplog.set_level(logging.INFO, logger="infdit")
    progress = []
    out = sample(model, **case, resume=resume, callback=lambda step, steps, done, total, p: progress.append(done))
    assert f"resuming from step {k} of {steps}" in caplog.text
    assert torch.equal(out, reference)
    # The progress starts where the finished steps' real network calls end (6 blocks a call).
    assert progress[0] == sum(SAMPLERS[sampler].step_calls(steps)[:k]) * 6
    assert progress[-1] == network_calls(steps, sampler) * 6
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "dpmpp_2m_forecast_end"])
def test_the_last_step_of_a_multistep_sampler_is_checkpointed(model, tmp_path, monkeypatch, sampler):
    """After the step into sigma = 0 a multistep sampler's x is its last estimate (one memory under
    two names in the checkpoint): it is still saved, so a crash before the clean-up loses nothing and
    the rerun returns the result without a network call."""
    steps = 4
    case = dict(condition(1, 2, 3, seed=4), steps=steps, sampler=sampler, seed=5, block_batch=2)
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(StateStore, "finish", lambda self: None)  # the crash: nothing is cleaned up
        reference = sample(model, **case, resume=Resume(str(tmp_path), 0))
    assert not [w for w in caught if "could not save" in str(w.message)]
    progress = []
    out = sample(model, **case, resume=Resume(str(tmp_path), 0),
                 callback=lambda step, steps, done, total, p: progress.append((done, total)))
    assert torch.equal(out, reference)
    assert progress and all(done == total == network_calls(steps, sampler) * 6 for done, total in progress)


def test_a_checkpoint_of_another_sampler_is_another_job(model, tmp_path):
    inputs = condition(1, 2, 2, seed=1)
    keys = {s: job_key(model, **inputs, steps=6, seed=0, noise=None, lr_noise_init=True, sampler=s) for s in SAMPLERS}
    assert len(set(keys.values())) == len(SAMPLERS)
    # The official sampler keeps the keys its checkpoints had before samplers were selectable.
    assert keys["heun"] == job_key(model, **inputs, steps=6, seed=0, noise=None, lr_noise_init=True)


# --- offload -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", MULTISTEP + ["euler"])
def test_offloaded_runs_equal_the_plain_run(model, sampler):
    from infdit_core.offload import Placement

    common = dict(condition(1, 2, 3, seed=6), steps=5, sampler=sampler, seed=2, block_batch=1)
    reference = sample(model, offload="off", **common)
    for offload in ["canvas", "all", Placement.for_mode("all", "cpu", 0)]:
        assert torch.equal(sample(model, offload=offload, **common), reference), (sampler, offload)


# --- noise keyed per image and block ---------------------------------------------------------------


def test_equal_images_in_one_batch_get_different_noise(model):
    one = condition(1, 2, 2, seed=8)
    twice = {k: torch.cat([v, v]) for k, v in one.items()}
    noise = strip_noise(StripSchedule(2, 2, 2), seed=3, block_size=32)
    assert not torch.equal(noise[0], noise[1])
    assert (noise[0] - noise[1]).abs().mean() > 0.5  # independent draws, not a shifted copy
    for sampler in ("heun", "unipc"):
        out = sample(model, **twice, steps=2, sampler=sampler, seed=3, block_batch=1)
        assert (out[0] - out[1]).abs().max() > 1e-2, sampler
        # Image 0 of the pair is the same job as the image alone (up to the float rounding of
        # batched conditioning, which the 2-step schedule's division by sigma_min amplifies).
        alone = sample(model, **one, steps=2, sampler=sampler, seed=3, block_batch=1)
        assert ((out[:1] - alone).norm() / alone.norm()).item() < 1e-4, sampler


def test_block_noise_key_names_seed_image_row_and_column():
    from infdit_core.strips import Block

    digest = hashlib.sha256(b"infdit-noise:3:1:0:2").digest()
    expected = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    assert torch.equal(sampling.block_noise(3, Block(1, 0, 2), 8), expected)


# --- the command line --------------------------------------------------------------------------------


def test_cli_takes_a_preset_or_a_sampler_with_steps(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from infdit_core import __main__ as cli

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3)).astype(np.uint8)).save(tmp_path / "in.png")
    used = []
    real = cli.upscale
    monkeypatch.setattr(cli, "upscale", lambda *a, **k: used.append((k["sampler"], k["steps"])) or real(*a, **k))
    base = ["upscale", str(tmp_path / "in.png"), "--model", "demo", "--device", "cpu", "--dtype", "fp32"]
    cli.main(base + ["-o", str(tmp_path / "a.png"), "--preset", "fast"])
    cli.main(base + ["-o", str(tmp_path / "b.png"), "--sampler", "unipc", "--steps", "3"])
    cli.main(base + ["-o", str(tmp_path / "c.png"), "--steps", "2"])  # as before: Heun for --steps
    assert used == [PRESETS["fast"], ("unipc", 3), ("heun", 2)]
    with pytest.raises(SystemExit, match="give either --preset or --sampler/--steps"):
        cli.main(base + ["-o", str(tmp_path / "d.png"), "--preset", "fast", "--steps", "4"])
