"""Turns a prompt plus sampling params into a fully resolved ``DiffusionRequest``.

Shared by the HTTP server and the offline ``Omni`` so both validate identically: this is the one
pass that checks a request's options against the served model's schema.
"""

from __future__ import annotations

import random
import uuid

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.inputs.data import OmniDiffusionSamplingParams
from vllm_omni.models.base import ModelSpec
from vllm_omni.models.options import COMMON, MAX_SEED, cap
from vllm_omni.utils.image import fit_input

# Options the request carries in fields of its own (the CFG machinery reads them); the others
# travel in ``DiffusionRequest.options``.
REQUEST_FIELDS = ("negative_prompt", "true_cfg_scale", "guidance_scale")


class InputProcessor:
    def __init__(self, spec: ModelSpec, seed: int | None = None,
                 caps: dict[str, tuple[float, str]] | None = None, loras=None):
        """``caps``: the server's limits on options, name -> (most, flag) (``--max-*``);
        ``loras``: the server's ``lora.LoraRegistry`` (None: no LoRA)."""
        from vllm_omni.lora import LoraRegistry

        self.spec = spec
        self.loras = loras or LoraRegistry()
        self.common = cap({o.name: o for o in COMMON if o.name in (caps or {})}, caps or {})
        self.schema = cap(spec.adapter.schema(), caps or {})
        # A server started with --seed draws per-request seeds from a seeded stream: runs are
        # reproducible, yet two requests without a seed still get different images. Without
        # one they come from the OS's entropy: a seeded Mersenne Twister could be predicted from
        # the seeds that responses report, and so could other users' seeds.
        self._seeds = random.Random(seed) if seed is not None else random.SystemRandom()

    def process(self, prompt: str | None, params: OmniDiffusionSamplingParams,
                request_id: str | None = None, images: list | None = None,
                mask=None, model_adapter: str | None = None) -> DiffusionRequest:
        """``images``/``mask``: decoded PIL inputs (edit and layered models);
        ``model_adapter``: a LoRA name the request gave as its model."""
        spec, adapter = self.spec, self.spec.adapter
        values = params.options()
        for name, option in self.common.items():  # the model-independent ones, checked as built
            option.check(getattr(params, name))
        adapter.check_options(values, self.schema)
        loras = self.loras.resolve(params.lora, model_adapter)
        captioned = "auto_caption" in adapter.schema()
        if prompt is None and captioned and values.get("auto_caption"):
            prompt = ""
        elif not isinstance(prompt, str) or not prompt.strip():
            hint = (" (or omit it and set auto_caption: true to have the model caption the input "
                    "image)") if captioned else ""
            raise InvalidRequestError(f"prompt must be a non-empty string{hint}", param="prompt")
        given = {"mask"} if mask is not None else set()
        if params.width is not None or params.height is not None:
            given.add("size")
        # RGB models get RGB (transparency composited on white); layered models keep RGBA.
        images = [fit_input(im, adapter.task == "image-layers", adapter.input_area)
                  for im in images or []]
        options = {k: v for k, v in values.items() if k not in REQUEST_FIELDS}
        width, height = adapter.default_size(list(images), options)
        req = DiffusionRequest(
            request_id=request_id or f"img-{uuid.uuid4().hex}",
            prompt=prompt,
            negative_prompt=values.get("negative_prompt"),
            width=params.width or width,
            height=params.height or height,
            num_inference_steps=params.num_inference_steps or spec.default_steps,
            seed=params.seed if params.seed is not None else self._seeds.randint(0, MAX_SEED),
            num_images_per_prompt=params.num_images_per_prompt,
            true_cfg_scale=values.get("true_cfg_scale"),
            guidance_scale=values.get("guidance_scale"),
            output_type=params.output_type,
            images=images,
            mask=mask,
            options=options,
            loras=loras,
        )
        adapter.validate(req, given)
        return req
