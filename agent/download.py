"""Resumable package download over HTTP(S) with a size limit and a sha256 check.

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
from typing import Callable
from urllib.parse import urlsplit

from ..sdk.errors import InputError, SecurityError, UnavailableError
from .store import no_space, no_space_error

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(UnavailableError):
    """The package could not be fetched (network, server answer)."""


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"package url must be http:// or https:// with a host, found {url!r}")


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
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 (scheme checked above)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # our partial file is already complete, or the file changed
            part.unlink()
            raise DownloadError(f"server refused the resume range at byte {offset}; starting over") from None
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"download of {url} failed: {reason}") from None
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
                    raise DownloadError(f"download of {url} interrupted at byte {received}: {exc}") from None
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if not no_space(exc):
                raise
            # A partial file that can never complete would keep the disk full for everything else.
            part.unlink(missing_ok=True)
            raise no_space_error(part.parent, f"downloading {url}") from None
        if total is not None and received < total:
            raise DownloadError(f"download of {url} interrupted at byte {received} of {total}")


def download(url: str, dest: str | Path, *, sha256: str, size: int | None = None,
             max_bytes: int = 2 * 1024**3, timeout_s: float = 60.0, attempts: int = 3,
             backoff_s: float = 0.5, on_progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` if present; verify size and sha256.

    Raises InputError (bad url, over the limit), SecurityError (sha256 or size mismatch) or DownloadError
    (network) after ``attempts`` tries. ``dest`` exists only after a complete, matching download.
    """
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
