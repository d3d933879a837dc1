"""A dict that forgets everything once it holds ``limit`` entries: the API's parse-once caches.

Reads are plain ``dict.get`` (the hot path pays nothing extra); :meth:`BoundedCache.put` keeps the size
bounded so a client sending ever-new requests cannot grow agent memory. Clearing all at once (rather than
evicting least-recently-used entries) is enough: a working set is a handful of request kinds and refills
on the next request of each.
"""
from __future__ import annotations

from typing import Any


class BoundedCache(dict):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
