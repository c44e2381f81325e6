"""POST /v1/images/generations: validate, submit to the engine, encode."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
import uuid
from typing import Any

from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.engine.input_processor import InputProcessor
from vllm_omni.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    OmniError,
    RequestCancelledError,
    RequestTimedOutError,
)
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest
from vllm_omni.entrypoints.openai.encoders import encode_image
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.limits import ServingLimits
from vllm_omni.entrypoints.openai.metrics import ServerMetrics
from vllm_omni.entrypoints.openai.protocol import OpenAIError, ImageRequestBase, parse_size
from vllm_omni.inputs.data import OmniDiffusionSamplingParams
from vllm_omni.models.base import ModelSpec
from vllm_omni.utils.text import log_safe

logger = logging.getLogger("vllm_omni.api")

DISCONNECT_POLL_S = 0.2


class ClientDisconnected(Exception):
    """The client went away; nobody is left to answer."""


async def _never_disconnected() -> bool:
    return False


# How each kind of engine error is answered: (kind, HTTP status, OpenAI error type), the first
# match wins. 499 is nginx's "client closed request": only logs and metrics ever see it.
HTTP_ERRORS = ((RequestTimedOutError, 504, "server_error"),
               (RequestCancelledError, 499, "cancelled"),
               (InvalidRequestError, 400, "invalid_request_error"),
               (EngineDeadError, 503, "server_error"),
               (OmniError, 500, "server_error"))


# The one option the OpenAI API names otherwise.
HTTP_NAMES = {"num_images_per_prompt": "n"}


def openai_error(e: OmniError) -> OpenAIError:
    status, kind = next((status, kind) for cls, status, kind in HTTP_ERRORS if isinstance(e, cls))
    param, message = e.param, e.message
    if param in HTTP_NAMES:
        param = HTTP_NAMES[param]
        message = message.replace(e.param, param)
    return OpenAIError(status, message, kind, param, e.code)


def _extension(req: DiffusionRequest, out: DiffusionOutput) -> dict[str, Any]:
    """Our response extension (OpenAI clients ignore unknown fields): what ran, to reproduce it."""
    extra: dict[str, Any] = {"seed": req.seed, **out.extra}
    for key in ("transformer_calls_computed", "transformer_calls_skipped"):
        if key in out.metrics:
            extra[key] = out.metrics[key]
    return extra


class ServingImages:
    def __init__(self, engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str],
                 seed: int | None, store: ImageStore, limits: ServingLimits | None = None,
                 metrics: ServerMetrics | None = None):
        self.engine = engine
        self.spec = spec
        self.served_model_names = served_model_names
        self.limits = limits or ServingLimits()
        self.inputs = InputProcessor(spec, seed, self.limits.caps)
        self.store = store
        self.metrics = metrics
        self.in_flight = 0  # admitted, not yet answered (the event loop is single-threaded)
        self._latency_s = 0.0  # moving average of engine time per request, for Retry-After

    def check_pixels(self, w: int | None, h: int | None) -> None:
        """The one limit across two options (the others cap the option schema)."""
        most = self.limits.max_pixels
        if most is not None and w is not None and w * h > most:
            raise OpenAIError(400, f"size {w}x{h} is {w * h} pixels, over this server's limit of "
                              f"{most} (--max-pixels)", param="size", code="invalid_value")

    def admit(self) -> None:
        """Counts a request in, or refuses it with 429 when the queue is full."""
        lim = self.limits
        if self.in_flight >= lim.max_in_flight:
            if self.metrics is not None:
                self.metrics.reject("queue_full")
            waits = max(1, self.in_flight - lim.max_num_seqs + 1) / lim.max_num_seqs
            retry = max(1, math.ceil(waits * (self._latency_s or 1.0)))
            raise OpenAIError(429, f"The server is busy: {self.in_flight} requests are queued or "
                              f"running (limit {lim.max_in_flight}, --max-queue-len "
                              f"{lim.max_queue_len}). Retry after {retry} s.",
                              "rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(retry)})
        self.in_flight += 1

    async def run(self, req: DiffusionRequest, is_disconnected, on_partial=None) -> DiffusionOutput:
        """The engine's answer, cancelling the work if the client leaves or the deadline passes."""
        task = asyncio.ensure_future(self.engine.generate(req, on_partial))
        deadline = None
        if self.limits.request_timeout_s is not None:
            deadline = time.monotonic() + self.limits.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    out = task.result()
                    if out.error is None and "execute_s" in out.metrics:
                        t, avg = out.metrics["execute_s"], self._latency_s
                        self._latency_s = t if not avg else 0.8 * avg + 0.2 * t
                    return out
                if deadline is not None and time.monotonic() > deadline:
                    self.engine.set_abort_reason(req.request_id, "timeout")
                    task.cancel()  # AsyncOmniEngine.generate sends the abort
                    if self.metrics is not None:
                        self.metrics.reject("timeout")
                    raise OpenAIError(504, f"the request did not finish within "
                                      f"{self.limits.request_timeout_s:g} s (--request-timeout) "
                                      "and was cancelled", "server_error", code="timeout")
                if await is_disconnected():
                    task.cancel()
                    logger.info("request %s: client disconnected; cancelling", req.request_id)
                    if self.metrics is not None:
                        self.metrics.reject("client_disconnected")
                    raise ClientDisconnected
        finally:
            if not task.done():
                task.cancel()

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist. This server serves "
                              f"{', '.join(self.served_model_names)}.", param="model",
                              code="model_not_found")

    def prepare(self, body: ImageRequestBase, images: list | None = None,
                mask=None) -> DiffusionRequest:
        """The engine request for ``body`` (plus decoded input images for edits); every check
        that can fail before running it."""
        adapter = self.spec.adapter
        self.check_model(body.model)
        body.check_openai_options(transparent=adapter.task == "image-layers")
        if body.stream and adapter.task == "image-layers":
            raise OpenAIError(400, "stream: true sends one image; this model returns several "
                              "layers, so it answers without streaming", param="stream",
                              code="unsupported_parameter")
        if body.partial_images and not adapter.has_preview:
            raise OpenAIError(400, f"partial_images: {self.spec.pipeline_class} has no preview "
                              "decoding; stream without partial images", param="partial_images",
                              code="unsupported_parameter")
        width, height = parse_size(body.size)
        request_id = f"img-{uuid.uuid4().hex}"
        try:
            # The body's model (protocol.request_models) has exactly this model's options.
            options = body.model_dump(include=set(adapter.schema()), exclude_none=True)
            params = OmniDiffusionSamplingParams(
                num_inference_steps=body.num_inference_steps, width=width, height=height,
                seed=body.seed, num_images_per_prompt=body.n, extra_args=options)
            req = self.inputs.process(body.prompt, params, request_id=request_id, images=images,
                                      mask=mask)
        except InvalidRequestError as e:
            raise openai_error(e) from None
        except ValueError as e:
            raise OpenAIError(400, str(e), code="invalid_value") from None
        self.check_pixels(req.width, req.height)
        req.partial_images = body.partial_images or 0
        logger.info("request %s: %dx%d, %d steps, n=%d, seed=%d, inputs=%d, stream=%s, user=%s",
                    request_id, req.width, req.height, req.num_inference_steps,
                    req.num_images_per_prompt, req.seed, len(req.images), bool(body.stream),
                    None if body.user is None else log_safe(body.user))
        return req

    async def generate(self, body: ImageRequestBase, base_url: str, is_disconnected=None,
                       images: list | None = None, mask=None) -> dict[str, Any]:
        req = self.prepare(body, images, mask)
        request_id = req.request_id
        self.admit()
        try:
            out = await self.run(req, is_disconnected or _never_disconnected)
        finally:
            self.in_flight -= 1
        if out.error is not None:
            raise openai_error(out.error)

        fmt = body.output_format
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, fmt, body.output_compression) for im in out.images])
        data = []
        for i, blob in enumerate(encoded):
            if body.response_format == "url":
                image_id = f"{request_id}-{i}"
                expires = self.store.put(image_id, blob, fmt)
                data.append({"url": f"{base_url}/v1/images/{image_id}/content?"
                                    f"{self.store.signed_query(image_id, expires)}",
                             "revised_prompt": None})
            else:
                data.append({"b64_json": base64.b64encode(blob).decode(), "revised_prompt": None})
        first = out.images[0]
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": fmt,
            "size": f"{first.width}x{first.height}" if hasattr(first, "width")
                    else f"{req.width}x{req.height}",
            "quality": "auto",
            "background": self.background,
            "vllm_omni": _extension(req, out),
        }

    @property
    def background(self) -> str:
        return "transparent" if self.spec.adapter.task == "image-layers" else "opaque"

    def stream(self, body: ImageRequestBase, images: list | None = None,
               mask=None) -> tuple[AsyncIterator[bytes], Callable]:
        """Server-sent events as OpenAI streams images: ``image_generation.partial_image`` for
        each preview, then ``image_generation.completed`` (or ``error``); edits (``images``
        given) are ``image_edit.*`` events, as OpenAI names them. Checks and admission
        happen here, before the stream starts, so they still answer with a plain HTTP error.

        Returns the events and a ``release`` to run when the response ends: a stream whose client
        left before it started never runs its generator's ``finally``."""
        req = self.prepare(body, images, mask)
        prefix = "image_edit" if images is not None else "image_generation"
        self.admit()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        fmt, compression = body.output_format, body.output_compression
        size = f"{req.width}x{req.height}"

        def event(kind: str, image, **fields) -> bytes:
            data = {"type": kind, "b64_json": base64.b64encode(
                encode_image(image, fmt, compression)).decode(), "created_at": int(time.time()),
                "size": size, "quality": "auto", "background": self.background,
                "output_format": fmt,
                **fields}
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

        def error_event(e: OpenAIError) -> bytes:
            data = {"type": "error", **e.body()}
            return f"event: error\ndata: {json.dumps(data)}\n\n".encode()

        async def events():
            partials: asyncio.Queue = asyncio.Queue()
            # A disconnect cancels this generator (Starlette watches for it), which cancels the run.
            task = asyncio.ensure_future(self.run(
                req, _never_disconnected, lambda i, im: partials.put_nowait((i, im))))
            try:
                while not task.done() or not partials.empty():
                    getter = asyncio.ensure_future(partials.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        i, image = getter.result()
                        yield await asyncio.to_thread(
                            event, f"{prefix}.partial_image", image, partial_image_index=i)
                    else:
                        getter.cancel()
                try:
                    out = task.result()
                except OpenAIError as e:
                    yield error_event(e)
                    return
                if out.error is not None:
                    yield error_event(openai_error(out.error))
                    return
                yield await asyncio.to_thread(event, f"{prefix}.completed", out.images[0],
                                              vllm_omni=_extension(req, out))
            finally:
                release()
                if not task.done():
                    task.cancel()

        return events(), release
