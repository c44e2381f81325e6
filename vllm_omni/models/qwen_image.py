"""Qwen-Image (text-to-image): ``QwenImagePipeline``."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import ModelAdapter, ModelSpec, read_json

# Qwen's published examples use a single space as the "empty" negative prompt.
EMPTY_NEGATIVE_PROMPT = " "


class QwenImageAdapter(ModelAdapter):
    name = "qwen-image"
    task = "text-to-image"
    pipeline_classes = ("QwenImagePipeline",)
    supported_fields = frozenset({"negative_prompt", "true_cfg_scale"})

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        vae = read_json(model_dir, "vae", "config.json")
        transformer = read_json(model_dir, "transformer", "config.json")
        vae_scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
        # QwenImagePipeline.default_sample_size is 128 latent pixels.
        side = 128 * vae_scale
        return ModelSpec(
            adapter=self,
            model_dir=model_dir,
            pipeline_class=pipeline_class,
            default_width=side,
            default_height=side,
            default_steps=50,
            size_multiple=vae_scale * transformer.get("patch_size", 2),
            has_guidance_embeds=bool(transformer.get("guidance_embeds", False)),
            num_heads=int(transformer.get("num_attention_heads", 24)),
            num_blocks=int(transformer.get("num_layers", 60)),
        )

    def allowed_fields(self, spec: ModelSpec) -> frozenset[str]:
        if spec.has_guidance_embeds:
            return self.supported_fields | {"guidance_scale"}
        return self.supported_fields

    def validate(self, spec: ModelSpec, req: DiffusionRequest, given: set[str]) -> None:
        if "guidance_scale" in given and not spec.has_guidance_embeds:
            raise InvalidRequestError(
                f"guidance_scale is not supported by {spec.pipeline_class}: this checkpoint is "
                "not guidance-distilled; use true_cfg_scale (with negative_prompt) instead",
                param="guidance_scale", code="unsupported_parameter",
            )
        super().validate(spec, req, given)
        if req.negative_prompt is not None and req.true_cfg_scale is not None \
                and req.true_cfg_scale <= 1:
            raise InvalidRequestError(
                "negative_prompt has no effect unless true_cfg_scale > 1", param="negative_prompt"
            )
        if spec.has_guidance_embeds and req.guidance_scale is None:
            raise InvalidRequestError("guidance_scale is required by this guidance-distilled model",
                                      param="guidance_scale")

    def check_loaded(self, pipe: Any, req: DiffusionRequest) -> None:
        # The pipeline silently truncates prompts beyond tokenizer_max_length; refuse instead.
        limit = pipe.tokenizer_max_length
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if text is None:
                continue
            n = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                raise InvalidRequestError(
                    f"{name} is {n} tokens long; {type(pipe).__name__} accepts at most {limit}",
                    param=name, code="context_length_exceeded",
                )

    def pipeline_kwargs(self, spec: ModelSpec, req: DiffusionRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            prompt=req.prompt,
            height=req.height,
            width=req.width,
            num_inference_steps=req.num_inference_steps,
            num_images_per_prompt=req.num_images,
        )
        negative = req.negative_prompt
        if req.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = req.true_cfg_scale
            # diffusers would warn and skip CFG without a negative prompt; CFG was asked for.
            if req.true_cfg_scale > 1 and negative is None:
                negative = EMPTY_NEGATIVE_PROMPT
        if negative is not None:
            kwargs["negative_prompt"] = negative
        elif req.true_cfg_scale is None:
            # No CFG either way; saying so explicitly avoids the pipeline's default-4.0 warning.
            kwargs["true_cfg_scale"] = 1.0
        if req.guidance_scale is not None:
            kwargs["guidance_scale"] = req.guidance_scale
        return kwargs

    def preview(self, pipe: Any, latents: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        # QwenImagePipeline's own decode, on the latents of the current step.
        import torch

        vae, z = pipe.vae, pipe.vae.config.z_dim
        x = pipe._unpack_latents(latents, reqs[0].height, reqs[0].width, pipe.vae_scale_factor)
        x = x.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(x.device, x.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(x.device, x.dtype)
        image = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pil")

    # -- batching ----------------------------------------------------------------------------------
    def batch_key(self, req: DiffusionRequest):
        # Everything the pipeline takes as one value for all prompts. Negative prompts may differ
        # (a list), but all or none must have one (pipeline_kwargs supplies " " for CFG).
        has_negative = req.negative_prompt is not None or (
            req.true_cfg_scale is not None and req.true_cfg_scale > 1)
        return (req.width, req.height, req.num_inference_steps, req.num_images,
                req.true_cfg_scale, req.guidance_scale, has_negative, req.output_type,
                req.partial_images)

    def batch_pipeline_kwargs(self, spec: ModelSpec, reqs: list[DiffusionRequest]) -> dict[str, Any]:
        each = [self.pipeline_kwargs(spec, r) for r in reqs]
        kwargs = dict(each[0])
        kwargs["prompt"] = [k["prompt"] for k in each]
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [k["negative_prompt"] for k in each]
        return kwargs

    # -- parallelism -------------------------------------------------------------------------------
    def parallel_plan(self, spec: ModelSpec, loaded: bool = False):
        from vllm_omni.distributed.apply import ParallelPlan

        # The pipeline calls the transformer once for the prompt and once for the negative prompt
        # (true CFG); guidance-distilled checkpoints embed the scale and make one call.
        plan = ParallelPlan(
            model=spec.pipeline_class, num_heads=spec.num_heads, sequence_parallel=True,
            tensor_parallel=True, vae_patch_parallel=True,
            cfg_branches=0 if spec.has_guidance_embeds else 2,
            cfg_reason=f"{spec.pipeline_class} with a guidance-distilled transformer runs without "
                       "classifier-free guidance",
        )
        if loaded:
            from vllm_omni.models.qwen_image_attention import QwenImageSPAttnProcessor

            plan.sp_processor = QwenImageSPAttnProcessor
            plan.cfg_output_like = _transformer_output_like
        return plan

    # From ComfyUI-TeaCache's Qwen-Image support, as shipped by vLLM-Omni
    # (vllm_omni/diffusion/cache/teacache/config.py, "QwenImageTransformer2DModel").
    teacache_coefficients = [-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02]
    # "balanced" is the threshold vLLM-Omni measured at 1.91x on real Qwen-Image (1024², 50 steps);
    # "fast" skips about twice as often. Measured on our bench model: docs/caching.md.
    teacache_presets = {"balanced": 0.2, "fast": 0.4}

    cache_dit_supported = True
    # cache-dit's own step-mask policies, applied statically: which steps reuse the cache is fixed
    # by the mask, so the speedup does not depend on the weights (a residual threshold tuned on
    # random weights would not carry over to the released ones). Measured: docs/caching.md.
    cache_dit_presets = {
        name: {"scm_steps_mask_policy": name if name != "balanced" else "medium",
               "scm_steps_policy": "static"}
        for name in ("balanced", "fast", "ultra")
    }

    def teacache_modulated_input(self, block: Any, kwargs: dict[str, Any]):
        img_mod1 = block.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]
        normed = block.img_norm1(kwargs["hidden_states"])
        return block._modulate(normed, img_mod1, kwargs.get("modulate_index"))[0]

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        # QwenImagePipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt is given.
        return kwargs.get("true_cfg_scale", 4.0) > 1 and kwargs.get("negative_prompt") is not None


def _transformer_output_like(transformer: Any, kwargs: dict[str, Any]):
    """An empty tensor shaped like QwenImageTransformer2DModel's output for these inputs."""
    x = kwargs["hidden_states"]
    return x.new_empty(*x.shape[:2], transformer.proj_out.out_features)
