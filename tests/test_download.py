"""Fetching the official checkpoint, against a real HTTP server on 127.0.0.1 started by the test.

The server serves a tiny official-style checkpoint (the golden tiny model wrapped as
{'module': state_dict}, torch.save'd like DeepSpeed's mp_rank_00_model_states.pt), honours Range
requests (or ignores them), and can cut a transfer after a given number of bytes. Nothing here
talks to any other address: proxy variables are cleared, and the one proxied test names a host
that only our server (as the proxy) ever sees.
"""
import argparse
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import sys
import threading
import urllib.parse
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_pack
from infdit_core import download, load_model
from infdit_core.__main__ import main
from infdit_core.checkpoint import OFFICIAL_FILENAME, ROPE_PREFIX, read_state_dict
from infdit_core.integrity import RECORD_SUFFIX, record

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
node_download = sys.modules[PACK.__name__ + ".nodes.weights_download"]
node_loaders = sys.modules[PACK.__name__ + ".nodes.loaders"]
pack_download = sys.modules[PACK.__name__ + ".infdit_core.download"]  # the pack's own copy of the engine
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class Route:
    """What the server sends for one path. `cuts`: byte counts after which successive responses
    are cut (the connection closes early), one per request until used up."""

    def __init__(self, body=b"", content_type="application/octet-stream", ranges=True, cuts=(), redirect=None):
        self.body, self.content_type, self.ranges, self.cuts = body, content_type, ranges, list(cuts)
        self.redirect = redirect  # a path: answer 302 with that Location instead


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the server thread for long

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Range")))
        route = self.server.routes.get(urllib.parse.urlsplit(self.path).path)  # proxied: an absolute URL
        if route is None:
            self.send_error(404)
            return
        if route.redirect is not None:  # a share link pointing at the storage URL
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers["Range"][6:].split("-")[0]) if route.ranges and self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body) - start))
        self.end_headers()
        payload = route.body[start:]
        self.wfile.write(payload[:route.cuts.pop(0)] if route.cuts else payload)  # HTTP/1.0: then it closes

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.seen = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def url(server, path="/official.pt"):
    return f"http://127.0.0.1:{server.server_port}{path}"


@pytest.fixture(autouse=True)
def local_and_quick(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: never a prompt
    for module in (download, pack_download):
        monkeypatch.setattr(module, "BACKOFF_S", 0.01)
        monkeypatch.setattr(module, "TIMEOUT_S", 10.0)


@pytest.fixture(scope="module")
def official_bytes(golden_dir, tmp_path_factory):
    """Like the official file: a pickle with the state dict under 'module' plus bookkeeping."""
    path = tmp_path_factory.mktemp("official") / OFFICIAL_FILENAME
    torch.save({"module": load_file(golden_dir / "tiny_model.safetensors"), "args": argparse.Namespace(lr=1e-4)}, path)
    return path.read_bytes()


def run_download(capsys, *args):
    """(exit code, stderr) of `python -m infdit_core download ARGS`, run in this process."""
    try:
        main(["download", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# --- the command line ------------------------------------------------------------------------


def test_cut_transfer_resumes_converts_and_loads(server, official_bytes, golden_dir, tmp_path, capsys):
    cut = len(official_bytes) * 2 // 5
    server.routes["/official.pt"] = Route(official_bytes, cuts=[cut])
    to = tmp_path / "models" / "infdit"
    code, err = run_download(capsys, "--to", to, "--url", url(server))
    assert code == 0, err
    assert [r for _, r in server.seen] == [None, f"bytes={cut}-"]  # resumed, not restarted
    assert "retrying" in err and "Resuming" in err and "kept" in err  # no prompt: stdin is not a terminal
    assert sorted(os.listdir(to)) == sorted(name + suffix for name in (OFFICIAL_FILENAME, "infdit_bf16.safetensors")
                                            for suffix in ("", RECORD_SUFFIX))
    assert (to / OFFICIAL_FILENAME).read_bytes() == official_bytes
    entry = json.loads((to / (OFFICIAL_FILENAME + RECORD_SUFFIX)).read_text())
    assert (entry["sha256"], entry["size"], entry["source"]) == (sha256(official_bytes), len(official_bytes), url(server))
    converted = to / "infdit_bf16.safetensors"
    assert json.loads(converted.with_name(converted.name + RECORD_SUFFIX).read_text())["sha256"] == \
        sha256(converted.read_bytes())
    model = load_model(converted)
    golden = load_file(golden_dir / "tiny_model.safetensors")
    for key, value in model.state_dict().items():
        if key in golden and not key.startswith(ROPE_PREFIX):  # RoPE tables are regenerated, at another size
            torch.testing.assert_close(value, golden[key].to(torch.bfloat16).float(), atol=0, rtol=0)

    # Run again with --delete-pickle: everything is there and verified, nothing is fetched.
    code, err = run_download(capsys, "--to", to, "--url", url(server), "--delete-pickle")
    assert code == 0 and len(server.seen) == 2 and "already there and verified" in err
    assert sorted(os.listdir(to)) == ["infdit_bf16.safetensors", "infdit_bf16.safetensors" + RECORD_SUFFIX]


def test_share_link_redirect_is_followed_and_resumes_with_its_range(server, official_bytes, tmp_path, capsys):
    cut = len(official_bytes) // 3
    server.routes["/share/abc"] = Route(redirect="/storage/official.pt")
    server.routes["/storage/official.pt"] = Route(official_bytes, cuts=[cut])
    code, err = run_download(capsys, "--to", tmp_path, "--url", url(server, "/share/abc"), "--convert", "none")
    assert code == 0, err
    # Each attempt goes through the share link, and the Range header survives the redirect.
    assert server.seen == [("/share/abc", None), ("/storage/official.pt", None),
                           ("/share/abc", f"bytes={cut}-"), ("/storage/official.pt", f"bytes={cut}-")]
    assert "Resuming" in err
    assert (tmp_path / OFFICIAL_FILENAME).read_bytes() == official_bytes


def test_server_ignoring_range_means_a_restart(server, official_bytes, tmp_path, capsys):
    server.routes["/official.pt"] = Route(official_bytes, ranges=False, cuts=[1000])
    code, err = run_download(capsys, "--to", tmp_path, "--url", url(server), "--convert", "none")
    assert code == 0, err
    assert [r for _, r in server.seen] == [None, "bytes=1000-"]
    assert "ignored the request to resume" in err and "starting again from 0" in err
    assert (tmp_path / OFFICIAL_FILENAME).read_bytes() == official_bytes


def test_persistent_cuts_keep_the_partial_for_later(server, official_bytes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 2)
    server.routes["/official.pt"] = Route(official_bytes, cuts=[1000] * 3)
    code, err = run_download(capsys, "--to", tmp_path, "--url", url(server), "--convert", "none")
    assert code == 1 and "failed after 3 attempts" in err and "run the download again to resume" in err
    assert os.listdir(tmp_path) == [OFFICIAL_FILENAME + ".part"]
    assert (tmp_path / (OFFICIAL_FILENAME + ".part")).stat().st_size == 3000


HTML = b"<!DOCTYPE html>\n<html><head><title>Share link expired</title></head><body>Sorry</body></html>"


def _wrong_model():
    buffer = io.BytesIO()
    torch.save({"module": {"encoder.weight": torch.zeros(4, 4)}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["html page", "html as octet-stream", "truncated file", "wrong model"])
def test_what_is_not_the_checkpoint_is_rejected_and_deleted(server, official_bytes, tmp_path, capsys, kind):
    route, expected = {
        "html page": (Route(HTML, content_type="text/html"), "HTML page titled 'Share link expired'"),
        "html as octet-stream": (Route(HTML), "HTML page titled 'Share link expired'"),
        "truncated file": (Route(official_bytes[:len(official_bytes) // 2]), "truncated or corrupt"),
        "wrong model": (Route(_wrong_model()), "does not contain Inf-DiT weights"),
    }[kind]
    server.routes["/official.pt"] = route
    to = tmp_path / "models" / "infdit"
    code, err = run_download(capsys, "--to", to, "--url", url(server))
    assert code == 1 and expected in err and "error: " in err
    assert not to.exists() or os.listdir(to) == []


def test_a_file_already_there_is_checked_and_left_alone(server, tmp_path, capsys):
    (tmp_path / OFFICIAL_FILENAME).write_bytes(b"half a browser download")
    code, err = run_download(capsys, "--to", tmp_path, "--url", url(server), "--convert", "none")
    assert code == 1 and "already there but is not usable" in err and "move or delete it" in err
    assert (tmp_path / OFFICIAL_FILENAME).read_bytes() == b"half a browser download" and server.seen == []


def test_404_is_final_and_clear(server, tmp_path, capsys):
    code, err = run_download(capsys, "--to", tmp_path, "--url", url(server, "/moved.pt"))
    assert code == 1 and "404 Not Found" in err and "--url" in err
    assert len(server.seen) == 1  # not retried
    assert os.listdir(tmp_path) == []


def test_refused_connection_is_clear(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = run_download(capsys, "--to", tmp_path, "--url", f"http://127.0.0.1:{port}/official.pt")
    assert code == 1 and f"Connection refused by 127.0.0.1:{port}" in err


def test_no_network_is_clear(tmp_path, capsys, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # as without a network; nothing is sent
    code, err = run_download(capsys, "--to", tmp_path, "--url", "http://weights.example/official.pt")
    assert code == 1 and "No network: cannot reach weights.example" in err and "https_proxy" in err


def test_proxy_variables_are_honoured(server, official_bytes, tmp_path, capsys, monkeypatch):
    server.routes["/official.pt"] = Route(official_bytes)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_port}")
    code, err = run_download(capsys, "--to", tmp_path, "--url", "http://weights.invalid/official.pt",
                             "--convert", "none")
    assert code == 0, err
    assert server.seen == [("http://weights.invalid/official.pt", None)]  # the proxy form of the request


def test_transfer_meter_reports_size_speed_and_eta():
    times = iter([0.0, 1.0, 2.0, 3.0, 4.0])
    stream = io.StringIO()
    meter = download.TransferMeter(stream, clock=lambda: next(times))
    for done in (0, 10 ** 6, 1_050_000, 3 * 10 ** 6, 4 * 10 ** 6):
        meter(done, 4 * 10 ** 6)
    lines = stream.getvalue().splitlines()
    assert lines == ["0 B / 4.0 MB (0%)", "1.0 MB / 4.0 MB (25%)  1.0 MB/s  ETA 0:03",
                     "3.0 MB / 4.0 MB (75%)  1.0 MB/s  ETA 0:01", "4.0 MB / 4.0 MB (100%)  1.0 MB/s"]


def test_transfer_meter_on_a_terminal_rewrites_one_line_and_ends_it_for_messages():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    meter = download.TransferMeter(stream, clock=iter([0.0, 0.1, 0.5]).__next__, interval_s=0.25)
    meter(0, 100)
    meter(10, 100)  # within the same quarter second: not drawn
    meter(50, 100)
    meter.say("retrying")
    assert stream.getvalue() == f"\r{'0 B / 100 B (0%)':<64}\r{'50 B / 100 B (50%)  100 B/s  ETA 0:00':<64}\nretrying\n"


# --- later loads and the upscale default ----------------------------------------------------------


def test_a_changed_file_is_reported_on_load(golden_dir, tmp_path):
    path = tmp_path / "infdit_bf16.safetensors"
    shutil.copy(golden_dir / "tiny_model.safetensors", path)
    record(str(path), source="test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_state_dict(str(path))  # unchanged: silent
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="has changed since it was verified.*SHA-256.*python -m infdit_core download"):
        read_state_dict(str(path))


def test_upscale_defaults_to_the_downloaded_model(golden_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from PIL import Image

    Image.new("RGB", (9, 7), (120, 30, 200)).save("in.png")
    with pytest.raises(SystemExit, match="default weights models/infdit/infdit_bf16.safetensors are not in .*\n"
                                         "  python -m infdit_core download"):
        main(["upscale", "in.png", "-o", "out"])
    os.makedirs("models/infdit")
    shutil.copy(golden_dir / "tiny_model.safetensors", "models/infdit/infdit_bf16.safetensors")
    with pytest.warns(UserWarning, match="zero"):
        main(["upscale", "in.png", "-o", "out", "--steps", "1", "--dtype", "fp32", "--device", "cpu"])
    assert Image.open("out/in_x4.png").size == (36, 28)


# --- the ComfyUI node's download entry, outside ComfyUI (the bridge's fallbacks) -----------------


class Interrupted(Exception):
    """Like ComfyUI's InterruptProcessingException: raised from the progress bar's hook."""


class ByteBar:
    def __init__(self, raise_at=None):
        self.updates, self.raise_at = [], raise_at

    def factory(self, total, unit="blocks"):
        self.created = (total, unit)
        return self

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total))
        if self.raise_at is not None and len(self.updates) >= self.raise_at:
            raise Interrupted


def test_node_download_entry_cancel_resume_and_load(server, official_bytes, tmp_path, monkeypatch):
    loader = NODES["InfDiTModelLoader"]
    entry = node_download.DOWNLOAD_ENTRY

    def choices():
        listed = loader.INPUT_TYPES()["required"]["model_name"][0]
        assert listed[-1] == node_loaders.DEMO_ENTRY  # the shipped demo model is always offered, last
        return listed[:-1]

    monkeypatch.setenv("INFDIT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(node_download, "OFFICIAL_WEIGHTS_URL", url(server))
    chunk = 1 << 18
    monkeypatch.setattr(pack_download, "CHUNK_BYTES", chunk)
    server.routes["/official.pt"] = Route(official_bytes)
    assert choices() == [entry] and server.seen == []  # listing it fetches nothing

    monkeypatch.setattr(bridge, "progress_bar", ByteBar(raise_at=3).factory)
    with pytest.raises(Interrupted):
        loader().load(entry, "fp32")
    folder = tmp_path / "models" / "infdit"
    assert os.listdir(folder) == [OFFICIAL_FILENAME + ".part"]
    assert (folder / (OFFICIAL_FILENAME + ".part")).stat().st_size == 3 * chunk
    assert choices() == [entry]  # a partial file is not a model

    bar = ByteBar()
    monkeypatch.setattr(bridge, "progress_bar", bar.factory)
    model = loader().load(entry, "fp32")[0]
    assert server.seen[-1][1] == f"bytes={3 * chunk}-"
    assert bar.created == (len(official_bytes), "bytes") and bar.updates[-1] == (len(official_bytes),) * 2
    assert model.path == str(folder / "infdit_bf16.safetensors") and model.model.dtype == torch.float32

    assert entry not in choices() and "infdit_bf16.safetensors" in choices()
    assert loader.VALIDATE_INPUTS(entry) is True  # a workflow saved with the entry still runs
    assert "not in ComfyUI/models/infdit" in loader.VALIDATE_INPUTS("other.pt")
    requests = len(server.seen)
    assert loader().load(entry, "fp32")[0].path == model.path and len(server.seen) == requests
