import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # test data shipped with the repository (tests/data/README.md); nothing else is read
GOLDEN = DATA / "golden"
GOLDEN_FULL = DATA / "golden_full"


@pytest.fixture(scope="session")
def golden_dir():
    """Outputs of the official code with a tiny configuration (tests/data/golden/README.md)."""
    assert GOLDEN.is_dir(), f"golden vectors not found at {GOLDEN} (they ship with the repository)"
    return GOLDEN


@pytest.fixture(scope="session")
def golden_full_dir():
    """Outputs of the official code at the released geometry (tests/data/golden_full/README.md)."""
    assert GOLDEN_FULL.is_dir(), f"golden vectors not found at {GOLDEN_FULL} (they ship with the repository)"
    return GOLDEN_FULL


# --- ComfyUI node pack under test (tests/test_nodes.py, tests/test_workflows.py) -----------------
PACK_NAME = "infdit_pack_under_test"  # shared with tests/test_hidiffusion.py: one import per session
# A tiny open_clip CLIP whose head width is CLIP's 64, so load_clip infers it from shapes alone
# (the node has no config override); the real vocabulary size so the text nudge can tokenize.
TINY_CLIP = {"embed_dim": 768,
             "vision_cfg": {"layers": 1, "width": 64, "head_width": 64, "patch_size": 14, "image_size": 56},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


def load_pack():
    """The pack's __init__.py imported the way ComfyUI does: by file, under a mangled name."""
    import importlib.util
    import sys

    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


@pytest.fixture(scope="session")
def tiny_clip():
    import open_clip
    import torch

    model = open_clip.CLIP(TINY_CLIP["embed_dim"], TINY_CLIP["vision_cfg"], TINY_CLIP["text_cfg"]).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():  # re-draw everything so no LayerNorm sits at the identity
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if ".ln_" in "." + name and name.endswith(".weight") else 0.0))
    return model


@pytest.fixture(scope="session")
def models_root(golden_dir, tiny_clip, tmp_path_factory):
    """A ComfyUI-style models/ folder: infdit/ with the tiny model alone and with an embedded CLIP
    image tower (as a converted official checkpoint), clip_vision/ with the full tiny CLIP."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("models")
    (root / "infdit").mkdir()
    (root / "clip_vision").mkdir()
    shutil.copy(golden_dir / "tiny_model.safetensors", root / "infdit" / "tiny_model.safetensors")
    clip_sd = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    with_clip = load_file(golden_dir / "tiny_model.safetensors")
    with_clip.update({"image_encoder.model." + k: v for k, v in clip_sd.items() if k.startswith("visual.")})
    save_file(with_clip, root / "infdit" / "tiny_with_clip.safetensors")
    save_file(clip_sd, root / "clip_vision" / "tiny_clip.safetensors")
    return root


@pytest.fixture
def models_dir(models_root, monkeypatch):
    """models_root as the pack's model folder (ComfyUI absent: $INFDIT_MODELS_DIR)."""
    monkeypatch.setenv("INFDIT_MODELS_DIR", str(models_root))
    return models_root


# --- helpers shared by test files ------------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on the loopback interface (multi-process tests talk only over 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, timeout: float = 240):
    """Run target(rank, world, port, *args) in `world` spawned processes; they must all exit 0 in time."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in processes]
    for p in processes:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"rank exit codes {codes}"


class OutOfMemoryInjector:
    """Fails a network call, like a device out of memory, while it holds more than `limit` blocks or
    (with `until_spilled`) while the K/V cache is not spilled. `error` is the exception type; a
    RuntimeError gets the CPU allocator's message."""

    def __init__(self, model, limit, error=None, until_spilled=False):
        import torch

        self.model, self.limit, self.until_spilled = model, limit, until_spilled
        self.error = error or torch.OutOfMemoryError
        self.original = model.forward_blocks
        self.failures = 0

    def __enter__(self):
        def forward_blocks(inputs, cond, cache, **options):
            if inputs.z.shape[0] > self.limit or (self.until_spilled and cache.placement is None):
                self.failures += 1
                raise self.error("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes"
                                 if self.error is RuntimeError else "CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.original(inputs, cond, cache, **options)
        self.model.forward_blocks = forward_blocks
        return self

    def __exit__(self, *exc):
        del self.model.forward_blocks


def random_inputs(batch, rows, cols, seed=0, block=32):
    """Seeded sampler inputs for a rows x cols grid of `block`-px blocks: a noisy x, the concat LR,
    the cross-attention LR and unit CLIP vectors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    H, W = rows * block, cols * block
    return dict(
        x=torch.randn(batch, 3, H, W, generator=g),
        concat_lr=torch.rand(batch, 3, H, W, generator=g) * 2 - 1,
        lr=torch.rand(batch, 3, H // 4, W // 4, generator=g) * 2 - 1,
        clip_vector=torch.nn.functional.normalize(torch.randn(batch, 768, generator=g), dim=-1),
    )


def condition(batch, rows, cols, seed=0, block=32):
    """random_inputs without x: what sample() takes."""
    inputs = random_inputs(batch, rows, cols, seed, block)
    del inputs["x"]
    return inputs


def network_forward(model, x, sigma, *, lr, concat_lr, clip_vector, checkpoint_layers=False):
    """The network output F of every block of the image, [blocks, 3, b, b], in one call and under
    autograd (the sampler's denoiser runs without gradients): what a training step differentiates."""
    import torch

    from infdit_core.denoiser import edm_precondition
    from infdit_core.offload import Placement
    from infdit_core.strips import StripSchedule
    from infdit_core.train import GridNeighbours
    from infdit_core.uniba import BlockCanvas

    B, _, H, W = x.shape
    s = model.config.block_size
    schedule = StripSchedule(B, H // s, W // s)
    canvas = BlockCanvas(model.config, lr, concat_lr, schedule, Placement.for_mode("off", model.device))
    blocks = schedule.order
    neighbours = GridNeighbours(blocks, x.device)  # one call: neighbours are its own K/V, as in training
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(B)
    _, _, c_in, c_noise = edm_precondition(sigma)
    inputs = canvas.inputs(blocks, x)
    inputs = inputs._replace(z=inputs.z * c_in[inputs.batch_index, None, None, None])
    return model.forward_blocks(inputs, model.conditioning(c_noise, clip_vector.float()), neighbours, checkpoint_layers)


class Recorder:
    """Stands in for comfy.utils.ProgressBar; optionally raises at the n-th update (ComfyUI's
    interrupt arrives the same way: an exception from the progress hook)."""

    def __init__(self, raise_at=None, error=KeyboardInterrupt):
        self.updates, self.raise_at, self.error = [], raise_at, error

    def factory(self, total):
        self.created_with = total
        return self

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))
        if self.raise_at is not None and len(self.updates) >= self.raise_at:
            raise self.error("stop")
