"""Stable Diffusion 3.5 (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

from typing import Any

from vllm_omni.models.image import ImageAdapter, latent_preview


class StableDiffusion3Adapter(ImageAdapter):
    name = "sd3"
    models = (("Stable-Diffusion-3.5", "stabilityai/stable-diffusion-3.5-large"),)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    features = frozenset({"cache_dit", "cfg_parallel", "lora"})
    cfg_default = 7.0
    default_steps = 28
    cfg_calls = "batched"  # the pipeline runs [uncond, cond] as one doubled batch
    has_preview = True
    preview = latent_preview

    def sample_size(self, model_dir: str) -> int:
        # StableDiffusion3Pipeline.default_sample_size is the transformer's sample_size.
        return int(self.transformer_config(model_dir).get("sample_size", 128))

    def cache_dit_target(self, transformer: Any) -> Any:
        # cache-dit registers SD3 by pipeline only; this is its own SD3 block description.
        from cache_dit import BlockAdapter, ForwardPattern

        return BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                            forward_pattern=ForwardPattern.Pattern_1, check_forward_pattern=True)
