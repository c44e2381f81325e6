"""A request as the engine runs it, and what it produces: typed artifacts (images, videos,
audio) plus model-specific extras."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

# InvalidRequestError: re-exported, the adapters raise it.
from vllm_omni.engine.errors import InvalidRequestError, OmniError  # noqa: F401

# Per-step progress callback: (request ids, steps done, total steps).
ProgressFn = Callable[[list[str], int, int], None]
# A preview while denoising: (request id, partial image index, image).
PartialFn = Callable[[str, int, Any], None]


@dataclass
class DiffusionRequest:
    """One prompt with fully resolved parameters (seed and steps are always concrete). Shape
    parameters are what the model declares: a size for images (and video), None for audio;
    frames, fps or audio length travel as options of the models that have them."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    width: int | None
    height: int | None
    num_inference_steps: int
    seed: int
    num_images_per_prompt: int = 1
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    output_type: str = "pil"
    partial_images: int = 0  # decoded previews sent while denoising (streaming)
    # Input images (RGB or RGBA PIL images) for editing/layering models, in the user's order.
    images: list[Any] = field(default_factory=list)
    mask: Any = None  # PIL mask image (white = repaint), for models that inpaint
    # Model-specific options the adapter declared and validated (e.g. layers, resolution).
    options: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters active for it (lora.LoraRef: name, weight file, scale), resolved and allowed.
    loras: tuple = ()
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # when the scheduler handed it to the executor


@dataclass
class Video:
    frames: list[Any]  # PIL images, or float HxWxC arrays for output_type "np"
    fps: float

    def save(self, path: str) -> None:
        """Writes the video as an H.264 mp4, as the server sends it."""
        from vllm_omni.entrypoints.openai.encoders import encode_video

        with open(path, "wb") as f:
            f.write(encode_video(self)[0])


@dataclass
class Audio:
    samples: Any  # float32 array, (channels, samples)
    sample_rate: int

    def save(self, path: str, fmt: str | None = None) -> None:
        """Writes the audio as the server sends it: ``fmt`` (wav, flac, mp3, opus or pcm) or the
        path's extension."""
        from vllm_omni.entrypoints.openai.encoders import encode_audio

        fmt = fmt or path.rsplit(".", 1)[-1].lower()
        with open(path, "wb") as f:
            f.write(encode_audio(self, fmt)[0])


@dataclass
class DiffusionOutput:
    request_id: str
    images: list[Any] = field(default_factory=list)  # PIL images, or float arrays for "np"
    videos: list[Video] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    error: OmniError | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Model-specific results beside the artifacts (GLM-Image: the prior's image tokens).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def add(self, artifacts: list[Any]) -> "DiffusionOutput":
        """Files each artifact under its kind (anything not a video or audio is an image)."""
        for a in artifacts:
            (self.videos if isinstance(a, Video) else self.audios if isinstance(a, Audio)
             else self.images).append(a)
        return self
