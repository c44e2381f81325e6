"""Per-request generation parameters (the offline API's ``OmniDiffusionSamplingParams``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_omni.engine.request import InvalidRequestError
from vllm_omni.models.options import COMMON, GUIDANCE_SCALE, NEGATIVE_PROMPT, TRUE_CFG_SCALE

_CHECKED = (*COMMON, NEGATIVE_PROMPT, GUIDANCE_SCALE, TRUE_CFG_SCALE)
_COMMON = {o.name for o in COMMON}


@dataclass
class OmniDiffusionSamplingParams:
    """What to generate for one prompt. ``None`` means "the model's own default".

    Every field is honoured or rejected: a field the served model cannot use raises
    ``ValueError`` (HTTP 400) instead of being dropped. The common fields are checked here;
    the model's options (its schema: names, bounds) when the request is made.
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
    # Video models only; image models reject them.
    num_frames: int | None = None
    fps: float | None = None  # labels the output video; the frames are the same
    # The low-noise expert's CFG scale (Wan2.2 A14B; guidance_scale sets the high-noise one's).
    guidance_scale_2: float | None = None
    # Audio models only: the clip's window in seconds (its length is end - start).
    audio_start_in_s: float | None = None
    audio_end_in_s: float | None = None
    # "pil" (8-bit images) or "np" (float32 HxWxC arrays in [0, 1], before 8-bit rounding).
    output_type: str = "pil"
    # Model options kept as fields for compatibility (their adapters declare and document them:
    # Qwen-Image-Layered, LongCat-Image, GLM-Image); a model without one rejects it.
    layers: int | None = None
    resolution: int | None = None
    enable_prompt_rewrite: bool | None = None
    auto_caption: bool | None = None
    prior_token_ids: list[int] | None = None
    # LoRA adapters for this request: {"name", "path", "scale"} or a list of them (a name
    # registered with lora_modules, or a path under allowed_lora_dirs).
    lora: dict[str, Any] | list[dict[str, Any]] | None = None
    # Any other option of the served model, by name (as vLLM's ``SamplingParams.extra_args``).
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Raises ``ValueError`` (an ``InvalidRequestError`` naming the field) on a bad value."""
        for option in _CHECKED:
            option.check(getattr(self, option.name))
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise InvalidRequestError("extra_args must be a dict of option names to values",
                                      param="extra_args")

    def options(self) -> dict[str, Any]:
        """The model options set, by name, for the served model's schema to check."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _COMMON
                 and f.name not in ("extra_args", "lora") and getattr(self, f.name) is not None}
        for name in set(self.extra_args or ()) & set(given):
            raise InvalidRequestError(f"{name} is set twice (field and extra_args)", param=name)
        return {k: v for k, v in {**given, **(self.extra_args or {})}.items() if v is not None}

    def to_dict(self) -> dict:
        return asdict(self)
