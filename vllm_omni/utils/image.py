"""Image encoding for HTTP responses and the normalisation of input images (Pillow)."""

from __future__ import annotations

import io

from PIL import Image

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Where an input image's size before ``fit_input`` shrank it is kept (``size: auto`` uses it).
SOURCE_SIZE = "vllm_omni_source_size"


def encode_image(image: Image.Image, fmt: str, compression: int | None = None) -> bytes:
    """``compression`` is OpenAI's output_compression (0-100, higher = better quality)."""
    buf = io.BytesIO()
    if fmt == "png":
        # Level 1: lossless like any level, a fraction of the default's encode time.
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    quality = 100 if compression is None else compression
    keep_alpha = fmt == "webp" and image.mode == "RGBA"  # JPEG has no alpha channel
    image = image if keep_alpha else image.convert("RGB")
    image.save(buf, format=_PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def source_size(image: Image.Image) -> tuple[int, int]:
    """The size an input image had when it arrived, before ``fit_input`` shrank it."""
    return tuple(image.info.get(SOURCE_SIZE, image.size))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def fit_input(image: Image.Image, keep_alpha: bool, max_area: int | None) -> Image.Image:
    """An input image as the model takes it: RGBA for models that keep alpha (layers), else RGB
    with transparent pixels composited on white; shrunk (aspect kept) to ``max_area`` pixels
    when larger, since the pipeline resizes it to its working area anyway and keeping the full
    decode alive while the request waits costs memory in every process it passes through.

    Shrinking comes first, in the image's own mode where Pillow can resample it, so that no
    full-size copy is made beside the decoded image."""
    target = "RGBA" if keep_alpha else "RGB"
    if SOURCE_SIZE in image.info and image.mode == target and (
            max_area is None or image.width * image.height <= max_area):
        return image  # fitted already (the API server did it; the engine core need not again)
    source = source_size(image)
    alpha = has_alpha(image)
    out = image
    if out.mode not in ("RGB", "RGBA", "L", "LA"):  # palette, CMYK, 16-bit: convert first
        out = out.convert("RGBA" if alpha else "RGB")
    w, h = out.size
    if max_area is not None and w * h > max_area:
        scale = (max_area / (w * h)) ** 0.5
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = out.resize(size, Image.LANCZOS, reducing_gap=3.0)
    if keep_alpha:
        out = out.convert("RGBA")
    elif alpha:
        rgba = out.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
    else:
        out = out.convert("RGB")
    out.info = {SOURCE_SIZE: tuple(source)}
    return out
