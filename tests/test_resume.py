"""Resuming an interrupted or crashed job: the sampler state checkpointed between Heun
steps, restored by a rerun with the same Resume folder, ignored when it is not this job's."""
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from conftest import condition, spawn_ranks
from infdit_core import load_model, sample, upscale
from infdit_core.pipeline import Resume
from infdit_core.resume import StateStore, prune
from infdit_core.sampling import network_calls

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
BLOCK = 32
STEPS = 4
K = 2  # the interrupt comes in step K: steps 0 .. K-1 are finished
RESUMED = re.compile(r"Inf-DiT: resuming from step (\d+) of (\d+)")


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_model(golden_dir / "tiny_model.safetensors")


def inputs(rows=2, cols=3, seed=0, batch=1):
    return condition(batch, rows, cols, seed, BLOCK)


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


class Cancelled(Exception):
    """What ComfyUI's interrupt does: the progress callback raises."""


def cancel_in_step(k):
    def callback(step, steps, done, total, preview):
        if step == k:
            raise Cancelled(f"cancelled in step {k}")
    return callback


def interrupted(run, k=K):
    """Run `run(callback)` and cancel it in step k (0-based), after steps 0 .. k-1 finished."""
    with pytest.raises(Cancelled):
        run(cancel_in_step(k))


def checkpoints(folder):
    """{step: [file names]} of the checkpoint files in `folder`."""
    found = {}
    for name in sorted(os.listdir(folder)):
        match = StateStore.NAME.match(name)
        assert match, f"unexpected file {name} in the resume folder"
        found.setdefault(int(match["step"]), []).append(name)
    return found


def resumed_steps(caplog):
    found = (RESUMED.search(r.getMessage()) for r in caplog.records if r.name == "infdit")
    return [(int(m[1]), int(m[2])) for m in found if m]


class Counter:
    def __init__(self):
        self.calls = []

    def __call__(self, step, steps, done, total, preview):
        self.calls.append((step, done, total))


# --- resume gives the uninterrupted result ---------------------------------------------------------


@pytest.mark.parametrize("interval", [0, 60])
def test_interrupted_run_resumes_bit_for_bit(model, tmp_path, caplog, interval):
    case = dict(inputs(), steps=STEPS, seed=3, block_batch=2)
    blocks, batch = 6, 2
    reference = sample(model, **case)
    resume = Resume(str(tmp_path), interval)

    interrupted(lambda cb: sample(model, **case, callback=cb, resume=resume))
    # Every step saved (the last two kept), or, at 60 s, only the last finished step, saved by the interrupt.
    assert sorted(checkpoints(tmp_path)) == ([K - 2, K - 1] if interval == 0 else [K - 1])

    caplog.set_level(logging.INFO, logger="infdit")
    counter = Counter()
    out = sample(model, **case, callback=counter, resume=resume)
    assert torch.equal(out, reference)
    assert resumed_steps(caplog) == [(K, STEPS)]
    # Fewer network calls: steps 0 .. K-1 (two calls each) are not redone, and the progress starts
    # (one update at once) where the interrupted run's last finished step ended.
    per_call = math.ceil(blocks / batch)
    assert len(counter.calls) == 1 + (network_calls(STEPS) - 2 * K) * per_call
    assert counter.calls[0] == (K, 2 * K * blocks, network_calls(STEPS) * blocks)
    assert counter.calls[1] == (K, 2 * K * blocks + batch, network_calls(STEPS) * blocks)
    assert counter.calls[-1][1:] == (network_calls(STEPS) * blocks,) * 2
    assert os.listdir(tmp_path) == [], "a finished job leaves no checkpoint"

    # A run that is never interrupted saves and cleans up without changing a bit.
    assert torch.equal(sample(model, **case, resume=resume), reference)
    assert os.listdir(tmp_path) == []


def test_resume_with_another_block_batch_and_offload(model, tmp_path, caplog):
    """Block batch and offload mode change where the work runs, not the job: they stay out of the key."""
    case = dict(inputs(rows=3, cols=2, seed=1), steps=STEPS, seed=4)
    reference = sample(model, **case, block_batch=1)
    resume = Resume(str(tmp_path), 0)
    interrupted(lambda cb: sample(model, **case, block_batch=1, callback=cb, resume=resume))
    caplog.set_level(logging.INFO, logger="infdit")
    counter = Counter()
    out = sample(model, **case, block_batch=6, offload="all", callback=counter, resume=resume)
    assert resumed_steps(caplog) == [(K, STEPS)]
    assert [c[1] for c in counter.calls[:2]] == [2 * K * 6, 2 * K * 6 + 6]
    # Other block batches sum in another order inside a network call: float rounding only.
    assert rel_l2(out, reference) <= 1e-5
    assert rel_l2(out, sample(model, **case, block_batch=6)) <= 1e-5
    assert os.listdir(tmp_path) == []


def test_crash_after_the_last_step_returns_the_saved_result(model, tmp_path, caplog, monkeypatch):
    """A crash between the last save and the clean-up: the rerun has nothing left to do."""
    case = dict(inputs(seed=2), steps=2, seed=5, block_batch=3)
    reference = sample(model, **case)
    with monkeypatch.context() as patch:
        patch.setattr(StateStore, "finish", lambda self: None)
        sample(model, **case, resume=Resume(str(tmp_path), 0))
    assert sorted(checkpoints(tmp_path)) == [0, 1]
    caplog.set_level(logging.INFO, logger="infdit")
    counter = Counter()
    assert torch.equal(sample(model, **case, callback=counter, resume=Resume(str(tmp_path), 0)), reference)
    assert resumed_steps(caplog) == [(2, 2)]
    assert counter.calls == [(2, 3 * 6, 3 * 6)]  # the bar at its end at once; no network call
    assert os.listdir(tmp_path) == []


# --- another job starts fresh ------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["seed", "concat_lr", "lr", "clip_vector", "steps", "lr_noise_init"])
def test_another_job_starts_fresh(model, tmp_path, caplog, change):
    job = dict(inputs(seed=6), steps=STEPS, seed=7, block_batch=6)
    other = dict(job)
    if change == "seed":
        other["seed"] = 8
    elif change == "steps":
        other["steps"] = STEPS + 1
    elif change == "lr_noise_init":
        other["lr_noise_init"] = False
    else:
        other[change] = job[change].clone()
        other[change].view(-1)[0] += 1e-3  # one number of the input
    resume = Resume(str(tmp_path), 0)
    interrupted(lambda cb: sample(model, **job, callback=cb, resume=resume))
    left = checkpoints(tmp_path)
    caplog.set_level(logging.INFO, logger="infdit")
    assert torch.equal(sample(model, **other, resume=resume), sample(model, **other))
    assert resumed_steps(caplog) == []
    assert checkpoints(tmp_path) == left, "another job's checkpoints are not touched"


def test_another_scale_starts_fresh(model, tmp_path, caplog):
    """4x and 3.5x of a 16x24 image both sample a 64x96 canvas: the content tells them apart."""
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(9))
    common = dict(clip_vector=torch.zeros(1, 768), steps=STEPS, seed=1, block_batch=6)
    resume = Resume(str(tmp_path), 0)
    interrupted(lambda cb: upscale(model, image, scale=4, **common, callback=cb, resume=resume))
    left = checkpoints(tmp_path)
    caplog.set_level(logging.INFO, logger="infdit")
    out = upscale(model, image, scale=3.5, **common, resume=resume)
    assert out.shape[-2:] == (56, 84)
    assert resumed_steps(caplog) == []
    assert torch.equal(out, upscale(model, image, scale=3.5, **common))
    assert checkpoints(tmp_path) == left
    # ... and the 4x job still resumes, through upscale() as well.
    out = upscale(model, image, scale=4, **common, resume=resume)
    assert resumed_steps(caplog) == [(K, STEPS)]
    assert torch.equal(out, upscale(model, image, scale=4, **common))
    assert os.listdir(tmp_path) == []


# --- damaged or foreign checkpoints are ignored ----------------------------------------------------------


def _truncate(path, **_):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_tensor_bytes(path, **_):
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - header > 64
    for i in range(len(data) - 16, len(data)):  # the tensor data, after the untouched header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _other_jobs_file(path, other, **_):
    shutil.copyfile(other, path)


DAMAGE = {"truncated": (_truncate, "unreadable"),
          "another job": (_other_jobs_file, "belongs to another job"),
          "bad checksum": (_flip_tensor_bytes, "checksum does not match")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_ignored_with_a_warning(model, tmp_path, caplog, damage):
    job = dict(inputs(seed=10), steps=STEPS, seed=2, block_batch=3)
    reference = sample(model, **job)
    resume = Resume(str(tmp_path / "job"), 60)  # one checkpoint: the interrupt's
    interrupted(lambda cb: sample(model, **job, callback=cb, resume=resume))
    (name,) = checkpoints(resume.directory)[K - 1]
    path = tmp_path / "job" / name

    # A file of another job (another seed, same canvas) under this job's name.
    other = Resume(str(tmp_path / "other"), 60)
    interrupted(lambda cb: sample(model, **dict(job, seed=99), callback=cb, resume=other))
    (other_name,) = checkpoints(other.directory)[K - 1]
    assert other_name != name
    DAMAGE[damage][0](path, other=tmp_path / "other" / other_name)

    caplog.set_level(logging.INFO, logger="infdit")
    with pytest.warns(UserWarning, match=DAMAGE[damage][1]):
        out = sample(model, **job, resume=resume)
    assert resumed_steps(caplog) == [], "nothing valid to resume from: a fresh start"
    assert torch.equal(out, reference)
    assert os.listdir(resume.directory) == [], "the damaged file goes with the finished job"
    assert os.listdir(other.directory) == [other_name]


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(model, tmp_path, caplog):
    job = dict(inputs(seed=11), steps=STEPS, seed=6, block_batch=6)
    reference = sample(model, **job)
    resume = Resume(str(tmp_path), 0)
    interrupted(lambda cb: sample(model, **job, callback=cb, resume=resume), k=3)
    saved = checkpoints(tmp_path)
    assert sorted(saved) == [1, 2]
    _flip_tensor_bytes(tmp_path / saved[2][0])
    caplog.set_level(logging.INFO, logger="infdit")
    with pytest.warns(UserWarning, match="checksum does not match"):
        out = sample(model, **job, resume=resume)
    assert resumed_steps(caplog) == [(2, STEPS)]
    assert torch.equal(out, reference)
    assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_canvas_under_this_name_is_ignored(model, tmp_path, caplog):
    """A file whose name is this job's but whose canvas is not (e.g. written by another version)."""
    job = dict(inputs(seed=12), steps=STEPS, seed=1, block_batch=6)
    reference = sample(model, **job)
    resume = Resume(str(tmp_path / "job"), 60)
    interrupted(lambda cb: sample(model, **job, callback=cb, resume=resume))
    (name,) = checkpoints(resume.directory)[K - 1]
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tmp_path / "job" / name), framework="pt") as f:
        meta, x = f.metadata(), f.get_tensor("x")
    save_file({"x": x[..., :BLOCK].contiguous()}, str(tmp_path / "job" / name), metadata=meta)
    caplog.set_level(logging.INFO, logger="infdit")
    with pytest.warns(UserWarning, match="canvas does not match"):
        out = sample(model, **job, resume=resume)
    assert resumed_steps(caplog) == [] and torch.equal(out, reference)


# --- the folder cap ----------------------------------------------------------------------------------------


def _fake_checkpoint(folder, key, step, size, age):
    path = folder / f"{key}.s{step:05d}.0-32.safetensors"
    path.write_bytes(b"\0" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path.name


def test_prune_removes_the_oldest_first_and_holds_the_cap(tmp_path):
    names = [_fake_checkpoint(tmp_path, f"{n:040x}", 0, 1000, age=100 - n) for n in range(6)]  # names[0] oldest
    prune(str(tmp_path), 3500)
    assert sorted(os.listdir(tmp_path)) == names[3:]
    prune(str(tmp_path), 3000)
    assert sorted(os.listdir(tmp_path)) == names[3:]
    prune(str(tmp_path), 2999)
    assert sorted(os.listdir(tmp_path)) == names[4:]
    # Files a running job still needs are kept even where the cap would take them.
    prune(str(tmp_path), 0, keep=(names[4],))
    assert os.listdir(tmp_path) == [names[4]]


def test_prune_deletes_nothing_but_checkpoints(tmp_path):
    """--resume may point at a folder holding other files, weights among them: the cap counts and
    deletes checkpoints only."""
    old = time.time() - 1000
    for name in ("my_model.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"\1" * 5000)
        os.utime(tmp_path / name, (old, old))
    kept = _fake_checkpoint(tmp_path, "ab" * 20, 3, 1000, age=10)
    _fake_checkpoint(tmp_path, "cd" * 20, 1, 1000, age=20)
    prune(str(tmp_path), 1000)
    assert sorted(os.listdir(tmp_path)) == sorted([kept, "my_model.safetensors", "notes.txt"])


def test_folder_cap_in_a_run_prunes_older_jobs(model, tmp_path, caplog):
    resume = Resume(str(tmp_path), 0)
    for seed in (1, 2):  # two interrupted jobs of 2 checkpoints each
        interrupted(lambda cb: sample(model, **inputs(seed=13), steps=STEPS, seed=seed, block_batch=6,
                                      callback=cb, resume=resume))
        time.sleep(0.05)
    files = {name: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)}
    assert len(files) == 4 and len(set(files.values())) == 1
    size = next(iter(files.values()))
    newest = sorted(files, key=lambda n: os.path.getmtime(tmp_path / n))[2:]
    # A third job capped at three files: the first job's go, the second's newest stays ...
    capped = Resume(str(tmp_path), 0, max_bytes=3 * size)
    job = dict(inputs(seed=13), steps=STEPS, seed=3, block_batch=6)
    interrupted(lambda cb: sample(model, **job, callback=cb, resume=capped))
    assert sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)) <= 3 * size
    mine = [n for n in os.listdir(tmp_path) if n not in files]
    assert len(mine) == 2 and set(os.listdir(tmp_path)) - set(mine) <= set(newest)
    # ... and the third job still resumes.
    caplog.set_level(logging.INFO, logger="infdit")
    assert torch.equal(sample(model, **job, resume=capped), sample(model, **job))
    assert resumed_steps(caplog) == [(K, STEPS)]


# --- saving never costs the job ------------------------------------------------------------------------


def test_failed_save_warns_and_the_job_goes_on(model, tmp_path, monkeypatch):
    """A full disk (or any write error) loses a checkpoint, never the job, and leaves no temporary file."""
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    case = dict(inputs(seed=14), steps=STEPS, seed=2, block_batch=6)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        out = sample(model, **case, resume=Resume(str(tmp_path), 0))
    assert torch.equal(out, sample(model, **case))
    assert os.listdir(tmp_path) == []


def test_finished_job_removes_temporary_files_of_a_killed_save(model, tmp_path):
    case = dict(inputs(seed=15), steps=2, seed=2, block_batch=6)
    resume = Resume(str(tmp_path), 0)
    interrupted(lambda cb: sample(model, **case, callback=cb, resume=resume), k=1)
    (name,) = checkpoints(tmp_path)[0]
    stale = tmp_path / f"{name.replace('.s00000.', '.s00001.')}.12345.tmp"  # a save killed midway
    stale.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / f"{'ef' * 20}.s00001.0-64.safetensors.12345.tmp"  # another job's
    unrelated.write_bytes(b"")
    sample(model, **case, resume=resume)
    assert os.listdir(tmp_path) == [unrelated.name]


# --- world size stays out of the key: strips of 2 ranks restore in one process --------------------------------
# (one process -> 2 ranks: tests/test_distributed.py::test_a_single_process_job_resumes_on_two_ranks)


DIST_STEPS = 3


def dist_case():
    return dict(inputs(rows=3, cols=5, seed=16), steps=DIST_STEPS, seed=9, block_batch=1)


def _rank_main(rank, world, port, model_path, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # A job of 2 ranks whose clean-up never ran (a crash at the very end): its files stay.
        StateStore.finish = lambda self: None
        sample(load_model(model_path), **dist_case(), resume=Resume(folder, 0))
    finally:
        dist.destroy_process_group()


def test_strips_of_two_ranks_resume_in_one_process(model, golden_dir, tmp_path, caplog):
    spawn_ranks(_rank_main, 2, str(golden_dir / "tiny_model.safetensors"), str(tmp_path))
    # Each step is two strip files. Without one strip of the last step that step does not cover the
    # canvas: the process resumes from the step before, put together from its two strips.
    saved = checkpoints(tmp_path)
    assert sorted(saved) == [DIST_STEPS - 2, DIST_STEPS - 1] and all(len(v) == 2 for v in saved.values())
    os.remove(tmp_path / saved[DIST_STEPS - 1][1])
    caplog.set_level(logging.INFO, logger="infdit")
    out = sample(model, **dist_case(), resume=Resume(str(tmp_path), 0))
    assert resumed_steps(caplog) == [(DIST_STEPS - 1, DIST_STEPS)]
    # One block per network call in every process: the same arithmetic, so the same bits.
    assert torch.equal(out, sample(model, **dist_case()))
    assert os.listdir(tmp_path) == []


# --- the command line: SIGKILL mid-run, rerun ------------------------------------------------------------

CLI_STEPS = 16
KILL_AFTER = 7  # 0-based: 8 of 16 steps finished


def cli(image, out, *extra):
    return [sys.executable, "-m", "infdit_core", "upscale", str(image), "-o", str(out),
            "--model", str(REPO / "tests" / "data" / "golden" / "tiny_model.safetensors"),
            "--steps", str(CLI_STEPS), "--seed", "3", "--bit-depth", "16", "--dtype", "fp32", "--device", "cpu",
            *map(str, extra)]


def progress(stderr):
    return [int(done) for done, _ in re.findall(r"blocks (\d+)/(\d+)", stderr)]


def test_cli_killed_midway_resumes_to_the_same_png(tmp_path):
    # A 384x384 output (144 blocks) in 16 steps: about 10 s on 2 idle CPU cores.
    pixels = (np.random.default_rng(1).random((96, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    folder = tmp_path / "resume"
    resume = ("--resume", folder, "--resume-interval", 0)

    started = time.monotonic()
    plain = subprocess.run(cli(tmp_path / "in.png", tmp_path / "plain.png"), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    uninterrupted_s = time.monotonic() - started
    assert plain.returncode == 0, plain.stderr

    victim = subprocess.Popen(cli(tmp_path / "in.png", tmp_path / "out.png", *resume), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # Killed in the middle: once the checkpoint of step KILL_AFTER is there (steps then run on).
        while not (folder.is_dir() and max(checkpoints_or_partial(folder), default=-1) >= KILL_AFTER):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint of step {KILL_AFTER} appeared"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "out.png").exists()
    last = max(checkpoints_or_partial(folder))  # a step may have finished before the kill landed
    assert KILL_AFTER <= last < CLI_STEPS - 1, "killed too late to test a resume"

    rerun = subprocess.run(cli(tmp_path / "in.png", tmp_path / "out.png", *resume), cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"Inf-DiT: resuming from step {last + 1} of {CLI_STEPS}" in rerun.stderr
    assert (tmp_path / "out.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    assert os.listdir(folder) == []
    # Fewer network calls: the progress starts after the finished steps, with fewer updates.
    blocks = 144
    done_plain, done_rerun = progress(plain.stderr), progress(rerun.stderr)
    assert done_rerun[0] > 2 * (last + 1) * blocks - 1 and done_plain[0] <= blocks
    assert done_rerun[-1] == done_plain[-1] == network_calls(CLI_STEPS) * blocks
    assert len(done_rerun) < len(done_plain)
    print(f"uninterrupted CLI run {uninterrupted_s:.1f} s, killed after step {last}")


def checkpoints_or_partial(folder):
    """Steps of the complete checkpoint files (a save the kill cut short leaves a .tmp, not a checkpoint)."""
    return [int(m["step"]) for n in os.listdir(folder) if (m := StateStore.NAME.match(n))]


def test_an_interrupt_in_a_later_chained_pass_keeps_the_finished_pass(model, tmp_path, caplog):
    """8x runs as 4x then 2x: the 4x pass keeps its final state until the chain is done, so a
    rerun after an interrupt in the 2x pass restores it instead of sampling it again."""
    image = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(8))
    common = dict(scale=8.0, clip_vector=torch.zeros(1, 768), steps=2, seed=3, block_batch=1)
    calls = []
    reference = upscale(model, image, callback=lambda *a: calls.append(a), **common)
    first_pass = sum(1 for c in calls if c[4].shape[-1] == 32)  # 5 px x4 = 20, padded to one 32-px block
    folder = tmp_path / "resume"
    seen = []

    def cancel_in_second_pass(step, steps, done, total, preview):
        seen.append(preview.shape)
        if preview.shape[-1] != 32 and step == 1:
            raise Cancelled("cancelled in the 2x pass")

    with pytest.raises(Cancelled):
        upscale(model, image, callback=cancel_in_second_pass, resume=Resume(str(folder), interval=0), **common)
    assert 0 < first_pass < len(seen)
    rerun = []
    with caplog.at_level(logging.INFO, logger="infdit"):
        out = upscale(model, image, callback=lambda *a: rerun.append(a), resume=Resume(str(folder), interval=0),
                      **common)
    assert torch.equal(out, reference)
    assert [int(m[0]) for m in RESUMED.findall(caplog.text)] == [2, 1]  # pass 1 restored whole, pass 2 at step 1
    # The first pass is not sampled again: its one progress update says it is done.
    assert [c[2:4] for c in rerun if c[4].shape[-1] == 32] == [(first_pass, first_pass)]
    assert os.listdir(folder) == []  # both passes' checkpoints gone once the chain is done
