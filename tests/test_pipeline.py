"""upscale(): any size, any scale up to 4 and chains above, padding instead of cropping, channels."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from infdit_core import InfDiT, InfDiTConfig, chain_factors, load_model, upscale
from infdit_core.pipeline import prepare_condition

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def image(batch, channels, h, w, seed=0):
    return torch.rand(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))


FAST = dict(steps=1, seed=0, clip_vector=torch.zeros(1, 768))


@pytest.mark.parametrize("scale,expected", [(4, (148, 212)), (3, (111, 159)), (2, (74, 106)), (1.5, (56, 80))])
def test_exact_output_size_for_odd_inputs(model, scale, expected):
    out = upscale(model, image(1, 3, 37, 53), scale=scale, **FAST)
    assert tuple(out.shape) == (1, 3, *expected)
    assert 0 <= out.min() and out.max() <= 1


def test_input_smaller_than_one_block(model):
    out = upscale(model, image(1, 3, 5, 7), scale=4, **FAST)
    assert tuple(out.shape) == (1, 3, 20, 28)


def test_padding_keeps_all_content():
    img = image(1, 3, 37, 53) * 2 - 1
    concat, lr = prepare_condition(img, (148, 212), block_size=32)
    assert tuple(concat.shape) == (1, 3, 160, 224) and tuple(lr.shape) == (1, 3, 40, 56)
    direct = F.interpolate(img, size=(148, 212), mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.equal(concat[..., :148, :212], direct)  # the content is the official concat LR, uncropped
    assert torch.equal(lr[..., :37, :53], img)  # at 4x the LR is the input itself
    # Replicate padding: the extra rows/columns repeat the last real ones.
    assert torch.equal(concat[..., 148:, :212], direct[..., -1:, :].expand(-1, -1, 12, -1))
    assert torch.equal(lr[..., :37, 53:], img[..., :, -1:].expand(-1, -1, -1, 3))


def test_condition_on_the_block_grid_is_clamped_without_touching_the_input():
    img = (image(1, 3, 16, 24) * 2 - 1) * 1.5  # beyond [-1, 1], as bicubic overshoot can be
    before = img.clone()
    concat, lr = prepare_condition(img, (64, 96), block_size=32)  # 4x lands on the grid: no padding
    direct = F.interpolate(before, size=(64, 96), mode="bicubic", antialias=True)
    assert torch.equal(concat, direct.clamp(-1, 1)) and torch.equal(lr, before)
    same, _ = prepare_condition(img, (16, 24), block_size=8)  # no resize either: the clamp makes a copy
    assert torch.equal(same, before.clamp(-1, 1)) and torch.equal(img, before)


def test_fractional_quarter_size_stays_aligned():
    img = image(1, 3, 37, 53) * 2 - 1
    concat, lr = prepare_condition(img, (111, 159), block_size=32)
    assert tuple(lr.shape) == (1, 3, concat.shape[-2] // 4, concat.shape[-1] // 4)
    expected = F.interpolate(concat, size=lr.shape[-2:], mode="bicubic", antialias=True)
    assert torch.equal(lr, expected)


@pytest.mark.parametrize("scale,factors", [(4, [4]), (3, [3]), (8, [4, 2]), (16, [4, 4]), (6, [4, 1.5])])
def test_chain_plan(scale, factors):
    assert chain_factors(scale) == pytest.approx(factors)
    with pytest.raises(ValueError, match="scale must be > 1"):
        chain_factors(1.0)


def test_scales_above_four_chain_passes(model):
    calls = []
    out = upscale(model, image(1, 3, 9, 11), scale=8, callback=lambda *a: calls.append(a[4].shape), **FAST)
    assert tuple(out.shape) == (1, 3, 72, 88)
    assert {tuple(s[-2:]) for s in calls} == {(64, 64), (96, 96)}  # 36x44 and 72x88, padded to 32-px blocks


def test_batch_rgba_and_grayscale(model):
    rgba = image(2, 4, 12, 10)
    out = upscale(model, rgba, scale=4, steps=1, seed=0, clip_vector=torch.zeros(2, 768))
    assert tuple(out.shape) == (2, 4, 48, 40)
    expected_alpha = F.interpolate(rgba[:, 3:], size=(48, 40), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.equal(out[:, 3:], expected_alpha)
    gray = upscale(model, image(1, 1, 12, 10), scale=2, **FAST)
    assert tuple(gray.shape) == (1, 1, 24, 20)


def test_same_seed_same_pixels_and_input_untouched(model):
    img = image(1, 3, 20, 24)
    before = img.clone()
    a = upscale(model, img, scale=4, block_batch=1, **FAST)
    b = upscale(model, img, scale=4, block_batch=4, **FAST)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.equal(img, before)


def test_missing_clip_vector_warns_and_uses_zero(model):
    with pytest.warns(UserWarning, match="no CLIP embedding"):
        out = upscale(model, image(1, 3, 8, 8), scale=4, steps=1, seed=0)
    assert torch.equal(out, upscale(model, image(1, 3, 8, 8), scale=4, **FAST))


@pytest.fixture(scope="module")
def random_tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = InfDiT(InfDiTConfig(num_layers=1, hidden_size=32, num_heads=2, block_size=32, image_size=64))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "infdit_core", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_upscales_png_end_to_end(tmp_path, random_tiny_checkpoint):
    pixels = (np.random.default_rng(0).random((13, 17, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    for name, block_batch in (("a", 1), ("again", 1), ("auto", "auto")):
        result = run_cli("upscale", tmp_path / "in.png", "-o", tmp_path / name, "--model", random_tiny_checkpoint,
                         "--steps", 2, "--seed", 5, "--block-batch", block_batch)
        assert result.returncode == 0, result.stderr
        assert "blocks" in result.stderr  # the progress bar
    a, again, auto = (np.asarray(Image.open(tmp_path / n / "in_x4.png")).astype(int) for n in ("a", "again", "auto"))
    assert a.shape == (52, 68, 3)
    assert np.array_equal(a, again)
    # Another block batch differs only by float rounding, which can flip a truncated 8-bit value.
    assert np.abs(a - auto).max() <= 1
    assert a.std() > 0


def test_cli_reports_missing_model(tmp_path):
    result = run_cli("upscale", tmp_path / "x.png", "-o", tmp_path, "--model", tmp_path / "missing.safetensors")
    assert result.returncode != 0
    assert "missing.safetensors" in result.stderr and "cloud.tsinghua.edu.cn" in result.stderr
