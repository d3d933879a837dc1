"""Resumable package download over HTTP(S) with a size limit and a sha256 check.

Only from the package store: a deploy command's URL must sit under one of the agent's allowed base URLs
(same scheme, host and port, path below the base, no ``..`` in any spelling, no user info); anything
else is refused before a connection is made, and redirects are never followed, so a command cannot point
the agent at another host or port (a database, a cloud metadata service). Error messages never quote
what a server answered (status line, reason phrase, body), only the status code or the local socket
error: an error report must not become a way to read other services through the agent.

The partial file is kept as ``<dest>.part`` between attempts (and between agent restarts, since the
installer names it after the expected sha256): the next attempt asks for the rest with a ``Range``
header. A server that ignores ranges (answers 200) is read again from the start. Nothing is left at
``dest`` unless the whole file arrived and its sha256 matches.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from ..sdk.errors import InputError, SecurityError, UnavailableError
from .store import no_space, no_space_error

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(UnavailableError):
    """The package could not be fetched (network, server answer)."""


_DEFAULT_PORT = {"http": 80, "https": 443}
# Encoded '.', '/', '\\' and NUL: a server may decode them into a path that leaves the store.
_ENCODED_TRICKS = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


def _shown(url: str) -> str:
    """A URL safe to put in one log line: printable, bounded."""
    return "".join(ch if ch.isprintable() else "?" for ch in url[:200])


def _check_url(url: str) -> None:
    if not url.isascii() or any(not ch.isprintable() or ch.isspace() for ch in url):
        raise InputError(f"package url contains spaces or control characters: {_shown(url)!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"package url must be http:// or https:// with a host, found {_shown(url)!r}")


def _origin(parts) -> tuple[str, str, int]:
    return parts.scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORT[parts.scheme]


def normalize_base_url(base: str) -> str:
    """An allowed base URL as compared: http(s), a host, no user info/query/fragment, path ending in '/'.

    Raises ValueError (the agent config validator turns it into a config error)."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"allowed package URL must be http:// or https:// with a host, found {base!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"allowed package URL {base!r} has an invalid port") from None
    if "@" in parts.netloc or parts.query or parts.fragment or "\\" in base:
        raise ValueError(f"allowed package URL {base!r} must have no user info, query or fragment")
    if _ENCODED_TRICKS.search(parts.path) or any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValueError(f"allowed package URL {base!r} must not contain '.', '..' or encoded separators")
    return base if parts.path.endswith("/") else base + "/"


def check_package_url(url: str, allowed: Sequence[str]) -> None:
    """Refuse a package URL outside the allowed base URLs (SecurityError), before any connection."""
    _check_url(url)
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.fragment or "\\" in url:
        raise SecurityError(f"package url {_shown(url)!r} has user info, a fragment or a backslash: refused")
    try:
        parts.port
    except ValueError:
        raise SecurityError(f"package url {_shown(url)!r} has an invalid port: refused") from None
    segments = parts.path.split("/")
    if _ENCODED_TRICKS.search(parts.path) or any(seg in (".", "..") for seg in segments):
        raise SecurityError(f"package url {_shown(url)!r} has '.', '..' or an encoded separator in its path: "
                            "refused")
    if not allowed:
        raise SecurityError("no package store is configured: every package url is refused",
                            hint="set [download] allowed_urls in the agent config to the dashboard's download URL")
    for base in allowed:
        b = urlsplit(normalize_base_url(base))
        if _origin(parts) == _origin(b) and parts.path.startswith(b.path):
            return
    raise SecurityError(f"package url {_shown(url)!r} is outside the package store "
                        f"({', '.join(_shown(a) for a in allowed)}): refused, nothing was fetched",
                        hint="deploy packages from the dashboard, or add its URL to [download] allowed_urls")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead anywhere the allow-list forbids: answer it as the error it then is."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _network_error(exc: BaseException) -> str:
    """What went wrong, without a byte of what the server sent (status lines and bodies can be secrets)."""
    reason = getattr(exc, "reason", exc) if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, (TimeoutError, OSError, http.client.HTTPException)):
        return type(reason).__name__  # e.g. BadStatusLine: its text is the server's first line
    return "connection failed"


def _hash_file(path: Path) -> "hashlib._Hash":
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def _attempt(url: str, part: Path, *, max_bytes: int, timeout_s: float, expected_size: int | None,
             on_progress: Callable[[int, int | None], None] | None) -> None:
    """One request: resume from the partial file's size when there is one."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": "edgeopt-agent"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = _OPENER.open(request, timeout=timeout_s)  # noqa: S310 (scheme checked above)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # our partial file is already complete, or the file changed
            part.unlink()
            raise DownloadError(f"server refused the resume range at byte {offset}; starting over") from None
        moved = " (redirects are not followed)" if 300 <= exc.code < 400 else ""
        raise DownloadError(f"download of {_shown(url)} failed: HTTP {exc.code}{moved}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(f"download of {_shown(url)} failed: {_network_error(exc)}") from None
    with response:
        total: int | None = None
        if response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise DownloadError(f"server answered a range that does not start at byte {offset}; starting over")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            if offset:
                log.info("server ignored the Range header: downloading %s from the start", url)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            part.unlink(missing_ok=True)
            raise InputError(f"package at {url} is {total} bytes, over the {max_bytes}-byte download limit",
                             hint="raise download.max_bytes in the agent config if this is expected")
        if total is not None and expected_size is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise SecurityError(f"package at {url} is {total} bytes; the deploy command said {expected_size}")
        received = offset
        try:
            with open(part, mode) as fh:
                try:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        received += len(block)
                        if received > max_bytes:
                            fh.close()
                            part.unlink(missing_ok=True)
                            raise InputError(
                                f"package at {url} is over the {max_bytes}-byte download limit",
                                hint="raise download.max_bytes in the agent config if this is expected")
                        fh.write(block)
                        if on_progress is not None:
                            on_progress(received, total)
                except (OSError, http.client.HTTPException) as exc:
                    if no_space(exc):
                        raise
                    fh.flush()
                    raise DownloadError(f"download of {_shown(url)} interrupted at byte {received}: "
                                        f"{_network_error(exc)}") from None
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if not no_space(exc):
                raise
            # A partial file that can never complete would keep the disk full for everything else.
            part.unlink(missing_ok=True)
            raise no_space_error(part.parent, f"downloading {_shown(url)}") from None
        if total is not None and received < total:
            raise DownloadError(f"download of {_shown(url)} interrupted at byte {received} of {total}")


def download(url: str, dest: str | Path, *, sha256: str, size: int | None = None,
             max_bytes: int = 2 * 1024**3, timeout_s: float = 60.0, attempts: int = 3,
             backoff_s: float = 0.5, on_progress: Callable[[int, int | None], None] | None = None,
             allowed: Sequence[str] | None = None) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` if present; verify size and sha256.

    With ``allowed`` (base URLs; the agent always passes its config's list, possibly empty) a URL outside
    them is refused before any connection. Raises InputError (bad url, over the limit), SecurityError
    (outside the store, sha256 or size mismatch) or DownloadError (network) after ``attempts`` tries.
    ``dest`` exists only after a complete, matching download.
    """
    if allowed is not None:
        check_package_url(url, allowed)
    _check_url(url)
    sha256 = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InputError(f"expected sha256 must be 64 hex digits, found {sha256!r}")
    if size is not None and size > max_bytes:
        raise InputError(f"package at {url} is {size} bytes, over the {max_bytes}-byte download limit",
                         hint="raise download.max_bytes in the agent config if this is expected")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: DownloadError | None = None
    for attempt in range(1, max(1, attempts) + 1):
        try:
            _attempt(url, part, max_bytes=max_bytes, timeout_s=timeout_s, expected_size=size,
                     on_progress=on_progress)
            break
        except DownloadError as exc:
            last = exc
            log.warning("download attempt %d/%d: %s", attempt, attempts, exc.one_line())
            if attempt < attempts:
                time.sleep(backoff_s * attempt)
    else:
        assert last is not None
        raise last
    got = _hash_file(part).hexdigest()
    if got != sha256:
        part.unlink(missing_ok=True)
        raise SecurityError(f"downloaded package sha256 {got[:16]}... does not match the expected "
                            f"{sha256[:16]}... (file changed on the server, or the deploy command is wrong)")
    if size is not None and part.stat().st_size != size:
        part.unlink(missing_ok=True)
        raise SecurityError(f"downloaded package is {part.stat().st_size} bytes; expected {size}")
    os.replace(part, dest)
    return dest
