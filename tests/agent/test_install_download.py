"""Resumable download (real HTTP server in a thread) and install from a URL."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgeopt.agent.download import DownloadError, download
from edgeopt.sdk.errors import InputError, SecurityError


class _Server:
    """Serves ``files`` with Range support; ``faults`` can cut, ignore ranges or omit the length."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_next: int | None = None  # send only this many bytes of the next response, then close
        self.ignore_range = False
        self.no_length = False
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                data = outer.files.get(self.path)
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                if data is None:
                    self.send_error(404, "no such package")
                    return
                start = 0
                if rng and not outer.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                if outer.no_length:
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_next is not None:
                    body, outer.cut_next = body[:outer.cut_next], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
                if outer.no_length:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def payload(server):
    data = bytes(range(256)) * 4000  # 1 MB, several read chunks
    server.files["/pkg.eopkg"] = data
    return data, hashlib.sha256(data).hexdigest()


def test_download_complete(server, payload, tmp_path):
    data, sha = payload
    out = download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, size=len(data))
    assert out.read_bytes() == data
    assert not (tmp_path / "p.eopkg.part").exists()


def test_interrupted_download_resumes_with_range(server, payload, tmp_path):
    data, sha = payload
    server.cut_next = 300_000
    out = download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, attempts=3, backoff_s=0)
    assert out.read_bytes() == data
    assert server.ranges == [None, "bytes=300000-"]


def test_resume_across_calls(server, payload, tmp_path):
    """A first call dies mid-way (as when the agent restarts); the next call continues from the .part file."""
    data, sha = payload
    server.cut_next = 123_456
    with pytest.raises(DownloadError, match="interrupted at byte 123456"):
        download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, attempts=1)
    assert (tmp_path / "p.eopkg.part").stat().st_size == 123_456
    assert not (tmp_path / "p.eopkg").exists()
    out = download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, attempts=1)
    assert out.read_bytes() == data
    assert server.ranges[-1] == "bytes=123456-"


def test_server_ignoring_range_restarts_from_zero(server, payload, tmp_path):
    data, sha = payload
    (tmp_path / "p.eopkg.part").write_bytes(data[:1000])
    server.ignore_range = True
    out = download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, attempts=1)
    assert out.read_bytes() == data


def test_size_limit_from_content_length(server, payload, tmp_path):
    data, sha = payload
    with pytest.raises(InputError, match=r"is 1024000 bytes, over the 500000-byte download limit"):
        download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, max_bytes=500_000)
    assert list(tmp_path.iterdir()) == []


def test_size_limit_without_content_length(server, payload, tmp_path):
    data, sha = payload
    server.no_length = True
    with pytest.raises(InputError, match=r"over the 500000-byte download limit"):
        download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, max_bytes=500_000)
    assert list(tmp_path.iterdir()) == []


def test_declared_size_over_limit_refused_before_request(server, payload, tmp_path):
    data, sha = payload
    with pytest.raises(InputError, match="over the 10-byte download limit"):
        download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, size=len(data), max_bytes=10)
    assert server.ranges == []


def test_wrong_sha256_refused_and_nothing_left(server, payload, tmp_path):
    data, _ = payload
    with pytest.raises(SecurityError, match="downloaded package sha256 .* does not match the expected 0000000000000000"):
        download(server.url("/pkg.eopkg"), tmp_path / "p.eopkg", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_bad_urls(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/missing.eopkg"), tmp_path / "p", sha256="0" * 64, attempts=1)
    with pytest.raises(InputError, match="package url must be http:// or https:// with a host, found 'file:///etc/passwd'"):
        download("file:///etc/passwd", tmp_path / "p", sha256="0" * 64)
    with pytest.raises(InputError, match="expected sha256 must be 64 hex digits"):
        download(server.url("/x"), tmp_path / "p", sha256="abc")


def test_install_url_end_to_end(server, installer, events, make_package):
    pkg = make_package("1.0.0").read_bytes()
    server.files["/digits-1.0.0.eopkg"] = pkg
    sha = hashlib.sha256(pkg).hexdigest()
    server.cut_next = len(pkg) // 2  # and the first attempt is cut
    model = installer.install_url(server.url("/digits-1.0.0.eopkg"), sha, len(pkg), command_id="c9")
    assert model.version == "1.0.0"
    assert events.kinds() == [("download", True), ("self_test", True), ("switch", True), ("install", True)]
    assert events[0]["command_id"] == "c9" and events[0]["details"]["bytes"] == len(pkg)
    assert list(installer.store.downloads_dir.iterdir()) == []


def test_install_url_wrong_sha_keeps_old(server, installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    pkg = make_package("2.0.0").read_bytes()
    server.files["/d2.eopkg"] = pkg
    with pytest.raises(SecurityError, match="does not match the expected"):
        installer.install_url(server.url("/d2.eopkg"), "1" * 64)
    ev = events.last("download")
    assert ev["ok"] is False and "does not match" in ev["message"]
    assert installer.store.current("digits").version == "1.0.0"
    assert list(installer.store.downloads_dir.iterdir()) == []
