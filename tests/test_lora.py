"""LoRA: the training form, the file, and merging into the weights for a run (tiny golden model, CPU)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import network_forward
from infdit_core import InfDiT, InfDiTConfig, denoise, load_model
from infdit_core.checkpoint import CheckpointError
from infdit_core.lora import (DEFAULT_TARGETS, LoraError, attach_lora, check_lora, detach_lora, expand_targets,
                              load_lora, lora_state_dict, merged, save_lora)

RANK = 4


@pytest.fixture(scope="module")
def golden_sd(golden_dir):
    return load_file(golden_dir / "tiny_model.safetensors")


@pytest.fixture(scope="module")
def case(golden_dir):
    c = load_file(golden_dir / "denoise_sq_2x2blocks.safetensors")
    return dict(x=c["in.x_noised"], sigma=c["in.sigma"], lr=c["in.lr_image"], concat_lr=c["in.concat_lr_image"],
                clip_vector=c["in.clip_vector"])


@pytest.fixture
def model(golden_sd):
    return load_model(dict(golden_sd))


def denoised(model, case):
    return denoise(model, case["x"], case["sigma"], lr=case["lr"], concat_lr=case["concat_lr"],
                   clip_vector=case["clip_vector"])


def trained_lora(model, path, seed, rank=RANK, alpha=8.0):
    """A LoRA as a training run leaves it: attached, B moved off zero, saved, detached, loaded."""
    attach_lora(model, rank, alpha, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            if name.endswith(".lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.05)
    save_lora(path, lora_state_dict(model), rank=rank, alpha=alpha, config=model.config)
    detach_lora(model, merge=False)
    return load_lora(path)


def merged_by_hand(golden_sd, loras):
    """The golden weights with sum(strength * alpha/rank * B @ A) added, as a plain state dict."""
    sd = dict(golden_sd)
    for lora, strength in loras:
        for target in lora.targets:
            a, b = lora.tensors[f"{target}.lora_A"].double(), lora.tensors[f"{target}.lora_B"].double()
            sd[f"{target}.weight"] = (sd[f"{target}.weight"].double() + strength * lora.alpha / lora.rank * b @ a).float()
    return sd


def test_default_targets_are_the_attention_and_mlp_projections(model):
    names = expand_targets(DEFAULT_TARGETS, 2)
    assert names == [f"transformer.layers.{i}.{t}" for t in ("attention.query_key_value", "attention.dense",
                                                             "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
                     for i in range(2)] + [f"mixins.adaln_layer.cross_attention.{t}" for t in
                                           ("query", "key_value", "dense")]
    params = attach_lora(model, RANK)
    assert list(params) == [f"{n}.lora_{x}" for n in names for x in "AB"]
    # Everything else is frozen; A is [rank, in], B [out, rank] and zero: the model starts unchanged.
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params.values()}
    qkv = params["transformer.layers.0.attention.query_key_value.lora_A"]
    assert qkv.shape == (RANK, 64) and params["transformer.layers.0.attention.query_key_value.lora_B"].shape == (192, RANK)
    assert all(not p.any() for n, p in params.items() if n.endswith("lora_B"))
    assert qkv.abs().max() <= 1 / 8 and qkv.std() > 0.03  # U(-1/sqrt(in), 1/sqrt(in)), in = 64


def test_attached_at_init_is_the_base_model_and_trains_only_lora(model, golden_sd, case):
    base = denoised(load_model(dict(golden_sd)), case)
    params = attach_lora(model, RANK, generator=torch.Generator().manual_seed(0))
    assert torch.equal(denoised(model, case), base)
    # Under autograd through forward_blocks (what the trainer runs), with and without activation
    # checkpointing: gradients reach the LoRA parameters only, and checkpointing changes nothing.
    grads = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        out = network_forward(model, case["x"], case["sigma"], lr=case["lr"], concat_lr=case["concat_lr"],
                              clip_vector=case["clip_vector"], checkpoint_layers=checkpointing)
        out.square().mean().backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        grads.append({n: p.grad.clone() for n, p in params.items()})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if n.endswith("lora_B"))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_save_load_roundtrip_and_metadata(model, tmp_path):
    path = tmp_path / "style.safetensors"
    lora = trained_lora(model, path, seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["style.safetensors"]  # no temporary file left behind
    assert (lora.rank, lora.alpha, lora.scale) == (RANK, 8.0, 2.0)
    assert lora.targets == sorted(expand_targets(DEFAULT_TARGETS, 2)) and len(lora.tensors) == 2 * 11
    assert lora.config == model.config.to_dict() and lora.metadata["format"] == "infdit-lora"
    assert json.loads(lora.metadata["targets"]) == lora.targets
    assert not any(".parametrizations." in k for k in model.state_dict())  # detached: the official layout again


def test_strength_zero_is_the_base_model_bitwise(model, case, tmp_path):
    base = denoised(model, case)
    lora = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    with merged(model, [(lora, 0.0)]):
        assert torch.equal(denoised(model, case), base)


def test_strength_one_equals_the_weights_merged_by_hand(model, golden_sd, case, tmp_path):
    lora = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    want = denoised(load_model(merged_by_hand(golden_sd, [(lora, 1.0)])), case)
    assert (want - denoised(model, case)).abs().max() > 1e-3  # the LoRA does change the output
    with merged(model, [(lora, 1.0)]):
        got = denoised(model, case)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_training_form_equals_merged_form(model, case, tmp_path):
    lora = trained_lora(model, tmp_path / "a.safetensors", seed=3)
    with merged(model, [(lora, 1.0)]):
        want = denoised(model, case)
    params = attach_lora(model, RANK, alpha=lora.alpha)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(lora.tensors[name])
    torch.testing.assert_close(denoised(model, case), want, atol=1e-5, rtol=0)
    detach_lora(model, merge=True)
    torch.testing.assert_close(denoised(model, case), want, atol=1e-5, rtol=0)


def test_two_loras_stack(model, golden_sd, case, tmp_path):
    first = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    second = trained_lora(model, tmp_path / "b.safetensors", seed=5, rank=2, alpha=2.0)
    pairs = [(first, 0.7), (second, -1.3)]
    want = denoised(load_model(merged_by_hand(golden_sd, pairs)), case)
    with merged(model, pairs):
        got = denoised(model, case)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with merged(model, [(first, 0.7)]):
        only_first = denoised(model, case)
    assert (got - only_first).abs().max() > 1e-3


def test_weights_are_restored_bit_exactly(model, golden_sd, tmp_path):
    lora = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged(model, [(lora, 1.0), (lora, 2.5)]):
        assert not torch.equal(model.state_dict()["transformer.layers.1.mlp.dense_4h_to_h.weight"],
                               before["transformer.layers.1.mlp.dense_4h_to_h.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(KeyboardInterrupt):
        with merged(model, [(lora, 1.0)]):
            raise KeyboardInterrupt  # a cancelled run
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bf16_model_merges_and_restores(golden_sd, case, tmp_path):
    model = load_model(dict(golden_sd), dtype=torch.bfloat16)
    lora = trained_lora(load_model(dict(golden_sd)), tmp_path / "a.safetensors", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged(model, [(lora, 1.0)]):
        w = model.transformer.layers[0].attention.dense.weight
        assert w.dtype == torch.bfloat16
        want = (golden_sd["transformer.layers.0.attention.dense.weight"].to(torch.bfloat16).float()
                + lora.delta("transformer.layers.0.attention.dense")).to(torch.bfloat16)
        assert torch.equal(w, want)  # summed in float32, rounded once
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_for_another_geometry_is_refused_with_the_keys(model, tmp_path):
    other = InfDiT(InfDiTConfig(num_layers=3, hidden_size=32, num_heads=2, patch_size=4, block_size=32, image_size=64))
    lora = trained_lora(other, tmp_path / "other.safetensors", seed=1)
    with pytest.raises(LoraError) as err:
        check_lora(model, lora)
    text = str(err.value)
    assert isinstance(err.value, CheckpointError) and "other.safetensors does not fit this Inf-DiT model" in text
    assert "targets not in this model (4): transformer.layers.2.attention.dense" in text
    assert ("transformer.layers.0.attention.query_key_value.lora_A (4, 32) (model expects (4, 64))") in text
    assert ("transformer.layers.0.attention.query_key_value.lora_B (96, 4) (model expects (192, 4))") in text
    assert "num_layers 3 (this model: 2), hidden_size 32 (this model: 64)" in text
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="does not fit"):
        with merged(model, [(lora, 1.0)]):
            pytest.fail("merged a LoRA of another geometry")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_files_that_are_not_loras_are_refused_clearly(golden_dir, tmp_path):
    with pytest.raises(LoraError, match=r"tiny_model\.safetensors is an Inf-DiT model, not a LoRA: load it as the model"):
        load_lora(str(golden_dir / "tiny_model.safetensors"))
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "sdxl_lora.safetensors")
    with pytest.raises(LoraError, match=r"sdxl_lora\.safetensors is not an Inf-DiT LoRA \(its metadata has no "
                                        r"format 'infdit-lora'\)\. Inf-DiT LoRAs are \.safetensors files written by"):
        load_lora(str(tmp_path / "sdxl_lora.safetensors"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "pickle.pt")
    with pytest.raises(LoraError, match=r"pickle\.pt is not a readable Inf-DiT LoRA .*truncated or corrupt"):
        load_lora(str(tmp_path / "pickle.pt"))
    with pytest.raises(FileNotFoundError, match="LoRA file not found: .*nope.safetensors"):
        load_lora(str(tmp_path / "nope.safetensors"))


def test_truncated_and_inconsistent_lora_files(model, tmp_path):
    path = tmp_path / "a.safetensors"
    lora = trained_lora(model, path, seed=1)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        load_lora(str(tmp_path / "cut.safetensors"))
    tensors = dict(lora.tensors)
    del tensors["transformer.layers.1.mlp.dense_h_to_4h.lora_B"]
    save_file(tensors, tmp_path / "unpaired.safetensors", metadata=lora.metadata)
    with pytest.raises(LoraError, match=r"inconsistent LoRA file: .*transformer\.layers\.1\.mlp\.dense_h_to_4h\.lora_B"):
        load_lora(str(tmp_path / "unpaired.safetensors"))
    with pytest.raises(LoraError, match="lora_A/lora_B pairs"):
        save_lora(str(tmp_path / "bad.safetensors"), tensors, rank=RANK, alpha=1.0, config=model.config)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "cut.safetensors", "unpaired.safetensors"]


def test_attach_errors(model):
    with pytest.raises(ValueError, match="positive integer"):
        attach_lora(model, 0)
    with pytest.raises(LoraError, match="not Linear layers of this model: mixins.adaln_layer.q_layer_norm.0"):
        attach_lora(model, 2, targets=["mixins.adaln_layer.q_layer_norm.0"])
    attach_lora(model, 2)
    with pytest.raises(LoraError, match="already has LoRA adapters attached"):
        attach_lora(model, 2)


def test_cli_lora_argument():
    from infdit_core.__main__ import lora_argument

    assert lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert lora_argument("dir/a:b.safetensors:-2") == ("dir/a:b.safetensors", -2.0)
    assert lora_argument(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    with pytest.raises(Exception, match="finite"):
        lora_argument("style.safetensors:nan")


def test_cli_upscale_applies_stacked_loras(golden_dir, golden_sd, model, tmp_path):
    import numpy as np
    from PIL import Image

    from infdit_core import upscale
    from infdit_core.__main__ import main as cli
    from infdit_core.imageio import read_image

    first = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    second = trained_lora(model, tmp_path / "b.safetensors", seed=5, rank=2, alpha=2.0)
    Image.fromarray((np.random.default_rng(0).random((12, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    with pytest.warns(UserWarning, match="no CLIP embedding given"):  # no CLIP: the zero vector
        cli(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--model",
             str(golden_dir / "tiny_model.safetensors"), "--steps", "1", "--dtype", "fp32", "--device", "cpu",
             "--lora", str(tmp_path / "a.safetensors"), "--lora", f"{tmp_path / 'b.safetensors'}:-0.5"])
        with merged(model, [(first, 1.0), (second, -0.5)]):
            want = upscale(model, read_image(str(tmp_path / "in.png")), steps=1, seed=0)
        base = upscale(model, read_image(str(tmp_path / "in.png")), steps=1, seed=0)
    got = read_image(str(tmp_path / "out.png"))
    assert got.shape == (1, 3, 48, 32)
    assert (got - want).abs().max() <= 1 / 255 + 1e-6  # one 8-bit step: float rounding before quantising
    assert (got - base).abs().max() > 4 / 255


def test_a_lora_run_never_resumes_a_base_run(model, case, tmp_path):
    from infdit_core.resume import job_key

    lora = trained_lora(model, tmp_path / "a.safetensors", seed=1)
    inputs = dict(lr=case["lr"], concat_lr=case["concat_lr"], clip_vector=case["clip_vector"], steps=2, seed=0,
                  noise=None, lr_noise_init=True)
    base = job_key(model, **inputs)
    with merged(model, [(lora, 1.0)]):
        with_lora = job_key(model, **inputs)
    assert with_lora != base and job_key(model, **inputs) == base
    with merged(model, [(lora, 0.0)]):
        assert job_key(model, **inputs) == base


def test_alpha_none_is_the_rank(model, tmp_path):
    attach_lora(model, 3)
    save_lora(str(tmp_path / "a.safetensors"), lora_state_dict(model), rank=3, alpha=None, config=model.config)
    assert (load_lora(str(tmp_path / "a.safetensors")).alpha, load_lora(str(tmp_path / "a.safetensors")).scale) == (3.0, 1.0)
