"""The training-step memory plan against the live tensor bytes of a measured CPU training step."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import network_forward, random_inputs
from infdit_core import InfDiT, InfDiTConfig
from infdit_core.lora import attach_lora
from infdit_core.memory import parameter_count
from infdit_core.train_memory import lora_parameter_count, plan_training


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode that are alive at once. A storage
    freed and another allocated at the same address within one op count as two (the second one
    replaces the expired entry)."""

    def __init__(self):
        super().__init__()
        self.alive = {}  # storage address -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                known = self.alive.get(storage.data_ptr())
                if known is None or torch.UntypedStorage._expired(known[0]):
                    self.alive[storage.data_ptr()] = (storage._weak_ref(), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if not torch.UntypedStorage._expired(v[0])}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


def measured_step(config, rows, cols, batch, checkpointing, rank=4):
    """Peak live bytes of a LoRA training step's forward and backward (128-px blocks, float32)."""
    torch.manual_seed(0)
    model = InfDiT(config)
    attach_lora(model, rank, generator=torch.Generator().manual_seed(0))
    inp = random_inputs(batch, rows, cols, seed=0, block=config.block_size)
    with LiveStorageBytes() as live:
        out = network_forward(model, inp["x"], torch.tensor(1.0), lr=inp["lr"], concat_lr=inp["concat_lr"],
                              clip_vector=inp["clip_vector"], checkpoint_layers=checkpointing)
        out.square().mean().backward()
    return live.peak


# Geometries other than the two the factors were measured on (2 heads of 64 and 4 of 64, 3 layers,
# 4 blocks): another head count and width, many layers (the peak moves to the last layer's
# backward), a batch of crops, and no checkpointing.
@pytest.mark.parametrize("layers,width,heads,rows,cols,batch,checkpointing", [
    (2, 192, 3, 2, 3, 1, True),
    (24, 64, 1, 1, 1, 2, True),
    (3, 96, 2, 1, 2, 1, False),
])
def test_plan_matches_a_measured_step(layers, width, heads, rows, cols, batch, checkpointing):
    config = InfDiTConfig(num_layers=layers, hidden_size=width, num_heads=heads, patch_size=4, block_size=128,
                          image_size=512)
    plan = plan_training(config, 128 * rows, batch, torch.float32, lora_rank=4, checkpointing=checkpointing,
                         crop_width=128 * cols)
    measured = measured_step(config, rows, cols, batch, checkpointing)
    predicted = plan.activations + plan.gradients  # what the step allocates; parameters exist before it
    assert predicted == pytest.approx(measured, rel=0.05), (predicted / 2**20, measured / 2**20)
    if checkpointing:
        assert plan.peak_layer == (layers - 1 if layers > 16 else 0)


def test_parameters_and_states_are_counted_exactly():
    config = InfDiTConfig(num_layers=2, hidden_size=64, num_heads=4, block_size=32, image_size=64)
    model = InfDiT(config)
    lora = attach_lora(model, 8)
    n = sum(p.numel() for p in lora.values())
    assert lora_parameter_count(config, 8) == n
    plan = plan_training(config, 64, 2, torch.bfloat16, lora_rank=8)
    assert (plan.weights, plan.trainable, plan.gradients, plan.optimizer, plan.ema) == (
        parameter_count(config) * 2, n * 4, n * 4, 2 * n * 4, n * 4)
    assert plan.blocks == 8
    full = plan_training(config, 64, 1, torch.bfloat16, lora_rank=None, ema=False)
    p = parameter_count(config)
    assert (full.weights, full.gradients, full.optimizer, full.ema) == (p * 4, p * 4, 8 * p, 0)
    with pytest.raises(ValueError, match="multiple of the 32-px block"):
        plan_training(config, 48)


def test_released_geometry_fits_24_gb_at_512():
    # As the trainer runs on CUDA: frozen float32 weights, bf16 autocast (some activations stay
    # float32: the upper bound has them all in float32), and the CLIP ViT-L/14 image tower
    # (303,966,208 parameters) in float32 beside it.
    clip = 303_966_208 * 4
    for activations in (torch.bfloat16, torch.float32):
        plan = plan_training(InfDiTConfig(), 512, 1, activations, lora_rank=16, checkpointing=True,
                             weights_dtype=torch.float32)
        assert plan.blocks == 16 and plan.peak_layer == 27 and plan.weights == parameter_count(InfDiTConfig()) * 4
        assert plan.total + clip < 24e9
