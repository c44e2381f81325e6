"""The diffusion API server: FastAPI app over an ``AsyncOmniEngine`` in its own process."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import vllm_omni
from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.protocol import ImageGenerationRequest, OpenAIError
from vllm_omni.entrypoints.openai.serving_images import ServingImages
from vllm_omni.models.base import ModelSpec

logger = logging.getLogger("vllm_omni.api")


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}",
                           param=param, code="unknown_parameter")
    if err.get("type") in ("json_invalid", "model_attributes_type", "dict_type") or not loc:
        return OpenAIError(400, "We could not parse the JSON body of your request: expected a "
                           "JSON object (Content-Type: application/json)", code="invalid_json")
    if err.get("type") == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    return OpenAIError(400, f"Invalid value for '{param}': {err.get('msg')}", param=param,
                       code="invalid_value")


def build_app(engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str], *,
              model_root: str, api_keys: list[str] | None = None, seed: int | None = None,
              root_path: str = "") -> FastAPI:
    app = FastAPI(title="vllm_omni", version=vllm_omni.__version__, root_path=root_path)
    store = ImageStore()
    images = ServingImages(engine, spec, served_model_names, seed, store)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = _validation_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        e = OpenAIError(exc.status_code, str(exc.detail), kind)
        return JSONResponse(e.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        e = OpenAIError(500, f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(e.body(), status_code=500)

    if api_keys:
        accepted = [f"Bearer {k}".encode() for k in api_keys]

        @app.middleware("http")
        async def _authenticate(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "").encode()
                if not any(hmac.compare_digest(given, a) for a in accepted):
                    e = OpenAIError(401, "Incorrect or missing API key (send "
                                    "'Authorization: Bearer <key>')", code="invalid_api_key")
                    return JSONResponse(e.body(), status_code=401)
            return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.healthy:
            return Response(status_code=200)
        e = OpenAIError(503, f"engine is {engine.state}", "server_error")
        return JSONResponse(e.body(), status_code=503)

    @app.get("/version")
    async def version():
        import vllm

        return {"version": vllm_omni.__version__, "vllm_version": vllm.__version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm-omni",
             "root": model_root, "parent": None, "task": spec.adapter.task}
            for name in served_model_names]}

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        return await images.generate(body, str(request.base_url))

    @app.get("/v1/images/{image_id}/content")
    async def image_content(image_id: str):
        item = store.get(image_id)
        if item is None:
            raise OpenAIError(404, f"No image with id {image_id!r} (image URLs expire after an "
                              "hour)", param="image_id", code="not_found")
        return Response(content=item[0], media_type=item[1])

    return app
