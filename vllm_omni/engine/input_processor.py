"""Turns a prompt plus sampling params into a fully resolved ``DiffusionRequest``.

Shared by the HTTP server and the offline ``Omni`` so both validate identically.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import fields

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.inputs.data import MAX_SEED, OmniDiffusionSamplingParams
from vllm_omni.models.base import ModelSpec

# Optional sampling fields that only some models honour; the adapter decides.
MODEL_FIELDS = ("negative_prompt", "true_cfg_scale", "guidance_scale", "num_frames")


class InputProcessor:
    def __init__(self, spec: ModelSpec, seed: int | None = None):
        self.spec = spec
        # A server started with --seed draws per-request seeds from a seeded stream: runs are
        # reproducible, yet two requests without a seed still get different images.
        self._seeds = random.Random(seed)

    def process(self, prompt: str, params: OmniDiffusionSamplingParams,
                request_id: str | None = None) -> DiffusionRequest:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        given = {f.name for f in fields(params)
                 if f.name in MODEL_FIELDS and getattr(params, f.name) is not None}
        if "num_frames" in given and self.spec.adapter.task.endswith("image"):
            raise InvalidRequestError(
                f"num_frames is not supported by {self.spec.pipeline_class}: it generates images",
                param="num_frames", code="unsupported_parameter")
        req = DiffusionRequest(
            request_id=request_id or f"img-{uuid.uuid4().hex}",
            prompt=prompt,
            negative_prompt=params.negative_prompt,
            width=params.width or self.spec.default_width,
            height=params.height or self.spec.default_height,
            num_inference_steps=params.num_inference_steps or self.spec.default_steps,
            seed=params.seed if params.seed is not None else self._seeds.randint(0, MAX_SEED),
            num_images=params.num_images_per_prompt,
            true_cfg_scale=params.true_cfg_scale,
            guidance_scale=params.guidance_scale,
            output_type=params.output_type,
        )
        self.spec.adapter.validate(self.spec, req, given)
        return req
