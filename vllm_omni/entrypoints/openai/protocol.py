"""OpenAI Images API request models (plus the diffusion extensions), validated at the edge."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from vllm_omni.models.base import ModelSpec
from vllm_omni.models.options import MAX_PROMPT_CHARS, MAX_SEED


# A request's LoRA adapters: {"name", "path", "scale"} or a list of them; in a multipart form,
# the same as a JSON string (checked by lora.LoraRegistry.resolve).
LoraField = Optional[dict[str, Any] | list[dict[str, Any]] | str]


# How a multipart form carries ``lora`` (its JSON) and a file, for /openapi.json.
FORM_LORA = {"type": "string", "description": "LoRA adapters as JSON: {name, path, scale} or a "
             "list of them"}
FORM_FILE = {"type": "string", "format": "binary"}


def form_request_body(model: type[BaseModel], files: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body itself: ``model`` as JSON, or as a
    multipart form with ``files`` uploaded; both in /openapi.json, for clients and for the
    schema fuzzer."""
    schema = model.model_json_schema()
    form = {**schema, "properties": {**schema["properties"], **files, "lora": FORM_LORA}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "application/json": {"schema": schema}}}}


def lora_entries(value: Any) -> Any:
    """The ``lora`` field with a form's JSON string decoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise OpenAIError(400, "lora must be an object {name, path, scale}, a list of them, or "
                          "(in a form) their JSON", param="lora", code="invalid_value") from None


class OpenAIError(Exception):
    """Raised anywhere in a handler; rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None``/``"auto"`` -> the model's default."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.fullmatch(size)
    if not m:
        raise OpenAIError(400, f"Invalid size {size!r}: expected 'WIDTHxHEIGHT' (e.g. '1024x1024') "
                          "or 'auto'", param="size", code="invalid_value")
    return int(m.group(1)), int(m.group(2))


class ImageRequestBase(BaseModel):
    """Fields of /v1/images/generations and /edits; ``request_models`` adds the model's options."""

    # Unknown fields are errors, and "4" is not an integer: nothing is guessed or dropped.
    # JSON's NaN / Infinity (which Python's parser accepts) are refused in every float field.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    n: int = Field(1, ge=1)  # the upper bound is a server flag (--max-images-per-request)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=256)  # logged, escaped (utils.text.log_safe)
    # OpenAI fields whose only value we can honour is the neutral one (checked in the handler).
    quality: str | None = None
    background: str | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    # Diffusion extensions (top level, so the OpenAI SDK's extra_body reaches them).
    num_inference_steps: int | None = Field(None, ge=1)  # bounded by --max-inference-steps
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    lora: LoraField = Field(None, description="LoRA adapters: {name, path, scale} or a list")

    # OpenAI fields we accept only at their neutral values, and why the others are refused.
    neutral: ClassVar[dict[str, tuple]] = {"quality": (None, "auto"),
                                           "background": (None, "auto", "opaque"),
                                           "moderation": (None,)}
    why_not: ClassVar[dict[str, str]] = {
        "quality": "image quality is set with num_inference_steps",
        "background": "transparent backgrounds are not produced by this model",
        "style": "style presets are a DALL-E 3 feature",
        "moderation": "this server does no content moderation",
        "input_fidelity": "input fidelity is fixed by the model",
    }

    def check_openai_options(self, transparent: bool = False) -> None:
        """``transparent``: the model outputs RGBA (layers), so background may say so."""
        for name, ok in self.neutral.items():
            value = getattr(self, name)
            if transparent and name == "background":
                ok = (None, "auto", "transparent")
            if value not in ok:
                raise OpenAIError(400, f"{name}={value!r} is not supported: {self.why_not[name]}",
                                  param=name, code="unsupported_parameter")
        if transparent and self.output_format == "jpeg":
            raise OpenAIError(400, "this model outputs RGBA layers and jpeg has no alpha channel; "
                              "use png or webp", param="output_format",
                              code="unsupported_parameter")
        if self.partial_images and not self.stream:
            raise OpenAIError(400, "partial_images needs stream: true", param="partial_images",
                              code="unsupported_parameter")
        if self.stream and self.n != 1:
            raise OpenAIError(400, "stream: true generates one image (n = 1)", param="n",
                              code="unsupported_parameter")
        if self.stream and self.response_format == "url":
            raise OpenAIError(400, "stream: true sends b64_json images; response_format url is "
                              "not available with it", param="response_format",
                              code="unsupported_parameter")
        if self.output_compression is not None and self.output_format == "png":
            raise OpenAIError(400, "output_compression applies to jpeg and webp only; "
                              "png output is lossless", param="output_compression",
                              code="unsupported_parameter")


class ImageGenerationRequest(ImageRequestBase):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    style: str | None = None

    neutral = {**ImageRequestBase.neutral, "style": (None,)}


class ImageEditRequest(ImageRequestBase):
    """The JSON form of an edit: images as base64 strings or data URLs. (The multipart form
    carries them as files; ``serving_images.parse_edit_form`` builds this model from it.)"""

    image: str | list[str] = Field(min_length=1)
    mask: str | None = None
    # Optional only for models that caption their input (auto_caption); checked downstream.
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    input_fidelity: str | None = None

    neutral = {**ImageRequestBase.neutral, "input_fidelity": (None,)}


def with_options(name: str, base: type[BaseModel], options) -> Any:
    """Request model ``name``: ``base`` plus the served model's ``options`` (each optional), so
    /openapi.json shows exactly them and any other option is an unknown field."""
    fields = {o.name: (Optional[o.annotation], Field(None, description=o.doc)) for o in options}
    return create_model(name, __base__=base, __module__=base.__module__, **fields)


def request_models(spec: ModelSpec) -> tuple[type[ImageGenerationRequest], type[ImageEditRequest]]:
    """The generation and edit request models of one served model."""
    schema = spec.adapter.schema().values()
    generate = [o for o in schema if "generate" in o.tasks]
    edit = [o for o in schema if "edit" in o.tasks]
    return (with_options("ImageGenerationRequest", ImageGenerationRequest, generate),
            with_options("ImageEditRequest", ImageEditRequest, edit))
