"""Encoded images kept for ``response_format=url`` (GET /v1/images/{id}/content)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageStore:
    """In-memory, bounded by age (OpenAI's URLs last an hour) and by total bytes (LRU)."""

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 512 * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, image_id: str, data: bytes, fmt: str) -> None:
        with self._lock:
            self._evict(time.monotonic())
            self._items[image_id] = (time.monotonic() + self.ttl_s, data, MIME[fmt])
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._evict(time.monotonic())
            item = self._items.get(image_id)
            return None if item is None else (item[1], item[2])

    def _evict(self, now: float) -> None:
        while self._items:
            key, (expires, data, _) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[key]
            self._bytes -= len(data)
