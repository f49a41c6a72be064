"""The command line under torchrun (2 CPU ranks, gloo, loopback): images and strips modes give the
single-process files; a rank killed mid-run fails the job quickly, names the rank, writes nothing."""
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    # One thread per rank: two ranks share this machine's cores.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def torchrun(ranks: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "infdit_core", "upscale", *args]


def single(*args) -> list[str]:
    return [sys.executable, "-m", "infdit_core", "upscale", *args]


def run(command, timeout=240):
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_png16(path) -> np.ndarray:
    """Decode the 16-bit PNGs infdit_core writes (filter 0 on every line)."""
    data = open(path, "rb").read()
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8:pos + 8 + length]
        pos += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 16
    channels = {0: 1, 2: 3, 6: 4}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + w * channels * 2)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].copy().view(">u2").reshape(h, w, channels).astype(np.float64) / 65535


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a": (11, 17), "b": (16, 8), "c": (9, 9)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def common(golden_dir):
    return ["--model", str(golden_dir / "tiny_model.safetensors"), "--steps", "2", "--seed", "5",
            "--dtype", "fp32", "--device", "cpu", "--block-batch", "1"]


def test_folder_in_images_mode_gives_the_single_process_files(golden_dir, images, tmp_path):
    run(single(str(images), "-o", str(tmp_path / "one"), *common(golden_dir)))
    result = run(torchrun(2, str(images), "-o", str(tmp_path / "two"), "--parallel", "images", *common(golden_dir)))
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == ["a_x4.png", "b_x4.png", "c_x4.png"] and sorted(os.listdir(tmp_path / "two")) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert result.stdout.count(" -> ") == 3  # each image written once, by the rank that made it


def test_one_image_in_strips_mode_matches_to_16_bits(golden_dir, images, tmp_path):
    source = str(images / "a.png")  # 17x11 -> 68x44: 3 block columns over 2 ranks, a partial strip
    run(single(source, "-o", str(tmp_path / "one.png"), "--bit-depth", "16", *common(golden_dir)))
    result = run(torchrun(2, source, "-o", str(tmp_path / "two.png"), "--parallel", "strips", "--bit-depth", "16",
                          *common(golden_dir)))
    one, two = read_png16(tmp_path / "one.png"), read_png16(tmp_path / "two.png")
    assert one.shape == two.shape == (44, 68, 3)
    assert np.abs(one - two).max() <= 1e-4
    assert result.stdout.count(" -> ") == 1  # rank 0 writes it


def test_a_killed_rank_fails_the_job_fast_and_leaves_no_output(golden_dir, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    target = tmp_path / "out.png"
    log = open(tmp_path / "stderr.txt", "w+")
    command = torchrun(2, str(tmp_path / "big.png"), "-o", str(target), "--parallel", "strips",
                       *common(golden_dir)[:-4], "--steps", "30", "--dtype", "fp32", "--device", "cpu")
    process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=log,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "blocks" not in open(tmp_path / "stderr.txt").read():  # rank 0's progress: sampling started
            assert process.poll() is None and time.monotonic() < deadline, open(tmp_path / "stderr.txt").read()
            time.sleep(0.2)
        victim = next(pid for pid in _children(process.pid) if "RANK=1" in _environ(pid))
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = process.wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = open(tmp_path / "stderr.txt").read()
    assert code != 0 and elapsed < 60
    # torchrun's summary names the killed rank as the root cause; the survivor says why it stopped.
    root_cause = stderr[stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause, stderr[-2000:]
    assert "infdit: rank 0 of 2 stopped: a neighbouring rank is gone" in stderr
    assert not target.exists() and [p.name for p in tmp_path.iterdir() if "out" in p.name] == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _environ(pid: int) -> str:
    try:
        return "\n" + open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""
