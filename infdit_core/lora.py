"""Low-rank adapters (LoRA) for Inf-DiT: the training form, the file format, and applying them.

A LoRA of rank r on a Linear with weight W [out, in] adds (alpha / r) * B @ A to W, with A [r, in]
and B [out, r]. For training, `attach_lora` registers that sum as a parametrization of the
Linear's `weight` (torch.nn.utils.parametrize): the network's code is unchanged, every read of a
target's weight sees W + (alpha / r) * B @ A, and only A and B are trainable. For inference,
`apply_loras` (or the context manager `merged`) adds the LoRAs into the weights in place for the
duration of a run and puts the exact original weights back afterwards, so sampling runs at the
base model's speed and memory.

A LoRA file is a .safetensors of the A/B tensors, named `<module path>.lora_A` / `.lora_B`, whose
metadata records the format, rank, alpha, target module paths and the base model's configuration.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import CheckpointError
from .config import InfDiTConfig
from .fp8 import is_fp8
from .model import InfDiT
from .resume import IDENTITY_ATTR

FORMAT = "infdit-lora"
A, B = "lora_A", "lora_B"
# The attention and MLP projections of every layer ({i}), and the layer-0 LR cross-attention.
LAYER_TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
DEFAULT_TARGETS = tuple(f"transformer.layers.{{i}}.{t}" for t in LAYER_TARGETS) + tuple(
    f"mixins.adaln_layer.cross_attention.{t}" for t in ("query", "key_value", "dense"))


class LoraError(CheckpointError):
    """A LoRA file, or a LoRA that does not fit the model it is applied to; the message says why."""


@dataclass(eq=False)  # compared by identity: comparing the tensors elementwise means nothing here
class Lora:
    """A loaded LoRA: tensors `<target>.lora_A` [rank, in] and `<target>.lora_B` [out, rank]."""
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    targets: list[str]
    config: Optional[dict] = None  # the base model's InfDiTConfig fields, when recorded
    name: str = "LoRA"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, target: str, device=None) -> torch.Tensor:
        """(alpha / rank) * B @ A of `target`, float32, on `device`."""
        a = self.tensors[f"{target}.{A}"].to(device, torch.float32)
        b = self.tensors[f"{target}.{B}"].to(device, torch.float32)
        return (b @ a).mul_(self.scale)


def expand_targets(targets: Iterable[str], num_layers: int) -> list[str]:
    """Module paths of `targets`; a path with `{i}` stands for that path in every layer."""
    out = []
    for target in targets:
        out += [target.format(i=i) for i in range(num_layers)] if "{i}" in target else [target]
    return list(dict.fromkeys(out))


class _LowRank(nn.Module):
    """The parametrization W -> W + scale * B @ A (A, B float32: the trained master copy)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).mul(self.scale).to(weight.dtype)


def _low_rank(module: nn.Module) -> Optional[_LowRank]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, _LowRank)), None)


def _attached(model: nn.Module) -> Iterator[tuple[str, nn.Module, _LowRank]]:
    for path, module in model.named_modules():
        if (low_rank := _low_rank(module)) is not None:
            yield path, module, low_rank


def _linear(model: nn.Module, target: str) -> Optional[nn.Linear]:
    try:
        module = model.get_submodule(target)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def attach_lora(model: InfDiT, rank: int, alpha: Optional[float] = None, targets: Optional[Sequence[str]] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, nn.Parameter]:
    """Make `model` a LoRA-training model: every other parameter frozen, each target Linear's weight
    reparametrized as W + (alpha / rank) * B @ A. A is drawn like nn.Linear's own init
    (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from `generator`, B is zero, so the
    model is unchanged at the start. alpha defaults to rank (scale 1). Returns the trainable
    parameters by name `<module path>.lora_A` / `.lora_B`."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    paths = expand_targets(DEFAULT_TARGETS if targets is None else targets, model.config.num_layers)
    problems = [p for p in paths if _linear(model, p) is None]
    if problems:
        raise LoraError(f"LoRA targets that are not Linear layers of this model: {', '.join(problems)}")
    if any(True for _ in _attached(model)):
        raise LoraError("this model already has LoRA adapters attached; call detach_lora(model, merge=...) first")
    model.requires_grad_(False)
    params = {}
    for path in paths:
        linear = _linear(model, path)
        out_features, in_features = linear.weight.shape
        bound = 1 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        low_rank = _LowRank(a.to(linear.weight.device),
                            torch.zeros(out_features, rank, device=linear.weight.device), alpha / rank)
        parametrize.register_parametrization(linear, "weight", low_rank)
        params[f"{path}.{A}"], params[f"{path}.{B}"] = low_rank.lora_A, low_rank.lora_B
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached LoRA tensors by name `<module path>.lora_A` / `.lora_B` (detached, not copied)."""
    out = {}
    for path, _, low_rank in _attached(model):
        out[f"{path}.{A}"], out[f"{path}.{B}"] = low_rank.lora_A.detach(), low_rank.lora_B.detach()
    return out


def detach_lora(model: nn.Module, merge: bool) -> None:
    """Remove the attached adapters; merge=True keeps W + (alpha / rank) * B @ A as the weights
    (rounded once to their dtype), merge=False restores the original W."""
    for _, module, _ in list(_attached(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=merge)


def save_lora(path: str, tensors: dict[str, torch.Tensor], *, rank: int, alpha: Optional[float],
              config: InfDiTConfig) -> dict[str, str]:
    """Write `tensors` (as lora_state_dict gives them) to a .safetensors LoRA file, atomically (a
    reader never sees a half-written file). alpha None: the rank (attach_lora's default). Returns
    the metadata written."""
    from safetensors.torch import save_file

    alpha = rank if alpha is None else alpha

    targets = sorted({name.rsplit(".", 1)[0] for name in tensors})
    expected = {f"{t}.{x}" for t in targets for x in (A, B)}
    if set(tensors) != expected:
        raise LoraError(f"LoRA tensors must come in {A}/{B} pairs named <module path>.{A}/.{B}; "
                        f"unpaired or misnamed: {', '.join(sorted(set(tensors) ^ expected))}")
    metadata = {"format": FORMAT, "rank": str(rank), "alpha": repr(float(alpha)), "targets": json.dumps(targets),
                "config": json.dumps(config.to_dict())}
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".lora-", suffix=".part", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return metadata


def load_lora(path: str) -> Lora:
    """A LoRA file written by save_lora (the trainer's --lora output). Only safetensors is read:
    nothing in the file is executed."""
    from safetensors import safe_open

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    what = ("Inf-DiT LoRAs are .safetensors files written by `python -m infdit_core train --lora RANK`.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if metadata.get("format") != FORMAT:
                if metadata.get("format") == "infdit" or any(k.startswith("transformer.layers.") for k in keys):
                    raise LoraError(f"{name} is an Inf-DiT model, not a LoRA: load it as the model (Load Inf-DiT "
                                    f"Model, --model). {what}")
                raise LoraError(f"{name} is not an Inf-DiT LoRA (its metadata has no format '{FORMAT}'). {what}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except LoraError:
        raise
    except Exception as e:  # not a safetensors file at all, or a truncated one
        raise LoraError(f"{name} is not a readable Inf-DiT LoRA ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
                        f"{what} If it is one, it is truncated or corrupt: copy it again.") from None
    try:
        rank, alpha, targets = int(metadata["rank"]), float(metadata["alpha"]), list(json.loads(metadata["targets"]))
        config = json.loads(metadata["config"]) if "config" in metadata else None
    except (KeyError, ValueError) as e:
        raise LoraError(f"{name}: the LoRA metadata is incomplete or malformed ({e}). {what}") from None
    lora = Lora(tensors, rank, alpha, targets, config, name, metadata)
    _check_pairs(lora)
    return lora


def _check_pairs(lora: Lora) -> None:
    expected = {f"{t}.{x}" for t in lora.targets for x in (A, B)}
    problems = []
    if set(lora.tensors) != expected:
        problems.append(f"tensors that do not match its targets: {', '.join(sorted(set(lora.tensors) ^ expected))}")
    for target in lora.targets:
        a, b = lora.tensors.get(f"{target}.{A}"), lora.tensors.get(f"{target}.{B}")
        if a is not None and b is not None and (a.ndim != 2 or b.ndim != 2 or a.shape[0] != lora.rank
                                                or b.shape[1] != lora.rank):
            problems.append(f"{target}: {A} {tuple(a.shape)} and {B} {tuple(b.shape)} are not of rank {lora.rank}")
    if problems:
        raise LoraError(f"{lora.name} is an inconsistent LoRA file: " + "; ".join(problems))


def check_lora(model: InfDiT, lora: Lora) -> None:
    """Raise LoraError naming every target missing from `model` and every A/B whose shape does not
    fit it (a LoRA made for another geometry)."""
    missing, misshaped = [], []
    for target in lora.targets:
        linear = _linear(model, target)
        if linear is None:
            missing.append(target)
            continue
        out_features, in_features = linear.weight.shape
        for key, want in ((f"{target}.{A}", (lora.rank, in_features)), (f"{target}.{B}", (out_features, lora.rank))):
            got = tuple(lora.tensors[key].shape)
            if got != want:
                misshaped.append(f"{key} {got} (model expects {want})")
    if not missing and not misshaped:
        return
    problems = []
    if missing:
        problems.append(f"targets not in this model ({len(missing)}): {', '.join(missing[:12])}"
                        + (f" ... and {len(missing) - 12} more" if len(missing) > 12 else ""))
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {', '.join(misshaped[:12])}"
                        + (f" ... and {len(misshaped) - 12} more" if len(misshaped) > 12 else ""))
    made_for = ""
    if lora.config:
        ours = model.config.to_dict()
        differ = [f"{k} {lora.config[k]} (this model: {ours[k]})" for k in ours if k in lora.config
                  and lora.config[k] != ours[k]]
        made_for = f"\n  It was made for another model: {', '.join(differ)}." if differ else ""
    raise LoraError(f"{lora.name} does not fit this Inf-DiT model:\n  " + "\n  ".join(problems) + made_for)


def apply_loras(model: InfDiT, loras: Sequence[tuple[Lora, float]], backup: bool = True) -> Callable[[], None]:
    """Add sum(strength * (alpha / rank) * B @ A) of the (LoRA, strength) pairs into the weights of
    `model` in place (summed in float32, rounded once to the weights' dtype) and return the function
    that puts the original weights back bit for bit, from copies kept in host memory. backup=False
    keeps no copies (a model loaded for one job, as on the command line); its restore does nothing.
    A LoRA with strength 0 is skipped, so the weights stay bit-identical."""
    active = [(lora, float(strength)) for lora, strength in loras if strength != 0]
    if active and is_fp8(model):
        raise LoraError("LoRAs cannot be merged into fp8 weights; load the model with weight dtype bf16 to use them")
    for lora, _ in active:
        check_lora(model, lora)
    if any(True for _ in _attached(model)):
        raise LoraError("this model has LoRA adapters attached for training; detach_lora(model, merge=...) first")
    targets = list(dict.fromkeys(t for lora, _ in active for t in lora.targets))
    backups: dict[str, torch.Tensor] = {}
    # The resume checkpoints' weights identity (resume.py), cached on the model, describes the base
    # weights: dropped while the LoRAs are in, so a LoRA run never continues a base run's job.
    identity = model.__dict__.pop(IDENTITY_ATTR, None) if targets else None

    def restore():
        with torch.no_grad():
            for target, saved in backups.items():
                model.get_submodule(target).weight.copy_(saved)
        backups.clear()
        model.__dict__.pop(IDENTITY_ATTR, None)
        if identity is not None:
            setattr(model, IDENTITY_ATTR, identity)

    try:
        with torch.no_grad():
            for target in targets:
                weight = model.get_submodule(target).weight
                if backup:
                    backups[target] = weight.to("cpu", copy=True)
                total = weight.float()
                if total.data_ptr() == weight.data_ptr():  # float32 weights: sum into a copy, write once
                    total = total.clone()
                for lora, strength in active:
                    if target in lora.targets:
                        total.add_(lora.delta(target, weight.device), alpha=strength)
                weight.copy_(total)
    except BaseException:
        restore()
        raise
    return restore if backup else (lambda: None)


@contextmanager
def merged(model: InfDiT, loras: Sequence[tuple[Lora, float]]):
    """apply_loras for the duration of the context: on exit, also when the body raises (a
    cancelled run), the weights are the original ones again, bit for bit."""
    restore = apply_loras(model, loras)
    try:
        yield model
    finally:
        restore()
