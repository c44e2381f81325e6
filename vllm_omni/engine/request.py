"""Plain dataclasses that cross process boundaries (API server <-> engine core <-> workers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

# What a running request's cancel flag says (0: run on); the worker answers with the matching
# error (RequestError.cancelled).
CANCEL_CODES = {"cancelled": 1, "timeout": 2}

# Per-step progress callback: (request ids, steps done, total steps).
ProgressFn = Callable[[list[str], int, int], None]
# A preview while denoising: (request id, partial image index, image).
PartialFn = Callable[[str, int, Any], None]


class InvalidRequestError(ValueError):
    """The request cannot be served as asked: the client gets HTTP 400 naming the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class RequestError:
    status: int  # HTTP status the API server answers with
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None

    @classmethod
    def invalid(cls, e: InvalidRequestError) -> "RequestError":
        return cls(400, e.message, "invalid_request_error", e.param, e.code)

    @classmethod
    def cancelled(cls, reason: str, when: str) -> "RequestError":
        """A request stopped because its client left (499) or its deadline passed (504)."""
        if reason == "timeout":
            return cls(504, f"timed out {when}", "server_error", code="timeout")
        return cls(499, f"cancelled {when}", "cancelled", code="cancelled")


@dataclass
class DiffusionRequest:
    """One prompt with fully resolved parameters (seed, size and steps are always concrete)."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    seed: int
    num_images: int = 1
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    output_type: str = "pil"
    partial_images: int = 0  # decoded previews sent while denoising (streaming)
    # Input images (RGB or RGBA PIL images) for editing/layering models, in the user's order.
    images: list[Any] = field(default_factory=list)
    mask: Any = None  # PIL mask image (white = repaint), for models that inpaint
    # Model-specific options the adapter declared and validated (e.g. layers, resolution).
    options: dict[str, Any] = field(default_factory=dict)
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # when the scheduler handed it to the executor


@dataclass
class DiffusionOutput:
    request_id: str
    images: list[Any] = field(default_factory=list)  # PIL images, or float arrays for "np"
    error: RequestError | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Model-specific results beside the images (GLM-Image: the prior's image tokens).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None
