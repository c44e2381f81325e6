"""A model's request options, each declared once: the HTTP request models, offline validation,
the batch key and the pipeline keyword arguments all derive from these declarations."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from vllm_omni.engine.request import InvalidRequestError

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 32000  # prompts and negative prompts, before any tokenizer sees them
# Guidance scales beyond this only overflow the latents (1e308 turns them to NaN and a black
# image); no released model is useful anywhere near it.
MAX_GUIDANCE_SCALE = 100.0
TASKS = frozenset({"generate", "edit"})  # /v1/images/generations, /v1/images/edits
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          list[int]: "a list of integers", list[float]: "a list of numbers"}


@dataclass(frozen=True)
class Option:
    name: str
    type: Any  # bool, int, float, str, list[int] or list[float]
    doc: str  # one line, for /openapi.json (say the default there)
    ge: float | None = None  # bounds (of each item, for a list)
    le: float | None = None
    max_length: int | None = None  # of a string
    choices: tuple | None = None
    default: Any = None  # what the pipeline gets when the request omits it (None: nothing)
    tasks: frozenset[str] = TASKS
    kwarg: str | bool = True  # the pipeline keyword (True: its name; False: the adapter maps it)
    batchable: bool = False  # requests setting it may share a pipeline call (equal values)
    limit: str | None = None  # the server flag that lowered ``le`` (named in the refusal)

    def capped(self, most: float, flag: str) -> "Option":
        """This option under a server limit (``--max-*``): the lower of the two bounds."""
        return replace(self, le=most if self.le is None else min(most, self.le), limit=flag)

    @cached_property
    def annotation(self) -> Any:
        """Its pydantic type, which the HTTP models and ``check`` share."""
        many = get_origin(self.type) is list
        item = Literal[self.choices] if self.choices else get_args(self.type)[0] if many \
            else self.type
        if self.ge is not None or self.le is not None:
            item = Annotated[item, Field(ge=self.ge, le=self.le)]
        if self.max_length is not None:
            item = Annotated[item, Field(max_length=self.max_length)]
        return list[item] if many else item

    @cached_property
    def _validator(self) -> TypeAdapter:
        return TypeAdapter(self.annotation, config=ConfigDict(strict=True, allow_inf_nan=False))

    def check(self, value: Any) -> None:
        """Raises ``InvalidRequestError`` naming the option when ``value`` does not fit it."""
        if value is None:
            return
        try:
            self._validator.validate_python(value)
        except ValidationError:
            what = "one of " + ", ".join(map(str, self.choices)) if self.choices \
                else _KINDS[self.type]
            if self.le is not None:
                what += f" between {self.ge:g} and {self.le:g}"
            elif self.ge is not None:
                what += f" >= {self.ge:g}"
            if self.max_length is not None:
                what += f" of at most {self.max_length} characters"
            if self.limit:
                what += f" (this server's limit, {self.limit})"
            raise InvalidRequestError(f"{self.name} must be {what}, got {value!r}",
                                      param=self.name) from None


# Shared by the image families: ImageAdapter takes the negative prompt and the family's CFG scale.
# The worker tokenizes it whole before its token count is refused: capped like the prompt.
NEGATIVE_PROMPT = Option("negative_prompt", str, "What the image should not show (the negative "
                         "branch of classifier-free guidance)", max_length=MAX_PROMPT_CHARS)
GUIDANCE_SCALE = Option("guidance_scale", float, "Guidance scale", ge=0, le=MAX_GUIDANCE_SCALE,
                        batchable=True)
TRUE_CFG_SCALE = Option("true_cfg_scale", float, "Classifier-free guidance scale (a separate "
                        "negative pass)", ge=0, le=MAX_GUIDANCE_SCALE, batchable=True)
CFG_OPTIONS = {o.name: o for o in (GUIDANCE_SCALE, TRUE_CFG_SCALE)}


def cap(options: dict[str, Option], caps: dict[str, tuple[float, str]]) -> dict[str, Option]:
    """``options`` with the server's limits (option name -> (most, flag)) applied."""
    return {n: o.capped(*caps[n]) if n in caps else o for n, o in options.items()}


# The model-independent fields of OmniDiffusionSamplingParams, checked when it is built.
COMMON = (Option("num_inference_steps", int, "Denoising steps", ge=1),
          Option("width", int, "Output width", ge=1), Option("height", int, "Output height", ge=1),
          Option("seed", int, "Seed of the first image", ge=0, le=MAX_SEED),
          Option("num_images_per_prompt", int, "Images per prompt", ge=1),
          Option("output_type", str, "Output kind", choices=("pil", "np")))
