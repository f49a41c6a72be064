"""benchmarks/quality.py's metrics are the standard ones: equal to scikit-image's reference code."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality  # its dataclasses look their module up there
spec.loader.exec_module(quality)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (72, 88, 3)).astype(np.uint8)
    noisy = np.clip(truth.astype(int) + rng.integers(-25, 26, truth.shape), 0, 255).astype(np.uint8)
    return truth, noisy


def _shave(a):
    return a[quality.BORDER:-quality.BORDER, quality.BORDER:-quality.BORDER]


def test_psnr_and_ssim_match_scikit_image(pair):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    truth, noisy = pair
    s = quality.score(noisy, truth)
    assert s.psnr_rgb == pytest.approx(peak_signal_noise_ratio(_shave(truth), _shave(noisy), data_range=255), abs=1e-9)
    y_t, y_n = quality.to_y(truth), quality.to_y(noisy)
    assert s.psnr_y == pytest.approx(peak_signal_noise_ratio(_shave(y_t), _shave(y_n), data_range=255), abs=1e-9)
    options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert s.ssim_y == pytest.approx(structural_similarity(_shave(y_t), _shave(y_n), **options), abs=1e-9)
    per_channel = [structural_similarity(_shave(truth[..., c]).astype(float), _shave(noisy[..., c]).astype(float),
                                         **options) for c in range(3)]
    assert s.ssim_rgb == pytest.approx(np.mean(per_channel), abs=1e-9)


def test_identical_images_score_perfectly(pair):
    truth, _ = pair
    s = quality.score(truth, truth)
    assert s.psnr_rgb == float("inf") and s.ssim_y == pytest.approx(1.0)


def test_bicubic_candidate_restores_the_ground_truth_size(tmp_path, pair):
    from PIL import Image

    truth, _ = pair
    Image.fromarray(truth[:70, :87]).save(tmp_path / "p.png")
    cropped, lr = quality.test_pair(str(tmp_path / "p.png"))
    assert cropped.shape == (68, 84, 3) and tuple(lr.shape) == (1, 3, 17, 21)
    assert tuple(quality.bicubic(lr).shape) == (1, 3, 68, 84)
    assert lr.dtype == torch.float32 and torch.equal(lr, (lr * 255).round() / 255)  # an 8-bit input


def test_sweep_plan_fits_each_budget_with_the_most_steps():
    assert [quality.steps_for_budget("heun", b) for b in (39, 20, 10, 6)] == [20, 10, 5, 3]
    assert quality.steps_for_budget("unipc", 10) == 10
    assert quality.steps_for_budget("dpmpp_2m_forecast", 10) == 18  # every other call forecast, the last computed
    assert quality.steps_for_budget("dpmpp_2m_forecast_end", 10) == 11  # the last call forecast
    plan = quality.sweep_plan(list(quality.SAMPLERS), quality.BUDGETS)
    assert plan[0] == quality.OFFICIAL == ("heun", 20) and len(plan) == len(set(plan))
    assert {s for s, _ in plan} == set(quality.SAMPLERS)
    calls = [quality.SAMPLERS[s].calls(n) for s, n in plan]
    assert max(calls) == 39 and min(calls) <= 6


def test_sweep_rows_compare_with_the_official_sampler(pair):
    truth, noisy = pair
    results = {"heun 20": {"scores": {"p": quality.score(noisy, truth)}, "seconds": 10.0, "outputs": {"p": noisy}},
               "euler 10": {"scores": {"p": quality.score(truth, truth[::-1])}, "seconds": 2.5,
                            "outputs": {"p": truth[::-1]}},
               "_truth": {"p": truth}}
    rows = quality.sweep_rows(results, [("heun", 20), ("euler", 10)])
    assert rows[0]["d_psnr_y"] == 0 and rows[0]["psnr_y_to_official"] is None and rows[0]["calls"] == 39
    assert rows[1]["calls"] == 10 and rows[1]["time_ratio"] == 0.25
    assert rows[1]["d_psnr_y"] == pytest.approx(rows[1]["psnr_y"] - rows[0]["psnr_y"])
    assert rows[1]["psnr_y_to_official"] == pytest.approx(quality.psnr(quality.to_y(truth[::-1]), quality.to_y(noisy)))
