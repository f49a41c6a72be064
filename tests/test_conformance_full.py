"""The denoiser against outputs of the official code at the released geometry (tests/data/golden_full).

Width 1280, 16 heads x 80, 128-px blocks, RoPE table 1024, depth cut to 3 layers. The 392 MB of
weights are regenerated from weights_recipe.json exactly as its README says and checked against the
recipe's checksum: if that fails, every test here fails (the goldens would say nothing).
"""
import gc
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from infdit_core import BlockSweepDenoiser, denoise, load_model

CASE = "a_sq256_sigma40_sigma0p5.safetensors"
CALLS = ["sigma40.", "sigma0p5."]


def regenerate(recipe):
    """Seeded CPU generator, one randn per entry in file order, N * mul + add (float32)."""
    g = torch.Generator(device="cpu").manual_seed(recipe["seed"])
    return {e["key"]: torch.randn(*e["shape"], generator=g) * e["mul"] + e["add"] for e in recipe["entries"]}


def checksum(sd):
    """sha256 of the concatenated float32 bytes (little-endian, C order) in sorted key order."""
    assert all(t.dtype == torch.float32 for t in sd.values())
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(sd[key].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def full(golden_full_dir):
    recipe = json.loads((golden_full_dir / "weights_recipe.json").read_text())
    sd = regenerate(recipe)
    digest = checksum(sd)
    model = load_model(sd)  # float32, CPU; no RoPE buffers in the recipe: image_size 512 -> table 1024
    del sd
    gc.collect()
    case = load_file(golden_full_dir / CASE)
    yield {"model": model, "case": case, "digest": digest, "expected": recipe["sha256_without_rope"]}
    del model, case
    gc.collect()


def check_weights(full):
    assert full["digest"] == full["expected"], (
        "regenerated weights do not match weights_recipe.json's sha256_without_rope: the golden outputs "
        "say nothing about this model")


def test_regenerated_weights_are_the_recipes(full):
    check_weights(full)
    cfg = full["model"].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.block_size, cfg.rope_size) == \
        (3, 1280, 16, 80, 128, 1024)


def inputs(case):
    return {"lr": case["in.lr_image"], "concat_lr": case["in.concat_lr_image"], "clip_vector": case["in.clip_vector"]}


@pytest.mark.parametrize("call", CALLS)
def test_reproduces_official_denoiser_at_released_geometry(full, call):
    check_weights(full)
    case = full["case"]
    out = denoise(full["model"], case[call + "in.x_noised"], case[call + "in.sigma"], **inputs(case))
    torch.testing.assert_close(out, case[call + "out.denoised"], rtol=0, atol=1e-4)


def test_block_sweep_at_released_geometry(full):
    check_weights(full)
    case, call = full["case"], "sigma0p5."
    denoiser = BlockSweepDenoiser(full["model"], block_batch=1, **inputs(case))
    assert denoiser.num_blocks == 4
    out = denoiser(case[call + "in.x_noised"], case[call + "in.sigma"])
    torch.testing.assert_close(out, case[call + "out.denoised"], rtol=0, atol=1e-4)
