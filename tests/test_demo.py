"""The demo model that ships with the pack: loads strictly, is small, and upscales without CLIP or
any download, from the command line and in ComfyUI."""
import os
import sys

import numpy as np
import torch
from PIL import Image

from conftest import REPO, load_pack
from infdit_core.__main__ import main as cli
from infdit_core.checkpoint import DEMO_MODEL, check_state_dict, read_state_dict, resolve_model

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
loaders = sys.modules[PACK.__name__ + ".nodes.loaders"]


def test_demo_model_ships_small_and_loads_strictly():
    assert os.path.dirname(DEMO_MODEL) == str(REPO / "infdit_core" / "demo")
    assert os.path.getsize(DEMO_MODEL) <= 10 * 2 ** 20
    sd, meta = read_state_dict(DEMO_MODEL)
    config = check_state_dict(sd, metadata=meta)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.block_size) == (4, 128, 4, 32)
    assert meta["clip"] == "none" and int(meta["trained_steps"]) > 0
    assert resolve_model("demo") == DEMO_MODEL and resolve_model("x.pt") == "x.pt"


def test_cli_upscales_with_the_demo_model(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 28, 3)).astype(np.uint8)).save(tmp_path / "in.png")
    cli(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--model", "demo", "--steps", "2",
         "--device", "cpu", "--dtype", "fp32"])
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (112, 80)


def test_comfyui_lists_the_demo_model_and_runs_it_without_clip(models_dir):
    loader = NODES["InfDiTModelLoader"]
    assert loaders.DEMO_ENTRY in loader.INPUT_TYPES()["required"]["model_name"][0]
    assert loader.VALIDATE_INPUTS(loaders.DEMO_ENTRY) is True
    model = loader().load(loaders.DEMO_ENTRY, "fp32")[0]
    assert model.needs_clip is False and model.path == DEMO_MODEL
    image = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(0))
    out, mask = NODES["InfDiTUpscale"]().upscale(model, image, 4.0, 2, 0, 0, True)
    assert tuple(out.shape) == (1, 96, 96, 3) and tuple(mask.shape) == (1, 96, 96)
