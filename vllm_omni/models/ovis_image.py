"""Ovis-Image (``OvisImagePipeline``): FLUX-style double/single-stream DiT, Qwen3 text encoder."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.models.image import ImageAdapter, decode_packed_latents


class OvisImageAdapter(ImageAdapter):
    name = "ovis-image"
    models = (("Ovis-Image", "OvisAI/Ovis-Image"),)
    pipeline_classes = ("OvisImagePipeline",)
    features = frozenset({"cache_dit", "cfg_parallel", "lora"})
    cfg_field = "guidance_scale"
    cfg_default = 5.0  # CFG (a second call, negative prompt "") unless guidance_scale <= 1
    has_preview = True

    def preview(self, pipe: Any, latents: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        return decode_packed_latents(pipe, latents, reqs[0].height, reqs[0].width)
