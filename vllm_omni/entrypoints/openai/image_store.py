"""Encoded images kept for ``response_format=url`` (GET /v1/images/{id}/content).

The URLs are pre-signed, as OpenAI's are: an HMAC over the image id and the expiry time with a
secret drawn when the server starts, so a link works in an ``<img src>`` without the API key, and
nobody can forge one for another image or extend its life.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict

from vllm_omni.entrypoints.openai.encoders import IMAGE_TYPES


class ImageStore:
    """In-memory, bounded by age (OpenAI's URLs last an hour) and by total bytes (LRU)."""

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 512 * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)

    def put(self, image_id: str, data: bytes, fmt: str) -> int:
        """Stores the image; returns its expiry (Unix seconds) for the signed URL."""
        with self._lock:
            self._evict(time.monotonic())
            self._items[image_id] = (time.monotonic() + self.ttl_s, data, IMAGE_TYPES[fmt])
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return int(time.time() + self.ttl_s)

    def get(self, image_id: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._evict(time.monotonic())
            item = self._items.get(image_id)
            return None if item is None else (item[1], item[2])

    def signature(self, image_id: str, expires: int) -> str:
        msg = f"{image_id}:{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def signed_query(self, image_id: str, expires: int) -> str:
        return f"expires={expires}&signature={self.signature(image_id, expires)}"

    def check_signature(self, image_id: str, expires: str | None,
                        signature: str | None) -> str | None:
        """None if the link is valid; otherwise why not."""
        # ASCII digits only: str.isdigit() takes "²", which int() refuses.
        if not expires or not signature or not re.fullmatch(r"[0-9]{1,12}", expires):
            return "the link is not signed (use the url returned by the API)"
        if not hmac.compare_digest(signature.encode(),  # bytes: str refuses non-ASCII
                                   self.signature(image_id, int(expires)).encode()):
            return "the link's signature is invalid"
        if int(expires) < time.time():
            return "the link has expired (image URLs last an hour)"
        return None

    def _evict(self, now: float) -> None:
        while self._items:
            key, (expires, data, _) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[key]
            self._bytes -= len(data)
