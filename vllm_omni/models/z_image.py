"""Z-Image (``ZImagePipeline``), served with Z-Image-Turbo's released settings by default."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.models.image import ImageAdapter, decode_latents


class ZImageAdapter(ImageAdapter):
    name = "z-image"
    models = (("Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo"),)
    pipeline_classes = ("ZImagePipeline",)
    features = frozenset({"cache_dit", "lora"})
    cfg_field = "guidance_scale"
    # Turbo is distilled to 8 denoiser calls without CFG (its model card: 9 steps, guidance 0);
    # the pipeline runs CFG (one doubled batch) for any guidance_scale > 0.
    cfg_default = 0.0
    cfg_above = 0.0
    cfg_calls = "batched"
    default_steps = 9
    has_preview = True

    def heads_and_blocks(self, config: dict[str, Any]) -> tuple[int, int]:
        return int(config.get("n_heads", 30)), int(config.get("n_layers", 30))

    def pipeline_kwargs(self, spec, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(spec, req)
        kwargs.setdefault("guidance_scale", self.cfg_default)
        return kwargs

    def preview(self, pipe: Any, latents: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        return decode_latents(pipe, latents)
