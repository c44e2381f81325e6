"""A model's request options, declared once: the HTTP request models, offline validation, the
batch key and the pipeline keyword arguments are all derived from these declarations."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from vllm_omni.engine.request import InvalidRequestError

MAX_SEED = 2**63 - 1
# Guidance scales beyond this only overflow the latents (1e308 turns them to NaN and a black
# image); no released model is useful anywhere near it.
MAX_GUIDANCE_SCALE = 100.0
# The routes an option can apply to: /v1/images/generations and /v1/images/edits.
TASKS = frozenset({"generate", "edit"})
_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


@dataclass(frozen=True)
class Option:
    name: str
    type: Any  # bool, int, float, str or list[int]
    doc: str  # one line, shown in /openapi.json
    ge: float | None = None  # bounds, of each item for a list
    le: float | None = None
    choices: tuple | None = None
    default: Any = None  # what the pipeline gets when the request omits it (None: nothing)
    tasks: frozenset[str] = TASKS
    # The pipeline keyword it is passed as (True: its own name); False: the adapter maps it.
    kwarg: str | bool = True
    # Whether requests setting it may share one pipeline call (with equal values).
    batchable: bool = False

    @cached_property
    def annotation(self) -> Any:
        """The pydantic type: strict, bounded, finite (the HTTP models and ``check`` share it)."""
        item = get_args(self.type)[0] if get_origin(self.type) is list else self.type
        if self.choices:
            item = Literal[self.choices]
        elif self.ge is not None or self.le is not None:
            item = Annotated[item, Field(ge=self.ge, le=self.le)]
        return list[item] if get_origin(self.type) is list else item

    @cached_property
    def _adapter(self) -> TypeAdapter:
        return TypeAdapter(self.annotation, config=ConfigDict(strict=True, allow_inf_nan=False))

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        many = get_origin(self.type) is list
        what = ("a list of integers" if many else _NAMES[self.type])
        if self.ge is not None and self.le is not None:
            return f"{what} between {self.ge:g} and {self.le:g}"
        return what + (f" >= {self.ge:g}" if self.ge is not None else "")

    def field(self) -> tuple[Any, Any]:
        """``(annotation, FieldInfo)`` for ``pydantic.create_model``; absent means default."""
        doc = self.doc + ("" if self.default is None else f" (default: {self.default})")
        return Optional[self.annotation], Field(None, description=doc)

    def check(self, value: Any) -> None:
        """Raises ``InvalidRequestError`` naming the option when ``value`` does not fit it."""
        if value is None:
            return
        try:
            self._adapter.validate_python(value)
        except ValidationError:
            raise InvalidRequestError(f"{self.name} must be {self.describe()}, got {value!r}",
                                      param=self.name) from None


# Shared by every image family; ImageAdapter picks the family's CFG field and negative prompt.
NEGATIVE_PROMPT = Option("negative_prompt", str, "What the image should not show (the negative "
                         "branch of classifier-free guidance)")
GUIDANCE_SCALE = Option("guidance_scale", float, "Guidance scale", ge=0, le=MAX_GUIDANCE_SCALE,
                        batchable=True)
TRUE_CFG_SCALE = Option("true_cfg_scale", float, "Classifier-free guidance scale (a separate "
                        "negative pass)", ge=0, le=MAX_GUIDANCE_SCALE, batchable=True)
CFG_OPTIONS = {o.name: o for o in (GUIDANCE_SCALE, TRUE_CFG_SCALE)}

# The model-independent fields of OmniDiffusionSamplingParams, checked when it is built.
COMMON = (Option("num_inference_steps", int, "Denoising steps", ge=1),
          Option("width", int, "Output width", ge=1), Option("height", int, "Output height", ge=1),
          Option("seed", int, "Seed of the first image", ge=0, le=MAX_SEED),
          Option("num_images_per_prompt", int, "Images per prompt", ge=1),
          Option("output_type", str, "Output kind", choices=("pil", "np")))
