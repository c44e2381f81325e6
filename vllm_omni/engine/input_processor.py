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
from vllm_omni.utils.image import fit_input

# Optional sampling fields that only some models honour; the adapter decides.
MODEL_FIELDS = ("negative_prompt", "true_cfg_scale", "guidance_scale", "num_frames")
# Model-specific options, carried in ``DiffusionRequest.options`` when the adapter allows them.
OPTION_FIELDS = ("layers", "resolution", "enable_prompt_rewrite", "auto_caption",
                 "prior_token_ids")


class InputProcessor:
    def __init__(self, spec: ModelSpec, seed: int | None = None):
        self.spec = spec
        # A server started with --seed draws per-request seeds from a seeded stream: runs are
        # reproducible, yet two requests without a seed still get different images. Without
        # one they come from the OS's entropy: a seeded Mersenne Twister could be predicted from
        # the seeds that responses report, and so could other users' seeds.
        self._seeds = random.Random(seed) if seed is not None else random.SystemRandom()

    def process(self, prompt: str | None, params: OmniDiffusionSamplingParams,
                request_id: str | None = None, images: list | None = None,
                mask=None) -> DiffusionRequest:
        """``images``/``mask``: decoded PIL inputs (edit and layered models)."""
        optional_prompt = self.spec.adapter.prompt_optional and params.auto_caption
        if prompt is None and optional_prompt:
            prompt = ""
        elif not isinstance(prompt, str) or not prompt.strip():
            hint = (" (or omit it and set auto_caption: true to have the model caption the input "
                    "image)") if self.spec.adapter.prompt_optional else ""
            raise InvalidRequestError(f"prompt must be a non-empty string{hint}", param="prompt")
        given = {f.name for f in fields(params)
                 if f.name in MODEL_FIELDS + OPTION_FIELDS and getattr(params, f.name) is not None}
        if images:
            given.add("image")
        if mask is not None:
            given.add("mask")
        if params.width is not None or params.height is not None:
            given.add("size")
        adapter = self.spec.adapter
        # RGB models get RGB (transparency composited on white); layered models keep RGBA.
        images = [fit_input(im, adapter.task == "image-layers", adapter.input_area)
                  for im in images or []]
        options = {k: getattr(params, k) for k in OPTION_FIELDS if getattr(params, k) is not None}
        width, height = self.spec.adapter.default_size(self.spec, list(images or []), options)
        if "num_frames" in given and "video" not in self.spec.adapter.task:
            raise InvalidRequestError(
                f"num_frames is not supported by {self.spec.pipeline_class}: it generates images",
                param="num_frames", code="unsupported_parameter")
        req = DiffusionRequest(
            request_id=request_id or f"img-{uuid.uuid4().hex}",
            prompt=prompt,
            negative_prompt=params.negative_prompt,
            width=params.width or width,
            height=params.height or height,
            num_inference_steps=params.num_inference_steps or self.spec.default_steps,
            seed=params.seed if params.seed is not None else self._seeds.randint(0, MAX_SEED),
            num_images=params.num_images_per_prompt,
            true_cfg_scale=params.true_cfg_scale,
            guidance_scale=params.guidance_scale,
            output_type=params.output_type,
            images=list(images or []),
            mask=mask,
            options=options,
        )
        self.spec.adapter.validate(self.spec, req, given)
        return req
