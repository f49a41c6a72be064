"""The denoiser against outputs of the official code (tests/data/golden), key layout, config inference."""
import ast
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from infdit_core import InfDiT, InfDiTConfig, denoise, load_model
from infdit_core.denoiser import edm_precondition
from infdit_core.memory import parameter_count

CASES = ["sq_2x2blocks", "rect_3wide_2high", "batch2_2wide_4high"]


@pytest.fixture(scope="module")
def manifest(golden_dir):
    return json.loads((golden_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def load_case(golden_dir, manifest, name):
    return load_file(golden_dir / manifest["cases"][name]["file"])


def run(model, case):
    return denoise(model, case["in.x_noised"], case["in.sigma"], lr=case["in.lr_image"],
                   concat_lr=case["in.concat_lr_image"], clip_vector=case["in.clip_vector"])


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", CASES)
def test_reproduces_official_denoiser_fp32(golden_dir, manifest, model, name):
    case = load_case(golden_dir, manifest, name)
    out = run(model, case)
    assert out.shape == case["out.denoised"].shape
    assert rel_l2(out, case["out.denoised"]) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_preconditioning_matches_official(golden_dir, manifest, name):
    case = load_case(golden_dir, manifest, name)
    for got, key in zip(edm_precondition(case["in.sigma"]), ["c_skip", "c_out", "c_in", "c_noise"]):
        torch.testing.assert_close(got, case[f"mid.{key}"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CASES)
def test_half_precision_close_to_fp32(golden_dir, manifest, name, dtype):
    case = load_case(golden_dir, manifest, name)
    half = load_model(golden_dir / "tiny_model.safetensors", dtype=dtype)
    assert half.dtype == dtype
    out = run(half, case)
    assert out.dtype == torch.float32  # preconditioning and output mix stay float32
    assert rel_l2(out, case["out.denoised"]) <= 2e-2


def test_state_dict_keys_are_the_official_ones(golden_dir, model):
    official = load_file(golden_dir / "tiny_model.safetensors")
    ours = model.state_dict()
    assert set(ours) == set(official)
    for key, tensor in official.items():
        assert tuple(ours[key].shape) == tuple(tensor.shape), key


def test_rope_tables_are_generated_exactly(golden_dir, model):
    official = load_file(golden_dir / "tiny_model.safetensors")
    ours = model.state_dict()
    for key in ["mixins.adaln_layer.rope.freqs_cos", "mixins.adaln_layer.rope.freqs_sin"]:
        torch.testing.assert_close(ours[key], official[key], rtol=0, atol=1e-6)


def test_checkpoint_without_rope_tables_gives_same_output(golden_dir, manifest, model):
    sd = {k: v for k, v in load_file(golden_dir / "tiny_model.safetensors").items() if ".rope." not in k}
    # Without the tables the position modulo falls back to the official 1024, so state it.
    config = InfDiTConfig.from_state_dict(load_file(golden_dir / "tiny_model.safetensors"))
    trimmed = InfDiT(config)
    trimmed.load_state_dict(sd, strict=False)
    case = load_case(golden_dir, manifest, "sq_2x2blocks")
    torch.testing.assert_close(run(trimmed, case), run(model, case), rtol=0, atol=0)


def test_config_inferred_from_tensors_matches_official_arguments(golden_dir):
    args = json.loads((golden_dir / "config.json").read_text())["args"]
    derived = json.loads((golden_dir / "config.json").read_text())["derived"]
    config = InfDiTConfig.from_state_dict(load_file(golden_dir / "tiny_model.safetensors"))
    assert (config.num_layers, config.hidden_size, config.num_heads) == (
        args["num_layers"], args["hidden_size"], args["num_attention_heads"])
    assert (config.patch_size, config.block_size, config.image_size) == (
        args["patch_size"], args["image_block_size"], args["image_size"])
    assert (config.vector_dim, config.in_channels, config.out_channels) == (
        args["vector_dim"], args["in_channels"], args["out_channels"])
    assert config.rope_size == derived["rope_position_modulo"]
    assert config.head_dim == derived["head_dim"]


def test_full_size_defaults_match_the_official_model():
    config = InfDiTConfig()
    assert parameter_count(config) == 753_762_928  # spec 3.6
    with torch.device("meta"):
        sd = InfDiT(config).state_dict()
    assert tuple(sd["mixins.adaln_layer.re_pos_embed"].shape) == (28, 4, 16, 80)
    assert tuple(sd["mixins.adaln_layer.lr_key_position_embedding"].shape) == (1, 2304, 16, 80)
    assert tuple(sd["mixins.adaln_layer.rope.freqs_cos"].shape) == (1024, 1024, 80)
    assert tuple(sd["mixins.adaln_layer.cross_attention.key_value.weight"].shape) == (2560, 1280)
    assert tuple(sd["transformer.position_embeddings.weight"].shape) == (256, 1280)
    assert "transformer.word_embeddings.weight" not in sd


def test_denoise_rejects_sizes_off_the_block_grid(model):
    x = torch.zeros(1, 3, 48, 64)
    with pytest.raises(ValueError, match="not a multiple of the 32-px block"):
        denoise(model, x, 1.0, lr=torch.zeros(1, 3, 12, 16), concat_lr=x, clip_vector=torch.zeros(1, 768))


def test_engine_never_imports_comfyui():
    root = pathlib.Path(__file__).resolve().parents[1] / "infdit_core"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.split(".")[0] in ("comfy", "folder_paths", "comfy_extras", "nodes"), \
                    f"{path.name} imports {name}"
