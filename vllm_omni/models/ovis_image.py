"""Ovis-Image (``OvisImagePipeline``): FLUX-style double/single-stream DiT, Qwen3 text encoder."""

from __future__ import annotations

from vllm_omni.models.image import ImageAdapter, packed_preview


class OvisImageAdapter(ImageAdapter):
    name = "ovis-image"
    models = (("Ovis-Image", "OvisAI/Ovis-Image"),)
    pipeline_classes = ("OvisImagePipeline",)
    features = frozenset({"cache_dit", "cfg_parallel", "lora"})
    cfg_default = 5.0  # CFG (a second call, negative prompt "") unless guidance_scale <= 1
    has_preview = True
    preview = packed_preview
