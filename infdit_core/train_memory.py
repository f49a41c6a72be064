"""Predicted device memory of one training step (LoRA or full fine-tuning) of Inf-DiT.

A step runs the network once over every block of a batch of crops (the whole crop in one call, so
each block's neighbour keys and values come from the same call), then the backward pass. With
per-layer activation checkpointing (model.forward_blocks(checkpoint_layers=True)) the forward
keeps only each layer's input; the backward recomputes one layer at a time and holds that layer's
activations, its gradients and the inputs of the layers before it. The peak is therefore the larger
of layer 0's backward (the LR cross-attention makes it the largest layer) and the last layer's
(the most stored inputs). Without checkpointing every layer's activations are kept.

The activation factors count hidden-sized tensors [blocks, tokens, width]; they were measured on
the CPU in float32 by counting live tensor storage through a training step of small models
with the released block geometry (tests/test_train_memory.py checks the plan against that
measurement on other geometries). Weights, LoRA tensors, gradients and optimiser states are
counted exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import InfDiTConfig
from .lora import DEFAULT_TARGETS, expand_targets
from .memory import parameter_count
from .model import InfDiT

# Hidden-sized tensors alive at the peak of one layer's backward pass under checkpointing, beside
# the stored layer inputs: its recomputed activations (the modulated and normalised inputs, the
# QKV projection, q, the 4-slot keys and values (8), the attention output, the 4x-wide MLP
# activation (4)...) and their gradients. Layer 0 adds the cross-attention over 3x3-block LR
# windows (2.25x a block's tokens, for keys and values and their gradients).
LAYER_BACKWARD = 36.5
LAYER0_BACKWARD = 52.6
# Without checkpointing: activations the forward keeps per layer, and for layer 0 together with
# what the backward adds on top of everything kept.
LAYER_SAVED = 25.1
LAYER0_SAVED_AND_BACKWARD = 51.6
# Hidden-sized tensors the 4-slot keys and values are of LAYER_BACKWARD (shown on their own).
KV_SLOTS = 8
# float32 values per HR pixel of a block alive through the step: the network input (6 channels)
# and its c_in-scaled copy, the output, its gradient and the loss terms.
IO_FLOATS = 16
# Linear weights of one layer, in units of width^2 (QKV 3, output 1, MLP 8), and of layer 0's
# cross-attention (4): with LoRA every target's weight W + scale * B @ A is materialised in the
# forward and kept for the backward of its input.
LAYER_WEIGHTS = 12
CROSS_WEIGHTS = 4
ADAM_STATES = 2


@dataclass(frozen=True)
class TrainingPlan:
    """Predicted peak device bytes of one training step."""
    weights: int  # the model's weights (frozen with LoRA)
    trainable: int  # LoRA A/B (float32), or the weights' float32 master copy when fully fine-tuned: counted in weights
    gradients: int
    optimizer: int  # AdamW's two moments
    ema: int  # the EMA copy of the trained parameters
    stored_inputs: int  # layer inputs kept for the recompute, at the peak
    layer_activations: int  # the recomputed layer's activations and gradients at the peak (or, without
    #                         checkpointing, every layer's)
    kv_slots: int  # of layer_activations: the 4-slot keys and values of one layer
    io: int  # block inputs, outputs and loss terms
    step_scratch: int  # AdamW's temporary (foreach) copy of one moment in the optimiser step, after the backward
    blocks: int  # network batch: blocks per step
    peak_layer: int  # the layer whose backward is the peak

    @property
    def total(self) -> int:
        # The activations are freed by the end of the backward; the optimiser step's scratch comes after.
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.ema
                + max(self.activations, self.step_scratch))

    @property
    def activations(self) -> int:
        """What the step's forward and backward allocate beyond the parameters and their states."""
        return self.stored_inputs + self.layer_activations + self.io

    def table(self) -> str:
        gb = 1 << 30
        rows = [("weights", self.weights), ("LoRA parameters (fp32)" if self.trainable else "trainable (in weights)",
                                             self.trainable),
                ("gradients", self.gradients), ("AdamW states", self.optimizer), ("EMA", self.ema),
                (f"stored layer inputs (peak at layer {self.peak_layer})", self.stored_inputs),
                (f"one layer recomputed + its gradients (4-slot K/V {self.kv_slots / gb:.2f} GiB)"
                 if self.stored_inputs else "all layers' activations + backward", self.layer_activations),
                ("block inputs, outputs, loss", self.io),
                ("optimiser step scratch (after the backward; the larger counts)", self.step_scratch),
                ("total", self.total)]
        return "\n".join(f"  {name:<66} {value / gb:8.2f} GiB" for name, value in rows)


def lora_parameter_count(config: InfDiTConfig, rank: int, targets=None) -> int:
    """A and B elements of a rank-`rank` LoRA on `targets` (default: the attention and MLP projections)."""
    with torch.device("meta"):
        model = InfDiT(config)
    total = 0
    for path in expand_targets(DEFAULT_TARGETS if targets is None else targets, config.num_layers):
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LoRA target {path} is not a Linear layer")
        total += rank * (linear.in_features + linear.out_features)
    return total


def plan_training(config: InfDiTConfig, crop: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                  lora_rank: Optional[int] = 16, checkpointing: bool = True, ema: bool = True,
                  crop_width: Optional[int] = None, weights_dtype: Optional[torch.dtype] = None) -> TrainingPlan:
    """Peak device bytes of a training step on `batch` crops of crop x crop_width (default square)
    HR pixels, activations in `dtype`. lora_rank: LoRA training, the model's weights frozen in
    `weights_dtype` (default `dtype`); None: full fine-tuning, weights in `weights_dtype` (default
    float32) and trained. The optimiser is AdamW (two float32 moments per trained element), the
    EMA a float32 copy. Under bf16 autocast some activations stay float32 (LayerNorm outputs and
    what follows them until the next matrix product): plan with dtype bfloat16 and float32 for the
    two bounds."""
    width = crop if crop_width is None else crop_width
    s = config.block_size
    if crop % s or width % s or crop <= 0 or width <= 0:
        raise ValueError(f"the crop {crop}x{width} must be a positive multiple of the {s}-px block")
    e = torch.empty((), dtype=dtype).element_size()
    params = parameter_count(config)
    blocks = batch * (crop // s) * (width // s)
    hidden = blocks * config.block_tokens ** 2 * config.hidden_size * e
    rope = 2 * blocks * config.block_tokens ** 2 * config.head_dim * e  # cos and sin, shared by the layers
    io = IO_FLOATS * blocks * s * s * 4 + rope
    L = config.num_layers
    w = torch.empty((), dtype=weights_dtype or (torch.float32 if lora_rank is None else dtype)).element_size()
    if lora_rank is None:
        weights, trained, trainable = params * w, params, 0
        merged_layer = merged_layer0 = 0
    else:
        weights, trained = params * w, lora_parameter_count(config, lora_rank)
        trainable = trained * 4
        merged_layer = LAYER_WEIGHTS * config.hidden_size ** 2 * e
        merged_layer0 = merged_layer + CROSS_WEIGHTS * config.hidden_size ** 2 * e
    if checkpointing:
        # Backward of layer k: inputs of layers 0..k stored, layer k recomputed.
        first, last = (1, LAYER0_BACKWARD * hidden + merged_layer0), (L, LAYER_BACKWARD * hidden + merged_layer)
        (stored_layers, layer), peak_layer = max((first, 0), (last, L - 1), key=lambda c: c[0][0] * hidden + c[0][1])
        stored = stored_layers * hidden
    else:
        stored, peak_layer = 0, L - 1
        layer = ((LAYER0_SAVED_AND_BACKWARD + (L - 1) * LAYER_SAVED) * hidden
                 + (L - 1) * merged_layer + merged_layer0)
    return TrainingPlan(
        weights=weights, trainable=trainable, gradients=trained * 4, optimizer=ADAM_STATES * trained * 4,
        ema=trained * 4 if ema else 0, stored_inputs=int(stored), layer_activations=int(layer),
        kv_slots=KV_SLOTS * hidden, io=int(io), step_scratch=trained * 4, blocks=blocks, peak_layer=peak_layer)
