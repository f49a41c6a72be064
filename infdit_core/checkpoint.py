"""Reading Inf-DiT weights safely, checking them key by key, and converting them to safetensors.

The official release is DeepSpeed/SAT's `mp_rank_00_model_states.pt`: a pickle whose `'module'`
entry is the state dict, next to training bookkeeping (numpy RNG state, argument namespaces...).
We never run pickled code: `torch.load(weights_only=True)`, where bookkeeping objects from a known
short list of libraries are replaced by an inert stand-in and anything else makes us refuse the
file. Our converted `.safetensors` keeps the official key layout: the DiT keys plus the CLIP image
tower under `image_encoder.model.visual.` (the RoPE tables are dropped: they are regenerated).
"""
from __future__ import annotations

import json
from dataclasses import replace
import os
import struct
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

from .config import InfDiTConfig
from .integrity import changed, sha256_file
from .fp8 import ACTIVATIONS, FP8, quantize_model
from .model import InfDiT

OFFICIAL_WEIGHTS_URL = "https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/?dl=1"
OFFICIAL_FILENAME = "mp_rank_00_model_states.pt"
CLIP_PREFIX = "image_encoder."
CLIP_VISUAL_PREFIX = "image_encoder.model.visual."
ROPE_PREFIX = "mixins.adaln_layer.rope."
# Saved by the official model but never read by its forward: accepted when present, filled with
# their initial values when a trimmed file lacks them.
UNUSED_PREFIXES = ("transformer.position_embeddings.", "mixins.adaln_layer.k_layer_norm.")
# Libraries whose objects appear in training checkpoints as bookkeeping (RNG states, args,
# DeepSpeed/SAT state). They are replaced by `_Dropped`; any other global is refused.
BOOKKEEPING_MODULES = ("numpy.", "argparse.", "deepspeed.", "sat.", "SwissArmyTransformer.", "_codecs.")

StateDict = Mapping[str, torch.Tensor]

# A small model trained on a few photos, shipped with the pack (infdit_core/demo/README.md): lets a
# fresh install upscale something without the 2 GB download. Far below the released model.
DEMO_NAME = "demo"
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "infdit_demo.safetensors")


def resolve_model(name: str) -> str:
    """A model argument as a path: 'demo' is the shipped demo model, anything else a file."""
    return DEMO_MODEL if name == DEMO_NAME else name


class CheckpointError(ValueError):
    """A file or state dict that is not usable Inf-DiT weights; the message says why and what to do."""


class _Dropped:
    """Inert stand-in for a bookkeeping object: accepts any construction, keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def missing_weights_message(path: str, folder_hint: str = "") -> str:
    where = f" Put it in {folder_hint}." if folder_hint else ""
    return (f"Inf-DiT weights not found: {path}.{where} Download the official {OFFICIAL_FILENAME} "
            f"from {OFFICIAL_WEIGHTS_URL} (linked from the THUDM/Inf-DiT README), or convert it with "
            f"`python -m infdit_core convert {OFFICIAL_FILENAME} infdit_bf16.safetensors --dtype bf16`.")


def _file_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 31:
        return "safetensors"
    return "unknown"


def safe_torch_load(path: str):
    """torch.load(weights_only=True) of a pickle checkpoint; bookkeeping objects of the libraries in
    BOOKKEEPING_MODULES become inert stand-ins, any other global is refused before loading."""
    if _file_kind(path) == "torch-zip":
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        refused = [n for n in names if not n.startswith(BOOKKEEPING_MODULES)]
        if refused:
            raise CheckpointError(
                f"Refusing to load {path}: it refers to {', '.join(refused)}, which a weights file never "
                "needs and which could run code (torch.load weights_only=True). Nothing from it was "
                "executed. Use the official checkpoint or a .safetensors file.")
        with torch.serialization.safe_globals([(_Dropped, n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    try:  # pre-1.6 format: the weights-only unpickler itself refuses unknown globals
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise CheckpointError(f"Refusing to load {path}: it holds objects other than tensors "
                                  "(torch.load weights_only=True; nothing from it was executed). "
                                  "Use a .safetensors file.") from None
        raise


def read_state_dict(path: str, select: Optional[Callable[[list[str]], list[str]]] = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a file, without executing anything it contains.

    `select(keys)` names the keys to keep (default: all); it may refuse the file by raising a
    CheckpointError. For a safetensors file it is asked from the header, before any tensor data is
    read, so a part of a large file costs only that part."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    if (difference := changed(path)) is not None:
        warnings.warn(f"{difference}. If you did not replace it on purpose, fetch it again (python -m infdit_core "
                      "download, or the 'download official weights' entry of Load Inf-DiT Model).", stacklevel=2)
    kind = _file_kind(path)
    if kind == "unknown":
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch (.pt) nor a .safetensors file.")
    try:
        if kind == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                return {k: f.get_tensor(k) for k in (select(keys) if select else keys)}, dict(f.metadata() or {})
        obj = safe_torch_load(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"Could not read {path}: the file is truncated or corrupt ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}). Download it again.") from None
    sd = unwrap_state_dict(obj, path)
    return ({k: sd[k] for k in select(list(sd))} if select else sd), {}


def unwrap_state_dict(obj, name: str = "state dict") -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a DeepSpeed/SAT checkpoint (under 'module') or a plain one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("module"), Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{name} is not a checkpoint: it holds no state dict of tensors.")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name} is not a checkpoint: it holds no tensors.")
    return tensors


def _fmt(keys, limit=12):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(model: InfDiT, sd: StateDict) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(ROPE_PREFIX)}
    optional = {k for k in expected if k.startswith(UNUSED_PREFIXES)}
    present = {k for k in sd if not k.startswith((CLIP_PREFIX, ROPE_PREFIX))}
    missing = set(expected) - present - optional
    unexpected = present - set(expected)
    misshaped = [f"{k} {tuple(sd[k].shape)} (model expects {expected[k]})"
                 for k in sorted(present & set(expected)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {_fmt(misshaped)}")
    if problems:
        raise CheckpointError("Checkpoint does not match the Inf-DiT architecture inferred from it:\n  "
                              + "\n  ".join(problems))


def infer_config(sd: StateDict, name: str = "checkpoint", metadata: Optional[Mapping[str, str]] = None
                 ) -> InfDiTConfig:
    """The architecture of `sd` from its shapes. The position modulo (image_size) is in no weight
    but the RoPE tables, which our files leave out: there it comes from the file's metadata (the
    config our writers store), else the official value."""
    if not any(k.startswith(("transformer.layers.", "mixins.")) for k in sd):
        raise CheckpointError(f"{name} does not contain Inf-DiT weights (found {len(sd)} tensors such as "
                              f"{_fmt(list(sd), 4)}). Expected official keys like "
                              "transformer.layers.0.attention.query_key_value.weight.")
    try:
        config = InfDiTConfig.from_state_dict(sd)
        stored = json.loads((metadata or {}).get("config") or "{}")
        if ROPE_PREFIX + "freqs_cos" not in sd and stored.get("image_size", config.image_size) != config.image_size:
            config = replace(config, image_size=int(stored["image_size"]))
        return config
    except KeyError as e:
        raise CheckpointError(f"Checkpoint does not match the Inf-DiT architecture:\n  missing keys (1+): "
                              f"{e.args[0]} (needed to infer the configuration)") from None
    except ValueError as e:
        raise CheckpointError(f"{name}: inconsistent tensor shapes ({e})") from None


def check_state_dict(sd: StateDict, name: str = "checkpoint", metadata: Optional[Mapping[str, str]] = None
                     ) -> InfDiTConfig:
    """The configuration of `sd`, after checking its keys and shapes against a model built on the
    meta device (no memory allocated)."""
    config = infer_config(sd, name, metadata)
    with torch.device("meta"):
        check_keys(InfDiT(config), sd)
    return config


def build_model(sd: StateDict, *, dtype=torch.float32, device="cpu", name="checkpoint",
                metadata: Optional[Mapping[str, str]] = None) -> InfDiT:
    """The model in `dtype`; torch.float8_e4m3fn: bf16 with the transformer's linear layers in fp8
    (fp8.py; runs only on GPUs that support it, which `sample` checks)."""
    quantised = dtype == FP8
    dtype = ACTIVATIONS if quantised else dtype
    config = infer_config(sd, name, metadata)
    with torch.device("meta"):
        model = InfDiT(config)
    check_keys(model, sd)
    # Allocate directly in the target dtype/device: no float32 copy of a 754M-parameter model.
    model = model.to(dtype=dtype).to_empty(device=device)
    for key, param in model.state_dict().items():
        if key.startswith(UNUSED_PREFIXES) and key not in sd:
            param.zero_()
    weights = {k: v for k, v in sd.items() if not k.startswith(CLIP_PREFIX)}
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{name}: {e}") from None
    model = model.eval().requires_grad_(False)
    return quantize_model(model) if quantised else model


def load_model(source: Union[str, os.PathLike, StateDict], *, dtype=torch.float32, device="cpu") -> InfDiT:
    """A ready Inf-DiT from an official .pt, a converted .safetensors, or a state dict."""
    if isinstance(source, Mapping):
        return build_model(unwrap_state_dict(source), dtype=dtype, device=device)
    path = os.fspath(source)
    sd, metadata = read_state_dict(path)
    return build_model(sd, dtype=dtype, device=device, name=path, metadata=metadata)


def convert(src: str, dst: str, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write the DiT weights (and the CLIP image tower, when present) of `src` to a .safetensors
    file `dst`, optionally cast to `dtype`. Returns the metadata written."""
    from safetensors.torch import save_file

    sd, source_metadata = read_state_dict(src)
    config = check_state_dict(sd, src, source_metadata)
    keep = {k: v for k, v in sd.items()
            if not k.startswith((CLIP_PREFIX, ROPE_PREFIX)) or k.startswith(CLIP_VISUAL_PREFIX)}
    if dtype is not None:
        keep = {k: v.to(dtype) if v.is_floating_point() else v for k, v in keep.items()}
    metadata = {
        "format": "infdit",
        "config": json.dumps(config.to_dict()),
        "source": os.path.basename(src),
        "source_sha256": sha256_file(src),
        "clip_visual": str(any(k.startswith(CLIP_VISUAL_PREFIX) for k in keep)).lower(),
    }
    save_file({k: v.contiguous() for k, v in keep.items()}, dst, metadata=metadata)
    return metadata
