"""benchmarks/gpu_speed.py without a GPU: it skips cleanly, its FLOP count is the hand count, and its
logic runs end to end on the CPU (--smoke: tiny geometry, fp32; not a measurement)."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

from infdit_core import InfDiTConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_speed.py"


def script():
    if "gpu_speed" not in sys.modules:  # registered before it runs: its dataclasses look it up
        spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
        sys.modules["gpu_speed"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_speed"]


def run_script(*args, timeout=300):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_skips_without_cuda():
    result = run_script()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("skipped: no CUDA")


def test_flop_count_is_the_hand_count():
    # The tiny golden geometry: T = (32/4)^2 = 64 tokens, D = 64, LR window L = (3 * 32/8)^2 = 144.
    config = InfDiTConfig(num_layers=2, hidden_size=64, num_heads=4, block_size=32, image_size=64)
    qkv, out, mlp = 2 * 64 * 64 * 192, 2 * 64 * 64 * 64, 2 * (2 * 64 * 64 * 256)
    attention = 2 * (2 * 64 * 256 * 64)  # QK^T and AV against 4 slots x 64 keys
    layer = qkv + out + mlp + attention
    cross = (2 * 64 * 64 * 64 + 2 * 144 * 64 * 128 + 2 * (2 * 64 * 144 * 64) + 2 * 64 * 64 * 64
             + 2 * 144 * 64 * 12)  # q, K/V, QK^T + AV, out projections, LR patch embedding (3 x 2 x 2)
    embed = 2 * 64 * 64 * 96 + 2 * 64 * 64 * 48  # patch embedding (6 x 4 x 4), final linear (4 x 4 x 3)
    assert script().block_flops(config) == 2 * layer + cross + embed == 28_139_520
    # The released model: 1.76 TFLOP per block per network call.
    assert round(script().block_flops(InfDiTConfig()) / 1e12, 2) == 1.76


def test_peak_table_by_device_name():
    gpu = script()
    assert gpu.peak_tflops("NVIDIA H200") == 989 and gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756 and gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops("NVIDIA GeForce RTX 4090") == 165 and gpu.peak_tflops("NVIDIA L40S") == 362
    assert gpu.peak_tflops("Some Future GPU") is None


def test_smoke_run_on_cpu(tmp_path):
    result = run_script("--smoke", "--block-batches", "1,2", "--repeats", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "smoke run, not a measurement" in out and "fp8: not run (CPU)" in out
    assert re.search(r"^eager +block batch +1: ", out, re.M) and re.search(r"^fast +block batch +2: ", out, re.M)
    assert "fast, no graphs" not in out  # no CUDA graphs on the CPU: the fast path is the compiled layers alone
    assert "projected 1024->4096 (64 blocks x 39 calls)" not in out  # tiny blocks: 32 px
    assert "projected 1024->4096 (16384 blocks x 39 calls) fast" in out
    report = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert [(t["mode"], t["block_batch"]) for t in report["timings"]] == [("eager", 1), ("eager", 2), ("fast", 1),
                                                                         ("fast", 2)]
    gaps = report["exactness"]["tiny"]
    assert gaps["eager fp32"] <= 1e-4 and abs(gaps["fast fp32"] - gaps["eager fp32"]) <= 1e-5
    assert (tmp_path / "gpu_speed.md").read_text().startswith("# gpu_speed: cpu")
