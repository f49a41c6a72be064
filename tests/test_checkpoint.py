"""Loading official-style pickles safely, refusing bad files with clear errors, converting."""
import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infdit_core import CheckpointError, convert, load_model
from infdit_core.__main__ import main as cli


@pytest.fixture(scope="module")
def golden_sd(golden_dir):
    return load_file(golden_dir / "tiny_model.safetensors")


def official_style_pickle(path, module):
    """What DeepSpeed/SAT write: weights under 'module' plus training bookkeeping."""
    torch.save({
        "module": module,
        "buffer_names": ["mixins.adaln_layer.rope.freqs_cos"],
        "optimizer": None,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero": {"stage": 1}},
        "ds_version": "0.14.2",
        "iteration": 120000,
        "np_rng_state": np.random.RandomState(7).get_state(),
        "random_rng_state": (3, tuple(range(5)), None),
        "torch_rng_state": torch.get_rng_state(),
        "args": argparse.Namespace(num_layers=2, hidden_size=64),
    }, path)


def test_official_style_pickle_loads(tmp_path, golden_sd):
    path = tmp_path / "mp_rank_00_model_states.pt"
    official_style_pickle(path, dict(golden_sd))
    model = load_model(path)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, golden_sd[key], rtol=0, atol=1e-6 if ".rope." in key else 0)


def test_pickle_that_would_run_code_is_refused(tmp_path, golden_sd):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"module": dict(golden_sd), "client_state": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*system.*Nothing from it was executed"):
        load_model(path)
    assert not marker.exists()


def test_missing_key_is_named(golden_sd):
    sd = {k: v for k, v in golden_sd.items() if k != "transformer.layers.1.mlp.dense_4h_to_h.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        load_model(sd)


def test_unexpected_key_is_named(golden_sd):
    sd = dict(golden_sd, **{"mixins.lora.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): mixins\.lora\.weight"):
        load_model(sd)


def test_misshaped_key_is_named(golden_sd):
    sd = dict(golden_sd)
    sd["transformer.layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \(1\): transformer\.layers\.1\.mlp\.dense_h_to_4h"
                                              r"\.weight \(128, 64\) \(model expects \(256, 64\)\)"):
        load_model(sd)


def test_wrong_rope_table_is_refused(golden_sd):
    sd = dict(golden_sd)
    sd["mixins.adaln_layer.rope.freqs_cos"] = torch.ones_like(sd["mixins.adaln_layer.rope.freqs_cos"])
    with pytest.raises(CheckpointError, match="freqs_cos: values differ from the official 2D RoPE table"):
        load_model(sd)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_reported(tmp_path, golden_dir, golden_sd, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        official_style_pickle(path, dict(golden_sd))
    else:
        path.write_bytes((golden_dir / "tiny_model.safetensors").read_bytes())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_not_a_checkpoint_is_reported(tmp_path, golden_dir):
    png = golden_dir / "bench_inputs" / "lr64.png"
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_model(png)


def test_foreign_weights_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not contain Inf-DiT weights"):
        load_model({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)})


def test_missing_file_names_file_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*mp_rank_00_model_states\.pt.*cloud\.tsinghua"):
        load_model(tmp_path / "nope.safetensors")


def test_clip_keys_are_ignored_deliberately(golden_sd):
    sd = dict(golden_sd, **{"image_encoder.model.visual.proj": torch.zeros(4, 768),
                            "image_encoder.model.logit_scale": torch.zeros(())})
    model = load_model(sd)
    assert not any(k.startswith("image_encoder") for k in model.state_dict())


@pytest.mark.parametrize("dtype_flag", [None, "bf16"])
def test_convert_roundtrip(tmp_path, golden_sd, dtype_flag):
    src = tmp_path / "mp_rank_00_model_states.pt"
    clip_tensor = torch.randn(4, 768)
    official_style_pickle(src, dict(golden_sd, **{"image_encoder.model.visual.proj": clip_tensor,
                                                  "image_encoder.model.logit_scale": torch.ones(())}))
    dst = tmp_path / "converted.safetensors"
    cli(["convert", str(src), str(dst)] + (["--dtype", dtype_flag] if dtype_flag else []))
    dtype = torch.bfloat16 if dtype_flag else torch.float32
    with safe_open(dst, framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "infdit" and json.loads(meta["config"])["num_layers"] == 2
    assert len(meta["source_sha256"]) == 64
    assert "image_encoder.model.visual.proj" in keys  # CLIP image tower kept under its official prefix
    assert "image_encoder.model.logit_scale" not in keys and not any(".rope." in k for k in keys)
    model = load_model(dst, dtype=dtype)
    for key, tensor in model.state_dict().items():
        if ".rope." not in key:
            assert torch.equal(tensor, golden_sd[key].to(dtype)), key
    assert torch.equal(load_file(dst)["image_encoder.model.visual.proj"], clip_tensor.to(dtype))


def test_converted_file_loads_with_mis_shaped_report(tmp_path, golden_sd):
    bad = dict(golden_sd)
    bad["mixins.final_layer.linear.bias"] = torch.zeros(7)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"mixins\.final_layer\.linear\.bias \(7,\)"):
        convert(str(tmp_path / "bad.safetensors"), str(tmp_path / "out.safetensors"))


# --- strict both ways: every key the forward reads is required, only the others may be absent ----


def keys_read_by_the_forward(golden_dir, golden_sd):
    """The state-dict keys whose tensors reach the network output, found by differentiating one
    forward pass of a golden case (not from checkpoint.py's lists, which this checks)."""
    from conftest import network_forward

    model = load_model(dict(golden_sd)).requires_grad_(True)
    case = load_file(golden_dir / "denoise_sq_2x2blocks.safetensors")
    out = network_forward(model, case["in.x_noised"], case["in.sigma"], lr=case["in.lr_image"],
                          concat_lr=case["in.concat_lr_image"], clip_vector=case["in.clip_vector"])
    out.square().sum().backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.fixture(scope="module")
def read_keys(golden_dir, golden_sd):
    return keys_read_by_the_forward(golden_dir, golden_sd)


def test_the_forward_reads_every_family_the_spec_names(read_keys):
    # The derivation finds the families the loader must require, LayerNorms included: a gradient
    # that misses one would make the removal test below vacuous for it.
    families = {re.sub(r"\.\d+\.", ".N.", k).rsplit(".", 1)[0] for k in read_keys}
    assert families >= {
        "transformer.layers.N.attention.query_key_value", "transformer.layers.N.attention.dense",
        "transformer.layers.N.mlp.dense_h_to_4h", "transformer.layers.N.mlp.dense_4h_to_h",
        "mixins.adaln_layer.adaLN_modulations.N.1", "mixins.adaln_layer.q_layer_norm.N",
        "mixins.adaln_layer", "mixins.adaln_layer.proj_lr",
        "mixins.adaln_layer.cross_attention.query", "mixins.adaln_layer.cross_attention.key_value",
        "mixins.adaln_layer.cross_attention.dense", "mixins.adaln_layer.post_cross_attention_layernorm",
        "mixins.adaln_layer.cross_q_ln", "mixins.adaln_layer.cross_k_ln", "mixins.final_layer.adaLN_modulation.N",
        "mixins.final_layer.linear", "mixins.patch_embed.proj", "time_embed.mlp.N", "cond_embed.map_vector.N"}
    assert {k for k in read_keys if k.startswith("mixins.adaln_layer.") and k.count(".") == 2} == {
        "mixins.adaln_layer.re_pos_embed", "mixins.adaln_layer.lr_query_position_embedding",
        "mixins.adaln_layer.lr_key_position_embedding"}


def test_every_key_the_forward_reads_is_required(tmp_path, golden_sd, read_keys):
    unread = set(golden_sd) - read_keys
    # Only these are never read: SAT's position table, the key LayerNorms the official code leaves
    # unused (keys are normalised by q_layer_norm) and the RoPE tables (regenerated).
    assert unread == {"transformer.position_embeddings.weight", "mixins.adaln_layer.rope.freqs_cos",
                      "mixins.adaln_layer.rope.freqs_sin"} | {
        f"mixins.adaln_layer.k_layer_norm.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    not_refused = []
    for key in sorted(read_keys):
        sd = {k: v for k, v in golden_sd.items() if k != key}
        try:
            load_model(sd)
        except CheckpointError as error:
            if key not in str(error):
                not_refused.append(f"{key}: refused without naming it ({str(error)[:200]})")
        else:
            not_refused.append(f"{key}: loaded without it")
    assert not not_refused, "\n".join(not_refused)
    # A whole family at once, from a file: every key of it is named.
    family = sorted(k for k in read_keys if "layer_norm" in k or "_ln." in k or "layernorm" in k)
    save_file({k: v for k, v in golden_sd.items() if k not in family}, tmp_path / "no_layernorms.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "no_layernorms.safetensors")
    assert f"missing keys ({len(family)})" in str(err.value)
    assert all(k in str(err.value) for k in family[:12])  # the message lists the first 12


def test_only_unread_keys_may_be_absent(golden_dir, golden_sd, read_keys):
    trimmed = {k: v for k, v in golden_sd.items() if k in read_keys}
    model = load_model(trimmed)
    case = load_file(golden_dir / "denoise_sq_2x2blocks.safetensors")
    from infdit_core import denoise

    out = denoise(model, case["in.x_noised"], case["in.sigma"], lr=case["in.lr_image"],
                  concat_lr=case["in.concat_lr_image"], clip_vector=case["in.clip_vector"])
    want = denoise(load_model(dict(golden_sd)), case["in.x_noised"], case["in.sigma"], lr=case["in.lr_image"],
                   concat_lr=case["in.concat_lr_image"], clip_vector=case["in.clip_vector"])
    assert torch.equal(out, want)
