"""Stable Audio Open (``StableAudioPipeline``): text to stereo audio.

The DiT denoises a fixed-length latent (``sample_size`` latents, ``hop_length`` samples each:
47.55 s at 44.1 kHz for the released model) conditioned on the prompt and on the clip's start
and end in seconds; the decoded waveform is then cut to ``audio_start_in_s``..``audio_end_in_s``.
A request's shape is that window, so no clip may end past the model's length. The released
scheduler is stochastic (cosine DPM-Solver SDE): its per-step noise comes from a Brownian tree
seeded from each output's generator, so a seed still fixes the waveform.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_omni.engine.request import Audio, DiffusionRequest, InvalidRequestError
from vllm_omni.models.base import ModelSpec, checkpoint_defaults, read_json
from vllm_omni.models.image import ImageAdapter
from vllm_omni.models.options import Option

AUDIO_START = Option("audio_start_in_s", float, "Where the clip starts in the model's window, in "
                     "seconds (default 0)", ge=0, batchable=True)
AUDIO_END = Option("audio_end_in_s", float, "Where the clip ends, in seconds: its length is "
                   "audio_end_in_s - audio_start_in_s (default: the model's longest clip, "
                   "47.55 s for Stable Audio Open)", ge=0, batchable=True)

# The released pipeline's defaults (StableAudioPipeline.__call__).
RELEASED = dict(num_inference_steps=100, guidance_scale=7.0)
# Keys a checkpoint's generation_config.json may set (the tiny test model's short clip).
DEFAULT_KEYS = frozenset({"num_inference_steps", "guidance_scale", "audio_end_in_s"})


class StableAudioAdapter(ImageAdapter):
    name = "stable-audio"
    models = (("Stable-Audio-Open", "stabilityai/stable-audio-open-1.0"),)
    task = "text-to-audio"
    output = "audio"
    pipeline_classes = ("StableAudioPipeline",)
    features = frozenset({"lora"})  # the seed's AudioGen row
    options = (AUDIO_START, AUDIO_END)
    sized = False
    cfg_default = RELEASED["guidance_scale"]
    cfg_calls = "batched"  # the pipeline doubles the batch for the unconditional branch

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        dit = read_json(model_dir, "transformer", "config.json")
        vae = read_json(model_dir, "vae", "config.json")
        projection = read_json(model_dir, "projection_model", "config.json")
        defaults = checkpoint_defaults(model_dir, RELEASED, DEFAULT_KEYS)
        rate = int(vae.get("sampling_rate", 44100))
        hop = math.prod(int(r) for r in vae.get("downsampling_ratios", [2, 4, 4, 8, 8]))
        longest = int(dit.get("sample_size", 1024)) * hop / rate
        # The seconds conditioning is trained on [min_value, max_value]: the window must lie in it.
        longest = min(longest, float(projection.get("max_value", longest)))
        return ModelSpec(
            adapter=self, model_dir=model_dir, pipeline_class=pipeline_class,
            default_width=None, default_height=None,
            default_steps=int(defaults["num_inference_steps"]), size_multiple=1,
            num_heads=int(dit.get("num_attention_heads", 24)),
            num_blocks=int(dit.get("num_layers", 24)),
            extra=dict(sample_rate=rate, hop_length=hop, channels=int(vae.get("audio_channels", 2)),
                       max_seconds=longest, latents=int(dit.get("sample_size", 1024)),
                       guidance_scale=float(defaults["guidance_scale"]),
                       audio_end_in_s=float(defaults.get("audio_end_in_s", longest))),
        )

    # -- validation ------------------------------------------------------------------------------
    def window(self, req: DiffusionRequest) -> tuple[float, float]:
        """(start, end) of ``req``'s clip in seconds."""
        return (req.options.get("audio_start_in_s", 0.0),
                req.options.get("audio_end_in_s", self.spec.extra["audio_end_in_s"]))

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        if "size" in given:
            raise InvalidRequestError(f"width and height are not supported by "
                                      f"{self.spec.pipeline_class}: it makes audio; set its "
                                      "length with audio_end_in_s", param="size",
                                      code="unsupported_parameter")
        if "mask" in given:
            raise self.unsupported("mask")
        if req.num_inference_steps < self.spec.min_steps:
            raise InvalidRequestError(f"num_inference_steps must be at least "
                                      f"{self.spec.min_steps}", param="num_inference_steps")
        self.check_images(len(req.images))
        if req.negative_prompt is not None and not self.runs_cfg(req.guidance_scale, True):
            raise InvalidRequestError("negative_prompt has no effect unless guidance_scale > 1",
                                      param="negative_prompt")
        start, end = self.window(req)
        longest, rate = self.spec.extra["max_seconds"], self.spec.extra["sample_rate"]
        if end > longest:
            raise InvalidRequestError(
                f"the clip would end at {end:g} s; {self.spec.pipeline_class} makes at most "
                f"{longest:g} s (audio_end_in_s <= {longest:g})", param="audio_end_in_s")
        if int(end * rate) - int(start * rate) < 1:
            raise InvalidRequestError(
                f"the clip from {start:g} s to {end:g} s is empty: audio_end_in_s must be after "
                "audio_start_in_s", param="audio_end_in_s")

    def check_images(self, n: int) -> None:
        if n:
            raise InvalidRequestError(f"{n} input images given to {self.spec.pipeline_class}: it "
                                      "generates audio from text alone", param="image")

    def prompt_limit(self, pipe: Any) -> int | None:
        # Its T5 pads and truncates prompts to the tokenizer's length (128 for the release),
        # counting the end-of-sequence token.
        return pipe.tokenizer.model_max_length - 1

    # -- the pipeline call -----------------------------------------------------------------------
    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        start, end = self.window(req)
        kwargs = dict(prompt=req.prompt, num_inference_steps=req.num_inference_steps,
                      num_waveforms_per_prompt=req.num_images_per_prompt,
                      audio_start_in_s=start, audio_end_in_s=end,
                      guidance_scale=(self.spec.extra["guidance_scale"]
                                      if req.guidance_scale is None else req.guidance_scale))
        if req.negative_prompt is not None:
            kwargs["negative_prompt"] = req.negative_prompt
        return kwargs

    # -- memory (vllm_omni.worker.memory) ------------------------------------------------------
    def decoded_pixels(self, req: DiffusionRequest) -> int:
        # The whole window is decoded, then cut to the clip: the cost is the same at any length.
        return self.spec.extra["latents"] * self.spec.extra["hop_length"]

    def output_tokens(self, req: DiffusionRequest, token_side: int) -> int:
        return self.spec.extra["latents"] + 1  # and the seconds token the DiT prepends

    def artifacts(self, output: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        import numpy as np
        import torch

        rate = self.spec.extra["sample_rate"]
        return [Audio(samples=a.float().cpu().numpy() if isinstance(a, torch.Tensor)
                      else np.asarray(a, dtype=np.float32), sample_rate=rate)
                for a in output.audios]
