"""Input images of /v1/images/edits: multipart files or base64 / data-URL strings.

Multipart is OpenAI's form: ``image`` (repeated, or ``image[]``), ``mask``, and every other
field as text. The text fields are validated by the same pydantic model as the JSON form, in
lax mode (a form field is always a string, so "2" must count as 2).

An upload can be small and decode to gigabytes (a one-colour 8192² PNG is 200 KB and 256 MB
decoded), so the count of images is checked before any is decoded, each image's header before its
pixels, and the images are decoded one at a time in a separate decoder process and shrunk there to
the model's working size (``fit_input``): only that comes back and is kept while the request
waits. The API server's event loop keeps answering meanwhile, its memory does not grow with the
decoded size (glibc would keep the freed pages), and a decoder that dies takes no request but its
own with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import types
from typing import Any, Union, get_args, get_origin

from PIL import Image

from vllm_omni.engine.request import InvalidRequestError
from vllm_omni.entrypoints.openai.protocol import ImageEditRequest, OpenAIError
from vllm_omni.models.base import ModelSpec
from vllm_omni.utils.image import fit_input

# Decoded pixels per input image; Pillow's own bomb check stops far larger ones earlier.
MAX_INPUT_PIXELS = 64 * 2**20
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


def _where(param: str, index: int | None) -> str:
    return param if index is None else f"{param}[{index}]"


def decode_image(data: bytes, param: str, index: int | None = None, keep_alpha: bool = True,
                 max_area: int | None = None) -> Image.Image:
    """A loaded image as the model takes it (``fit_input``), or a 400 naming which upload could
    not be read."""
    where = _where(param, index)
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise OpenAIError(400, f"{where} is {im.width}x{im.height}, more than "
                                  f"{MAX_INPUT_PIXELS} pixels", param=param, code="invalid_value")
            im.load()
            return fit_input(im, keep_alpha, max_area)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise OpenAIError(400, f"{where} could not be decoded as an image "
                          f"({type(e).__name__}); send PNG, JPEG or WebP", param=param,
                          code="invalid_image") from None


def base64_bytes(text: str, param: str, index: int | None = None) -> bytes:
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"{_where(param, index)} is neither a base64 string nor a data "
                          "URL (data:image/png;base64,...)", param=param,
                          code="invalid_image") from None


def _decode_for_parent(data: bytes, param: str, index: int | None, keep_alpha: bool,
                       max_area: int | None) -> tuple[str, Any]:
    """``decode_image`` in the decoder process: ("ok", image) or ("error", OpenAIError fields)
    (an exception with our constructor would not survive pickling)."""
    try:
        return "ok", decode_image(data, param, index, keep_alpha, max_area)
    except OpenAIError as e:
        return "error", (e.status, e.message, e.type, e.param, e.code)


def body_kind(request) -> str:
    """The request's body type, multipart (as the OpenAI client sends uploads) or JSON; 415
    for any other."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise OpenAIError(415, f"Content-Type {kind or 'none'} is not accepted: send "
                          "multipart/form-data (as the OpenAI client does) or "
                          "application/json", code="unsupported_media_type")
    return kind


def text_field(key: str, value: Any) -> Any:
    """A multipart field's text; a file where text belongs is a 400."""
    from starlette.datastructures import UploadFile

    if isinstance(value, UploadFile):
        raise OpenAIError(400, f"{key} must be a text field, not a file", param=key,
                          code="invalid_value")
    return value


def add_text_field(fields: dict[str, Any], key: str, value: Any) -> None:
    """A multipart text field into ``fields``; a file or a repeated name is a 400."""
    value = text_field(key, value)
    if key in fields:
        raise OpenAIError(400, f"{key} was given more than once", param=key,
                          code="invalid_value")
    fields[key] = value


def _is_list(annotation) -> bool:
    if get_origin(annotation) is list:
        return True
    return get_origin(annotation) in (Union, types.UnionType) and any(
        get_origin(a) is list for a in get_args(annotation))


def validate_body(model, data: dict[str, Any] | bytes):
    """``model`` of a JSON body (bytes, strict) or of multipart text fields (a dict, lax: a form
    field is always a string); invalid values answer as FastAPI's own validation does."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data, strict=False)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _decoder_started() -> None:
    from vllm_omni.utils.proc import set_process_title, watch_parent

    set_process_title("image_decoder")
    watch_parent()


class InputDecoder:
    """Decodes one request's uploads as the served model's pipeline takes them."""

    def __init__(self, spec: ModelSpec):
        self.spec, self.adapter = spec, spec.adapter
        self._pool = None

    def start(self) -> None:
        """Starts the decoder process now (edit models), so the first upload does not wait."""
        self._executor().submit(int).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_decoder_started)
        return self._pool

    async def _decode_one(self, data: bytes, param: str, index: int | None,
                          keep_alpha: bool) -> Image.Image:
        from concurrent.futures.process import BrokenProcessPool

        loop = asyncio.get_running_loop()
        try:
            kind, value = await loop.run_in_executor(
                self._executor(), _decode_for_parent, data, param, index, keep_alpha,
                self.adapter.input_area)
        except BrokenProcessPool:
            self._pool = None  # a new decoder process for the next upload
            raise OpenAIError(400, f"{_where(param, index)} could not be decoded: the decoder "
                              "process died (out of memory?)", param=param,
                              code="invalid_image") from None
        if kind == "error":
            raise OpenAIError(*value)
        return value

    async def decode(self, sources: list[Any], param: str = "image") -> list[Image.Image]:
        """Uploads (multipart files, or base64 / data-URL text) decoded one after another off
        the event loop, after checking their count; a mask keeps its alpha channel."""
        from starlette.datastructures import UploadFile

        if param == "image":  # a model that does not edit takes none
            try:
                self.adapter.check_images(len(sources))
            except InvalidRequestError as e:
                raise OpenAIError(400, e.message, param=e.param, code=e.code) from None
        keep_alpha = param == "mask" or self.adapter.task == "image-layers"
        images = []
        for i, source in enumerate(sources):
            index = i if len(sources) > 1 else None
            if isinstance(source, UploadFile):
                data = await source.read()
            else:
                data = base64_bytes(source, param, index)
            images.append(await self._decode_one(data, param, index, keep_alpha))
            del data
        return images

    async def json_images(self, body: ImageEditRequest
                          ) -> tuple[list[Image.Image], Image.Image | None]:
        texts = [body.image] if isinstance(body.image, str) else list(body.image)
        images = await self.decode(texts)
        mask = (await self.decode([body.mask], "mask"))[0] if body.mask is not None else None
        return images, mask

    async def form(self, form, model: type[ImageEditRequest]
                   ) -> tuple[ImageEditRequest, list[Image.Image], Image.Image | None]:
        """A Starlette ``FormData`` as (fields validated by the served model's ``model``, input
        images, mask)."""
        fields: dict[str, Any] = {}
        files: list[Any] = []
        mask = None
        lists: dict[str, list] = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                files.append(value)
            elif key == "mask":
                mask = value
            elif key.endswith("[]"):  # a list, one item per field (how clients send arrays)
                lists.setdefault(key[:-2], []).append(text_field(key[:-2], value))
            else:
                add_text_field(fields, key, value)
        for key, items in lists.items():
            add_text_field(fields, key, items)
        for key, value in fields.items():  # a list field also takes one JSON array: "[0.2, 1]"
            field = model.model_fields.get(key)
            if isinstance(value, str) and field is not None and _is_list(field.annotation):
                try:
                    fields[key] = json.loads(value)
                except ValueError:
                    raise OpenAIError(400, f"{key} must be a JSON array or repeated {key}[] "
                                      "fields", param=key, code="invalid_value") from None
        if not files:
            raise OpenAIError(400, "Missing required parameter: 'image'.", param="image",
                              code="missing_required_parameter")
        # The files are decoded below; the model still wants its required image field.
        body = validate_body(model, {**fields, "image": "multipart"})
        images = await self.decode(files)
        mask_image = (await self.decode([mask], "mask"))[0] if mask is not None else None
        return body, images, mask_image
