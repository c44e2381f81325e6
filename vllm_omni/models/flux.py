"""FLUX.1-dev (``FluxPipeline``) and FLUX.2-klein (``Flux2KleinPipeline``)."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import ModelSpec, read_json
from vllm_omni.models.image import ImageAdapter, decode_packed_latents


class FluxAdapter(ImageAdapter):
    """FLUX.1-dev embeds its guidance scale (``guidance_scale``, one transformer call per step);
    ``true_cfg_scale`` with a negative prompt adds real CFG (a second call)."""

    name = "flux"
    models = (("FLUX.1-dev", "black-forest-labs/FLUX.1-dev"),)
    pipeline_classes = ("FluxPipeline",)
    features = frozenset({"cache_dit", "tensor_parallel", "lora"})
    supported_fields = frozenset({"guidance_scale"})
    cfg_field = "true_cfg_scale"
    cfg_default = 1.0
    empty_negative = ""
    default_steps = 28
    has_preview = True

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        # FluxPipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt is given.
        return kwargs.get("true_cfg_scale", 1.0) > 1 and kwargs.get("negative_prompt") is not None

    def pipeline_kwargs(self, spec: ModelSpec, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(spec, req)
        if req.guidance_scale is not None:
            kwargs["guidance_scale"] = req.guidance_scale
        return kwargs

    def preview(self, pipe: Any, latents: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        return decode_packed_latents(pipe, latents, reqs[0].height, reqs[0].width)


class Flux2KleinAdapter(ImageAdapter):
    """FLUX.2-klein. The released 4B/9B checkpoints are step-distilled (``is_distilled``): four
    steps, no guidance. The base checkpoints run CFG against an empty prompt (two calls)."""

    name = "flux2-klein"
    models = (("FLUX.2-klein", "black-forest-labs/FLUX.2-klein-4B"),)
    pipeline_classes = ("Flux2KleinPipeline",)
    features = frozenset({"cfg_parallel", "tensor_parallel", "lora"})
    negative_prompt = False  # the pipeline's negative branch is always the empty prompt
    cfg_field = "guidance_scale"
    cfg_default = 4.0

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        spec = super().load_spec(model_dir, pipeline_class)
        spec.extra["distilled"] = bool(read_json(model_dir, "model_index.json")
                                       .get("is_distilled", False))
        if spec.extra["distilled"]:
            spec.default_steps = 4
        return spec

    def allowed_fields(self, spec: ModelSpec) -> frozenset[str]:
        fields = super().allowed_fields(spec)
        return fields - {"guidance_scale"} if spec.extra["distilled"] else fields

    def validate(self, spec: ModelSpec, req: DiffusionRequest, given: set[str]) -> None:
        if "guidance_scale" in given and spec.extra["distilled"]:
            raise InvalidRequestError(
                f"guidance_scale is not supported by this step-distilled {spec.pipeline_class} "
                "checkpoint (is_distilled: it runs without guidance)", param="guidance_scale",
                code="unsupported_parameter")
        super().validate(spec, req, given)

    def pipeline_kwargs(self, spec: ModelSpec, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(spec, req)
        if spec.extra["distilled"]:
            kwargs["guidance_scale"] = 1.0  # no CFG, said explicitly (any other value warns)
        return kwargs

    def parallel_plan(self, spec: ModelSpec, loaded: bool = False):
        plan = super().parallel_plan(spec, loaded)
        if spec.extra["distilled"]:
            plan.cfg_branches = 0
            plan.cfg_reason = (f"this {spec.pipeline_class} checkpoint is step-distilled "
                               "(is_distilled) and runs without classifier-free guidance")
        return plan
