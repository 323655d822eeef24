"""util/download.py against a loopback HTTP server with misbehaving endpoints."""
import os
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from util import download as dl

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size
CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    """Paths pick a behaviour:
    /ok          honours Range
    /drop_once   first request: announces the full length, sends half, hangs up; then like /ok
    /always_drop every request hangs up half-way
    /norange     ignores Range (always 200 with the whole file)
    /norange_drop_once  ignores Range and hangs up half-way the first time
    /redirect    302 to /ok (as Dropbox does)
    /misaligned  answers a Range request with 206 from 1000 bytes before the asked start
    /always416   answers every Range request with 416 "bytes */<size>" (a file that changed)
    /longer_once first request: announces the file's length but streams more (chunked, as a
                 proxy beside a stale Content-Length can); then like /ok
    /html        a 200 HTML page
    /hangup      closes the connection without answering
    anything else: 404
    """

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        self.server.requests.append((path, self.headers.get("Range")))
        count = sum(p == path for p, _ in self.server.requests)
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/html":
            body = b"<html>preview</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/hangup":
            self.close_connection = True
        elif path in ("/ok", "/drop_once", "/always_drop"):
            drop = path == "/always_drop" or (path == "/drop_once" and count == 1)
            self.send_file(honour_range=True, drop=drop)
        elif path == "/misaligned":
            self.send_file(honour_range=True, drop=False, shift=-1000)
        elif path == "/always416" and self.headers.get("Range"):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/always416":
            self.send_file(honour_range=False, drop=False)
        elif path == "/longer_once" and count == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.send_header("Transfer-Encoding", "chunked")  # http.client then reads the chunks, not the length
            self.end_headers()
            body = PAYLOAD + b"stale tail"
            for i in range(0, len(body), CHUNK):
                piece = body[i:i + CHUNK]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
        elif path == "/longer_once":
            self.send_file(honour_range=True, drop=False)
        elif path in ("/norange", "/norange_drop_once"):
            self.send_file(honour_range=False, drop=path == "/norange_drop_once" and count == 1)
        else:
            self.send_error(404, "Not Found")

    def send_file(self, honour_range, drop, shift=0):
        start, status = 0, 200
        rng = self.headers.get("Range")
        if honour_range and rng:
            start = max(0, int(rng.split("=")[1].split("-")[0]) + shift)
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = PAYLOAD[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if drop:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def fetch(server, path, dest, **kwargs):
    kwargs = {"retries": 2, "backoff": 0.0, "chunk_size": CHUNK, "progress": False, "timeout": 10, **kwargs}
    return dl.download_file(url(server, path), dest, **kwargs)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_plain_download(server, tmp_path):
    dest = tmp_path / "m" / "checkpoint-last.pth"
    assert fetch(server, "/ok", dest) == str(dest)
    assert read(dest) == PAYLOAD
    assert not os.path.exists(str(dest) + ".part")


def test_existing_file_is_kept(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    dest.write_bytes(b"already here")
    fetch(server, "/ok", dest)
    assert read(dest) == b"already here"
    assert server.requests == []
    fetch(server, "/ok", dest, overwrite=True)
    assert read(dest) == PAYLOAD


def test_resume_after_dropped_connection(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    fetch(server, "/drop_once", dest)
    assert read(dest) == PAYLOAD
    (first, r1), (second, r2) = server.requests
    assert r1 is None
    # the second request asks only for what is missing
    assert r2 is not None and int(r2.split("=")[1].rstrip("-")) > 0


def test_resume_from_existing_part_file(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(PAYLOAD[:1000])
    fetch(server, "/ok", dest)
    assert read(dest) == PAYLOAD
    assert server.requests == [("/ok", "bytes=1000-")]


def test_complete_part_file_is_renamed(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(PAYLOAD)
    fetch(server, "/ok", dest)  # server answers 416 with the total size
    assert read(dest) == PAYLOAD


@pytest.mark.parametrize("have", [1000, 5000, len(PAYLOAD) - 10])
def test_a_reply_resuming_at_another_byte_restarts_cleanly(server, tmp_path, have):
    """A 206 whose Content-Range starts elsewhere than the .part file ends: appending it
    would shift every later byte (and still add up to the announced size)."""
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(PAYLOAD[:have])
    fetch(server, "/misaligned", dest)
    assert read(dest) == PAYLOAD
    assert server.requests[-1] == ("/misaligned", None)  # started over


@pytest.mark.parametrize("part", [PAYLOAD[:1000], PAYLOAD + b"stale tail", b"x" * (len(PAYLOAD) - 1)],
                         ids=["short", "longer", "one-short"])
def test_416_means_done_only_when_the_part_file_has_the_announced_size(server, tmp_path, part):
    """416 "bytes */N" says the file has N bytes: only a .part file of exactly N bytes is
    the complete file; any other (a shorter one, a stale longer one) is downloaded again."""
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(part)
    fetch(server, "/always416", dest)
    assert read(dest) == PAYLOAD
    assert server.requests == [("/always416", f"bytes={len(part)}-"), ("/always416", None)]
    assert not os.path.exists(str(dest) + ".part")


def test_a_reply_longer_than_announced_is_never_put_in_place(server, tmp_path):
    """More bytes than the server announced is a wrong file, not a complete one: the
    download starts over instead of renaming it into place."""
    dest = tmp_path / "ckpt.pth"
    fetch(server, "/longer_once", dest)
    assert read(dest) == PAYLOAD
    assert server.requests == [("/longer_once", None)] * 2


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(b"stale bytes from some other file")
    fetch(server, "/norange", dest)
    assert read(dest) == PAYLOAD  # not stale prefix + full file


def test_server_ignoring_range_with_drop(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    fetch(server, "/norange_drop_once", dest)
    assert read(dest) == PAYLOAD
    assert len(server.requests) == 2


def test_persistent_failure_keeps_part_for_later_resume(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    with pytest.raises(dl.DownloadError, match="run the same command again"):
        fetch(server, "/always_drop", dest, retries=1)
    assert not dest.exists()
    part = tmp_path / "ckpt.pth.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    assert PAYLOAD.startswith(read(part))
    # a later run against a healthy server picks up where it stopped
    have = part.stat().st_size
    fetch(server, "/ok", dest)
    assert read(dest) == PAYLOAD
    assert server.requests[-1] == ("/ok", f"bytes={have}-")


def test_http_404_is_a_clear_error(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        fetch(server, "/missing", dest)
    assert len(server.requests) == 1  # no pointless retries
    assert not dest.exists() and not (tmp_path / "ckpt.pth.part").exists()


def test_html_page_is_rejected(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="dl=1"):
        fetch(server, "/html", tmp_path / "ckpt.pth")


def test_redirect_keeps_range(server, tmp_path):
    dest = tmp_path / "ckpt.pth"
    (tmp_path / "ckpt.pth.part").write_bytes(PAYLOAD[:10])
    fetch(server, "/redirect", dest)
    assert read(dest) == PAYLOAD
    assert server.requests == [("/redirect", "bytes=10-"), ("/ok", "bytes=10-")]


def test_download_pretrained_layout(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.PRETRAINED_URLS, "fractalmar_in64", url(server, "/ok"))
    path = dl.download_pretrained("fractalmar_in64", root=tmp_path, progress=False, retries=0)
    assert path == os.path.join(tmp_path, "fractalmar_in64", "checkpoint-last.pth")
    assert read(path) == PAYLOAD
    with pytest.raises(ValueError, match="fractalmar_huge_in256"):
        dl.download_pretrained("fractalmar_giant", root=tmp_path)


def test_cli_reports_http_errors(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.PRETRAINED_URLS, "fractalar_in64", url(server, "/gone"))
    with pytest.raises(SystemExit, match="HTTP 404"):
        dl.main(["--model", "fractalar_in64", "--output_dir", str(tmp_path), "--retries", "0"])


def test_dropbox_links_are_direct():
    assert len(dl.PRETRAINED_URLS) == 5
    for link in dl.PRETRAINED_URLS.values():
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
        assert query["dl"] == ["1"] and "rlkey" in query
    share = "https://www.dropbox.com/scl/fi/abc/checkpoint-last.pth?rlkey=x&st=y&dl=0"
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(dl.direct_link(share)).query) == \
        {"rlkey": ["x"], "st": ["y"], "dl": ["1"]}
    assert dl.direct_link("http://127.0.0.1:8000/file?dl=0") == "http://127.0.0.1:8000/file?dl=0"


def test_failure_before_any_byte_leaves_no_folder_and_no_resume_hint(server, tmp_path):
    dest = tmp_path / "pm" / "fractalmar_in64" / "checkpoint-last.pth"
    with pytest.raises(dl.DownloadError) as e:
        fetch(server, "/hangup", dest, retries=1)
    assert "run the same command again" in str(e.value) and ".part" not in str(e.value)
    assert len(server.requests) == 2  # a dropped connection is retried
    assert not (tmp_path / "pm").exists()


@pytest.fixture
def offline(monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_offline_fails_at_once_in_one_line(offline, tmp_path, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:  # five retries with backoff would take 30 s
        dl.main(["--model", "fractalmar_in64", "--output_dir", str(tmp_path / "pm")])
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert message.startswith("error: cannot reach www.dropbox.com") and "network" in message
    assert "\n" not in message and ".part" not in message and "resume" not in message
    assert "retrying" not in capsys.readouterr().err
    assert not (tmp_path / "pm").exists()
