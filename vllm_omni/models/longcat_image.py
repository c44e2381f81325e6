"""LongCat-Image (``LongCatImagePipeline``) and LongCat-Image-Edit (``LongCatImageEditPipeline``).

Both run CFG as two transformer calls (negative prompt "" by default). Neither pipeline takes a
step callback; the runner follows their steps through the scheduler instead.
"""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.models.image import ImageAdapter, packed_preview
from vllm_omni.models.options import Option
from vllm_omni.utils.image import source_size


class LongCatImageAdapter(ImageAdapter):
    name = "longcat-image"
    models = (("LongCat-Image", "meituan-longcat/LongCat-Image"),)
    pipeline_classes = ("LongCatImagePipeline",)
    features = frozenset({"cache_dit", "sequence_parallel", "cfg_parallel", "tensor_parallel",
                          "lora"})
    options = (Option("enable_prompt_rewrite", bool, "Rewrite the prompt with the text encoder "
                      "first (up to 512 generated tokens; default on, as in diffusers)",
                      batchable=True),)
    cfg_default = 4.5
    has_preview = True
    preview = packed_preview

    sp_processor = "vllm_omni.models.longcat_image_attention:LongCatImageSPAttnProcessor"
    tp_plan = "vllm_omni.models.longcat_image:longcat_tp_plan"
    cp_plan = "vllm_omni.models.longcat_image:longcat_cp_plan"


def longcat_tp_plan(transformer: Any) -> dict[str, Any]:
    """FLUX.1's plan: LongCat's blocks have the same layout and module names. The single-stream
    ``proj_out`` reads cat([attention, MLP]); its blocks are given here, as LongCat's
    ``__init__`` (unlike FLUX's) does not record them on the Linear."""
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks.tensor_parallel import PackedRowwiseParallel

    plan = dict(FluxTransformer2DModel._tp_plan)
    block = transformer.single_transformer_blocks[0]
    plan["single_transformer_blocks.*.proj_out"] = PackedRowwiseParallel(
        [block.attn.inner_dim, block.proj_mlp.out_features])
    return plan


class LongCatImageEditAdapter(LongCatImageAdapter):
    name = "longcat-image-edit"
    models = (("LongCat-Image-Edit", "meituan-longcat/LongCat-Image-Edit"),)
    task = "image-edit"
    pipeline_classes = ("LongCatImageEditPipeline",)
    options = ()
    image_inputs = (1, 1)
    sized = False  # the pipeline resizes its input to about 1 megapixel and outputs that size

    def default_size(self, images, options):
        if not images:
            return super().default_size(images, options)
        from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as module

        w, h = source_size(images[0])
        width, height = module.calculate_dimensions(1024 * 1024, w / h)
        m = self.spec.size_multiple
        return width // m * m, height // m * m

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as module

        w, h = req.images[0].size
        return [tuple(module.calculate_dimensions(1024 * 1024, w / h)[:2])]


def longcat_cp_plan(transformer: Any) -> dict[str, Any]:
    """FLUX.1's context-parallel plan (same forward inputs and ``proj_out``): split the image and
    text streams and their position ids at the model's input, gather at ``proj_out``."""
    from diffusers import FluxTransformer2DModel

    return dict(FluxTransformer2DModel._cp_plan)
