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
