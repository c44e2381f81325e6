"""Wan 2.2 video: text-to-video (``WanPipeline``: T2V-A14B, TI2V-5B) and image-to-video
(``WanImageToVideoPipeline``: I2V-A14B).

The A14B checkpoints have two experts: ``transformer`` denoises the high-noise (early) steps and
``transformer_2`` the low-noise (late) ones, switched where the timestep falls below
``boundary_ratio`` x 1000. diffusers scales CFG with ``guidance_scale`` on the high-noise expert and
``guidance_scale_2`` on the low-noise one, and runs the negative branch only when
``guidance_scale`` > 1 (then for both experts). TI2V-5B has one transformer on the 48-channel Wan2.2
VAE (16x spatial) with per-token timesteps (``expand_timesteps``).

A request's shape is ``width`` x ``height`` x ``num_frames`` (4k+1: the VAE packs 4 frames per
latent frame after the first); ``fps`` only labels the output. Defaults are the released models'
(or, where a checkpoint carries a ``generation_config.json``, its own: the tiny test models do).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError, Video
from vllm_omni.models.base import ModelSpec, checkpoint_defaults, read_json
from vllm_omni.models.image import ImageAdapter
from vllm_omni.models.options import MAX_GUIDANCE_SCALE, Option
from vllm_omni.utils.image import source_size

NUM_FRAMES = Option("num_frames", int, "Frames of the video, 4k+1 (default: the model's; 81 for "
                    "the A14B models, 121 for TI2V-5B)", ge=1, le=4097, kwarg=False)
FPS = Option("fps", float, "Frames per second of the output file; does not change the frames "
             "(default: the model's; 16 for the A14B models, 24 for TI2V-5B)", ge=1, le=240,
             kwarg=False)
GUIDANCE_SCALE_2 = Option("guidance_scale_2", float, "CFG scale of the low-noise expert "
                          "(transformer_2, the late steps); guidance_scale sets the high-noise "
                          "expert's (the early steps). Default: the model's", ge=0,
                          le=MAX_GUIDANCE_SCALE, kwarg=False)

# The Wan team's released settings (their generate.py configs), by checkpoint kind.
RELEASED = {
    "t2v-a14b": dict(width=832, height=480, num_frames=81, fps=16, num_inference_steps=40,
                     guidance_scale=4.0, guidance_scale_2=3.0),
    "i2v-a14b": dict(width=832, height=480, num_frames=81, fps=16, num_inference_steps=40,
                     guidance_scale=3.5, guidance_scale_2=3.5),
    "ti2v-5b": dict(width=1280, height=704, num_frames=121, fps=24, num_inference_steps=50,
                    guidance_scale=5.0),
}
# Keys a checkpoint's generation_config.json may set.
DEFAULT_KEYS = frozenset(RELEASED["t2v-a14b"])
# The UMT5 prompt length the pipelines pad and truncate to (their max_sequence_length).
MAX_PROMPT_TOKENS = 512


class VideoAdapter(ImageAdapter):
    """What a video family shares with the image families (the CFG scale and negative prompt,
    the prompt-length check) plus frames, fps and ``Video`` artifacts."""

    task = "text-to-video"
    options = (NUM_FRAMES, FPS)
    output = "video"
    frame_step: ClassVar[int] = 4  # num_frames = frame_step * k + 1

    def frames_for_seconds(self, seconds: float, fps: float | None) -> int:
        """The valid frame count nearest ``seconds`` at ``fps`` (None: the model's)."""
        frames = seconds * (fps or self.spec.extra["fps"])
        return max(0, round((frames - 1) / self.frame_step)) * self.frame_step + 1

    def video_shape(self, req: DiffusionRequest) -> tuple[int, float]:
        """(frames, fps) of ``req``'s video."""
        return self.num_frames(req), float(req.options.get("fps", self.spec.extra["fps"]))

    # -- validation ------------------------------------------------------------------------------
    def num_frames(self, req: DiffusionRequest) -> int:
        return req.options.get("num_frames", self.spec.extra["num_frames"])

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        n, k = self.num_frames(req), self.frame_step
        if (n - 1) % k:
            lo = (n - 1) // k * k + 1
            raise InvalidRequestError(
                f"num_frames={n} is not supported by {self.spec.pipeline_class}: it must be "
                f"{k}k+1 (1, {k + 1}, {2 * k + 1}, ...; nearest: {lo} or {lo + k})",
                param="num_frames")

    def check_images(self, n: int) -> None:
        lo, hi = self.image_inputs
        if not lo <= n <= hi:
            why = ("it generates from text alone" if hi == 0 else
                   f"it takes exactly {lo} input image, the first frame (input_reference in "
                   "/v1/videos; multi_modal_data offline)")
            raise InvalidRequestError(
                f"{n} input images given to {self.spec.pipeline_class}: {why}", param="image")

    def default_size(self, images: list[Any], options: dict[str, Any]) -> tuple[int, int]:
        """The model's default size; from an input image, its aspect ratio at the default area
        (the Wan team's image-to-video sizing)."""
        if not images:
            return self.spec.default_width, self.spec.default_height
        w, h = source_size(images[0])
        m, area = self.spec.size_multiple, self.spec.default_width * self.spec.default_height
        width = max(m, round(math.sqrt(area * w / h) / m) * m)
        height = max(m, round(math.sqrt(area * h / w) / m) * m)
        return min(self.max_side, width), min(self.max_side, height)

    def prompt_limit(self, pipe: Any) -> int | None:
        return MAX_PROMPT_TOKENS

    # -- the pipeline call -----------------------------------------------------------------------
    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        kwargs["num_videos_per_prompt"] = kwargs.pop("num_images_per_prompt")
        kwargs["num_frames"] = self.num_frames(req)
        kwargs.setdefault("guidance_scale", self.spec.extra["guidance_scale"])
        return kwargs

    def artifacts(self, output: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        fps = [self.video_shape(r)[1] for r in reqs for _ in range(r.num_images_per_prompt)]
        return [Video(frames=list(frames), fps=f) for frames, f in zip(output.frames, fps)]

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        # The image is resized to the output size and VAE-encoded as the first frame of a clip
        # (the others zero); its latents join the noise, not the sequence.
        return [(req.width, req.height)] * len(req.images)

    def output_frames(self, req: DiffusionRequest) -> int:
        return self.num_frames(req)

    def latent_frames(self, req: DiffusionRequest) -> int:
        return (self.num_frames(req) - 1) // self.frame_step + 1

    def frames_decoded_at_once(self, req: DiffusionRequest) -> int:
        # AutoencoderKLWan decodes one latent frame (frame_step frames) per decoder call, and
        # each causal convolution caches its last 2 input frames. Not measured: counted high.
        return min(self.num_frames(req), self.frame_step + 2)

    def batch_key(self, req: DiffusionRequest):
        return None  # one video per call: a video's memory is a batch's worth of images


class WanAdapter(VideoAdapter):
    name = "wan2.2"
    models = (("Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),
              ("Wan2.2-TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"))
    pipeline_classes = ("WanPipeline",)
    # The seed's VideoGen row; CPU offload and LoRA arrive with their own features.
    features = frozenset({"cache_dit", "sequence_parallel", "cfg_parallel", "tensor_parallel",
                          "cpu_offload", "lora"})
    options = (*VideoAdapter.options, GUIDANCE_SCALE_2)

    def kind(self, index: dict[str, Any]) -> str:
        return "ti2v-5b" if index.get("boundary_ratio") is None else "t2v-a14b"

    def vae_scale(self, model_dir: str) -> int:
        return int(read_json(model_dir, "vae", "config.json").get("scale_factor_spatial", 8))

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        index = read_json(model_dir, "model_index.json")
        experts = [name for name in ("transformer", "transformer_2")
                   if (index.get(name) or [None])[0] is not None]
        if not experts:
            raise ValueError(f"{model_dir}: {pipeline_class} without a transformer")
        config = read_json(model_dir, experts[0], "config.json")
        kind = self.kind(index)
        defaults = checkpoint_defaults(model_dir, RELEASED[kind], DEFAULT_KEYS)
        # The A14B experts take turns; with one of them (or no boundary) one runs throughout.
        two_stage = len(experts) == 2 and index.get("boundary_ratio") is not None
        if not two_stage:
            defaults.pop("guidance_scale_2", None)
        if kind == "ti2v-5b":
            self.image_inputs = (0, 1)  # an optional first frame: image-to-video
        return ModelSpec(
            adapter=self, model_dir=model_dir, pipeline_class=pipeline_class,
            default_width=defaults["width"], default_height=defaults["height"],
            default_steps=defaults["num_inference_steps"],
            size_multiple=self.vae_scale(model_dir) * int(config.get("patch_size", [1, 2, 2])[1]),
            num_heads=int(config.get("num_attention_heads", 40)),
            num_blocks=int(config.get("num_layers", 40)),
            extra=dict(defaults, experts=tuple(experts), two_stage=two_stage,
                       boundary_ratio=index.get("boundary_ratio")),
        )

    def refused_options(self) -> dict[str, str]:
        if self.spec.extra["two_stage"]:
            return {}
        return {"guidance_scale_2": "this checkpoint has one transformer; guidance_scale sets "
                                    "its CFG scale"}

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        super().validate(req, given)
        if "guidance_scale_2" in req.options and not self.runs_cfg(req.guidance_scale):
            raise InvalidRequestError(
                "guidance_scale_2 has no effect unless guidance_scale > 1: the pipeline runs the "
                "negative branch (for both experts) only when the high-noise expert's scale, "
                "guidance_scale, exceeds 1", param="guidance_scale_2")

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(req)
        if self.spec.extra["two_stage"]:
            kwargs["guidance_scale_2"] = req.options.get("guidance_scale_2",
                                                         self.spec.extra["guidance_scale_2"])
        return kwargs

    def pipeline_for(self, pipe: Any, reqs: list[DiffusionRequest]) -> Any:
        if not reqs[0].images or type(pipe).__name__ != "WanPipeline":
            return pipe
        if getattr(self, "_i2v", None) is None:
            # TI2V-5B animates an image through diffusers' image-to-video pipeline on the same
            # modules (first-frame latents under per-token timesteps, expand_timesteps).
            from diffusers import WanImageToVideoPipeline

            self._i2v = WanImageToVideoPipeline(**pipe.components,
                                                expand_timesteps=pipe.config.expand_timesteps,
                                                boundary_ratio=pipe.config.boundary_ratio)
            self._i2v.set_progress_bar_config(disable=True)
        return self._i2v

    # -- parallelism -------------------------------------------------------------------------------
    sp_processor = "vllm_omni.models.wan:WanSPAttnProcessor"
    tp_plan = "vllm_omni.models.wan:wan_tp_plan"

    def parallel_plan(self):
        plan = super().parallel_plan()
        plan.denoisers = self.spec.extra["experts"]
        return plan


class WanI2VAdapter(WanAdapter):
    """I2V-A14B: the first frame is the input image (VAE-encoded and joined, with a mask, to the
    noise on the channel axis: in_channels 36); no CLIP image encoder in Wan 2.2."""

    name = "wan2.2-i2v"
    models = (("Wan2.2-I2V-A14B", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),)
    task = "image-to-video"
    pipeline_classes = ("WanImageToVideoPipeline",)
    image_inputs = (1, 1)

    def kind(self, index: dict[str, Any]) -> str:
        return "i2v-a14b"


def wan_tp_plan(transformer: Any) -> dict[str, str]:
    """Megatron-style split of each Wan block (diffusers has no ``_tp_plan`` for it): the Q/K/V
    projections of self- and cross-attention and the FFN's first layer by output features, the
    attention outputs and the FFN's second layer by input features. The query/key RMS norms span
    all heads (``rms_norm_across_heads``), so they sum their squares over the ranks; the
    modulation, the other norms and the embedders stay whole on every rank."""
    import torch

    plan = {"blocks.*.ffn.net.0.proj": "colwise", "blocks.*.ffn.net.2": "rowwise"}
    block = transformer.blocks[0]
    for name in ("attn1", "attn2"):
        attn = getattr(block, name)
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
            if isinstance(getattr(attn, proj, None), torch.nn.Linear):
                plan[f"blocks.*.{name}.{proj}"] = "colwise"
        plan[f"blocks.*.{name}.to_out.0"] = "rowwise"
        for norm in ("norm_q", "norm_k", "norm_added_k"):
            module = getattr(attn, norm, None)
            if isinstance(module, torch.nn.RMSNorm):
                if module.normalized_shape[-1] != attn.inner_dim:
                    raise ValueError(f"{name}.{norm} normalises {module.normalized_shape}, not "
                                     "across the heads: no tensor-parallel plan for it")
                plan[f"blocks.*.{name}.{norm}"] = "sharded_rmsnorm"
    return plan


class WanSPAttnProcessor:
    """Wan's attention with self-attention done sequence-parallel: the same projections,
    across-heads RMS norms and RoPE as diffusers' ``WanAttnProcessor``; each rank's queries
    attend over every rank's tokens. Cross-attention needs nothing from other ranks (the prompt
    is whole on each) and runs diffusers' own processor."""

    def __init__(self, sp):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.sp = sp
        self.local = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None:
            return self.local(attn, hidden_states, encoder_hidden_states, attention_mask,
                              rotary_emb)
        if attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("Wan self-attention takes no mask and no image context")
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
        sizes, masks = self.sp.joint_layout(("hidden_states",))
        out = self.sp.attention(q, k, v, sizes, masks).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _rope(x, freqs_cos, freqs_sin):
    """Wan's interleaved RoPE (as in ``WanAttnProcessor``)."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
