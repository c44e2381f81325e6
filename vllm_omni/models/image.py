"""The request mapping shared by the image families: prompt, size, steps, CFG, input images.

A family adapter sets a few class attributes (which request option scales guidance, whether a
negative prompt is accepted, the pipeline's defaults), declares its own ``options`` and overrides
only what its pipeline does differently. Nothing here wraps the pipeline: ``pipeline_kwargs`` is
exactly the keyword arguments of one ``pipeline.__call__``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import ModelAdapter, ModelSpec, checkpoint_defaults, read_json
from vllm_omni.models.options import CFG_OPTIONS, NEGATIVE_PROMPT, Option


class ImageAdapter(ModelAdapter):
    # The request field that sets classifier-free guidance, the pipeline's default for it, and
    # the value it must exceed for the pipeline to run a second (negative) branch.
    cfg_field: ClassVar[str | None] = "guidance_scale"
    cfg_default: ClassVar[float] = 4.0
    cfg_above: ClassVar[float] = 1.0
    # Whether the pipeline takes negative_prompt; and what to send when CFG is asked for without
    # one (None: the pipeline's own default negative is fine).
    negative_prompt: ClassVar[bool] = True
    empty_negative: ClassVar[str | None] = None
    # The pipeline's default scale when only a negative prompt is given, where that differs
    # from cfg_default (Qwen-Image: true_cfg_scale 4.0 applies once a negative prompt is there).
    cfg_default_with_negative: ClassVar[float | None] = None
    default_steps: ClassVar[int] = 50
    # Latent side multiple beyond the VAE factor (2 for FLUX-style 2x2 packing or patch 2).
    latent_multiple: ClassVar[int] = 2

    # -- spec --------------------------------------------------------------------------------------
    def vae_scale(self, model_dir: str) -> int:
        vae = read_json(model_dir, "vae", "config.json")
        return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)

    def transformer_config(self, model_dir: str) -> dict[str, Any]:
        return read_json(model_dir, "transformer", "config.json")

    def heads_and_blocks(self, config: dict[str, Any]) -> tuple[int, int]:
        return (int(config.get("num_attention_heads", 1)),
                int(config.get("num_layers", 1)) + int(config.get("num_single_layers", 0)))

    def sample_size(self, model_dir: str) -> int:
        """The pipeline's default output side in latent pixels (``default_sample_size``)."""
        return 128

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        config = self.transformer_config(model_dir)
        scale = self.vae_scale(model_dir)
        heads, blocks = self.heads_and_blocks(config)
        side = self.sample_size(model_dir) * scale
        # A checkpoint may serve at a size of its own (the tiny test models: 64x64, so that
        # their warm-up and a request without a size take well under a second).
        size = checkpoint_defaults(model_dir, {"width": side, "height": side},
                                   frozenset({"width", "height"}))
        return ModelSpec(
            adapter=self, model_dir=model_dir, pipeline_class=pipeline_class,
            default_width=int(size["width"]), default_height=int(size["height"]),
            default_steps=self.default_steps,
            size_multiple=scale * self.latent_multiple,
            has_guidance_embeds=bool(config.get("guidance_embeds", False)),
            num_heads=heads, num_blocks=blocks,
        )

    # -- validation ------------------------------------------------------------------------------
    @property
    def declared(self) -> dict[str, Option]:
        negative = (NEGATIVE_PROMPT,) if self.negative_prompt else ()
        cfg = (CFG_OPTIONS[self.cfg_field],) if self.cfg_field else ()
        return {o.name: o for o in (*negative, *cfg, *self.options)}

    def cfg_scale(self, req: DiffusionRequest) -> float | None:
        return getattr(req, self.cfg_field) if self.cfg_field else None

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        if req.negative_prompt is not None and not self.runs_cfg(self.cfg_scale(req), True):
            raise InvalidRequestError(
                f"negative_prompt has no effect unless {self.cfg_field} > {self.cfg_above:g}",
                param="negative_prompt")

    def prompt_limit(self, pipe: Any) -> int | None:
        """The most prompt tokens the pipeline encodes (None: unknown)."""
        return getattr(pipe, "tokenizer_max_length", None)

    def check_loaded(self, pipe: Any, req: DiffusionRequest) -> None:
        # Pipelines silently truncate prompts beyond their limit; refuse instead.
        limit = self.prompt_limit(pipe)
        tokenizer = getattr(pipe, "tokenizer", None)
        if limit is None or tokenizer is None:
            return
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if not text:
                continue
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                raise InvalidRequestError(
                    f"{name} is {n} tokens long; {type(pipe).__name__} accepts at most {limit}",
                    param=name, code="context_length_exceeded",
                )

    # -- the pipeline call -----------------------------------------------------------------------
    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(prompt=req.prompt,
                                      num_inference_steps=req.num_inference_steps,
                                      num_images_per_prompt=req.num_images_per_prompt,
                                      **self.option_kwargs(req))
        if self.sized:
            kwargs.update(height=req.height, width=req.width)
        if req.images:
            kwargs["image"] = req.images[0] if self.image_inputs[1] == 1 else list(req.images)
        if req.negative_prompt is None and self.empty_negative is not None \
                and self.runs_cfg(self.cfg_scale(req), False):
            kwargs["negative_prompt"] = self.empty_negative  # CFG asked for: it needs a negative
        return kwargs

    def runs_cfg(self, scale: float | None, has_negative: bool = False) -> bool:
        """Whether the pipeline runs CFG at this requested scale (None: its default, or the
        checkpoint's own where the spec records one: the video and audio models)."""
        if scale is None:
            scale = self.spec.extra.get("guidance_scale", self.cfg_default)
            if has_negative and self.cfg_default_with_negative is not None:
                scale = self.cfg_default_with_negative
        return scale > self.cfg_above

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        if not self.cfg_field:
            return False
        return self.runs_cfg(kwargs.get(self.cfg_field), "negative_prompt" in kwargs)

    # -- batching ----------------------------------------------------------------------------------
    def batch_key(self, req: DiffusionRequest):
        declared = self.declared
        if req.images or not all(declared[k].batchable for k in req.options):
            return None  # per-request images and options do not stack into one call
        has_negative = req.negative_prompt is not None or (
            self.empty_negative is not None and self.runs_cfg(self.cfg_scale(req), False))
        return (req.width, req.height, req.num_inference_steps, req.num_images_per_prompt,
                req.true_cfg_scale, req.guidance_scale, has_negative, req.output_type,
                req.partial_images, tuple(sorted(req.options.items())))

    def batch_pipeline_kwargs(self, reqs: list[DiffusionRequest]) -> dict[str, Any]:
        each = [self.pipeline_kwargs(r) for r in reqs]
        kwargs = dict(each[0])
        kwargs["prompt"] = [k["prompt"] for k in each]
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [k["negative_prompt"] for k in each]
        return kwargs


# ``ModelAdapter.preview`` implementations, assigned as methods (``preview = latent_preview``).
def latent_preview(adapter: Any, pipe: Any, latents: Any, reqs: list) -> list[Any]:
    """Previews of latents in the VAE's own layout: undo the VAE scaling, decode."""
    vae = pipe.vae
    x = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    image = vae.decode(x, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def packed_preview(adapter: Any, pipe: Any, latents: Any, reqs: list) -> list[Any]:
    """FLUX-style previews: unpack 2x2-packed latents, then as ``latent_preview``."""
    x = pipe._unpack_latents(latents, reqs[0].height, reqs[0].width, pipe.vae_scale_factor)
    return latent_preview(adapter, pipe, x, reqs)
