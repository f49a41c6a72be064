"""Device memory of a training step at the released geometry (InfDiTConfig() defaults).

    python benchmarks/train_memory.py

Prints the plan of `infdit_core.train_memory.plan_training` for LoRA fine-tuning at a 512² crop,
batch 1, LoRA rank 16, per-layer checkpointing and bf16 autocast, as `python -m infdit_core train`
runs it on CUDA (the frozen weights in float32), then a table of other settings. Under autocast
some activations stay float32, so each setting is planned with every activation in bf16 (lower
bound) and in float32 (upper bound). Predictions only: nothing runs on a device. The activation
factors were measured on the CPU (tests/test_train_memory.py checks the plan within 5% of measured
steps). Not counted: the CUDA context and the allocator's fragmentation.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core import InfDiTConfig  # noqa: E402
from infdit_core.clip import VIT_L_14  # noqa: E402
from infdit_core.train_memory import lora_parameter_count, plan_training  # noqa: E402

GiB = 2 ** 30
TARGET = 24e9  # a "24 GB" card, in bytes


def clip_tower_bytes(dtype) -> int:
    """The CLIP ViT-L/14 image tower the trainer keeps on the device to embed each LR."""
    import open_clip

    with torch.device("meta"):
        model = open_clip.CLIP(VIT_L_14["embed_dim"], VIT_L_14["vision_cfg"], VIT_L_14["text_cfg"])
    return sum(p.numel() for p in model.visual.parameters()) * torch.empty((), dtype=dtype).element_size()


def bounds(config, crop, batch, lora, checkpointing, weights_dtype):
    return [plan_training(config, crop, batch, dtype, lora_rank=lora, checkpointing=checkpointing,
                          weights_dtype=weights_dtype) for dtype in (torch.bfloat16, torch.float32)]


def main():
    config = InfDiTConfig()
    clip = clip_tower_bytes(torch.float32)
    low, high = bounds(config, 512, 1, 16, True, torch.float32)
    print(f"Released geometry ({config.num_layers} layers, width {config.hidden_size}, {config.block_size}-px "
          f"blocks): LoRA rank 16 ({lora_parameter_count(config, 16) / 1e6:.1f}M parameters), 512x512 crop, "
          f"batch 1 ({low.blocks} blocks), frozen weights in fp32, bf16 autocast, checkpointing on, AdamW + EMA.\n")
    print("Activations all bf16 (lower bound):")
    print(low.table())
    print("Activations all fp32 (upper bound):")
    print(high.table())
    print(f"  {'+ CLIP ViT-L/14 image tower (fp32) on the device':<66} {clip / GiB:8.2f} GiB")
    worst = high.total + clip
    print(f"\n  = {(low.total + clip) / GiB:.2f} to {worst / GiB:.2f} GiB ({worst / 1e9:.2f} GB at most) of a "
          f"{TARGET / 1e9:.0f} GB card: " + ("fits" if worst < TARGET else "does NOT fit") + "\n")
    print("With the CLIP tower; GiB = 2^30 bytes.\n")
    print("| training | weights | crop | batch | checkpointing | predicted peak | fits 24 GB |")
    print("| --- | --- | ---: | ---: | --- | ---: | --- |")
    for lora, weights_dtype, crop, batch, checkpointing in [
            (16, torch.float32, 512, 1, True), (16, torch.bfloat16, 512, 1, True), (16, torch.float32, 512, 4, True),
            (16, torch.float32, 1024, 1, True), (64, torch.float32, 512, 1, True),
            (16, torch.float32, 512, 1, False), (None, torch.float32, 512, 1, True)]:
        low, high = bounds(config, crop, batch, lora, checkpointing, weights_dtype)
        name = f"LoRA rank {lora}" if lora else "full fine-tuning"
        fits = "yes" if high.total + clip < TARGET else "no" if low.total + clip >= TARGET else "maybe"
        print(f"| {name} | {'fp32' if weights_dtype == torch.float32 else 'bf16'} | {crop}² | {batch} | "
              f"{'on' if checkpointing else 'off'} | {(low.total + clip) / GiB:.1f} to {(high.total + clip) / GiB:.1f} "
              f"GiB | {fits} |")


if __name__ == "__main__":
    main()
