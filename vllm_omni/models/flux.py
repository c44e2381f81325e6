"""FLUX.1-dev (``FluxPipeline``) and FLUX.2-klein (``Flux2KleinPipeline``)."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.models.base import ModelSpec, read_json
from vllm_omni.models.image import ImageAdapter, packed_preview
from vllm_omni.models.options import GUIDANCE_SCALE


class FluxAdapter(ImageAdapter):
    """FLUX.1-dev embeds its guidance scale (``guidance_scale``, one transformer call per step);
    ``true_cfg_scale`` with a negative prompt adds real CFG (a second call)."""

    name = "flux"
    models = (("FLUX.1-dev", "black-forest-labs/FLUX.1-dev"),)
    pipeline_classes = ("FluxPipeline",)
    features = frozenset({"cache_dit", "tensor_parallel", "lora"})
    options = (GUIDANCE_SCALE,)
    cfg_field = "true_cfg_scale"
    cfg_default = 1.0
    empty_negative = ""
    default_steps = 28
    has_preview = True
    preview = packed_preview

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        # FluxPipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt is given.
        return kwargs.get("true_cfg_scale", 1.0) > 1 and kwargs.get("negative_prompt") is not None


class Flux2KleinAdapter(ImageAdapter):
    """FLUX.2-klein. The released 4B/9B checkpoints are step-distilled (``is_distilled``): four
    steps, no guidance. The base checkpoints run CFG against an empty prompt (two calls)."""

    name = "flux2-klein"
    models = (("FLUX.2-klein", "black-forest-labs/FLUX.2-klein-4B"),)
    pipeline_classes = ("Flux2KleinPipeline",)
    features = frozenset({"cfg_parallel", "tensor_parallel", "lora"})
    negative_prompt = False  # the pipeline's negative branch is always the empty prompt

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        spec = super().load_spec(model_dir, pipeline_class)
        spec.extra["distilled"] = bool(read_json(model_dir, "model_index.json")
                                       .get("is_distilled", False))
        if spec.extra["distilled"]:
            spec.default_steps = 4
        return spec

    def refused_options(self) -> dict[str, str]:
        if not self.spec.extra["distilled"]:
            return {}
        return {"guidance_scale": "this checkpoint is step-distilled (is_distilled) and runs "
                                  "without guidance"}

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        if self.spec.extra["distilled"]:
            kwargs["guidance_scale"] = 1.0  # no CFG, said explicitly (any other value warns)
        return kwargs

    def parallel_plan(self):
        plan = super().parallel_plan()
        if self.spec.extra["distilled"]:
            plan.cfg_branches = 0
            plan.cfg_reason = (f"this {self.spec.pipeline_class} checkpoint is step-distilled "
                               "(is_distilled) and runs without classifier-free guidance")
        return plan
