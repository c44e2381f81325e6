"""BAGEL-7B-MoT: text-to-image and image editing with our own modelling (``modeling``,
``pipeline``), served from the published checkpoint directory as it is."""

from __future__ import annotations

import os
from typing import Any

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.bagel.layout import (
    AE_WEIGHTS,
    LLM_CONFIG,
    ae_config,
    configs,
    vae_input_size,
    weight_shapes,
)
from vllm_omni.models.base import ModelSpec, read_json
from vllm_omni.models.image import ImageAdapter
from vllm_omni.models.options import MAX_GUIDANCE_SCALE, Option
from vllm_omni.utils.image import source_size

OPTIONS = (
    Option("cfg_text_scale", float, "Text guidance: the prompt against no prompt (default 4.0)",
           ge=0, le=MAX_GUIDANCE_SCALE, batchable=True),
    Option("cfg_img_scale", float, "Image guidance against no input image (default 2.0 for "
           "edits; text-to-image: 1.5, against the prompt's own branch); needs "
           "cfg_text_scale > 1", ge=0, le=MAX_GUIDANCE_SCALE, batchable=True),
    Option("cfg_interval", list[float], "[start, end]: guidance runs at timesteps t with "
           "start < t <= end, t going from 1 (noise) to 0 (default [0.4, 1.0]; edits: "
           "[0.0, 1.0])", ge=0, le=1, batchable=True),
    Option("cfg_renorm_min", float, "The least the guided velocity's norm may be rescaled to, "
           "as a fraction of the unguided one's (default 0.0)", ge=0, le=1, batchable=True),
    Option("cfg_renorm_type", str, "Which norm the rescaling keeps: of the whole image "
           "(global), per token (channel), or of the text guidance alone (text_channel) "
           "(default global; edits: text_channel)",
           choices=("global", "channel", "text_channel"), batchable=True),
    Option("timestep_shift", float, "Shift of the timestep schedule towards the noisy end "
           "(default 3.0)", ge=0.1, le=100, default=3.0, batchable=True),
)


class BagelAdapter(ImageAdapter):
    name = "bagel"
    models = (("BAGEL-7B-MoT", "ByteDance-Seed/BAGEL-7B-MoT"),)
    task = "image-generate-edit"
    pipeline_classes = ("BagelPipeline",)
    features = frozenset({"tea_cache", "cache_dit", "lora"})
    options = OPTIONS
    # Guidance is BAGEL's own pair of scales; its "negative" branches drop the prompt or the
    # image, so a negative prompt has nothing to go in.
    cfg_field = None
    negative_prompt = False
    image_inputs = (0, 1)
    # Its CFG branches are sequences packed into the one denoiser call of each step.
    cfg_calls = "batched"

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        llm, _, config = configs(model_dir)
        # The latent position table bounds the size: 64 patches of 16 px, 1024 px per side.
        self.max_side = config.max_latent_size * config.latent_downsample
        return ModelSpec(adapter=self, model_dir=model_dir, pipeline_class=pipeline_class,
                         default_width=self.max_side, default_height=self.max_side,
                         default_steps=self.default_steps, size_multiple=config.latent_downsample,
                         num_heads=llm.num_attention_heads, num_blocks=llm.num_hidden_layers,
                         extra={"config": config})

    def load(self, dtype: Any) -> Any:
        from vllm_omni.models.bagel.pipeline import load_bagel

        return load_bagel(self.spec.model_dir, dtype)

    def default_size(self, images: list[Any], options: dict[str, Any]) -> tuple[int, int]:
        if not images:
            return super().default_size(images, options)
        return vae_input_size(self.spec.extra["config"], *source_size(images[0]))

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        interval = req.options.get("cfg_interval")
        if interval is not None and (len(interval) != 2 or interval[0] >= interval[1]):
            raise InvalidRequestError("cfg_interval must be [start, end] with start < end",
                                      param="cfg_interval")
        img = req.options.get("cfg_img_scale")
        if img is not None and img > 1 and req.options.get("cfg_text_scale", 4.0) <= 1:
            # BAGEL applies image guidance on top of text guidance only.
            raise InvalidRequestError("cfg_img_scale > 1 needs cfg_text_scale > 1",
                                      param="cfg_img_scale")

    def vae_scale(self, model_dir: str) -> int:
        return self.spec.extra["config"].vae_downsample

    def memory_configs(self, model_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        vae = ae_config(weight_shapes(os.path.join(model_dir, AE_WEIGHTS)))
        return {"_class_name": "AutoencoderKL", **vae}, read_json(model_dir, LLM_CONFIG)

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        return [vae_input_size(self.spec.extra["config"], *im.size) for im in req.images]

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("cfg_text_scale", 4.0) > 1

    # Its denoiser call is one packed forward over per-request contexts, not a batch of
    # diffusers inputs the step batcher could concatenate.
    step_batching_refused = ("--step-batching does not run BAGEL yet; requests of one size "
                             "and settings are batched into one call (--max-num-seqs)")

    def stochastic_scheduler(self) -> str | None:
        return None  # BAGEL's own Euler sampler draws noise once

    # -- caches ----------------------------------------------------------------------------------
    # vLLM-Omni's fit for BAGEL-7B-MoT (vllm_omni/diffusion/cache/teacache/config.py, "Bagel"):
    # their coefficient estimator over 70 PartiPrompts at 50 steps, x and y the relative L1
    # changes of the language model's packed input and of its output between steps. Our
    # modulated input is that same packed input.
    teacache_coefficients = [1.33313129e06, -1.68644226e05, 7.95050740e03, -1.63747873e02,
                             1.26352397e00]
    teacache_presets = {"balanced": 0.2, "fast": 0.4}
    teacache_inputs = ("hidden_states",)
    teacache_outputs = None

    def teacache_blocks(self, transformer: Any) -> Any:
        return transformer.language_model.model.layers

    def teacache_modulated_input(self, block: Any, kwargs: dict[str, Any]) -> Any:
        if kwargs["p"].kv_out is not None:
            return None  # extending a prompt's context, not a denoising step
        return kwargs["hidden_states"]

    def cache_dit_target(self, transformer: Any) -> Any:
        from cache_dit import BlockAdapter, ForwardPattern

        # The language model's forward is a denoising step (extending a context calls ``run``).
        lm = transformer.language_model.model
        return BlockAdapter(transformer=lm, blocks=lm.layers,
                            forward_pattern=ForwardPattern.Pattern_3, check_forward_pattern=True)
