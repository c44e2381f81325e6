"""GLM-Image (``GlmImagePipeline``): an autoregressive prior (a GLM vision-language model writes a
grid of image tokens) followed by a DiT conditioned on those tokens and on glyph embeddings.

The prior is the model's first stage, not an optional extra: it generates
(height/32 x width/32) + 16x16 preview tokens + 1 for every image, so its cost follows the
requested size. It is seeded from the request's seed like the rest of the pipeline.
"""

from __future__ import annotations

from vllm_omni.models.image import ImageAdapter


class GlmImageAdapter(ImageAdapter):
    name = "glm-image"
    models = (("GLM-Image", "zai-org/GLM-Image"),)
    pipeline_classes = ("GlmImagePipeline",)
    features = frozenset({"lora"})
    cfg_field = "guidance_scale"
    cfg_default = 1.5
    negative_prompt = False  # the pipeline's negative branch is fixed (no negative prompt text)
    # The prior's token grid is one token per 32 pixels (GlmImageProcessor._get_target_shape).
    latent_multiple = 4
