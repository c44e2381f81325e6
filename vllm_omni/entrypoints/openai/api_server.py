"""The diffusion API server: FastAPI app over an ``AsyncOmniEngine`` in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette._utils import get_route_path
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import vllm_omni
from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.entrypoints.openai.connections import BodyDeadline
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.limits import ServingLimits
from vllm_omni.entrypoints.openai.metrics import ServerMetrics
from vllm_omni.entrypoints.openai import playground
from vllm_omni.entrypoints.openai.protocol import (
    FORM_FILE,
    OpenAIError,
    form_request_body,
    request_models,
)
from vllm_omni.entrypoints.openai.serving import ClientDisconnected, Serving
from vllm_omni.entrypoints.openai.serving_images import ServingImages
from vllm_omni.entrypoints.openai.uploads import InputDecoder, body_kind, validate_body
from vllm_omni.models.base import ModelSpec
from vllm_omni.models.registry import ADAPTERS
from vllm_omni.utils.text import log_safe

logger = logging.getLogger("vllm_omni.api")


# Options some model declares: sent to a model without them, they are refused as unsupported
# (saying why, where the checkpoint knows) rather than as unknown.
KNOWN_OPTIONS = frozenset(name for a in ADAPTERS for name in a.declared)


def _validation_error(exc: RequestValidationError, spec: ModelSpec) -> OpenAIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden" and param in KNOWN_OPTIONS:
        e = spec.adapter.unsupported(param)
        return OpenAIError(400, e.message, param=param, code=e.code)
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


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.message = (f"Request body too large: this server accepts at most {max_bytes} bytes "
                        "(--max-upload-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            e = OpenAIError(413, self.message, code="request_too_large")
            return await JSONResponse(e.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing and reaches our handler.
                    raise StarletteHTTPException(413, self.message)
            return msg

        await self.app(scope, counted, send)


# Routes that answer without the API key (as in vLLM: probes, metrics, version, API docs; and the
# playground's static page, which holds no data). The image content route checks its own
# signature instead. Every other path needs the key, whatever --root-path is and whether or not
# the route exists.
PUBLIC_ROUTES = frozenset({"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect",
                           "/redoc", "/openapi.json", *playground.ROUTES})
SIGNED_ROUTE = re.compile(r"/v1/images/[^/]+/content")


class ApiKeyAuth:
    """ASGI middleware: every route but ``PUBLIC_ROUTES`` needs ``Authorization: Bearer <key>``
    (401 if not; a WebSocket is closed before it opens). It matches the path the router sees
    (Starlette's own ``get_route_path``: the path without --root-path), so a root-path prefix
    changes nothing."""

    def __init__(self, app, keys: list[str]):
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("API keys must be non-empty strings")
        self.app = app
        self.accepted = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = get_route_path(scope)
            if path not in PUBLIC_ROUTES and not SIGNED_ROUTE.fullmatch(path):
                given = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not any(hmac.compare_digest(given, a) for a in self.accepted):
                    if scope["type"] == "websocket":  # the server answers the handshake 403
                        return await send({"type": "websocket.close", "code": 1008})
                    e = OpenAIError(401, "Incorrect or missing API key (send "
                                    "'Authorization: Bearer <key>')", code="invalid_api_key")
                    return await JSONResponse(e.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class CountResponses:
    """ASGI middleware: counts ``/v1`` answers by route and status (rejections included).

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware hides a client's
    disconnect from ``Request.is_disconnected``, which cancellation relies on.
    """

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not get_route_path(scope).startswith("/v1"):
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.answered(route, status)


def build_app(engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str], *,
              model_root: str, api_keys: list[str], seed: int | None, root_path: str,
              limits: ServingLimits, public_url: str | None, job_store, loras,
              playground_url: str | None) -> FastAPI:
    """``job_store``: a video model's ``video_jobs.JobStore``; ``loras``: the server's
    ``lora.LoraRegistry``; ``playground_url``: where the playground page is (None: no page)."""
    adapter = spec.adapter
    metrics = ServerMetrics(served_model_names[0], limits.max_in_flight)
    decoder = InputDecoder(spec)
    created = int(time.time())
    warm = asyncio.Event()
    if adapter.output == "video":
        from vllm_omni.entrypoints.openai import serving_videos

        serving = serving_videos.ServingVideos(engine, spec, served_model_names, seed,
                                               job_store, limits, metrics, loras)
    elif adapter.output == "audio":
        from vllm_omni.entrypoints.openai import serving_audio

        serving = serving_audio.ServingAudio(engine, spec, served_model_names, seed, limits,
                                             metrics, loras)
    else:
        serving = ServingImages(engine, spec, served_model_names, seed, ImageStore(), limits,
                                metrics, loras)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if adapter.image_inputs[1]:
            await asyncio.to_thread(decoder.start)
        tasks = [asyncio.create_task(_warm_up(serving, spec, limits, warm, playground_url))]
        if job_store is not None:
            if resumed := serving.resume():
                logger.info("resumed %d unfinished video jobs from %s", resumed,
                            job_store.directory)
            tasks.append(asyncio.create_task(serving.sweep_forever()))
        yield
        for task in tasks:
            task.cancel()
        decoder.close()
        if job_store is not None:
            job_store.close()

    app = FastAPI(title="vllm_omni", version=vllm_omni.__version__, root_path=root_path,
                  lifespan=lifespan)
    engine.on_output = metrics.observe
    # Added first, so innermost (add_middleware prepends): the router reads the body through it
    # directly, and its 413 reaches our error handler.
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    # Its 408 is raised where the body is read, so it too reaches our error handler.
    app.add_middleware(BodyDeadline, timeout_s=limits.body_read_timeout_s)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        # Nobody reads this; 499 is what proxies log for a client that closed the request.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _openai_error(request, _validation_error(exc, spec))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {408: "request_timeout", 413: "request_too_large"}.get(exc.status_code)
        e = OpenAIError(exc.status_code, str(exc.detail), kind, code=code)
        return JSONResponse(e.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", log_safe(request.url.path))
        e = OpenAIError(500, f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(e.body(), status_code=500)

    if api_keys:
        app.add_middleware(ApiKeyAuth, keys=api_keys)
    app.add_middleware(CountResponses, metrics=metrics)

    @app.get("/health")
    async def health():
        """200 once the model is loaded and warmed up and while every worker is alive."""
        ok = engine.healthy and warm.is_set()
        metrics.set_state(healthy=ok)
        if ok:
            return Response(status_code=200)
        state = engine.state if not engine.healthy else "warming up"
        e = OpenAIError(503, f"engine is {state}", "server_error")
        return JSONResponse(e.body(), status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.set_state(in_flight=serving.in_flight, healthy=engine.healthy and warm.is_set(),
                          replicas=[r.healthy for r in engine.replicas])
        return Response(content=metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():
        import vllm

        return {"version": vllm_omni.__version__, "vllm_version": vllm.__version__}

    # What a client (the playground) needs to know to build a request beyond the request schema
    # in /openapi.json: the output, how many input images, whether streams carry previews.
    capabilities = {"output": adapter.output, "input_images": list(adapter.image_inputs),
                    "previews": adapter.has_preview}

    @app.get("/v1/models")
    async def models():
        # LoRA adapters are models whose parent is the base, as vLLM lists them.
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm-omni",
             "root": model_root, "parent": None, "task": adapter.task,
             "capabilities": capabilities}
            for name in served_model_names] + [
            {"id": name, "object": "model", "created": created, "owned_by": "vllm-omni",
             "root": path, "parent": served_model_names[0], "task": adapter.task}
            for name, path in loras.modules.items()]}

    if playground_url is not None:
        playground.add_routes(app)
    if loras.runtime_updates:
        _lora_routes(app, loras)
    if adapter.output == "video":
        serving_videos.add_routes(app, serving, decoder, limits)
    elif adapter.output == "audio":
        serving_audio.add_routes(app, serving)
    else:
        base_url = functools.partial(_base_url, public_url, root_path)
        _image_routes(app, serving, decoder, limits, request_models(spec), base_url)
    return app


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


def _lora_routes(app: FastAPI, loras) -> None:
    """vLLM's run-time adapter routes (VLLM_ALLOW_RUNTIME_LORA_UPDATING): they change which
    names requests may use; the workers load an adapter when a request first uses it and drop
    it when --max-loras needs the room."""
    from vllm_omni.engine.errors import InvalidRequestError

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        try:
            # A few stat calls: run here, so that /v1/models never sees the dict change mid-read.
            loras.add(body.lora_name, body.lora_path, body.load_inplace)
        except InvalidRequestError as e:
            raise OpenAIError(400, e.message, param=e.param, code="invalid_value") from None
        logger.info("LoRA adapter %s registered (%s)", log_safe(body.lora_name),
                    loras.modules[body.lora_name])
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                        media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        try:
            loras.remove(body.lora_name)
        except KeyError:
            raise OpenAIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                              param="lora_name", code="not_found") from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                        media_type="text/plain")


def _base_url(public_url: str | None, root_path: str, request: Request) -> str:
    """--public-url, else this server's address as the socket the request came in on reports it
    (never the client's Host header, which would let anyone have links built to their host)."""
    if public_url:
        return public_url.rstrip("/")
    host, port = request.scope.get("server") or ("127.0.0.1", 80)
    if ":" in host:
        host = f"[{host}]"
    return f"{request.scope.get('scheme', 'http')}://{host}:{port}{root_path}"


def _image_routes(app: FastAPI, images: ServingImages, decoder: InputDecoder,
                  limits: ServingLimits, models, base_url) -> None:
    generation_model, edit_model = models

    async def answer(body, request: Request, inputs=None, mask=None):
        if body.stream:
            events, release = images.stream(body, inputs, mask)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(release))
        return await images.generate(body, base_url(request), request.is_disconnected, inputs,
                                     mask)

    async def generations(body, request: Request) -> dict[str, Any]:
        return await answer(body, request)
    # The body's model is this server's (built above), which a string annotation cannot name.
    generations.__annotations__["body"] = generation_model
    app.post("/v1/images/generations")(generations)

    files = {"image": {"type": "array", "items": FORM_FILE}, "mask": FORM_FILE}

    @app.post("/v1/images/edits", openapi_extra=form_request_body(edit_model, files))
    async def edits(request: Request):
        """OpenAI's multipart form (image / image[] files, mask, text fields), or JSON with
        base64 / data-URL images."""
        if body_kind(request) == "multipart/form-data":
            form = await request.form(max_part_size=limits.max_body_bytes)
            try:
                body, inputs, mask = await decoder.form(form, edit_model)
            finally:
                await form.close()
        else:
            body = validate_body(edit_model, await request.body())
            inputs, mask = await decoder.json_images(body)
        return await answer(body, request, inputs, mask)

    @app.get("/v1/images/{image_id}/content")
    async def image_content(image_id: str, expires: str | None = None,
                            signature: str | None = None):
        """A ``response_format=url`` image; the link's signature stands in for the API key."""
        why = images.store.check_signature(image_id, expires, signature)
        if why is not None:
            raise OpenAIError(403, f"Access denied to image {image_id!r}: {why}",
                              param="signature", code="invalid_signature")
        item = images.store.get(image_id)
        if item is None:
            raise OpenAIError(404, f"No image with id {image_id!r} (image URLs expire after an "
                              "hour)", param="image_id", code="not_found")
        return Response(content=item[0], media_type=item[1])


def warmup_params(spec: ModelSpec, steps: int, width: int, height: int):
    """(params, images) of a warm-up request: an edit model gets a gray input of that size."""
    from PIL import Image

    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    adapter = spec.adapter
    sized = {"width": width, "height": height} if adapter.sized else {}
    params = OmniDiffusionSamplingParams(num_inference_steps=steps, seed=0, **sized)
    if not adapter.image_inputs[0]:
        return params, []
    mode = "RGBA" if adapter.task == "image-layers" else "RGB"
    return params, [Image.new(mode, (width, height), (128,) * len(mode))] * adapter.image_inputs[0]


async def _warm_up(serving: Serving, spec: ModelSpec, limits: ServingLimits,
                   warm: asyncio.Event, playground_url: str | None) -> None:
    """Runs requests through the real path (input processing, engine, workers) before /health
    reports ready, so the first user request does not pay for first-call initialisation."""
    sizes = limits.warmup_sizes
    if sizes is None:
        sizes = [(spec.default_width, spec.default_height)]
    names = [f"{w}x{h}" if w is not None else "the model's defaults" for w, h in sizes]
    t0 = time.perf_counter()
    for (width, height), what in zip(sizes, names):
        try:
            params, inputs = warmup_params(spec, limits.warmup_steps, width, height)
            # Every data-parallel replica, side by side: each has its own first calls to make.
            outs = await asyncio.gather(*(
                replica.generate(serving.inputs.process(
                    "warm-up", params, request_id=f"warmup-{width}x{height}-{r}", images=inputs))
                for r, replica in enumerate(serving.engine.replicas)))
            error = next((o.error.message for o in outs if o.error is not None), None)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            # Stay unhealthy: the server cannot serve this model as configured.
            logger.error("warm-up at %s failed: %s", what, error)
            return
    if sizes:
        logger.info("warmed up at %s in %.1fs", ", ".join(names), time.perf_counter() - t0)
    warm.set()
    if playground_url is not None:
        logger.info("ready: try it at %s", playground_url)
