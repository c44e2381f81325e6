"""POST /v1/images/generations: validate, submit to the engine, encode."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any

from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.engine.input_processor import InputProcessor
from vllm_omni.engine.request import InvalidRequestError
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.protocol import ImageGenerationRequest, OpenAIError, parse_size
from vllm_omni.inputs.data import OmniDiffusionSamplingParams
from vllm_omni.models.base import ModelSpec
from vllm_omni.utils.image import encode_image

logger = logging.getLogger("vllm_omni.api")


class ServingImages:
    def __init__(self, engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str],
                 seed: int | None, store: ImageStore):
        self.engine = engine
        self.spec = spec
        self.served_model_names = served_model_names
        self.inputs = InputProcessor(spec, seed)
        self.store = store

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist. This server serves "
                              f"{', '.join(self.served_model_names)}.", param="model",
                              code="model_not_found")

    async def generate(self, body: ImageGenerationRequest, base_url: str) -> dict[str, Any]:
        self.check_model(body.model)
        body.check_openai_options()
        width, height = parse_size(body.size)
        request_id = f"img-{uuid.uuid4().hex}"
        try:
            params = OmniDiffusionSamplingParams(
                num_inference_steps=body.num_inference_steps, width=width, height=height,
                true_cfg_scale=body.true_cfg_scale, guidance_scale=body.guidance_scale,
                negative_prompt=body.negative_prompt, seed=body.seed, num_images_per_prompt=body.n)
            req = self.inputs.process(body.prompt, params, request_id=request_id)
        except InvalidRequestError as e:
            raise OpenAIError(400, e.message, param=e.param, code=e.code) from None
        except ValueError as e:
            raise OpenAIError(400, str(e), code="invalid_value") from None
        logger.info("request %s: %dx%d, %d steps, n=%d, seed=%d, user=%s", request_id, req.width,
                    req.height, req.num_inference_steps, req.num_images, req.seed, body.user)

        out = await self.engine.generate(req)
        if out.error is not None:
            e = out.error
            raise OpenAIError(e.status, e.message, e.type, e.param, e.code)

        fmt = body.output_format
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, fmt, body.output_compression) for im in out.images])
        data = []
        for i, blob in enumerate(encoded):
            if body.response_format == "url":
                image_id = f"{request_id}-{i}"
                self.store.put(image_id, blob, fmt)
                data.append({"url": f"{base_url}v1/images/{image_id}/content",
                             "revised_prompt": None})
            else:
                data.append({"b64_json": base64.b64encode(blob).decode(), "revised_prompt": None})
        # Our extension (OpenAI clients ignore unknown fields): what was run, to reproduce it.
        extra: dict[str, Any] = {"seed": req.seed}
        for key in ("transformer_calls_computed", "transformer_calls_skipped"):
            if key in out.metrics:
                extra[key] = out.metrics[key]
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": fmt,
            "size": f"{req.width}x{req.height}",
            "quality": "auto",
            "background": "opaque",
            "vllm_omni": extra,
        }
