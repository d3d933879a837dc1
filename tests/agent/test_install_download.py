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
    with pytest.raises(DownloadError, match="HTTP 404$") as err:
        download(server.url("/missing.eopkg"), tmp_path / "p", sha256="0" * 64, attempts=1)
    assert "no such package" not in err.value.message  # the server's reason phrase is not repeated
    with pytest.raises(InputError, match="package url must be http:// or https:// with a host, found 'file:///etc/passwd'"):
        download("file:///etc/passwd", tmp_path / "p", sha256="0" * 64)
    with pytest.raises(InputError, match="expected sha256 must be 64 hex digits"):
        download(server.url("/x"), tmp_path / "p", sha256="abc")


@pytest.fixture
def installer(server, agent_config, events):
    """An Installer whose package store is the test server (its whole origin)."""
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import Store

    config = agent_config(download={"allowed_urls": [server.url("/")]})
    return Installer(Store(config.state_dir), config, on_event=events)


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


# ------------------------------------------------------------------ only from the package store


class _Banner:
    """A TCP service that is not a package store (think PostgreSQL on 5432): it answers every connection
    with a secret banner and counts the connections it got."""

    SECRET = b"SFATAL-secret-banner-of-another-service"

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(self.SECRET + b"\r\n\r\n")

    def close(self):
        self.sock.close()


@pytest.fixture
def banner():
    b = _Banner()
    yield b
    b.close()


@pytest.mark.parametrize("path", ["/", "/dl/pkg.eopkg"])
def test_url_outside_the_store_is_refused_before_connecting(banner, server, tmp_path, path):
    store = [server.url("/dl/")]
    with pytest.raises(SecurityError, match="outside the package store .* refused, nothing was fetched"):
        download(f"http://127.0.0.1:{banner.port}{path}", tmp_path / "p", sha256="0" * 64, allowed=store)
    assert banner.connections == 0


@pytest.mark.parametrize("url, message", [
    ("{store}../pkg.eopkg", "has '.', '..' or an encoded separator"),
    ("{store}%2e%2e/pkg.eopkg", "has '.', '..' or an encoded separator"),
    ("{store}x%2Fy", "has '.', '..' or an encoded separator"),
    ("{origin}/dlx/pkg.eopkg", "outside the package store"),
    ("{origin}/pkg.eopkg", "outside the package store"),
    ("https://127.0.0.1:{port}/dl/pkg.eopkg", "outside the package store"),
    ("http://localhost:{port}/dl/pkg.eopkg", "outside the package store"),
    ("http://evil@127.0.0.1:{port}/dl/pkg.eopkg", "has user info"),
    ("http://127.0.0.1:{port}/dl/pkg.eopkg#x", "a fragment"),
])
def test_store_paths_and_spellings(server, tmp_path, url, message):
    port = server.httpd.server_address[1]
    url = url.format(store=server.url("/dl/"), origin=server.url(""), port=port)
    with pytest.raises(SecurityError, match=message):
        download(url, tmp_path / "p", sha256="0" * 64, allowed=[server.url("/dl/")])
    assert server.ranges == []  # no request reached the server


def test_no_store_configured_refuses_everything(server, tmp_path):
    with pytest.raises(SecurityError, match="no package store is configured"):
        download(server.url("/dl/p"), tmp_path / "p", sha256="0" * 64, allowed=[])
    assert server.ranges == []


def test_download_from_the_store_works(server, payload, tmp_path):
    data, sha = payload
    server.files["/dl/pkg.eopkg"] = data
    out = download(server.url("/dl/pkg.eopkg"), tmp_path / "p.eopkg", sha256=sha, allowed=[server.url("/dl")])
    assert out.read_bytes() == data


def test_errors_never_echo_what_a_server_answered(banner, tmp_path):
    """The probe made an agent fetch http://127.0.0.1:5432/ and the error quoted PostgreSQL's answer.
    Even from an allowed origin, a non-HTTP answer is named by its kind only."""
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{banner.port}/dl/p", tmp_path / "p", sha256="0" * 64, attempts=1,
                 allowed=[f"http://127.0.0.1:{banner.port}/dl/"])
    assert banner.connections == 1
    assert "secret" not in err.value.message.lower() and "SFATAL" not in err.value.message
    assert err.value.message.endswith("failed: BadStatusLine")


def test_redirects_are_not_followed(banner, tmp_path):
    """A store answering 302 to another service must not become a way around the allow-list."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{banner.port}/")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        store = f"http://127.0.0.1:{httpd.server_address[1]}/dl/"
        with pytest.raises(DownloadError, match=r"HTTP 302 \(redirects are not followed\)"):
            download(store + "p", tmp_path / "p", sha256="0" * 64, attempts=1, allowed=[store])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert banner.connections == 0
