"""fp8 weights (infdit_core/fp8.py) on the CPU: the quantisation math (e4m3 emulated by torch's
float8 dtype, which converts on the CPU), the model built from a checkpoint, its deviation from
bf16 on the tiny golden, and the refusal where the device cannot run it."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import load_pack
from infdit_core import BlockSweepDenoiser, load_model, sample
from infdit_core.fast import COMPILED_LAYERS
from infdit_core.fp8 import E4M3_MAX, FP8, Fp8Linear, dequantize, is_fp8, quantize, refusal
from infdit_core.lora import Lora, LoraError, apply_loras


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_per_channel_scales_and_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, as real weight matrices have: one scale per row.
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 1, 64)[:, None]
    q, scale = quantize(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / E4M3_MAX, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))  # each row's largest -> 448
    back = dequantize(q, scale, torch.float32)
    # e4m3: 3 mantissa bits, so half a step is at most 2^-4 of the value; below the normal range
    # (2^-6 of the row's scale) the step is the subnormal one, 2^-9 x scale.
    bound = w.abs() * 2.0 ** -4 + scale[:, None] * 2.0 ** -10
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    assert rel_l2(back, w) < 0.03  # typical: ~2 % for Gaussian rows


def test_fp8_linear_is_the_dequantised_product():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(96, 48).to(torch.bfloat16)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    layer = Fp8Linear(linear)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_fp8.element_size() == 1
    assert torch.equal(layer(x), F.linear(x, dequantize(layer.weight_fp8, layer.weight_scale), layer.bias))
    assert rel_l2(layer(x), linear(x)) < 0.05


@pytest.fixture(scope="module")
def golden(golden_dir):
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    return load_file(golden_dir / manifest["cases"]["rect_3wide_2high"]["file"])


def test_fp8_model_from_a_checkpoint_and_its_deviation_from_bf16(golden_dir, golden, capsys):
    bf16 = load_model(golden_dir / "tiny_model.safetensors", dtype=torch.bfloat16)
    fp8 = load_model(golden_dir / "tiny_model.safetensors", dtype=FP8)
    assert is_fp8(fp8) and not is_fp8(bf16) and fp8.dtype == torch.bfloat16
    layers = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == fp8.config.num_layers * 5  # QKV, out, 2 MLP, adaLN modulation per layer
    assert isinstance(fp8.mixins.adaln_layer.cross_attention.query, torch.nn.Linear)  # left in bf16
    inputs = dict(lr=golden["in.lr_image"], concat_lr=golden["in.concat_lr_image"], clip_vector=golden["in.clip_vector"])
    x, sigma, official = golden["in.x_noised"], golden["in.sigma"], golden["out.denoised"]
    outs = {name: BlockSweepDenoiser(model, block_batch=1, layer_runner=runner, **inputs)(x, sigma)
            for name, model, runner in [("bf16", bf16, None), ("fp8", fp8, None), ("fp8 fast", fp8, COMPILED_LAYERS)]}
    gaps = {name: (out - official).abs().max().item() for name, out in outs.items()}
    with capsys.disabled():
        print(f"\ntiny golden, max |out - official fp32|: " + ", ".join(f"{k} {v:.2e}" for k, v in gaps.items()))
    # Measured: bf16 4.9e-3, fp8 3.9e-2 (outputs of about unit size; the tiny golden's weights are
    # random, not a trained checkpoint's). The compiled path adds only bf16 rounding of its fusions.
    assert gaps["bf16"] < 1e-2 and gaps["fp8"] < 0.1
    assert (outs["fp8 fast"] - outs["fp8"]).abs().max().item() < 2e-2


def test_fp8_refused_where_it_cannot_run(golden_dir, golden, models_dir):
    assert "compute capability >= 8.9" in refusal(torch.device("cpu"))
    fp8 = load_model(golden_dir / "tiny_model.safetensors", dtype=FP8)
    inputs = dict(lr=golden["in.lr_image"], concat_lr=golden["in.concat_lr_image"], clip_vector=golden["in.clip_vector"])
    with pytest.raises(ValueError, match=r"fp8 weights need a CUDA GPU of compute capability >= 8.9 .* Use bf16"):
        sample(fp8, steps=1, **inputs)
    pack = load_pack()
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        pack.NODE_CLASS_MAPPINGS["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp8")
    target = "transformer.layers.0.attention.dense"
    lora = Lora({f"{target}.lora_A": torch.zeros(2, 64), f"{target}.lora_B": torch.zeros(64, 2)}, rank=2, alpha=2.0,
                targets=[target])
    with pytest.raises(LoraError, match="LoRAs cannot be merged into fp8 weights"):
        apply_loras(fp8, [(lora, 1.0)])
    assert sys.modules[pack.__name__ + ".nodes.loaders"].WEIGHT_DTYPES["fp8"] is FP8


def test_cli_refuses_fp8_before_loading(tmp_path):
    from infdit_core.__main__ import main

    with pytest.raises(SystemExit, match="error: fp8 weights need a CUDA GPU of compute capability >= 8.9"):
        main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path), "--model", "demo", "--dtype", "fp8",
              "--device", "cpu"])
