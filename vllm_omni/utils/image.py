"""Image encoding for HTTP responses (Pillow)."""

from __future__ import annotations

import io

from PIL import Image

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, fmt: str, compression: int | None = None) -> bytes:
    """``compression`` is OpenAI's output_compression (0-100, higher = better quality)."""
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: lossless like any level, a fraction of the default's encode time.
        image.save(buf, format="PNG", compress_level=1)
    else:
        quality = 100 if compression is None else compression
        image.convert("RGB").save(buf, format=_PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()
