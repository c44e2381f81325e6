"""GLM-Image (``GlmImagePipeline``): an autoregressive prior (a GLM vision-language model writes a
grid of image tokens) followed by a DiT conditioned on those tokens and on glyph embeddings.

The prior is the model's first stage, not an optional extra: it generates
(height/32 x width/32) + 16x16 preview tokens + 1 for every image, so its cost follows the
requested size. It is seeded from the request's seed like the rest of the pipeline, and a request
can skip it by sending the tokens of an earlier response back.
"""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import ModelSpec
from vllm_omni.models.image import ImageAdapter
from vllm_omni.models.options import Option
from vllm_omni.utils.tasks import TaskLocal


class GlmImageAdapter(ImageAdapter):
    name = "glm-image"
    models = (("GLM-Image", "zai-org/GLM-Image"),)
    pipeline_classes = ("GlmImagePipeline",)
    features = frozenset({"lora"})
    cfg_default = 1.5
    negative_prompt = False  # the pipeline's negative branch is fixed (no negative prompt text)
    # The prior's token grid is one token per 32 pixels (GlmImageProcessor._get_target_shape).
    latent_multiple = 4

    # Re-rendering a response's prior tokens (its ``vllm_omni`` extension) with another seed,
    # step count or guidance skips the prior; their count is fixed by the size (``validate``).
    options = (Option("prior_token_ids", list[int], "The prior's image tokens from an earlier "
                      "response: the prior is skipped and the DiT renders them", ge=0,
                      tasks=frozenset({"generate"}), kwarg=False),)

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        spec = super().load_spec(model_dir, pipeline_class)
        config = self.transformer_config(model_dir)
        spec.extra["codebook"] = int(config.get("prior_vq_quantizer_codebook_size", 16384))
        return spec

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        ids = req.options.get("prior_token_ids")
        if ids is None:
            return
        # One token per 32 pixels, upsampled 2x per side for the DiT (GlmImagePipeline).
        want = (req.height // 32) * (req.width // 32) * 4
        if len(ids) != want:
            raise InvalidRequestError(
                f"prior_token_ids has {len(ids)} tokens; a {req.width}x{req.height} image takes "
                f"{want}", param="prior_token_ids")
        if max(ids) >= self.spec.extra["codebook"]:
            raise InvalidRequestError(
                f"prior_token_ids must be below {self.spec.extra['codebook']}",
                param="prior_token_ids")

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        ids = req.options.get("prior_token_ids")
        if ids is not None:
            import torch

            kwargs["prior_token_ids"] = torch.tensor([ids], dtype=torch.long)
        return kwargs

    def batch_key(self, req: DiffusionRequest):
        return None  # the prior samples a whole batch from the first request's seed

    def on_load(self, pipe: Any) -> None:
        generate = pipe.generate_prior_tokens
        # Per call that made them: with step batching, calls run side by side.
        self._priors = TaskLocal()

        def recorded(*args, **kwargs):
            out = generate(*args, **kwargs)
            self._priors.tokens = out[0]
            return out

        pipe.generate_prior_tokens = recorded

    def output_extra(self, pipe: Any) -> dict[str, Any]:
        prior = getattr(getattr(self, "_priors", None), "tokens", None)
        if prior is not None:
            del self._priors.tokens
        return {} if prior is None else {"prior_token_ids": prior[0].tolist()}
