"""Optional fp8 weights: the transformer's linear layers stored as float8 e4m3 with one float32 scale
per output channel, run with bf16 activations.

Each weight row is divided by its scale, amax(|row|) / 448 (e4m3's largest finite value), and
rounded to e4m3 (3 mantissa bits: a relative rounding error of at most 2^-4 per weight, plus the
subnormal floor for entries far below their row's largest). The layer dequantises its weight to
bf16 where it is used, so the products run in bf16 as with bf16 weights: the saving is weight
memory (about half of bf16 for the layers quantised), not arithmetic. Quantised: every linear layer
of the 28 transformer layers and of their adaLN modulations (most of the 754M parameters); the
embedders, the cross-attention and the final layer stay bf16.

fp8 is offered on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper and newer: the generations
with fp8 tensor cores, which a later fp8 x fp8 product can use); `check_supported` refuses it
elsewhere with a message that says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max  # 448
ACTIVATIONS = torch.bfloat16
MIN_CAPABILITY = (8, 9)


def refusal(device) -> str | None:
    """Why fp8 weights cannot run on `device`, or None where they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"fp8 weights need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer); the compute "
                f"device here is {device.type}. Use bf16 (or fp32 on the CPU).")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"fp8 weights need compute capability >= 8.9 (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Use bf16.")
    return None


def check_supported(device) -> None:
    problem = refusal(device)
    if problem:
        raise ValueError(problem)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale per output row) with weight ~= e4m3 * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (w / scale[:, None]).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = ACTIVATIONS) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in e4m3 with per-output-channel scales. `weight` is the
    dequantised bf16 weight (a new tensor on every read: merging into it changes nothing, so
    LoRAs are refused on fp8 models, see lora.apply_loras)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize(linear.weight)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(ACTIVATIONS),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def quantize_model(model) -> nn.Module:
    """`model` (bf16) with the linear layers of its transformer layers and adaLN modulations in fp8,
    in place. Refuses a model already quantised."""
    if is_fp8(model):
        raise ValueError("the model's weights are already fp8")
    roots = [model.transformer.layers, model.mixins.adaln_layer.adaLN_modulations]
    for root in roots:
        for name, module in list(root.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, Fp8Linear(child.to(ACTIVATIONS)))
    return model


def is_fp8(model) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())
