"""Bounded decoding of compressed request bodies (``Content-Encoding: gzip`` / ``deflate``).

A 1 MB gzip body can inflate to 1 GiB: ``zlib.decompress`` would allocate all of it before anyone
could look at its size (measured before this module: RSS 92 MB -> 2.19 GB, the event loop blocked 8.2 s).
Here the body is inflated in slices of at most :data:`SLICE_BYTES` with ``decompressobj(max_length=...)``
and refused with 413 as soon as the output passes the body limit, so memory never exceeds the limit plus
one slice. The transport runs bodies above :data:`INLINE_BYTES` on a worker thread, off the event loop.
"""
from __future__ import annotations

import zlib

from .kserve import ApiError

# Compressed bodies up to this size are inflated on the event loop: at zlib's maximum ratio (~1032:1)
# that is at most 4 MiB of output, a few milliseconds; larger ones go to a worker thread.
INLINE_BYTES = 4096
SLICE_BYTES = 1024 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(value: str) -> str | None:
    """The coding to undo for a ``Content-Encoding`` header value; None for identity. Raises 415."""
    coding = value.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _WBITS:
        raise ApiError(415, f"unsupported Content-Encoding {value!r}; use gzip, deflate or none")
    return coding


def inflate(coding: str, body: bytes, limit: int) -> bytearray:
    """Decode ``body``; 413 once the output passes ``limit`` bytes, 400 when it is not valid ``coding``."""
    decoder = zlib.decompressobj(_WBITS[coding])
    out = bytearray()
    data: bytes = body
    try:
        while True:
            # max_length bounds each call's output; what it could not decode yet stays in unconsumed_tail.
            out += decoder.decompress(data, min(SLICE_BYTES, limit + 1 - len(out)))
            if len(out) > limit:
                raise ApiError(413, f"request body inflates to more than the {limit}-byte limit "
                                    f"({len(body)} bytes of {coding})")
            data = decoder.unconsumed_tail
            if not data:
                break
        if not decoder.eof:
            raise ApiError(400, f"request body is not valid {coding}: the compressed stream is truncated")
    except zlib.error as exc:
        raise ApiError(400, f"request body is not valid {coding}: {exc}") from None
    if decoder.unused_data:
        raise ApiError(400, f"request body is not valid {coding}: "
                            f"{len(decoder.unused_data)} bytes follow the end of the compressed stream")
    return out
