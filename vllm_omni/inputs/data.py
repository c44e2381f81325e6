"""Per-request generation parameters (the offline API's ``OmniDiffusionSamplingParams``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from vllm_omni.engine.request import InvalidRequestError

MAX_SEED = 2**63 - 1
# Guidance scales beyond this only overflow the latents (1e308 turns them to NaN and a black
# image); no released model is useful anywhere near it.
MAX_GUIDANCE_SCALE = 100.0
OUTPUT_TYPES = ("pil", "np")


@dataclass
class OmniDiffusionSamplingParams:
    """What to generate for one prompt. ``None`` means "the model's own default".

    Every field is honoured or rejected: a field the served model cannot use raises
    ``ValueError`` (HTTP 400) instead of being dropped.
    """

    num_inference_steps: int | None = None
    width: int | None = None
    height: int | None = None
    # Classifier-free guidance with a separate negative pass (Qwen-Image's ``true_cfg_scale``).
    true_cfg_scale: float | None = None
    # Guidance embedded in guidance-distilled models (FLUX.1-dev style).
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_images_per_prompt: int = 1
    # Video models only; image models reject it.
    num_frames: int | None = None
    # "pil" (8-bit images) or "np" (float32 HxWxC arrays in [0, 1], before 8-bit rounding).
    output_type: str = "pil"
    # Model-specific options; a model that has no such option rejects them.
    layers: int | None = None  # Qwen-Image-Layered: RGBA layers to decompose into
    resolution: int | None = None  # Qwen-Image-Layered: 640 or 1024 bucket
    # LongCat-Image: rewrite the prompt with the text encoder first (an autoregressive pass).
    enable_prompt_rewrite: bool | None = None
    # Qwen-Image-Layered: caption the input image when no prompt is given (autoregressive).
    auto_caption: bool | None = None
    # GLM-Image: the prior's image tokens from an earlier response; the autoregressive prior is
    # skipped and the DiT renders these tokens.
    prior_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        """Raises ``ValueError`` (an ``InvalidRequestError`` naming the field) on a bad value."""
        def bad(name: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(message, param=name)

        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, f"{name} must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise bad(name, f"{name} must be {bound}, got {v}")

        _int("num_inference_steps", 1)
        _int("width", 1)
        _int("height", 1)
        _int("seed", 0, MAX_SEED)
        _int("num_images_per_prompt", 1)
        _int("num_frames", 1)
        _int("layers", 1, 16)
        if self.resolution is not None and self.resolution not in (640, 1024):
            raise bad("resolution", f"resolution must be 640 or 1024, got {self.resolution!r}")
        if self.prior_token_ids is not None and (
                not isinstance(self.prior_token_ids, list) or not self.prior_token_ids
                or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                       for t in self.prior_token_ids)):
            raise bad("prior_token_ids",
                      "prior_token_ids must be a non-empty list of non-negative integers")
        for name in ("enable_prompt_rewrite", "auto_caption"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise bad(name, f"{name} must be true or false, got {v!r}")
        for name in ("true_cfg_scale", "guidance_scale"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(name, f"{name} must be a number, got {v!r}")
            if not math.isfinite(v) or not 0 <= v <= MAX_GUIDANCE_SCALE:
                raise bad(name, f"{name} must be a finite number between 0 and "
                                f"{MAX_GUIDANCE_SCALE:g}, got {v!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise bad("output_type", f"output_type must be one of {', '.join(OUTPUT_TYPES)}, "
                                     f"got {self.output_type!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise bad("negative_prompt", "negative_prompt must be a string")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
