"""The ComfyUI nodes, run without ComfyUI on the tiny golden model (2 layers, 32-px blocks).

A 16x16 input at 4x is a 64x64 output: 4 blocks. Steps are kept at 2 (3 network calls)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import Recorder, load_pack
from infdit_core.checkpoint import OFFICIAL_WEIGHTS_URL
from infdit_core.clip import CLIP_HF_REPO
from infdit_core.sampling import network_calls

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
loaders = sys.modules[PACK.__name__ + ".nodes.loaders"]
upscale_mod = sys.modules[PACK.__name__ + ".nodes.upscale"]

OUR_NODES = {"InfDiTModelLoader": "Load Inf-DiT Model", "InfDiTClipLoader": "Load Inf-DiT CLIP",
             "InfDiTClipEmbed": "Inf-DiT CLIP Semantic Embed", "InfDiTUpscale": "Inf-DiT UniBA Upscale"}
STEPS = 2


def image(b=1, h=16, w=16, c=3, seed=0):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


def unit(b=1, seed=1):
    return F.normalize(torch.randn(b, 768, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def model(models_dir):
    return NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "auto")[0]


def run(model, img, embed=None, clip=None, **kw):
    args = dict(scale=4.0, steps=STEPS, seed=0, block_batch=0, lr_noise_init=True)
    args.update(kw)
    return NODES["InfDiTUpscale"]().upscale(model, img, embed=embed, clip=clip, **args)[0]


# --- registration and interfaces -----------------------------------------------------------


def test_pack_exports_our_nodes_with_tooltips():
    for node_id, display in OUR_NODES.items():
        cls = NODES[node_id]
        assert PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        assert cls.CATEGORY == "image/upscaling/Inf-DiT"
        assert hasattr(cls, cls.FUNCTION) and cls.DESCRIPTION
        for section in cls.INPUT_TYPES().values():
            for name, (_, options) in section.items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_fixed_interfaces(models_dir):
    def order(node_id):
        spec = NODES[node_id].INPUT_TYPES()
        return list(spec["required"]), list(spec.get("optional", {}))

    assert order("InfDiTModelLoader") == (["model_name", "weight_dtype"], [])
    assert order("InfDiTClipLoader") == (["clip_name"], ["infdit_model"])
    assert order("InfDiTClipEmbed") == (["image", "clip", "positive", "negative", "strength"],
                                        ["reference_image", "reference_weight"])
    assert order("InfDiTUpscale") == (["model", "image", "scale", "steps", "seed", "block_batch",
                                       "lr_noise_init", "offload", "resume", "sampler", "fast"],
                                      ["embed", "clip", "mask"])
    assert [NODES[n].RETURN_TYPES for n in OUR_NODES] == [("INFDIT_MODEL",), ("INFDIT_CLIP",), ("INFDIT_EMBED",),
                                                           ("IMAGE", "MASK")]
    up = NODES["InfDiTUpscale"].INPUT_TYPES()["required"]
    assert up["seed"][1]["control_after_generate"] is True and up["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert [up[k][1]["default"] for k in ("scale", "steps", "sampler", "seed", "block_batch", "lr_noise_init")] == \
        [4.0, 20, "official", 0, 0, True]
    assert up["sampler"][0] == ["official", "balanced", "fast", "heun", "euler", "dpmpp_2m", "unipc",
                                "dpmpp_2m_forecast", "dpmpp_2m_forecast_end"]
    loader = NODES["InfDiTModelLoader"].INPUT_TYPES()["required"]
    assert loader["model_name"][0] == ["tiny_model.safetensors", "tiny_with_clip.safetensors",
                                       "demo: small model shipped with the pack (not the released weights)"]
    assert loader["weight_dtype"][0] == ["auto", "bf16", "fp16", "fp32", "fp8"]
    clip_names = NODES["InfDiTClipLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    # tiny_model.safetensors holds no CLIP image tower: not offered.
    assert clip_names == ["embedded in the Inf-DiT checkpoint", "tiny_clip.safetensors", "tiny_with_clip.safetensors"]


def test_scale_widget_range_is_exactly_what_runs(model):
    options = NODES["InfDiTUpscale"].INPUT_TYPES()["required"]["scale"][1]
    validate = NODES["InfDiTUpscale"].VALIDATE_INPUTS
    low, high, step = options["min"], options["max"], options["step"]
    # Every value the widget can show passes validation (the frontend rounds to the step's decimals)...
    values = [round(low + i * step, 2) for i in range(round((high - low) / step) + 1)]
    assert values[0] == low and values[-1] == high == 4.0 and options["default"] in values
    assert all(validate(scale=v) is True for v in values) and validate(scale=None) is True
    # ...nothing outside it does (1.0 used to pass the widget and fail validation)...
    for outside in (1.0, low - 0.01, high + 0.01, 0.5):
        assert f"between {low:g} and {high:g}" in validate(scale=outside)
    assert "chain" in validate(scale=high + 0.01)
    # ...and both ends run.
    assert run(model, image(1, 20, 20), unit(), scale=low).shape == (1, 21, 21, 3)
    # The Memory Plan node plans the same range.
    plan_options = NODES["InfDiTMemoryPlan"].INPUT_TYPES()["required"]["scale"][1]
    assert {k: plan_options[k] for k in ("min", "max", "step")} == {"min": low, "max": high, "step": step}


# --- loaders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice,dtype", [("auto", torch.float32), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_model_loader_dtype(models_dir, choice, dtype):
    loaded = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", choice)[0]
    assert loaded.model.dtype == dtype and loaded.model.device.type == "cpu"
    assert loaded.model.config.block_size == 32 and not loaded.has_embedded_clip


def test_missing_model_names_file_folder_and_source(models_dir):
    with pytest.raises(FileNotFoundError) as err:
        NODES["InfDiTModelLoader"]().load("nope.safetensors", "auto")
    text = str(err.value)
    assert "nope.safetensors" in text and "ComfyUI/models/infdit" in text and str(models_dir / "infdit") in text
    assert OFFICIAL_WEIGHTS_URL in text


def test_wrong_model_file_names_file_folder_and_source(models_dir):
    # A CLIP file put in models/infdit by mistake.
    (models_dir / "infdit" / "wrong.safetensors").write_bytes((models_dir / "clip_vision" / "tiny_clip.safetensors").read_bytes())
    try:
        with pytest.raises(PACK.infdit_core.CheckpointError) as err:
            NODES["InfDiTModelLoader"]().load("wrong.safetensors", "auto")
    finally:
        (models_dir / "infdit" / "wrong.safetensors").unlink()
    text = str(err.value)
    assert "does not contain Inf-DiT weights" in text and "wrong.safetensors" in text
    assert str(models_dir / "infdit") in text and OFFICIAL_WEIGHTS_URL in text


def test_clip_loader_embedded(models_dir, tiny_clip):
    with_clip = NODES["InfDiTModelLoader"]().load("tiny_with_clip.safetensors", "fp32")[0]
    assert with_clip.has_embedded_clip
    clip = NODES["InfDiTClipLoader"]().load("embedded in the Inf-DiT checkpoint", with_clip)[0].embedder
    assert not clip.has_text_tower
    x = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = tiny_clip.encode_image(clip.preprocess(x), normalize=True)
    torch.testing.assert_close(clip.embed_image(x), want, atol=1e-6, rtol=0)


def test_clip_loader_errors(models_dir, model):
    loader = NODES["InfDiTClipLoader"]()
    with pytest.raises(ValueError, match="infdit_model input"):
        loader.load("embedded in the Inf-DiT checkpoint")
    with pytest.raises(ValueError, match="tiny_model.safetensors: this Inf-DiT file has no CLIP image tower; pick"):
        loader.load("embedded in the Inf-DiT checkpoint", model)
    # The same file picked by name (a workflow or API prompt can name it; the list leaves it out):
    # the same advice instead of hundreds of missing and unexpected keys.
    with pytest.raises(ValueError) as err:
        loader.load("tiny_model.safetensors")
    text = str(err.value)
    assert "tiny_model.safetensors: this Inf-DiT file has no CLIP image tower; pick" in text
    assert CLIP_HF_REPO in text and "missing" not in text
    with pytest.raises(FileNotFoundError) as err:
        loader.load("missing_clip.bin")
    assert "missing_clip.bin" in str(err.value) and str(models_dir / "clip_vision") in str(err.value)
    assert CLIP_HF_REPO in str(err.value)


def clip_folder(tmp_path, monkeypatch, files):
    """A models/ folder whose clip_vision/ holds `files` {name: bytes}; infdit/ is empty."""
    (tmp_path / "infdit").mkdir()
    (tmp_path / "clip_vision").mkdir()
    for name, data in files.items():
        (tmp_path / "clip_vision" / name).write_bytes(data)
    monkeypatch.setenv("INFDIT_MODELS_DIR", str(tmp_path))
    return tmp_path / "clip_vision"


def test_clip_list_offers_only_files_that_can_work(models_root, tiny_clip, tmp_path, monkeypatch):
    import io

    from safetensors.torch import save

    good = (models_root / "clip_vision" / "tiny_clip.safetensors").read_bytes()
    pickled = io.BytesIO()
    torch.save({k: v for k, v in tiny_clip.state_dict().items() if k.startswith("visual.")}, pickled)
    clip_folder(tmp_path, monkeypatch, {
        "good.safetensors": good,
        "dit_only.safetensors": (models_root / "infdit" / "tiny_model.safetensors").read_bytes(),
        "other_vision.safetensors": save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 3, 2, 2)}),
        "unchecked.bin": pickled.getvalue(),  # a pickle cannot be checked without loading it whole
        "truncated.safetensors": good[:len(good) // 2],  # kept: loading it says what is wrong
    })
    names = NODES["InfDiTClipLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    assert names == ["embedded in the Inf-DiT checkpoint", "good.safetensors", "truncated.safetensors", "unchecked.bin"]
    assert NODES["InfDiTClipLoader"]().load("unchecked.bin")[0].embedder.embed_image(torch.rand(1, 3, 30, 30)).shape == (1, 768)
    with pytest.raises(ValueError, match="this file holds no open_clip CLIP image tower"):
        NODES["InfDiTClipLoader"]().load("other_vision.safetensors")


def test_truncated_clip_file_is_named_with_what_to_do(models_root, tmp_path, monkeypatch):
    good = (models_root / "clip_vision" / "tiny_clip.safetensors").read_bytes()
    folder = clip_folder(tmp_path, monkeypatch, {"open_clip_model.safetensors": good[:len(good) - 100]})
    with pytest.raises(PACK.infdit_core.CheckpointError) as err:
        NODES["InfDiTClipLoader"]().load("open_clip_model.safetensors")
    text = str(err.value)
    assert str(folder / "open_clip_model.safetensors") in text
    assert "truncated or corrupt" in text and "Download it again" in text


def test_clip_is_managed_by_comfyui_like_the_model(models_dir, monkeypatch):
    # ComfyUI stood in for by its memory-manager API: the CLIP weights live in a ModelPatcher,
    # are loaded through load_models_gpu (which evicts others and accounts for them) and are never
    # moved by hand, so ComfyUI can evict them when another model needs the room.
    import types

    cpu = torch.device("cpu")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    loads = []
    mm = types.SimpleNamespace(
        get_torch_device=lambda: cpu, unet_offload_device=lambda: cpu, should_use_bf16=lambda device: False,
        should_use_fp16=lambda device: False,
        load_models_gpu=lambda patchers, memory_required=0, force_full_load=False: loads.append(
            (patchers, memory_required, force_full_load)))
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", types.SimpleNamespace(ModelPatcher=ModelPatcher))

    clip = NODES["InfDiTClipLoader"]().load("tiny_clip.safetensors")[0]
    patcher = clip.managed.patcher
    assert isinstance(patcher, ModelPatcher) and (patcher.load_device, patcher.offload_device) == (cpu, cpu)
    # Both towers' weights are what ComfyUI manages (and counts).
    managed = {id(p) for p in patcher.model.parameters()}
    assert managed == {id(p) for p in clip.embedder.module.parameters()}
    assert {id(p) for p in clip.embedder.visual.parameters()} < managed and clip.embedder.has_text_tower
    monkeypatch.setattr(clip.embedder.module, "to", lambda *a, **k: pytest.fail("CLIP moved by hand"))
    assert embed(clip, image(), strength=2.0).shape == (1, 768)
    assert loads == [([patcher], 0, True)]


# --- embed ----------------------------------------------------------------------------------------


@pytest.fixture
def full_clip(models_dir):
    return NODES["InfDiTClipLoader"]().load("tiny_clip.safetensors")[0]


def embed(clip, img, strength=0.0, **kw):
    return NODES["InfDiTClipEmbed"]().embed(img, clip, "HD, high resolution, clear.", "noisy,blurry,low resolution.",
                                            strength, **kw)[0]


def test_embed_node(full_clip):
    img, ref = image(2, 30, 40), image(1, 20, 20, seed=5)
    e = embed(full_clip, img)
    want = full_clip.embedder.embed_image(img.movedim(-1, 1))
    assert e.shape == (2, 768) and e.device.type == "cpu"
    torch.testing.assert_close(e, want)
    # The alpha channel is not content.
    torch.testing.assert_close(embed(full_clip, torch.cat([img, torch.rand(2, 30, 40, 1)], -1)), e)
    e_ref = full_clip.embedder.embed_image(ref.movedim(-1, 1))
    torch.testing.assert_close(embed(full_clip, img, reference_image=ref, reference_weight=1.0), e_ref.expand(2, -1))
    torch.testing.assert_close(embed(full_clip, img, reference_image=ref, reference_weight=0.0), e)
    half = embed(full_clip, img, reference_image=ref, reference_weight=0.5)
    torch.testing.assert_close(half, F.normalize(e + e_ref, dim=-1))
    nudged = embed(full_clip, img, strength=2.0)
    torch.testing.assert_close(nudged, full_clip.embedder.nudge(e, "HD, high resolution, clear.", "noisy,blurry,low resolution.", 2.0))
    assert (nudged - e).abs().max() > 1e-3


def test_embed_nudge_needs_text_tower(models_dir):
    with_clip = NODES["InfDiTModelLoader"]().load("tiny_with_clip.safetensors", "fp32")[0]
    clip = NODES["InfDiTClipLoader"]().load("embedded in the Inf-DiT checkpoint", with_clip)[0]
    assert embed(clip, image()).shape == (1, 768)
    with pytest.raises(ValueError, match="text tower"):
        embed(clip, image(), strength=2.0)


# --- upscale ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 3, 4])
def test_upscale_shapes_range_and_inputs_untouched(model, c):
    img = image(2, 16, 12, c)
    before = img.clone()
    out = run(model, img, unit(1))
    assert out.shape == (2, 64, 48, c) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.is_contiguous() and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    assert torch.equal(img, before)
    if c == 4:  # alpha is resized, not generated
        torch.testing.assert_close(out[..., 3:], F.interpolate(img[..., 3:].movedim(-1, 1), (64, 48), mode="bicubic",
                                                                antialias=True).clamp(0, 1).movedim(1, -1))


def test_grayscale_stays_grayscale(model):
    # Load Image makes three equal channels of a gray PNG; the model alone would add chroma.
    gray = image(2, 16, 12, 1).expand(-1, -1, -1, 3)
    out = run(model, gray, unit(1))
    assert out.shape == (2, 64, 48, 3) and out.std() > 0.01
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])


def test_mask_is_upscaled_beside_the_image(model):
    # Load Image gives an RGBA file as IMAGE (RGB) plus MASK = 1 - alpha. Passed as a 4-channel
    # image as well, the alpha channel and the mask output must agree.
    rgb, alpha = image(1, 16, 12), torch.rand(1, 16, 12, generator=torch.Generator().manual_seed(4))
    out, mask = NODES["InfDiTUpscale"]().upscale(model, torch.cat([rgb, alpha[..., None]], -1), 4.0, STEPS, 0, 0, True,
                                                 embed=unit(), mask=1 - alpha)
    assert mask.shape == (1, 64, 48) and mask.dtype == torch.float32 and mask.device.type == "cpu"
    want = F.interpolate((1 - alpha)[:, None], (64, 48), mode="bicubic", antialias=True).clamp(0, 1)[:, 0]
    torch.testing.assert_close(mask, want, atol=0, rtol=0)
    torch.testing.assert_close(1 - mask, out[..., 3], atol=1e-6, rtol=0)
    # The mask does not change the image; without one the mask output is all zero (what Load Image
    # gives for an opaque picture), one per image, at the output size.
    plain, zeros = NODES["InfDiTUpscale"]().upscale(model, rgb, 4.0, STEPS, 0, 0, True, embed=unit())
    torch.testing.assert_close(plain, out[..., :3], atol=0, rtol=0)
    assert torch.equal(zeros, torch.zeros(1, 64, 48))
    assert torch.equal(upscale_mod.upscale_mask(None, (64, 48), 2), torch.zeros(2, 64, 48))
    # Load Image's mask of an opaque picture is 64x64 whatever the image size; [H, W] masks occur too.
    assert torch.equal(upscale_mod.upscale_mask(torch.zeros(1, 64, 64), (64, 48), 1), torch.zeros(1, 64, 48))
    torch.testing.assert_close(upscale_mod.upscale_mask(1 - alpha[0], (64, 48), 1), want, atol=0, rtol=0)


def test_auto_asks_comfyui_for_what_auto_picks(model, monkeypatch):
    # 16x16 at 4x: 4 blocks. Free memory set so that auto (which leaves 20% headroom) picks 2 of
    # them; before, auto asked ComfyUI for room for all 4 at once.
    memory = sys.modules[PACK.__name__ + ".infdit_core.memory"]
    config, dtype = model.model.config, model.model.dtype
    two = memory.plan(config, 64, 64, 2, dtype).working
    monkeypatch.setattr(memory, "free_memory", lambda device: int(two / 0.8) + 1)
    asked = []
    load = model.managed.load
    monkeypatch.setattr(model.managed, "load", lambda need: asked.append(need) or load(need))
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    run(model, image(), unit(), block_batch=0)
    assert len(rec.updates) == network_calls(STEPS) * 2  # the run used 2 blocks per call...
    assert asked == [two] and two < memory.plan(config, 64, 64, 4, dtype).working  # ...and asked for that


def test_upscale_fractional_scale(model):
    assert run(model, image(1, 15, 10), unit(), scale=2.5).shape == (1, 38, 25, 3)


def test_upscale_deterministic_for_a_seed(model):
    img, e = image(), unit()
    a = run(model, img, e, seed=7, block_batch=1)
    assert torch.equal(run(model, img, e, seed=7, block_batch=1), a)
    # Another block batch only reorders float32 sums.
    torch.testing.assert_close(run(model, img, e, seed=7, block_batch=3), a, atol=5e-4, rtol=0)
    c = run(model, img, e, seed=2 ** 64 - 1, block_batch=1)
    assert (a - c).abs().max() > 1e-2
    d = run(model, img, e, seed=7, block_batch=1, lr_noise_init=False)
    assert (a - d).abs().max() > 1e-2


def test_upscale_needs_embed_or_clip(model, full_clip):
    img = image(2)
    with pytest.raises(ValueError, match="connect 'embed'.*or 'clip'"):
        run(model, img)
    torch.testing.assert_close(run(model, img, clip=full_clip), run(model, img, embed(full_clip, img)))
    with pytest.raises(ValueError, match="3 embeddings but the image batch has 2"):
        run(model, img, unit(3))
    with pytest.raises(ValueError, match="between 1.05 and 4"):
        run(model, img, unit(), scale=1.0)


@pytest.mark.parametrize("block_batch,batches", [(1, 4), (2, 2), (0, 1)])
def test_progress_counts_every_block_batch(model, monkeypatch, block_batch, batches):
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    monkeypatch.setattr(bridge, "PREVIEW_INTERVAL_S", 0.0)
    run(model, image(), unit(), block_batch=block_batch)  # auto: 4 blocks fit easily in memory
    total = network_calls(STEPS) * 4
    assert rec.created_with == total
    assert len(rec.updates) == network_calls(STEPS) * batches
    assert [v for v, _, _ in rec.updates] == [total * (i + 1) // len(rec.updates) for i in range(len(rec.updates))]
    assert all(t == total for _, t, _ in rec.updates)
    fmt, pil, size = rec.updates[-1][2]
    assert (fmt, pil.size, size, pil.mode) == ("JPEG", (64, 64), 512, "RGB")


def test_previews_are_throttled_and_downsized(model, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    times = iter([0.0, 0.3, 0.6, 1.2] + [1.3] * 100)
    reporter = bridge.ProgressReporter((1000, 600), clock=lambda: next(times))
    canvas = torch.zeros(1, 3, 1024, 640)
    for i in range(6):
        reporter(0, 1, i + 1, 6, canvas)
    sent = [p for _, _, p in rec.updates]
    assert [p is not None for p in sent] == [True, False, False, True, False, False]
    assert sent[0][1].size == (307, 512)  # PIL: (width, height), longer side 512, padding cropped off
    assert sent[0][1].getpixel((0, 0)) == (128, 128, 128)  # x0 = 0 is mid-grey


def test_interrupt_stops_run_and_next_run_works(model, monkeypatch):
    img, e = image(), unit()
    reference = run(model, img, e, block_batch=1)
    rec = Recorder(raise_at=3)
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    with pytest.raises(KeyboardInterrupt):
        run(model, img, e, block_batch=1)
    assert len(rec.updates) == 3  # stopped within one block batch
    monkeypatch.setattr(bridge, "progress_bar", Recorder().factory)
    torch.testing.assert_close(run(model, img, e, block_batch=1), reference, atol=0, rtol=0)


@pytest.mark.parametrize("batch,dtype,advice", [(1, "fp32", "weight_dtype to bf16"), (2, "bf16", "one at a time")])
def test_out_of_memory_says_which_knob(models_dir, monkeypatch, batch, dtype, advice):
    # Every block batch "runs out of memory": the engine halves down to 1, then gives up.
    model = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", dtype)[0]
    monkeypatch.setattr(bridge, "progress_bar", Recorder(raise_at=1, error=torch.OutOfMemoryError).factory)
    with pytest.warns(UserWarning, match="retrying with block_batch"), pytest.raises(bridge.InfDiTOutOfMemory) as err:
        run(model, image(batch), unit(), block_batch=4)
    assert isinstance(err.value, torch.OutOfMemoryError)  # ComfyUI unloads models on these
    text = str(err.value)
    assert "64x64 output even with block_batch 1" in text and advice in text and "lower scale" in text


def test_offload_modes_give_the_same_image(model):
    img, e = image(h=16, w=24), unit()
    reference = run(model, img, e, block_batch=2, offload="off")
    for mode in ("auto", "canvas", "all"):
        assert torch.equal(run(model, img, e, block_batch=2, offload=mode), reference), mode


@pytest.mark.filterwarnings("ignore:Inf-DiT. out of memory")
@pytest.mark.parametrize("offload,mentions_offload", [("off", True), ("all", False)])
def test_out_of_memory_advice_mentions_offload_only_when_it_was_off(models_dir, monkeypatch, offload,
                                                                    mentions_offload):
    model = NODES["InfDiTModelLoader"]().load("tiny_model.safetensors", "fp32")[0]
    monkeypatch.setattr(bridge, "progress_bar", Recorder(raise_at=1, error=torch.OutOfMemoryError).factory)
    with pytest.raises(bridge.InfDiTOutOfMemory) as err:
        run(model, image(), unit(), block_batch=1, offload=offload)
    assert ("set offload to all" in str(err.value)) == mentions_offload
    assert f"offload {offload}" in str(err.value)


def test_cancel_then_queue_again_resumes_where_it_stopped(model, monkeypatch, tmp_path):
    # The threshold is 2048² outputs; the tiny test image stands in for a big one.
    monkeypatch.setattr(upscale_mod, "RESUME_MIN_PIXELS", 1)
    folder = tmp_path / "infdit_resume"
    monkeypatch.setattr(bridge, "resume_dir", lambda: str(folder))
    img, e = image(), unit()
    reference = run(model, img, e, block_batch=1, resume="off")
    assert not folder.exists()
    # 2 steps = 3 network calls x 4 blocks; update 10 falls in the second half (step 1's calls).
    monkeypatch.setattr(bridge, "progress_bar", Recorder(raise_at=10).factory)
    with pytest.raises(KeyboardInterrupt):
        run(model, img, e, block_batch=1)
    assert len(list(folder.iterdir())) == 1  # step 0's state, kept by the cancel
    again = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", again.factory)
    assert torch.equal(run(model, img, e, block_batch=1), reference)
    # The bar shows step 0's two calls as done at once, then goes on from there.
    assert [u[0] for u in again.updates] == list(range(2 * 4, 3 * 4 + 1)) and again.updates[0][1] == 3 * 4
    assert list(folder.iterdir()) == []  # a finished job deletes its checkpoint


def test_bridge_without_comfyui(models_dir):
    assert not bridge.in_comfyui()
    bridge.register_model_folder()  # a no-op without ComfyUI
    assert bridge.folder_dirs("infdit") == [str(models_dir / "infdit")]
    assert bridge.find_file("clip_vision", "tiny_clip.safetensors") == str(models_dir / "clip_vision" / "tiny_clip.safetensors")
    assert bridge.find_file("clip_vision", "absent.bin") is None
    assert bridge.intermediate_device() == torch.device("cpu")
    assert bridge.auto_dtype(torch.device("cpu")) == torch.float32


def test_folder_registration_keeps_extra_model_paths(monkeypatch, tmp_path):
    # folder_paths as ComfyUI leaves it after extra_model_paths.yaml added an "infdit" path: an
    # entry with an empty extension set (which would list every file).
    import types

    fake = types.SimpleNamespace(models_dir=str(tmp_path / "models"), supported_pt_extensions={".pt", ".safetensors"},
                                 folder_names_and_paths={"infdit": (["/nas/infdit"], set())})
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    bridge.register_model_folder()
    assert fake.folder_names_and_paths["infdit"] == (["/nas/infdit", str(tmp_path / "models" / "infdit")],
                                                     {".pt", ".safetensors"})
    del fake.folder_names_and_paths["infdit"]
    bridge.register_model_folder()
    assert fake.folder_names_and_paths["infdit"] == ([str(tmp_path / "models" / "infdit")], {".pt", ".safetensors"})


@pytest.mark.parametrize("sampler,steps,calls", [("fast", STEPS, None), ("unipc", 3, 3), ("heun", 2, 3)])
def test_sampler_combo_runs_presets_with_their_steps_and_samplers_with_the_widget(model, monkeypatch, sampler,
                                                                                  steps, calls):
    from infdit_core.sampling import PRESETS, get_sampler

    if calls is None:  # a preset ignores the steps widget
        calls = get_sampler(PRESETS[sampler][0]).calls(PRESETS[sampler][1])
    rec = Recorder()
    monkeypatch.setattr(bridge, "progress_bar", rec.factory)
    out = run(model, image(), unit(), steps=steps, sampler=sampler, block_batch=4)  # 4 blocks: one update a call
    assert len(rec.updates) == calls and rec.created_with == calls * 4
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        run(model, image(), unit(), sampler="nope")
