"""Training: the training forward is the sampler's denoiser, the loss falls, resume is exact,
checkpoints load strictly, bad input is refused clearly."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infdit_core import InfDiTConfig, load_model
from infdit_core.__main__ import main as cli
from infdit_core.checkpoint import check_state_dict, read_state_dict
from infdit_core.denoiser import BlockSweepDenoiser
from infdit_core.train import (TrainingError, TrainSettings, denoise_crops, edm_loss, find_images, initialise,
                               make_pair, train)

TINY = InfDiTConfig(num_layers=2, hidden_size=32, num_heads=2, block_size=32, image_size=64)


def _write_photos(folder, sizes, seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n, (h, w) in enumerate(sizes):
        # Smooth random colour fields with some edges: cheap stand-ins for photos.
        base = rng.random((h // 8 + 1, w // 8 + 1, 3))
        image = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
        image = (image * 200 + rng.random((h, w, 3)) * 55).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"photo{n}.png"))
    return folder


@pytest.fixture
def photos(tmp_path):
    return _write_photos(str(tmp_path / "photos" / "nested"), [(96, 80), (70, 130)])


def _settings(data, out, **kw):
    base = dict(data=data, output=str(out), steps=4, batch=2, crop=64, warmup=2, save_every=2, log_every=1, lr=1e-3)
    base.update(kw)
    return TrainSettings(**base)


def test_training_forward_is_the_sampler_denoiser(golden_dir):
    model = load_model(golden_dir / "tiny_model.safetensors")
    g = torch.Generator().manual_seed(0)
    B, S = 2, 96
    x, concat = torch.randn(B, 3, S, S, generator=g), torch.rand(B, 3, S, S, generator=g) * 2 - 1
    lr = torch.rand(B, 3, S // 4, S // 4, generator=g) * 2 - 1
    vectors = torch.nn.functional.normalize(torch.randn(B, 768, generator=g), dim=-1)
    sigma = torch.tensor([5.0, 0.3])
    with torch.no_grad():
        sweep = torch.cat([BlockSweepDenoiser(model, lr=lr[i:i + 1], concat_lr=concat[i:i + 1],
                                              clip_vector=vectors[i:i + 1], block_batch=2)(x[i:i + 1], sigma[i])
                           for i in range(B)])
        crops = denoise_crops(model, x, sigma, concat, lr, vectors)
    assert (crops - sweep).abs().max() <= 1e-5


def test_checkpointed_layers_give_the_same_gradients(golden_dir):
    model = load_model(golden_dir / "tiny_model.safetensors").requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    concat, lr = make_pair(hr, 4.0, g)
    grads = []
    for checkpoint_layers in (False, True):
        model.zero_grad()
        loss = edm_loss(model, hr, concat, lr, torch.zeros(1, 768), torch.Generator().manual_seed(5),
                        TrainSettings("", ""), checkpoint_layers=checkpoint_layers)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # The recomputed layers sum their gradients in another order: equal to float32 rounding.
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


def test_loss_on_a_fixed_batch_falls():
    torch.manual_seed(0)
    model = initialise(InfDiT_tiny(), torch.Generator().manual_seed(0)).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    hr = (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1)
    concat, lr = make_pair(hr, 4.0, g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = edm_loss(model, hr, concat, lr, torch.zeros(1, 768), torch.Generator().manual_seed(3),
                        TrainSettings("", ""))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def InfDiT_tiny():
    from infdit_core import InfDiT
    return InfDiT(TINY)


def test_resumed_run_equals_an_uninterrupted_one(photos, tmp_path):
    whole = tmp_path / "whole"
    train(_settings(photos, whole, steps=6), config=TINY, progress=False)
    split = tmp_path / "split"
    train(_settings(photos, split, steps=3, save_every=3), config=TINY, progress=False)
    train(_settings(photos, split, steps=6, save_every=3), config=TINY, progress=False, resume=True)
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(whole / name), load_file(split / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = (whole / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seconds" and len(rows) == 7
    assert [r.split(",")[:2] for r in rows[1:]] == \
        [r.split(",")[:2] for r in (split / "loss.csv").read_text().splitlines()[1:]]


def test_checkpoint_is_the_official_layout_and_loads_strictly(photos, tmp_path, golden_dir):
    model = train(_settings(photos, tmp_path / "run", steps=2), config=TINY, progress=False)
    path = tmp_path / "run" / "model.safetensors"
    sd, meta = read_state_dict(str(path))
    assert check_state_dict(sd, metadata=meta) == TINY  # image_size (RoPE modulo) from the metadata
    golden, _ = read_state_dict(str(golden_dir / "tiny_model.safetensors"))
    official = {k for k in golden if not k.startswith("mixins.adaln_layer.rope.")}
    assert set(sd) == official  # the same keys as the official checkpoint (tiny geometry: same names)
    loaded = load_model(str(path))
    assert loaded.config == TINY and meta["clip"] == "none" and meta["trained_steps"] == "2"
    # The file holds the EMA weights, not the raw ones, and the PNG plot was written.
    assert any(not torch.equal(sd[k], v.detach()) for k, v in model.state_dict().items() if k in sd)
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fine_tuning_starts_from_the_checkpoint(photos, tmp_path, golden_dir):
    init = str(golden_dir / "tiny_model.safetensors")
    model = train(_settings(photos, tmp_path / "ft", steps=1, lr=0.0, warmup=1), init=init, progress=False)
    base = load_model(init)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_cli_trains_and_resumes(photos, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["train", photos, "-o", out, "--layers", "2", "--width", "32", "--heads", "2", "--block-size", "32",
            "--crop", "64", "--batch", "1", "--save-every", "2", "--warmup", "1"]
    cli(args + ["--steps", "2"])
    cli(args + ["--steps", "3", "--resume"])
    assert load_file(os.path.join(out, "train_state.safetensors"))["rng"].dtype == torch.uint8
    # Logged every 10 steps and at the end of each run; the resumed run appends to the same log.
    assert [row.split(",")[0] for row in open(os.path.join(out, "loss.csv")).read().splitlines()] == \
        ["step", "2", "3"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "empty", "unreadable", "small", "crop"])
def test_bad_training_input_is_refused_clearly(tmp_path, problem):
    data = tmp_path / "data"
    crop = 64
    if problem == "empty":
        data.mkdir()
        (data / "notes.txt").write_text("no images here")
        expected = "no training images in"
    elif problem == "missing":
        expected = "does not exist"
    elif problem == "unreadable":
        data.mkdir()
        (data / "broken.png").write_bytes(b"not a png")
        expected = "cannot read training image"
    elif problem == "small":
        _write_photos(str(data), [(40, 200), (50, 50)])
        expected = "2 training image(s) smaller than the 64-px crop: photo0.png (200x40), photo1.png (50x50)"
    else:
        _write_photos(str(data), [(96, 96)])
        crop = 48
        expected = "crop 48 px is not a multiple of the model's 32-px block: use a multiple such as 64"
    with pytest.raises(TrainingError) as error:
        train(_settings(str(data), tmp_path / "out", crop=crop), config=TINY, progress=False)
    assert expected in str(error.value)


def test_a_small_image_beside_usable_ones_is_skipped_with_a_warning(tmp_path):
    data = _write_photos(str(tmp_path / "d"), [(96, 96), (30, 30)])
    with pytest.warns(UserWarning, match="1 training image.*photo1.png \\(30x30\\).*skipped"):
        train(_settings(data, tmp_path / "out", steps=1), config=TINY, progress=False)


def test_find_images_is_recursive_and_sorted(tmp_path):
    _write_photos(str(tmp_path / "b"), [(64, 64)])
    _write_photos(str(tmp_path / "a" / "deeper"), [(64, 64)])
    (tmp_path / "a" / "skip.txt").write_text("x")
    assert [os.path.relpath(p, tmp_path) for p in find_images(str(tmp_path))] == \
        [os.path.join("a", "deeper", "photo0.png"), os.path.join("b", "photo0.png")]


def test_lora_training_saves_only_the_adapters_and_they_apply(photos, tmp_path, golden_dir):
    from infdit_core.lora import load_lora, merged

    init = str(golden_dir / "tiny_model.safetensors")
    out = tmp_path / "lora"
    model = train(_settings(photos, out, steps=3, lora_rank=2), init=init, progress=False)
    assert not (out / "model.safetensors").exists()
    lora = load_lora(str(out / "lora.safetensors"))
    assert lora.rank == 2 and lora.alpha == 2
    saved = set(load_file(out / "lora.safetensors"))
    assert saved == {f"{t}.lora_{ab}" for t in lora.targets for ab in "AB"} and len(saved) == 2 * (4 * 2 + 3)
    # The frozen base is the checkpoint, unchanged; the adapters (EMA) move the output once merged.
    base = load_model(init)
    g = torch.Generator().manual_seed(4)
    hr = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    concat, lr = make_pair(hr, 4.0, g)
    args = (hr, torch.tensor([0.5]), concat, lr, torch.zeros(1, 768))
    with torch.no_grad():
        before = denoise_crops(base, *args)
        with merged(base, [(lora, 1.0)]):
            after = denoise_crops(base, *args)
        assert torch.equal(denoise_crops(base, *args), before)
    assert not torch.equal(before, after)


def test_lora_needs_a_checkpoint_to_start_from(photos, tmp_path):
    with pytest.raises(TrainingError, match="--lora trains adapters on a loaded checkpoint"):
        train(_settings(photos, tmp_path / "x", lora_rank=2), config=TINY, progress=False)
