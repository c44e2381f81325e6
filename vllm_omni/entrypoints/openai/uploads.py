"""Input images of /v1/images/edits: multipart files or base64 / data-URL strings, decoded once.

Multipart is OpenAI's form: ``image`` (repeated, or ``image[]``), ``mask``, and every other
field as text. The text fields are validated by the same pydantic model as the JSON form, in
lax mode (a form field is always a string, so "2" must count as 2).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from PIL import Image

from vllm_omni.entrypoints.openai.protocol import ImageEditRequest, OpenAIError

# Decoded pixels per input image; Pillow's own bomb check stops far larger ones earlier.
MAX_INPUT_PIXELS = 64 * 2**20
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


def decode_image(data: bytes, param: str, index: int | None = None) -> Image.Image:
    """A loaded RGB or RGBA PIL image, or a 400 naming which upload could not be read."""
    where = param if index is None else f"{param}[{index}]"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise OpenAIError(400, f"{where} is {im.width}x{im.height}, more than "
                                  f"{MAX_INPUT_PIXELS} pixels", param=param, code="invalid_value")
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            return im.convert("RGBA" if has_alpha else "RGB")
    except OpenAIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise OpenAIError(400, f"{where} could not be decoded as an image "
                          f"({type(e).__name__}); send PNG, JPEG or WebP", param=param,
                          code="invalid_image") from None


def decode_base64_image(text: str, param: str, index: int | None = None) -> Image.Image:
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        where = param if index is None else f"{param}[{index}]"
        raise OpenAIError(400, f"{where} is neither a base64 string nor a data URL "
                          "(data:image/png;base64,...)", param=param,
                          code="invalid_image") from None
    return decode_image(data, param, index)


def json_edit_images(body: ImageEditRequest) -> tuple[list[Image.Image], Image.Image | None]:
    texts = [body.image] if isinstance(body.image, str) else list(body.image)
    images = [decode_base64_image(t, "image", i if len(texts) > 1 else None)
              for i, t in enumerate(texts)]
    mask = decode_base64_image(body.mask, "mask") if body.mask is not None else None
    return images, mask


async def parse_edit_form(form) -> tuple[ImageEditRequest, list[Image.Image], Image.Image | None]:
    """A Starlette ``FormData`` as (validated fields, input images, mask)."""
    from pydantic import ValidationError
    from starlette.datastructures import UploadFile

    fields: dict[str, Any] = {}
    files: list[Any] = []
    mask = None
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            files.append(value)
        elif key == "mask":
            mask = value
        elif isinstance(value, UploadFile):
            raise OpenAIError(400, f"{key} must be a text field, not a file", param=key,
                              code="invalid_value")
        elif key in fields:
            raise OpenAIError(400, f"{key} was given more than once", param=key,
                              code="invalid_value")
        else:
            fields[key] = value
    if not files:
        raise OpenAIError(400, "Missing required parameter: 'image'.", param="image",
                          code="missing_required_parameter")
    images = []
    for i, f in enumerate(files):
        data = await f.read() if isinstance(f, UploadFile) else None
        if data is None:  # a text part: accept base64 / data URL like the JSON form
            images.append(decode_base64_image(f, "image", i if len(files) > 1 else None))
        else:
            images.append(decode_image(data, "image", i if len(files) > 1 else None))
    mask_image = None
    if mask is not None:
        mask_image = (decode_image(await mask.read(), "mask") if isinstance(mask, UploadFile)
                      else decode_base64_image(mask, "mask"))
    try:
        # The files are decoded already; the model still wants its required image field.
        body = ImageEditRequest.model_validate({**fields, "image": "multipart"}, strict=False)
    except ValidationError as e:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(e.errors()) from None
    return body, images, mask_image
