"""Z-Image (``ZImagePipeline``), served with Z-Image-Turbo's released settings by default."""

from __future__ import annotations

from typing import Any

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.models.image import ImageAdapter, latent_preview


class ZImageAdapter(ImageAdapter):
    name = "z-image"
    models = (("Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo"),)
    pipeline_classes = ("ZImagePipeline",)
    features = frozenset({"tea_cache", "cache_dit", "sequence_parallel", "tensor_parallel",
                          "vae_patch_parallel", "lora", "fp8"})
    # Turbo is distilled to 8 denoiser calls without CFG (its model card: 9 steps, guidance 0);
    # the pipeline runs CFG (one doubled batch) for any guidance_scale > 0.
    cfg_default = 0.0
    cfg_above = 0.0
    cfg_calls = "batched"
    default_steps = 9
    has_preview = True
    preview = latent_preview
    # Every block's attention and SwiGLU in FP8; the AdaLN modulation stays in full precision.
    fp8_layers = ("layers.*", "noise_refiner.*", "context_refiner.*")
    fp8_ignore = ("*adaLN_modulation*",)

    def heads_and_blocks(self, config: dict[str, Any]) -> tuple[int, int]:
        return int(config.get("n_heads", 30)), int(config.get("n_layers", 30))

    def load_spec(self, model_dir: str, pipeline_class: str):
        spec = super().load_spec(model_dir, pipeline_class)
        dim = int(self.transformer_config(model_dir).get("dim", 3840))
        spec.extra["ffn_dim"] = int(dim / 3 * 8)  # ZImageTransformerBlock's FeedForward width
        return spec

    def check_parallel(self, parallel) -> None:
        super().check_parallel(parallel)
        tp, ffn = parallel.tensor_parallel_size, self.spec.extra["ffn_dim"]
        if ffn % tp:
            ok = [d for d in range(2, 9) if self.spec.num_heads % d == 0 and ffn % d == 0]
            raise ValueError(f"{self.spec.pipeline_class}'s feed-forward width {ffn} does not "
                             f"split over --tensor-parallel-size {tp}; use "
                             + (" or ".join(map(str, ok)) if ok else "1"))

    sp_processor = "vllm_omni.models.z_image_attention:ZImageSPAttnProcessor"
    tp_plan = "vllm_omni.models.z_image:z_image_tp_plan"
    cp_plan = "vllm_omni.models.z_image_attention:z_image_cp_plan"

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        kwargs.setdefault("guidance_scale", self.cfg_default)
        return kwargs

    # vLLM-Omni ships Qwen-Image's rescaling polynomial for Z-Image (not yet fitted to it); ours
    # is the same, so thresholds mean the same on both.
    teacache_coefficients = [-4.5e02, 2.8e02, -4.5e01, 3.2e00, -2.0e-02]
    teacache_presets = {"balanced": 0.2, "fast": 0.4}

    def teacache_blocks(self, transformer: Any) -> Any:
        return transformer.layers  # the main stack over the joined image+caption sequence

    teacache_inputs = ("x",)  # its blocks' one stream (returned alone: diffusers' registry)

    def teacache_modulated_input(self, block: Any, kwargs: dict[str, Any]) -> Any:
        # ZImageTransformerBlock's attention input: norm1(x) * (1 + scale_msa).
        if kwargs.get("noise_mask") is not None:
            raise ValueError("TeaCache on Z-Image supports the text-to-image path only")
        scale_msa = block.adaLN_modulation(kwargs["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
        return block.attention_norm1(kwargs["x"]) * (1.0 + scale_msa)


def z_image_tp_plan(transformer: Any) -> dict[str, str]:
    """Megatron-style split of every Z-Image block (refiners and main stack): Q/K/V and the
    SwiGLU's w1/w3 by output features, the attention output and w2 by input features. Norms,
    RoPE and the adaLN modulation stay whole on every rank."""
    plan = {}
    for stack in ("noise_refiner", "context_refiner", "layers"):
        for name, style in (("attention.to_q", "colwise"), ("attention.to_k", "colwise"),
                            ("attention.to_v", "colwise"), ("attention.to_out.0", "rowwise"),
                            ("feed_forward.w1", "colwise"), ("feed_forward.w3", "colwise"),
                            ("feed_forward.w2", "rowwise")):
            plan[f"{stack}.*.{name}"] = style
    return plan
