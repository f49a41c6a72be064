"""CLIP embedding + text nudge (infdit_core/clip.py), checked against open_clip and torchvision.

A tiny seeded open_clip model stands in for ViT-L-14 (golden config.json "clip_standin"); the real
ViT-L-14 architecture is only built on the meta device.
"""
import json
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from safetensors.torch import save_file

from infdit_core import CheckpointError, ClipEmbedder, load_clip
from infdit_core import clip as clipmod

PREFIX = "image_encoder.model."


@pytest.fixture(scope="module")
def standin(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())["clip_standin"]
    # The real CLIP BPE tokenizer emits ids up to 49407, so the text tower needs the real vocabulary
    # size for the nudge to run (the stand-in's 64 is only used for the vocab-mismatch test).
    cfg["text_cfg"]["vocab_size"] = 49408
    return cfg


@pytest.fixture(scope="module")
def heads_override(standin):
    # Head counts are invisible in tensor shapes; the stand-in's differ from CLIP's 64-wide heads.
    return {"vision_cfg": {"head_width": standin["vision_cfg"]["head_width"]},
            "text_cfg": {"heads": standin["text_cfg"]["heads"]}}


def make_clip(cfg, seed):
    """open_clip CLIP with every tensor re-drawn (so no LayerNorm sits at the identity)."""
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_ln_weight = ".ln_" in "." + name and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if is_ln_weight else 0.0))
    return model


@pytest.fixture(scope="module")
def ref(standin):
    return make_clip(standin, standin["seed"])


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_vision")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch.save(sd, d / "open_clip_pytorch_model.bin")
    save_file(sd, str(d / "open_clip_model.safetensors"))
    return {"bin": d / "open_clip_pytorch_model.bin", "safetensors": d / "open_clip_model.safetensors"}


@pytest.fixture(scope="module")
def embedder(files, heads_override):
    return load_clip(files["bin"], config=heads_override)


def official_layout(ref):
    """What an Inf-DiT checkpoint holds: DiT keys, the image tower and the text leftovers."""
    sd = {"transformer.layers.0.attention.dense.weight": torch.randn(64, 64),
          "mixins.patch_embed.proj.weight": torch.randn(64, 6, 4, 4)}
    for k, v in ref.state_dict().items():
        if k.startswith("visual.") or k in clipmod.TEXT_LEFTOVERS:
            sd[PREFIX + k] = v.contiguous()
    return sd


def torchvision_preprocess(x):
    return T.Compose([
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(224),
        T.Normalize(clipmod.CLIP_MEAN, clipmod.CLIP_STD),
    ])(x)


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_embed_image_matches_open_clip(kind, files, ref, heads_override):
    emb = load_clip(files[kind], config=heads_override)
    assert isinstance(emb, ClipEmbedder) and emb.has_text_tower
    x = torch.rand(2, 3, 64, 65, generator=torch.Generator().manual_seed(1))
    got = emb.embed_image(x)
    with torch.no_grad():
        want = ref.encode_image(torchvision_preprocess(x), normalize=True)
    assert got.shape == (2, 768) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(64, 65), (70, 48), (224, 224), (300, 500), (97, 130)])
def test_preprocess_matches_torchvision(hw, embedder):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(embedder.preprocess(x), torchvision_preprocess(x), atol=1e-6, rtol=0)


def test_crop_offset_rounds_half_to_even(embedder):
    # 64x65 -> resized 224x227: torchvision crops at left = round(1.5) = 2, floor division gives 1.
    x = torch.rand(1, 3, 64, 65, generator=torch.Generator().manual_seed(3))
    resized = T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x)
    assert resized.shape[-1] == 227
    norm = T.Normalize(clipmod.CLIP_MEAN, clipmod.CLIP_STD)
    got = embedder.preprocess(x)
    torch.testing.assert_close(got, norm(resized[..., :, 2:226]), atol=1e-6, rtol=0)
    assert (got - norm(resized[..., :, 1:225])).abs().max() > 1e-3


def test_embed_image_is_per_sample(embedder):
    x = torch.rand(3, 3, 50, 80, generator=torch.Generator().manual_seed(4))
    batched = embedder.embed_image(x)
    single = torch.cat([embedder.embed_image(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


@pytest.mark.parametrize("strength,pos,neg", [
    (clipmod.PRESET_STRENGTH, clipmod.DEFAULT_POSITIVE, clipmod.DEFAULT_NEGATIVE),
    (-0.5, "a photo of a cat", "a watercolor painting"),
])
def test_nudge_matches_eq5(strength, pos, neg, embedder, ref):
    e = embedder.embed_image(torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5)))
    tok = open_clip.get_tokenizer("ViT-L-14")
    with torch.no_grad():
        t_pos = ref.encode_text(tok([pos]), normalize=True)
        t_neg = ref.encode_text(tok([neg]), normalize=True)
    want = F.normalize(e + strength * t_pos - strength * t_neg, dim=-1)
    got = embedder.nudge(e, pos, neg, strength)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - e).abs().max() > 1e-3


def test_official_constants():
    assert clipmod.DEFAULT_POSITIVE == "HD, high resolution, clear."
    assert clipmod.DEFAULT_NEGATIVE == "noisy,blurry,low resolution."
    assert clipmod.PRESET_STRENGTH == 2.0


def test_nudge_strength_zero_is_identity(embedder, ref):
    image_only = load_clip(official_layout(ref), config={"vision_cfg": {"head_width": 32}})
    for emb in (embedder, image_only):
        e = emb.embed_image(torch.rand(1, 3, 32, 32))
        assert emb.nudge(e, "sharp", "blurry", 0.0) is e


def test_text_embeddings_are_cached(files, heads_override, monkeypatch):
    emb = load_clip(files["bin"], config=heads_override)
    calls = []
    encode = emb._text_model.encode_text
    monkeypatch.setattr(emb._text_model, "encode_text", lambda *a, **k: calls.append(1) or encode(*a, **k))
    e = emb.embed_image(torch.rand(1, 3, 32, 32))
    first = emb.nudge(e, "sharp", "blurry", 1.0)
    second = emb.nudge(e, "sharp", "blurry", 1.0)
    assert len(calls) == 2
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_nudge_without_text_tower_names_the_file(ref, heads_override):
    emb = load_clip(official_layout(ref), config=heads_override)
    assert not emb.has_text_tower
    e = emb.embed_image(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError) as err:
        emb.nudge(e, clipmod.DEFAULT_POSITIVE, clipmod.DEFAULT_NEGATIVE, 2.0)
    msg = str(err.value)
    assert "text tower" in msg and "open_clip_pytorch_model.bin" in msg
    assert "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K" in msg


def test_tokenizer_vocab_mismatch_is_reported(standin, heads_override):
    cfg = json.loads(json.dumps(standin))
    cfg["text_cfg"]["vocab_size"] = 64
    emb = load_clip(make_clip(cfg, 0).state_dict(), config=heads_override)
    with pytest.raises(ValueError, match="64 token embeddings"):
        emb.nudge(emb.embed_image(torch.rand(1, 3, 32, 32)), "a", "b", 1.0)


def test_official_layout_matches_plain_file(files, ref, heads_override, tmp_path):
    x = torch.rand(2, 3, 48, 72, generator=torch.Generator().manual_seed(6))
    want = load_clip(files["safetensors"], config=heads_override).embed_image(x)

    official = official_layout(ref)
    torch.save({"module": official}, tmp_path / "mp_rank_00_model_states.pt")  # official wrapper
    save_file(official, str(tmp_path / "converted.safetensors"))  # our convert tool's layout
    for source in (official, tmp_path / "mp_rank_00_model_states.pt", tmp_path / "converted.safetensors"):
        emb = load_clip(source, config=heads_override)
        assert not emb.has_text_tower
        torch.testing.assert_close(emb.embed_image(x), want, atol=0, rtol=0)


def test_bf16_checkpoint_and_dtype(ref, heads_override):
    # Official checkpoints are bf16; the embedder may also run in bf16 and still returns float32.
    official = {k: v.to(torch.bfloat16) for k, v in official_layout(ref).items()}
    x = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    fp32 = load_clip(official, config=heads_override).embed_image(x)
    bf16 = load_clip(official, config=heads_override, dtype=torch.bfloat16).embed_image(x)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 3e-2


def spec_37_visual_shapes():
    """The image_encoder.model.visual.* keys and shapes listed in spec 3.7 (ViT-L-14)."""
    shapes = {"class_embedding": (1024,), "positional_embedding": (257, 1024),
              "conv1.weight": (1024, 3, 14, 14), "ln_pre.weight": (1024,), "ln_pre.bias": (1024,),
              "ln_post.weight": (1024,), "ln_post.bias": (1024,), "proj": (1024, 768)}
    block = {"ln_1.weight": (1024,), "ln_1.bias": (1024,), "ln_2.weight": (1024,), "ln_2.bias": (1024,),
             "attn.in_proj_weight": (3072, 1024), "attn.in_proj_bias": (3072,),
             "attn.out_proj.weight": (1024, 1024), "attn.out_proj.bias": (1024,),
             "mlp.c_fc.weight": (4096, 1024), "mlp.c_fc.bias": (4096,),
             "mlp.c_proj.weight": (1024, 4096), "mlp.c_proj.bias": (1024,)}
    for i in range(24):
        shapes.update({f"transformer.resblocks.{i}.{k}": s for k, s in block.items()})
    return {"visual." + k: torch.Size(s) for k, s in shapes.items()}


def test_vit_l_14_architecture_offline():
    assert clipmod.VIT_L_14 == open_clip.get_model_config("ViT-L-14")
    spec = spec_37_visual_shapes()
    cfg = clipmod._infer_config({k: torch.empty(s, device="meta") for k, s in spec.items()}, False, None)
    assert cfg["vision_cfg"] == {**clipmod.VIT_L_14["vision_cfg"], "mlp_ratio": 4.0}
    assert cfg["embed_dim"] == 768
    with torch.device("meta"):  # no memory, no init cost, no weights
        visual, text_model = clipmod.build_model(cfg, with_text=True)
    assert {"visual." + k: v.shape for k, v in visual.state_dict().items()} == spec
    block = visual.transformer.resblocks[0]
    assert block.attn.num_heads == 16 and type(block.mlp.gelu) is torch.nn.GELU
    # The text leftovers spec 3.7 lists for the official checkpoint.
    assert text_model.token_embedding.weight.shape == (49408, 768)
    assert text_model.positional_embedding.shape == (77, 768)
    assert text_model.text_projection.shape == (768, 768)
    assert text_model.logit_scale.shape == ()


def test_runs_without_network(files, heads_override, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, no_network)
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))
    clipmod._tokenizer.cache_clear()  # build the tokenizer under the patch as well
    emb = load_clip(files["bin"], config=heads_override)
    e = emb.embed_image(torch.rand(1, 3, 64, 64))
    out = emb.nudge(e, clipmod.DEFAULT_POSITIVE, clipmod.DEFAULT_NEGATIVE, clipmod.PRESET_STRENGTH)
    assert out.shape == (1, 768) and torch.isfinite(out).all()


def test_missing_file_names_file_folder_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_clip(tmp_path / "open_clip_pytorch_model.bin")
    msg = str(err.value)
    for needle in ("open_clip_pytorch_model.bin", "models/clip_vision",
                   "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", str(tmp_path)):
        assert needle in msg


@pytest.mark.parametrize("edit,section,key", [
    (lambda sd: sd.__setitem__("visual.ln_post.weight", torch.ones(65)), "wrong shapes",
     "visual.ln_post.weight"),
    (lambda sd: sd.pop("visual.transformer.resblocks.1.mlp.c_fc.bias"), "missing keys",
     "visual.transformer.resblocks.1.mlp.c_fc.bias"),
    (lambda sd: sd.pop("ln_final.bias"), "missing keys", "ln_final.bias"),
    (lambda sd: sd.__setitem__("visual.extra_head.weight", torch.ones(3)), "unexpected keys",
     "visual.extra_head.weight"),
])
def test_bad_checkpoint_lists_keys(edit, section, key, ref, heads_override):
    sd = dict(ref.state_dict())
    edit(sd)
    with pytest.raises(ValueError) as err:
        load_clip(sd, config=heads_override)
    msg = str(err.value)
    assert section in msg and key in msg


def test_image_only_unknown_key_is_reported(ref, heads_override):
    sd = official_layout(ref)
    sd[PREFIX + "text_pool.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\s+text_pool.weight"):
        load_clip(sd, config=heads_override)


class NotATensor:
    pass


def test_pickles_are_loaded_weights_only(ref, tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"module": dict(ref.state_dict()), "client_state": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_clip(path)


def test_file_without_state_dict_is_rejected(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.bin")
    with pytest.raises(ValueError, match="tensor.bin is not a checkpoint: it holds no state dict"):
        load_clip(tmp_path / "tensor.bin")


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_truncated_file_is_named_with_what_to_do(kind, files, tmp_path):
    # What a real ComfyUI run met: a partly downloaded file gave safetensors' raw "incomplete
    # metadata". It gets the Inf-DiT loader's treatment: the file, what is wrong, what to do.
    data = files[kind].read_bytes()
    path = tmp_path / files[kind].name
    path.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as err:
        load_clip(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated or corrupt" in msg and "Download it again" in msg


def dit_only(ref):
    return {k: v for k, v in official_layout(ref).items() if not k.startswith(PREFIX)}


def test_file_without_image_tower_says_what_to_pick(ref, tmp_path):
    # A DiT-only Inf-DiT file used to fail with every CLIP key missing and every DiT key unexpected.
    save_file(dit_only(ref), str(tmp_path / "dit_only.safetensors"))
    torch.save({"module": dit_only(ref)}, tmp_path / "dit_only.pt")
    for source in (tmp_path / "dit_only.safetensors", tmp_path / "dit_only.pt"):
        with pytest.raises(CheckpointError) as err:
            load_clip(source)
        msg = str(err.value)
        assert msg.startswith(f"{source}: this Inf-DiT file has no CLIP image tower; pick the open_clip")
        assert "open_clip_pytorch_model.bin" in msg and "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K" in msg
        assert "missing" not in msg and "unexpected" not in msg
    # A file that is neither CLIP nor Inf-DiT.
    with pytest.raises(CheckpointError, match="this file holds no open_clip CLIP image tower; pick"):
        load_clip({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 3, 2, 2)})


def test_has_image_tower_from_the_header(files, ref, tmp_path):
    save_file(official_layout(ref), str(tmp_path / "with_tower.safetensors"))
    save_file(dit_only(ref), str(tmp_path / "dit_only.safetensors"))
    data = files["safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    assert clipmod.has_image_tower(str(files["safetensors"])) is True
    assert clipmod.has_image_tower(str(tmp_path / "with_tower.safetensors")) is True
    assert clipmod.has_image_tower(str(tmp_path / "dit_only.safetensors")) is False
    # Cannot be told cheaply: a pickle must be loaded whole; an unreadable header is load_clip's to report.
    assert clipmod.has_image_tower(str(files["bin"])) is None
    assert clipmod.has_image_tower(str(tmp_path / "cut.safetensors")) is None


def test_blend(embedder):
    a = embedder.embed_image(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)))
    b = embedder.embed_image(torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(clipmod.blend([a, b], [0.3, 0.7]), F.normalize(0.3 * a + 0.7 * b, dim=-1),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(clipmod.blend([a], [2.5]), a, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cancel"):
        clipmod.blend([a, a], [1.0, -1.0])
    with pytest.raises(ValueError, match="one weight per embedding"):
        clipmod.blend([a, b], [1.0])


def test_module_owns_both_towers(files, ref, heads_override):
    # `module` is what a memory manager moves (ComfyUI's ModelPatcher in the nodes).
    emb = load_clip(files["bin"], config=heads_override)
    assert emb.module.to("meta") is emb.module and emb.device.type == "meta"
    assert all(p.device.type == "meta" for p in emb._text_model.parameters())
    image_only = load_clip(official_layout(ref), config=heads_override)
    assert image_only.module is image_only.visual
