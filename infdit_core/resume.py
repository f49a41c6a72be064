"""The state store: checkpoints of the sampler state so an interrupted or crashed job resumes.

Between Heun steps the whole state of a job is the canvas x and the step index (the noise is a
pure function of the seed), so a checkpoint is x after a finished step; a multistep sampler adds its
history (earlier estimates, canvases shaped like x: see sampling.py), stored beside x as
"h.<name>". It is written atomically (temporary file, fsync, rename) as a safetensors file with a
SHA-256 of its bytes, under a key that identifies the job's result: the weights, their dtype, the
inputs (LR and concat LR, which carry the image, the scale and the output size), the CLIP vector,
the steps, the sampler, the seed (or the explicit noise) and lr_noise_init. Block batch, device,
world size and placement change where the work runs, not the result, and stay out of the key.

Each rank writes the region of the canvas it sweeps (its strip along the strip axis) and restores
its region from whatever files of one step cover it, so a job may resume with another number of
ranks. Ranks save at the same steps and keep their last two, and a distributed job resumes from the
latest step every rank can restore.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .strips import StripSchedule

log = logging.getLogger("infdit")
FORMAT = "infdit-resume-1"
SUFFIX = ".safetensors"
KEEP = 2  # checkpoints a rank keeps of a job: a step all ranks have survives a crash mid-save


HISTORY = "h."  # prefix of the history tensors in a checkpoint file


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes for hashing, without a copy when it already lies contiguous in host memory
    (a 8192² canvas is 805 MB)."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


# Where weights_identity caches its value on a model; whoever changes the weights in place drops it.
IDENTITY_ATTR = "_infdit_weights_sha256"


def weights_identity(model) -> str:
    """SHA-256 of the model's weights (computed once per model object: seconds for the full model)."""
    cached = getattr(model, IDENTITY_ATTR, None)
    if cached is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            if ".rope." in name:
                continue  # generated from the geometry, which the other shapes already fix
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(_tensor_bytes(tensor))
        cached = digest.hexdigest()
        setattr(model, IDENTITY_ATTR, cached)
    return cached


def _state_sha256(tensors: dict) -> str:
    """SHA-256 of a checkpoint's tensors in name order (x alone for the official sampler)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(_tensor_bytes(tensors[name]))
    return digest.hexdigest()


def job_key(model, *, lr, concat_lr, clip_vector, steps: int, seed, noise, lr_noise_init: bool,
            sampler: str = "heun") -> str:
    digest = hashlib.sha256(f"{FORMAT}:{weights_identity(model)}:{model.dtype}".encode())
    for tensor in (lr, concat_lr, clip_vector) + ((noise,) if noise is not None else ()):
        tensor = tensor.to(torch.float32)
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_tensor_bytes(tensor))
    job = {"steps": steps, "seed": None if noise is not None else seed, "lr_noise_init": bool(lr_noise_init)}
    if sampler != "heun":  # the official sampler's keys stay those its checkpoints were written under
        job["sampler"] = sampler
    digest.update(json.dumps(job).encode())
    return digest.hexdigest()[:40]


def _fsync_dir(directory: str):
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# A checkpoint file, and the temporary file a save writes first (left behind when a process dies
# while saving): KEY.sSTEP.START-STOP.safetensors[.PID.tmp]
_STEM = r"^(?P<key>[0-9a-f]+)\.s(?P<step>\d+)\.(?P<start>\d+)-(?P<stop>\d+)" + re.escape(SUFFIX)
CHECKPOINT = re.compile(_STEM + r"(\.\d+\.tmp)?$")


def _remove(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:  # removed meanwhile (by the job it belongs to, or another rank)
        pass


def prune(directory: str, max_bytes: int, keep: tuple[str, ...] = ()):
    """Delete the oldest checkpoints (and temporary files of interrupted saves) until they take at
    most max_bytes. Only files named as checkpoints count and go: the folder may hold others."""
    files = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if CHECKPOINT.match(name) and os.path.isfile(path):
                files.append((os.path.getmtime(path), os.path.getsize(path), name))
        except FileNotFoundError:  # removed meanwhile by the job it belongs to
            continue
    files.sort()
    total = sum(size for _, size, _ in files)
    for _, size, name in files:
        if total <= max_bytes:
            break
        if name in keep:
            continue
        total -= size
        _remove(os.path.join(directory, name))


def remove_job(directory: str, key: str):
    """Delete every checkpoint of the job `key`, and the temporary files of saves a crash cut short."""
    for name in os.listdir(directory):
        match = CHECKPOINT.match(name)
        if match and match["key"] == key:
            _remove(os.path.join(directory, name))


class StateStore:
    """Saves and restores one rank's region of x for the job `key` in `directory`."""

    NAME = re.compile(_STEM + "$")  # a complete checkpoint

    def __init__(self, directory: str, key: str, schedule: StripSchedule, block_size: int,
                 canvas_shape: tuple[int, ...], interval: float = 60.0, group=None,
                 max_bytes: Optional[int] = None):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.key, self.schedule = directory, key, schedule
        self.region = schedule.pixel_span(block_size)
        self.axis = schedule.axis % 4
        self.canvas_shape = tuple(canvas_shape)
        self.interval, self.group, self.max_bytes = interval, group, max_bytes
        self.last_save = time.monotonic()
        self.period: Optional[int] = None  # steps between saves, agreed by all ranks
        self.saved: list[int] = []
        self.latest: Optional[tuple] = None  # (step, x, history) of the last finished step, not yet saved

    def _path(self, step: int, start: int, stop: int) -> str:
        return os.path.join(self.directory, f"{self.key}.s{step:05d}.{start}-{stop}{SUFFIX}")

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, x: torch.Tensor, history: Optional[dict] = None):
        from safetensors.torch import save_file

        tensors, storages = {}, set()
        for name, t in {"x": x, **{HISTORY + name: h for name, h in (history or {}).items()}}.items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            if t.untyped_storage().data_ptr() in storages:
                # safetensors refuses two names for one memory; after the step into sigma = 0 a
                # multistep sampler's x is its last estimate.
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        meta = {"format": FORMAT, "key": self.key, "step": str(step), "axis": str(self.axis),
                "start": str(self.region[0]), "stop": str(self.region[1]),
                "canvas": json.dumps(self.canvas_shape), "sha256": _state_sha256(tensors)}
        path = self._path(step, *self.region)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            save_file(tensors, temporary, metadata=meta)
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temporary, path)
            _fsync_dir(self.directory)
        except Exception as error:  # noqa: BLE001 - a lost checkpoint must never cost the job itself
            _remove(temporary)
            self.last_save = time.monotonic()
            warnings.warn(f"Inf-DiT: could not save the resume checkpoint of step {step} in {self.directory} "
                          f"({type(error).__name__}: {str(error)[:200]}); the job goes on without it.")
            return
        self.saved.append(step)
        self.last_save = time.monotonic()
        for old in self.saved[:-KEEP]:
            _remove(self._path(old, *self.region))
        self.saved = self.saved[-KEEP:]
        if self.max_bytes is not None:
            prune(self.directory, self.max_bytes, keep=tuple(os.path.basename(self._path(s, *self.region))
                                                             for s in self.saved))

    def _due(self, step: int, start: int) -> bool:
        if self.interval <= 0:
            return True
        if self.group is None:
            return time.monotonic() - self.last_save >= self.interval
        if self.period is None:
            # Ranks decide alike without talking at every step: the slowest rank's first step
            # sets how many steps make up the interval.
            elapsed = torch.tensor([time.monotonic() - self.last_save], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.group)
            self.period = max(1, math.ceil(self.interval / max(elapsed.item(), 1e-9)))
        return (step - start + 1) % self.period == 0

    def after_step(self, step: int, x: torch.Tensor, start: int, history: Optional[dict] = None):
        if self._due(step, start):
            self.save(step, x, history)
            self.latest = None
        else:
            self.latest = (step, x, history)

    def save_unsaved(self):
        """On an interrupt: keep the last finished step if it was not saved (one process only,
        where no other rank has to agree on the step)."""
        if self.latest is not None and self.group is None:
            self.save(*self.latest)
            self.latest = None

    def keep(self, step: int, x: torch.Tensor, history: Optional[dict] = None):
        """Make sure the final state is on disk (a chained pass a later pass builds on)."""
        if not self.saved or self.saved[-1] != step:
            self.save(step, x, history)

    def finish(self):
        """The job is done: its checkpoints go. Rank 0 removes them all, after the gather (no rank
        reads them any more), whichever layout of regions wrote them."""
        if self.schedule.rank == 0:
            remove_job(self.directory, self.key)

    # -- restoring ------------------------------------------------------------------------------

    def _listing(self):
        for name in os.listdir(self.directory):
            match = self.NAME.match(name)
            if match and match["key"] == self.key:
                yield match

    def _steps_on_disk(self) -> list[int]:
        return sorted({int(m["step"]) for m in self._listing()}, reverse=True)

    def _files(self, step: int) -> list[tuple[str, tuple[int, int]]]:
        return [(os.path.join(self.directory, m.string), (int(m["start"]), int(m["stop"])))
                for m in self._listing() if int(m["step"]) == step]

    def _read(self, path: str, step: int, region: tuple[int, int]) -> Optional[dict]:
        """The tensors of one checkpoint file ("x" and the history), or None (with a warning) if it
        is not a valid piece of this job's step."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                x = tensors["x"]
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            warnings.warn(f"Inf-DiT: ignoring the unreadable resume checkpoint {path} ({type(error).__name__}: "
                          f"{str(error)[:120]})")
            return None
        expected = list(self.canvas_shape)
        expected[self.axis] = region[1] - region[0]
        problem = None
        if meta.get("format") != FORMAT or meta.get("key") != self.key or meta.get("step") != str(step):
            problem = "it belongs to another job"
        elif (meta.get("axis"), meta.get("start"), meta.get("stop")) != (str(self.axis), str(region[0]), str(region[1])) \
                or json.loads(meta.get("canvas", "null")) != list(self.canvas_shape) \
                or any(list(t.shape) != expected for t in tensors.values()):
            problem = "its canvas does not match this job"
        elif _state_sha256(tensors) != meta.get("sha256"):
            problem = "its checksum does not match (corrupt file)"
        if problem:
            warnings.warn(f"Inf-DiT: ignoring the resume checkpoint {path}: {problem}.")
            return None
        return tensors

    def _assemble(self, step: int) -> Optional[dict]:
        """This rank's region of x and the history at `step` from the files of that step, if they
        cover it (every file of a step holds the same tensors: one sampler wrote them)."""
        start, stop = self.region
        shape = list(self.canvas_shape)
        shape[self.axis] = stop - start
        state: Optional[dict] = None
        covered = [False] * (stop - start)
        for path, (a, b) in self._files(step):
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            pieces = self._read(path, step, (a, b))
            if pieces is None or (state is not None and set(pieces) != set(state)):
                continue
            if state is None:
                state = {name: torch.empty(shape) for name in pieces}
            for name, piece in pieces.items():
                state[name].narrow(self.axis, lo - start, hi - lo).copy_(piece.narrow(self.axis, lo - a, hi - lo))
            covered[lo - start:hi - start] = [True] * (hi - lo)
        return state if all(covered) else None

    def load(self) -> Optional[tuple[int, torch.Tensor, dict]]:
        """(last finished step, this rank's x, its history) of the newest step every rank can
        restore, or None."""
        restorable = {}
        for step in self._steps_on_disk():
            x = self._assemble(step)
            if x is not None:
                restorable[step] = x
                if self.group is None:
                    break
        steps = set(restorable)
        if self.group is not None:
            everyone: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(everyone, sorted(steps), group=self.group)
            steps = set.intersection(*(set(s) for s in everyone))
        if not steps:
            return None
        step = max(steps)
        self.saved = [step]
        state = restorable[step]
        return step, state.pop("x"), {name[len(HISTORY):]: t for name, t in state.items()}
