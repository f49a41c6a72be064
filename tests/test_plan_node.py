"""Inf-DiT Memory Plan: the report agrees with infdit_core.plan for the size the upscaler will run."""
import torch

from conftest import load_pack
from infdit_core import plan

NODES = load_pack().NODE_CLASS_MAPPINGS


def test_plan_node_reports_the_planner_numbers(models_dir):
    model = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]
    node = NODES["InfDiTMemoryPlan"]
    assert node.CATEGORY == "image/upscaling/Inf-DiT" and node.OUTPUT_NODE
    for section in node.INPUT_TYPES().values():
        assert all("tooltip" in options for _, options in section.values())
    out = node().report(model, width=37, height=21, scale=4.0, steps=20, block_batch=2)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    expected = plan(model.model.config, 84, 148, 2, torch.float32)  # 21x37 -> 84x148: 3x5 blocks of 32 px
    assert "37x21 -> 148x84 (x4)" in text
    assert "blocks 15, block batch 2," in text and f"{39 * 8} network calls for heun 20 steps" in text
    assert f"predicted peak {expected.total / 2**30:.2f} GB" in text


def test_plan_node_uses_the_image_size_and_batch(models_dir):
    model = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]
    text = NODES["InfDiTMemoryPlan"]().report(model, 1, 1, 2.0, 10, 0, image=torch.rand(3, 16, 40, 3))["result"][0]
    assert "40x16 -> 80x32 (x2), batch 3" in text
    assert "(auto)" in text and "blocks 9," in text  # 3 images x (1 x 3 blocks)


def test_plan_node_plans_the_chosen_sampler(models_dir):
    """A preset brings its steps, network calls and canvases: `fast` is 10 calls a sweep, and holds
    the forecaster's estimates beside Heun's canvases."""
    from infdit_core.sampling import PRESETS, get_sampler
    model = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]
    name, steps = PRESETS["fast"]
    method = get_sampler(name)
    text = NODES["InfDiTMemoryPlan"]().report(model, 37, 21, 4.0, 20, 2, sampler="fast")["result"][0]
    expected = plan(model.model.config, 84, 148, 2, torch.float32, canvases=method.canvases)
    assert f"{method.calls(steps) * 8} network calls for {name} {steps} steps" in text
    assert method.canvases > get_sampler("heun").canvases
    assert f"predicted peak {expected.total / 2**30:.2f} GB" in text
    heun = plan(model.model.config, 84, 148, 2, torch.float32)
    assert expected.canvases > heun.canvases


def test_plan_node_counts_the_weights_as_loaded_fp8_included():
    """fp8 weights are reported at their size: one byte per quantised weight plus a float32 scale
    per output channel, the rest (and the activations) bf16."""
    import dataclasses
    import importlib
    import re

    from infdit_core import InfDiT, InfDiTConfig
    from infdit_core.memory import parameter_count

    ManagedModel = importlib.import_module(load_pack().__name__ + ".nodes.comfy_bridge").ManagedModel
    InfDiTModel = importlib.import_module(load_pack().__name__ + ".nodes.loaders").InfDiTModel
    # The pack's own copy of fp8.py, whose Fp8Linear the node recognises.
    quantize_model = importlib.import_module(load_pack().__name__ + ".infdit_core.fp8").quantize_model

    config = dataclasses.replace(InfDiTConfig(), num_layers=2)  # the released width, two layers
    network = InfDiT(config).to(torch.bfloat16).eval()
    linears = [m for root in (network.transformer.layers, network.mixins.adaln_layer.adaLN_modulations)
               for m in root.modules() if isinstance(m, torch.nn.Linear)]
    fp8_bytes = parameter_count(config) * 2 - sum(m.weight.numel() * (2 - 1) - m.out_features * 4 for m in linears)
    model = InfDiTModel(managed=ManagedModel(network, torch.device("cpu"), torch.device("cpu")), path="x",
                        has_embedded_clip=False)

    def reported():
        text = NODES["InfDiTMemoryPlan"]().report(model, 64, 64, 4.0, 20, 1)["result"][0]
        return text.splitlines()[0], float(re.search(r"device: weights ([\d.]+) GB", text).group(1))

    assert reported() == ("64x64 -> 256x256 (x4), batch 1, bfloat16", round(parameter_count(config) * 2 / 2**30, 2))
    quantize_model(network)
    assert reported() == ("64x64 -> 256x256 (x4), batch 1, bfloat16 activations, fp8 weights",
                          round(fp8_bytes / 2**30, 2))
    assert round(fp8_bytes / 2**30, 2) < round(parameter_count(config) * 2 / 2**30, 2)  # 0.08 GB against 0.13
