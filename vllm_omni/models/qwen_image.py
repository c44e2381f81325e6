"""The Qwen-Image family: text-to-image (Qwen-Image, Qwen-Image-2512), editing (Qwen-Image-Edit,
Qwen-Image-Edit-2509) and layer decomposition (Qwen-Image-Layered). All share one transformer
architecture, VAE and text encoder, hence one set of parallel and cache hooks.
"""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import read_json
from vllm_omni.models.image import ImageAdapter
from vllm_omni.models.options import GUIDANCE_SCALE, Option
from vllm_omni.utils.image import source_size


class QwenImageAdapter(ImageAdapter):
    name = "qwen-image"
    models = (("Qwen-Image", "Qwen/Qwen-Image"), ("Qwen-Image-2512", "Qwen/Qwen-Image-2512"))
    pipeline_classes = ("QwenImagePipeline",)
    features = frozenset({"tea_cache", "cache_dit", "sequence_parallel", "cfg_parallel",
                          "tensor_parallel", "vae_patch_parallel", "cpu_offload", "lora", "fp8"})
    cfg_field = "true_cfg_scale"
    # Its transformer masks text tokens exactly: prompts of any length share a step forward.
    step_padding = {"encoder_hidden_states": (1, "encoder_hidden_states_mask")}
    # The pipeline runs CFG (at its default 4.0) only when a negative prompt is given.
    cfg_default = 1.0
    cfg_default_with_negative = 4.0
    empty_negative = " "  # Qwen's published examples' "empty" negative prompt
    has_preview = True
    # Guidance-distilled checkpoints embed it (refused by the others: refused_options).
    options = (GUIDANCE_SCALE,)

    def vae_scale(self, model_dir: str) -> int:
        vae = read_json(model_dir, "vae", "config.json")
        return 2 ** len(vae.get("temperal_downsample", [False, True, True]))

    def heads_and_blocks(self, config: dict[str, Any]) -> tuple[int, int]:
        return int(config.get("num_attention_heads", 24)), int(config.get("num_layers", 60))

    def refused_options(self) -> dict[str, str]:
        if self.spec.has_guidance_embeds:
            return {}
        return {"guidance_scale": "this checkpoint is not guidance-distilled; use true_cfg_scale "
                                  "(with negative_prompt) instead"}

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        if self.spec.has_guidance_embeds and req.guidance_scale is None:
            raise InvalidRequestError("guidance_scale is required by this guidance-distilled model",
                                      param="guidance_scale")

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        if "true_cfg_scale" not in kwargs:
            # A negative prompt alone gets diffusers' default scale; without one, no CFG, said
            # explicitly (the pipeline would warn that its default 4.0 needs a negative prompt).
            kwargs["true_cfg_scale"] = (self.cfg_default_with_negative
                                        if "negative_prompt" in kwargs else 1.0)
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

    # -- parallelism -------------------------------------------------------------------------------
    sp_processor = "vllm_omni.models.qwen_image_attention:QwenImageSPAttnProcessor"

    # Modulation stays in full precision, and so does the image MLP: vLLM-Omni measured LPIPS 0.298
    # against bf16 with every block Linear in FP8 on Qwen-Image, hence its ignored_layers
    # ["img_mlp"] (docs/memory.md).
    fp8_layers = ("transformer_blocks.*",)
    fp8_ignore = ("*img_mod*", "*txt_mod*", "*img_mlp*")

    def parallel_plan(self):
        # The pipeline calls the transformer once for the prompt and once for the negative prompt
        # (true CFG); guidance-distilled checkpoints embed the scale and make one call.
        plan = super().parallel_plan()
        if self.spec.has_guidance_embeds:
            plan.cfg_branches = 0
            plan.cfg_reason = (f"{self.spec.pipeline_class} with a guidance-distilled transformer "
                               "runs without classifier-free guidance")
        return plan

    # From ComfyUI-TeaCache's Qwen-Image support, as shipped by vLLM-Omni
    # (vllm_omni/diffusion/cache/teacache/config.py, "QwenImageTransformer2DModel").
    teacache_coefficients = [-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02]
    # "balanced" is the threshold vLLM-Omni measured at 1.91x on real Qwen-Image (1024², 50 steps);
    # "fast" skips about twice as often. Measured on our bench model: docs/caching.md.
    teacache_presets = {"balanced": 0.2, "fast": 0.4}

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


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit (one input image) and Qwen-Image-Edit-2509 (one to three)."""

    name = "qwen-image-edit"
    models = (("Qwen-Image-Edit", "Qwen/Qwen-Image-Edit"),)
    task = "image-edit"
    pipeline_classes = ("QwenImageEditPipeline",)
    features = frozenset({"tea_cache", "cache_dit", "sequence_parallel", "cfg_parallel",
                          "tensor_parallel", "cpu_offload", "lora"})
    image_inputs = (1, 1)

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        # The pipeline resizes its input to about 1 megapixel whatever the output size.
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

        w, h = req.images[0].size
        return [tuple(module.calculate_dimensions(1024 * 1024, w / h)[:2])]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    name = "qwen-image-edit-2509"
    models = (("Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2509"),)
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    image_inputs = (1, 3)  # the released model is trained with up to three input images

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        # Each input is VAE-encoded at VAE_IMAGE_SIZE (1024²) pixels, in its own aspect ratio.
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        return [tuple(module.calculate_dimensions(module.VAE_IMAGE_SIZE, w / h)[:2])
                for w, h in (im.size for im in req.images)]


EDIT = frozenset({"edit"})
LAYERS = Option("layers", int, "RGBA layers to decompose the image into (default 4)", ge=1, le=16,
                default=4, tasks=EDIT)
RESOLUTION = Option("resolution", int, "The size bucket the pipeline works at (default 640)",
                    choices=(640, 1024), default=640, tasks=EDIT)
AUTO_CAPTION = Option("auto_caption", bool, "Caption the input image to make the prompt (an "
                      "autoregressive pass); the prompt is then omitted", tasks=EDIT, kwarg=False)


class QwenImageLayeredAdapter(QwenImageAdapter):
    """Decomposes one image into RGBA layers; each output image is a list of ``layers`` layers."""

    name = "qwen-image-layered"
    models = (("Qwen-Image-Layered", "Qwen/Qwen-Image-Layered"),)
    task = "image-layers"
    pipeline_classes = ("QwenImageLayeredPipeline",)
    features = frozenset({"cache_dit", "sequence_parallel", "cfg_parallel", "tensor_parallel",
                          "cpu_offload", "lora"})
    options = (*QwenImageAdapter.options, LAYERS, RESOLUTION, AUTO_CAPTION)
    image_inputs = (1, 1)
    sized = False
    has_preview = False

    def default_size(self, images, options):
        if not images:
            return super().default_size(images, options)
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as module

        res = options.get("resolution", RESOLUTION.default)
        w, h = source_size(images[0])
        width, height = module.calculate_dimensions(res * res, w / h)
        m = self.spec.size_multiple
        return width // m * m, height // m * m

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        if req.options.get("auto_caption") and req.prompt:
            raise InvalidRequestError("auto_caption captions the input image to make the prompt; "
                                      "give either a prompt or auto_caption: true",
                                      param="auto_caption")

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        kwargs["image"] = req.images[0].convert("RGBA")  # the VAE encodes four channels
        # An empty prompt makes the pipeline caption the image (asked for with auto_caption).
        kwargs["prompt"] = req.prompt or ""
        return kwargs

    def flatten_output(self, images: list[Any]) -> list[Any]:
        return [layer for image in images for layer in image]

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        return [(req.width, req.height)]  # the input is resized to the output size

    def output_frames(self, req: DiffusionRequest) -> int:
        # The transformer denoises the layers plus the input's frame; the VAE decodes the layers.
        return req.options.get("layers", LAYERS.default) + 1
