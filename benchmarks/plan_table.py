"""The planner's device/host split for the released model (InfDiTConfig() defaults, bf16).

    python benchmarks/plan_table.py [--sizes 4096,8192,16384] [--cards 8,12,24]

Prints, as Markdown tables: the predicted device and host peaks at 4096², 8192² and 16384² for
offload off/canvas/all at one block per call, and what `offload auto` / `block_batch auto` pick on
8, 12 and 24 GiB cards (other output sides and card sizes with --sizes and --cards). These are predictions of `infdit_core.plan` only; nothing runs on a device.

A card's budget is what resolve_execution would see there: 0.8 x the memory free after the weights
are loaded (card size minus the weights; the CUDA context's few hundred MB are not subtracted).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infdit_core import InfDiTConfig, plan  # noqa: E402
from infdit_core.memory import resolve_execution  # noqa: E402

GB = 1e9
GiB = 2 ** 30
DTYPE = torch.bfloat16


def numbers(text):
    return [int(v) for v in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=numbers, default=[4096, 8192, 16384], help="output sides, comma-separated")
    parser.add_argument("--cards", type=numbers, default=[8, 12, 24], help="card sizes in GiB, comma-separated")
    args = parser.parse_args()
    config = InfDiTConfig()
    weights = plan(config, 128, 128, 1, DTYPE).weights
    print(f"Released geometry ({config.num_layers} layers, width {config.hidden_size}, {config.block_size}-px blocks), "
          f"bf16; weights {weights / GB:.2f} GB. GB = 10^9 bytes.\n")
    print("Block batch 1:\n")
    print("| output | offload | device peak | of which K/V | canvases on device | host (canvases + K/V) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        for mode in ("off", "canvas", "all"):
            p = plan(config, size, size, 1, DTYPE, offload=mode)
            print(f"| {size}² | {mode} | {p.total / GB:.2f} GB | {p.kv_cache / GB:.2f} GB | {p.canvases / GB:.2f} GB "
                  f"| {p.host / GB:.2f} GB ({p.canvases_host / GB:.2f} + {p.kv_host / GB:.2f}) |")
    print("\nWhat auto picks (offload auto, block_batch auto), budget = 0.8 x (card - weights):\n")
    print("| card | output | offload | K/V blocks kept beyond the next call's | block batch | device peak | host |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for card in args.cards:
        budget = int(0.8 * (card * GiB - weights))
        for size in args.sizes:
            m, placement, p = resolve_execution("auto", "auto", config, size, size, DTYPE, "cuda",
                                                budget=budget, host_budget=1 << 50)
            slots = placement.kv_device_slots if placement.spills_kv else "-"
            print(f"| {card} GiB | {size}² | {placement.mode} | {slots} | {m} | {p.total / GB:.2f} GB "
                  f"| {p.host / GB:.2f} GB |")


if __name__ == "__main__":
    main()
