"""Load Inf-DiT LoRA and its application by Inf-DiT UniBA Upscale, without ComfyUI (tiny model, CPU)."""
import os
import sys

import pytest
import torch

from conftest import load_pack
from infdit_core import InfDiT, InfDiTConfig
from infdit_core.lora import attach_lora, detach_lora, lora_state_dict, save_lora
from test_nodes import STEPS, image, unit

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
LoraError = sys.modules[PACK.__name__ + ".infdit_core.lora"].LoraError


def write_lora(model, path, seed, strength_of_b=0.05):
    attach_lora(model, 4, 8.0, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            if name.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * strength_of_b)
    save_lora(str(path), lora_state_dict(model), rank=4, alpha=8.0, config=model.config)
    detach_lora(model, merge=False)


@pytest.fixture
def lora_models(models_root, tmp_path, monkeypatch):
    """A models/ folder with the tiny model in infdit/ and, in infdit_lora/, a LoRA for it and one
    made for another geometry."""
    os.symlink(models_root / "infdit", tmp_path / "infdit")
    (tmp_path / "infdit_lora").mkdir()
    monkeypatch.setenv("INFDIT_MODELS_DIR", str(tmp_path))
    base = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]
    write_lora(InfDiT(base.model.config), tmp_path / "infdit_lora" / "style.safetensors", seed=1)
    other = InfDiT(InfDiTConfig(num_layers=3, hidden_size=32, num_heads=2, block_size=32, image_size=64))
    write_lora(other, tmp_path / "infdit_lora" / "other.safetensors", seed=2)
    return tmp_path, base


def upscaled(model, **kw):
    return NODES["InfDiTUpscale"]().upscale(model, image(), 4.0, STEPS, 0, 0, True, embed=unit(), **kw)[0]


def test_lora_node_interface(lora_models):
    cls = NODES["InfDiTLoraLoader"]
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS["InfDiTLoraLoader"] == "Load Inf-DiT LoRA"
    assert cls.RETURN_TYPES == ("INFDIT_MODEL",) and cls.CATEGORY == "image/upscaling/Inf-DiT"
    spec = cls.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "lora_name", "strength"] and spec["model"][0] == "INFDIT_MODEL"
    assert spec["lora_name"][0] == ["other.safetensors", "style.safetensors"]
    assert {k: spec["strength"][1][k] for k in ("default", "min", "max")} == {"default": 1.0, "min": -10.0, "max": 10.0}
    assert all(options.get("tooltip") for _, options in spec.values())


def test_lora_node_applies_for_the_run_only(lora_models):
    _, base = lora_models
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    reference = upscaled(base)
    loader = NODES["InfDiTLoraLoader"]()
    off = loader.load(base, "style.safetensors", 0.0)[0]
    assert torch.equal(upscaled(off), reference)  # strength 0: the base model, bit for bit
    on = loader.load(base, "style.safetensors", 1.0)[0]
    assert base.loras == () and len(on.loras) == 1 and on.managed is base.managed  # the input is not changed
    with_lora = upscaled(on)
    assert (with_lora - reference).abs().max() > 1e-3
    # Other branches keep the base model, and the weights are the base weights again after the run.
    assert torch.equal(upscaled(base), reference)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())
    # Stacked: the same LoRA at 0.5 twice is the LoRA at 1, up to the float32 rounding of the two
    # additions into the weights (one unit in the last place), which two sampler steps amplify.
    half_twice = loader.load(loader.load(base, "style.safetensors", 0.5)[0], "style.safetensors", 0.5)[0]
    assert len(half_twice.loras) == 2
    torch.testing.assert_close(upscaled(half_twice), with_lora, atol=1e-3, rtol=0)


def test_missing_lora_names_the_folder(lora_models):
    root, base = lora_models
    with pytest.raises(FileNotFoundError) as err:
        NODES["InfDiTLoraLoader"]().load(base, "nope.safetensors", 1.0)
    text = str(err.value)
    assert "nope.safetensors" in text and "ComfyUI/models/infdit_lora" in text and str(root / "infdit_lora") in text
    assert "python -m infdit_core train --lora" in text


def test_lora_for_another_geometry_is_refused_with_the_keys(lora_models):
    root, base = lora_models
    with pytest.raises(LoraError) as err:
        NODES["InfDiTLoraLoader"]().load(base, "other.safetensors", 1.0)
    text = str(err.value)
    assert "other.safetensors does not fit this Inf-DiT model" in text
    assert "transformer.layers.0.attention.query_key_value.lora_A (4, 32) (model expects (4, 64))" in text
    assert "targets not in this model (4): transformer.layers.2.attention.dense" in text
    assert str(root / "infdit_lora") in text


def test_lora_folder_is_registered_in_comfyui(monkeypatch, tmp_path):
    import types

    fake = types.SimpleNamespace(models_dir=str(tmp_path / "models"), supported_pt_extensions={".safetensors"},
                                 folder_names_and_paths={})
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    bridge.register_model_folder(bridge.LORA_FOLDER)
    assert fake.folder_names_and_paths["infdit_lora"] == ([str(tmp_path / "models" / "infdit_lora")], {".safetensors"})
