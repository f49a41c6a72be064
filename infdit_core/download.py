"""Fetching the official checkpoint on request: resumable, checked before it is trusted, never silent.

The transfer uses the standard library only: urllib honours the http_proxy / https_proxy / no_proxy
environment variables and follows the share link's redirects (keeping the Range header). A
partial transfer is kept as `NAME.part` and resumed with an HTTP Range request. What arrives is
trusted for nothing but its bytes: it goes through the same safe loader and key/shape check as any
other file before it gets its real name, and is deleted (with an explanation) when it fails them.
The verified file's SHA-256 and size are recorded next to it (integrity.py).
"""
from __future__ import annotations

import errno
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional

import torch

from .checkpoint import (OFFICIAL_FILENAME, OFFICIAL_WEIGHTS_URL, CheckpointError, check_state_dict, convert,
                         read_state_dict)
from .integrity import changed, read_record, record

DEFAULT_DIR = os.path.join("models", "infdit")
CONVERT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0
RETRIES = 4
BACKOFF_S = 2.0  # doubled after each failed attempt
USER_AGENT = "infdit-upscale (python urllib)"

Progress = Callable[[int, Optional[int]], None]  # (bytes done, total bytes or None when unknown)


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says what happened and what to do."""


class _Transient(Exception):
    """A failure worth retrying (timeout, reset, cut transfer, server overload)."""


def converted_name(dtype: str) -> str:
    return f"infdit_{dtype}.safetensors"


DEFAULT_MODEL = os.path.join(DEFAULT_DIR, converted_name("bf16"))


def size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# One HTTP transfer


def _network_error(url: str, reason) -> Exception:
    """A URLError's reason as a retryable _Transient or a final DownloadError with advice."""
    host = urllib.parse.urlsplit(url).netloc
    proxy = " (or the proxy named in $https_proxy / $http_proxy)" if urllib.request.getproxies() else ""
    if isinstance(reason, ConnectionRefusedError):
        return DownloadError(f"Connection refused by {host}{proxy}: nothing accepts connections there. "
                             "Check the address given with --url, or your proxy settings.")
    if isinstance(reason, socket.gaierror) or getattr(reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return DownloadError(f"No network: cannot reach {host} ({reason}). Check the connection; behind a proxy, "
                             "set https_proxy / http_proxy (the download honours them).")
    if isinstance(reason, (TimeoutError, ConnectionError, http.client.HTTPException)):
        return _Transient(f"network error talking to {host}: {reason}")
    return DownloadError(f"Cannot download from {url}: {reason}")


def _http_error(url: str, error: urllib.error.HTTPError) -> Exception:
    if error.code in (408, 429) or error.code >= 500:
        return _Transient(f"the server answered {error.code} {error.reason}")
    return DownloadError(f"The server answered {error.code} {error.reason} for {url}: the file is not available "
                         "there (the link may have moved or expired). The current link is in the THUDM/Inf-DiT "
                         "README; pass it, or a mirror, with --url.")


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:64].lower().startswith((b"<!doctype html", b"<html", b"<head", b"<!--"))


def _html_error(url: str, head: bytes) -> DownloadError:
    title = re.search(rb"<title[^>]*>(.*?)</title>", head, re.I | re.S)
    named = f" titled '{title.group(1).decode('utf-8', 'replace').strip()[:80]}'" if title else ""
    return DownloadError(f"{url} sent an HTML page{named} instead of the checkpoint (an expired share link, a "
                         "login or captive portal, or a proxy error page). Nothing was kept. Open the link in a "
                         "browser to see why, or pass a direct link or mirror with --url.")


def _content_range(value: str) -> tuple[int, Optional[int]]:
    """(first byte, total size or None) of a Content-Range header 'bytes 100-199/200'."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if match is None:
        raise _Transient(f"unexpected Content-Range '{value}'")
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _read(response, url: str) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as error:
        raise _network_error(url, error) from None


def _transfer(url: str, part: str, progress: Optional[Progress], say: Callable[[str], None]) -> None:
    """Append the rest of `url` to `part` (from its current size); _Transient if the transfer is cut."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    # A fresh opener per transfer: its ProxyHandler reads the proxy variables now, not at first use.
    opener = urllib.request.build_opener()
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing after `have`: the part may already be whole
            if error.headers.get("Content-Range", "").strip() == f"bytes */{have}":
                return
            os.remove(part)
            raise _Transient(f"the server refused to resume at byte {have}; starting again") from None
        raise _http_error(url, error) from None
    except urllib.error.URLError as error:
        raise _network_error(url, error.reason) from None
    except (OSError, http.client.HTTPException) as error:
        raise _network_error(url, error) from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                raise _Transient(f"the server resumed at byte {start} instead of {have}")
            say(f"Resuming {os.path.basename(part)} at {size_text(have)}"
                + (f" of {size_text(total)}" if total else ""))
        else:
            if have:
                say(f"The server ignored the request to resume at {size_text(have)}: starting again from 0.")
            have, total = 0, length
        first = _read(response, url)
        if response.headers.get_content_type() == "text/html" or (have == 0 and _looks_like_html(first)):
            if os.path.exists(part):
                os.remove(part)
            raise _html_error(url, first + _read(response, url))
        if have == 0:
            say(f"Downloading {os.path.basename(part)[:-5]} ({size_text(total) if total else 'size unknown'}) "
                f"from {url}")
        os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
        done = have
        with open(part, "ab" if have else "wb") as f:
            chunk = first
            while chunk:
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)  # may raise (an interrupt): the part stays for a resume
                chunk = _read(response, url)
    if total is not None and done < total:
        raise _Transient(f"the connection closed after {size_text(done)} of {size_text(total)}")


def _verify(part: str, url: str) -> None:
    """The safe loader and the key/shape check, on what arrived; deleted when it fails them."""
    try:
        sd, _ = read_state_dict(part)
        check_state_dict(sd, part)
    except CheckpointError as error:
        size = os.path.getsize(part)
        os.remove(part)
        raise DownloadError(f"What arrived from {url} ({size_text(size)}) is not the Inf-DiT checkpoint, so it "
                            f"was deleted:\n{error}") from None


def _kept(part: str) -> str:
    if not os.path.exists(part):
        return ""
    return (f" The {size_text(os.path.getsize(part))} received so far are kept in {part}: run the download again "
            "to resume.")


def fetch(url: str, destination: str, *, progress: Optional[Progress] = None,
          say: Callable[[str], None] = _stderr) -> str:
    """Download `url` to `destination` through `destination.part` (resumed if present), retrying
    transient failures with back-off, verify it and record its hash. Returns `destination`."""
    part = destination + ".part"
    for attempt in range(RETRIES + 1):
        try:
            _transfer(url, part, progress, say)
            break
        except DownloadError as error:
            raise DownloadError(f"{error}{_kept(part)}") from None
        except _Transient as error:
            if attempt == RETRIES:
                raise DownloadError(f"Download failed after {RETRIES + 1} attempts: {error}.{_kept(part)}") from None
            delay = BACKOFF_S * 2 ** attempt
            say(f"{error}; retrying in {delay:g} s ({attempt + 1}/{RETRIES})")
            time.sleep(delay)
    _verify(part, url)
    os.replace(part, destination)
    record(destination, source=url)
    return destination


# ---------------------------------------------------------------------------------------------
# The official weights, ready to load


def _verified(path: str, say: Callable[[str], None]) -> bool:
    """Whether `path` can be used as it is: unchanged since it was recorded, or (a file put there by
    hand) passing the checks now, after which it is recorded."""
    if not os.path.isfile(path):
        return False
    difference = changed(path)
    if difference is not None:
        say(f"{difference}: replacing it.")
        return False
    if read_record(path) is None:
        try:
            sd, _ = read_state_dict(path)
            check_state_dict(sd, path)
        except CheckpointError as error:
            raise DownloadError(f"{path} is already there but is not usable:\n{error}\nThe download did not put it "
                                "there, so it is left alone: move or delete it, then run the download again.") from None
        record(path, source="found in place")
    say(f"{path} is already there and verified.")
    return True


def download_official(folder: str = DEFAULT_DIR, *, url: str = OFFICIAL_WEIGHTS_URL, convert_to: str = "bf16",
                      progress: Optional[Progress] = None, say: Callable[[str], None] = _stderr) -> str:
    """The official weights in `folder`: fetched when not already there, then converted to
    `infdit_<dtype>.safetensors` unless `convert_to` is 'none'. Returns the path to load."""
    if convert_to != "none" and convert_to not in CONVERT_DTYPES:
        raise ValueError(f"convert_to must be one of {', '.join(CONVERT_DTYPES)} or none, got {convert_to!r}")
    pickle = os.path.join(folder, OFFICIAL_FILENAME)
    target = pickle if convert_to == "none" else os.path.join(folder, converted_name(convert_to))
    if _verified(target, say):
        return target
    if not _verified(pickle, say):
        fetch(url, pickle, progress=progress, say=say)
    if target != pickle:
        say(f"Converting to {convert_to}: {target}")
        part = target + ".part"
        try:
            convert(pickle, part, CONVERT_DTYPES[convert_to])
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.remove(part)
        record(target, source=f"{OFFICIAL_FILENAME} converted to {convert_to}")
    return target


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class TransferMeter:
    """Bytes, percentage, speed and ETA for the terminal: one line rewritten at most every
    `interval_s`, or, when stderr is not a terminal (a log file), one line per tenth."""

    def __init__(self, stream=None, clock=time.monotonic, interval_s: float = 0.25):
        self.stream = stream or sys.stderr
        self.clock, self.interval_s = clock, interval_s
        self.start = None  # (time, bytes) of the first call: a resumed transfer's speed counts new bytes only
        self.last = None
        self.open_line = False  # a terminal line being rewritten, which a message must end first

    def say(self, message: str):
        """A message between progress lines."""
        self.stream.write(("\n" if self.open_line else "") + message + "\n")
        self.open_line = False

    def __call__(self, done: int, total: Optional[int]):
        now = self.clock()
        if self.start is None:
            self.start = (now, done)
        finished = total is not None and done >= total
        tty = self.stream.isatty()
        mark = now // self.interval_s if tty else (10 * done // total if total else done // 10 ** 8)
        if mark == self.last and not finished:
            return
        self.last = mark
        elapsed = now - self.start[0]
        speed = (done - self.start[1]) / elapsed if elapsed > 0 else 0.0
        text = f"{size_text(done)}" + (f" / {size_text(total)} ({100 * done / total:.0f}%)" if total else "")
        text += f"  {size_text(speed)}/s" if speed else ""
        text += f"  ETA {_duration((total - done) / speed)}" if total and speed and not finished else ""
        self.stream.write(f"\r{text:<64}" + ("\n" if finished else "") if tty else text + "\n")
        self.stream.flush()
        self.open_line = tty and not finished
