"""What every route that runs the engine shares: admission (429 past the queue limit), one
run with its deadline and disconnect watch, the served-model check, and the mapping of engine
error kinds to HTTP."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    OmniError,
    RequestCancelledError,
    RequestTimedOutError,
)
from vllm_omni.engine.input_processor import InputProcessor
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest
from vllm_omni.entrypoints.openai.limits import ServingLimits
from vllm_omni.entrypoints.openai.metrics import ServerMetrics
from vllm_omni.entrypoints.openai.protocol import OpenAIError
from vllm_omni.inputs.data import OmniDiffusionSamplingParams
from vllm_omni.models.base import ModelSpec

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


def extension(req: DiffusionRequest, out: DiffusionOutput) -> dict[str, Any]:
    """Our response extension (OpenAI clients ignore unknown fields): what ran, to reproduce it."""
    extra: dict[str, Any] = {"seed": req.seed, **out.extra}
    for key in ("transformer_calls_computed", "transformer_calls_skipped"):
        if key in out.metrics:
            extra[key] = out.metrics[key]
    return extra


class Serving:
    def __init__(self, engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str],
                 seed: int | None, limits: ServingLimits, metrics: ServerMetrics, loras):
        """``loras``: the server's ``lora.LoraRegistry``."""
        self.engine = engine
        self.loras = loras
        self.spec = spec
        self.served_model_names = served_model_names
        self.limits = limits
        self.inputs = InputProcessor(spec, seed, self.limits.caps, self.loras)
        self.metrics = metrics
        self.in_flight = 0  # admitted, not yet answered (the event loop is single-threaded)
        self._latency_s = 0.0  # moving average of engine time per request, for Retry-After

    def process(self, prompt: str | None, request_id: str, images: list | None = None,
                mask=None, model: str | None = None, **params) -> DiffusionRequest:
        """The engine request for ``prompt`` and sampling ``params`` after the one validation
        pass and the server's pixel limit; a bad one answers 400. ``model``: the request's
        (checked by ``check_model``); a LoRA adapter's name selects that adapter."""
        adapter = model if model in self.loras.modules else None
        try:
            req = self.inputs.process(prompt, OmniDiffusionSamplingParams(**params),
                                      request_id=request_id, images=images, mask=mask,
                                      model_adapter=adapter)
        except InvalidRequestError as e:
            raise openai_error(e) from None
        except ValueError as e:
            raise OpenAIError(400, str(e), code="invalid_value") from None
        self.check_pixels(req.width, req.height)
        return req

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
            self.metrics.reject("queue_full")
            waits = max(1, self.in_flight - lim.max_num_seqs + 1) / lim.max_num_seqs
            retry = max(1, math.ceil(waits * (self._latency_s or 1.0)))
            raise OpenAIError(429, f"The server is busy: {self.in_flight} requests are queued or "
                              f"running (limit {lim.max_in_flight}, --max-queue-len "
                              f"{lim.max_queue_len}). Retry after {retry} s.",
                              "rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(retry)})
        self.in_flight += 1

    async def answer(self, req: DiffusionRequest, is_disconnected) -> DiffusionOutput:
        """Admits ``req`` (429 past the queue limit), runs it, and returns its output or raises
        its error as HTTP."""
        self.admit()
        try:
            out = await self.run(req, is_disconnected)
        finally:
            self.in_flight -= 1
        if out.error is not None:
            raise openai_error(out.error)
        return out

    async def run(self, req: DiffusionRequest, is_disconnected, on_partial=None,
                  on_progress=None) -> DiffusionOutput:
        """The engine's answer, cancelling the work if the client leaves or the deadline passes."""
        task = asyncio.ensure_future(self.engine.generate(req, on_partial, on_progress))
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
                    self.metrics.reject("timeout")
                    raise OpenAIError(504, f"the request did not finish within "
                                      f"{self.limits.request_timeout_s:g} s (--request-timeout) "
                                      "and was cancelled", "server_error", code="timeout")
                if await is_disconnected():
                    task.cancel()
                    logger.info("request %s: client disconnected; cancelling", req.request_id)
                    self.metrics.reject("client_disconnected")
                    raise ClientDisconnected
        finally:
            if not task.done():
                task.cancel()

    def check_model(self, model: str | None) -> None:
        """The served model, or one of its LoRA adapters (vLLM's ``--lora-modules`` names)."""
        if model is not None and model not in self.served_model_names \
                and model not in self.loras.modules:
            raise OpenAIError(404, f"The model `{model}` does not exist. This server serves "
                              f"{', '.join(self.served_model_names)}.", param="model",
                              code="model_not_found")
