"""POST /v1/images/generations: validate, submit to the engine, encode."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.entrypoints.openai.encoders import encode_image
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.limits import ServingLimits
from vllm_omni.entrypoints.openai.metrics import ServerMetrics
from vllm_omni.entrypoints.openai.protocol import (
    ImageRequestBase,
    OpenAIError,
    lora_entries,
    parse_size,
)
from vllm_omni.entrypoints.openai.serving import (
    Serving,
    extension,
    _never_disconnected,
    openai_error,
)
from vllm_omni.models.base import ModelSpec
from vllm_omni.utils.text import log_safe

logger = logging.getLogger("vllm_omni.api")


class ServingImages(Serving):
    def __init__(self, engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str],
                 seed: int | None, store: ImageStore, limits: ServingLimits,
                 metrics: ServerMetrics, loras):
        super().__init__(engine, spec, served_model_names, seed, limits, metrics, loras)
        self.store = store

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
        # The body's model (protocol.request_models) has exactly this model's options.
        options = body.model_dump(include=set(adapter.schema()), exclude_none=True)
        req = self.process(body.prompt, request_id, images, mask, model=body.model,
                           num_inference_steps=body.num_inference_steps, width=width,
                           height=height, seed=body.seed, num_images_per_prompt=body.n,
                           lora=lora_entries(body.lora), extra_args=options)
        req.partial_images = body.partial_images or 0
        logger.info("request %s: %dx%d, %d steps, n=%d, seed=%d, inputs=%d, stream=%s, user=%s",
                    request_id, req.width, req.height, req.num_inference_steps,
                    req.num_images_per_prompt, req.seed, len(req.images), bool(body.stream),
                    None if body.user is None else log_safe(body.user))
        return req

    async def generate(self, body: ImageRequestBase, base_url: str, is_disconnected,
                       images: list | None = None, mask=None) -> dict[str, Any]:
        req = self.prepare(body, images, mask)
        out = await self.answer(req, is_disconnected)

        fmt = body.output_format
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, fmt, body.output_compression) for im in out.images])
        data = []
        for i, blob in enumerate(encoded):
            if body.response_format == "url":
                image_id = f"{req.request_id}-{i}"
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
            "vllm_omni": extension(req, out),
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
                "output_format": fmt, **fields}
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
                                              vllm_omni=extension(req, out))
            finally:
                release()
                if not task.done():
                    task.cancel()

        return events(), release
