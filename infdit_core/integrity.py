"""A record of a weights file as it was when verified, so a later load can say it has changed.

`record(path)` writes `path + RECORD_SUFFIX` (JSON: SHA-256, size, modification time, where it came
from). `changed(path)` compares the file with its record. It hashes only when the modification
time differs (a 2 GB hash on every load would cost seconds), so an untouched file costs one stat.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

RECORD_SUFFIX = ".verified.json"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record(path: str, source: str) -> dict:
    stat = os.stat(path)
    entry = {"file": os.path.basename(path), "sha256": sha256_file(path), "size": stat.st_size,
             "mtime_ns": stat.st_mtime_ns, "source": source,
             "verified": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": "safe loader, Inf-DiT keys and shapes"}
    with open(path + RECORD_SUFFIX, "w") as f:
        json.dump(entry, f, indent=1)
    return entry


def read_record(path: str) -> Optional[dict]:
    try:
        with open(path + RECORD_SUFFIX) as f:
            entry = json.load(f)
        return entry if {"sha256", "size", "mtime_ns"} <= set(entry) else None
    except (OSError, ValueError):
        return None


def forget(path: str) -> None:
    """Delete `path` and its record."""
    for name in (path, path + RECORD_SUFFIX):
        if os.path.exists(name):
            os.remove(name)


def changed(path: str) -> Optional[str]:
    """Why `path` differs from what was verified, or None (unchanged, or never recorded)."""
    entry = read_record(path)
    if entry is None:
        return None
    stat = os.stat(path)
    if stat.st_size != entry["size"]:
        difference = f"its size is {stat.st_size} bytes instead of {entry['size']}"
    elif stat.st_mtime_ns == entry["mtime_ns"]:
        return None
    elif (digest := sha256_file(path)) != entry["sha256"]:
        difference = f"its SHA-256 is {digest[:16]}... instead of {entry['sha256'][:16]}..."
    else:
        return None
    return f"{path} has changed since it was verified on {entry.get('verified', '?')}: {difference}"
