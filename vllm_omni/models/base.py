"""What the engine needs to know about a model family, as data plus small pure functions.

An adapter never wraps or forks the diffusers pipeline: it declares the options the pipeline
honours (``options``: the HTTP models, validation, batch key and keyword arguments derive from
them), how requests map onto ``pipeline.__call__`` keyword arguments, and checks that need the
loaded pipeline (e.g. prompt length) in ``check_loaded``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vllm_omni.engine.request import DiffusionRequest, InvalidRequestError
from vllm_omni.models.options import Option
from vllm_omni.utils.image import source_size


def read_json(model_dir: str, *parts: str) -> dict[str, Any]:
    path = os.path.join(model_dir, *parts)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{model_dir} is not a diffusers pipeline directory: {path} is missing")


def checkpoint_defaults(model_dir: str, released: dict[str, Any],
                        keys: frozenset[str]) -> dict[str, Any]:
    """``released`` settings overridden by the checkpoint's own ``generation_config.json`` (the
    tiny test models carry one), which may set only ``keys``."""
    values = dict(released)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(path):
        own = read_json(model_dir, "generation_config.json")
        unknown = set(own) - keys
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; accepted: "
                             + ", ".join(sorted(keys)))
        values.update(own)
    return values


@dataclass
class ModelSpec:
    """Static facts about one served model, read from its config files without loading it."""

    adapter: "ModelAdapter"
    model_dir: str
    pipeline_class: str
    default_width: int | None  # None: the model has no pixel size (audio)
    default_height: int | None
    default_steps: int
    size_multiple: int
    has_guidance_embeds: bool = False
    num_heads: int = 1
    num_blocks: int = 1  # transformer blocks (cache-dit's Fn + Bn must fit in them)
    min_steps: int = 1  # the fewest denoising steps its scheduler runs correctly
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-specific facts


# The support matrix's columns (README "Models"). Each adapter lists the ones it
# supports; the engine refuses the others at startup.
FEATURES = {
    "tea_cache": "TeaCache",
    "cache_dit": "Cache-DiT",
    "sequence_parallel": "Sequence Parallel",
    "cfg_parallel": "CFG-Parallel",
    "tensor_parallel": "Tensor Parallel",
    "cpu_offload": "CPU Offload",
    "lora": "LoRA",
    "vae_patch_parallel": "VAE-Patch-Parallel",
    "fp8": "FP8",
}


class ModelAdapter:
    """A model family's knowledge. ``registry.load_model_spec`` binds an instance to one model:
    ``spec`` holds that model's facts, and ``spec.adapter`` is the adapter."""

    spec: ModelSpec
    name: ClassVar[str]
    # (display name, hub id) of the released checkpoints this adapter serves (README table).
    models: ClassVar[tuple[tuple[str, str], ...]] = ()
    task: ClassVar[str] = "text-to-image"  # or "image-edit", "image-layers", "text-to-video"...
    output: ClassVar[str] = "image"  # the artifact kind it makes: "image", "video" or "audio"
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    # The family's own request options (beyond prompt, size, steps, seed and n); the shared ones
    # come from ``declared``.
    options: ClassVar[tuple[Option, ...]] = ()
    max_side: ClassVar[int] = 4096
    features: ClassVar[frozenset[str]] = frozenset()
    # How many input images a request takes (edit models: at least one).
    image_inputs: ClassVar[tuple[int, int]] = (0, 0)
    # The largest area (pixels) the pipeline works at on an input image; larger inputs are
    # shrunk to it once decoded (the edit and layered pipelines resize to about 1 MP anyway).
    input_area: ClassVar[int] = 1024 * 1024
    # Whether ``size`` may be set; False: the pipeline decides the output size itself.
    sized: ClassVar[bool] = True
    has_preview: ClassVar[bool] = False
    # How CFG reaches the transformer: "separate" (one call per branch: caches keep per-branch
    # state, CFG-parallel splits the calls) or "batched" (one call on a doubled batch: caches see
    # one call per step, CFG-parallel splits the batch).
    cfg_calls: ClassVar[str] = "separate"

    def load_spec(self, model_dir: str, pipeline_class: str) -> ModelSpec:
        raise NotImplementedError

    def load(self, dtype: Any) -> Any:
        """The loaded pipeline: diffusers' own loader here; a model without a diffusers pipeline
        (BAGEL) supplies its own."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(self.spec.model_dir, dtype=dtype)

    # -- options -----------------------------------------------------------------------------------
    @property
    def declared(self) -> dict[str, Option]:
        """Every option this adapter may accept, by name (some checkpoints refuse some)."""
        return {o.name: o for o in self.options}

    def refused_options(self) -> dict[str, str]:
        """Declared options this checkpoint cannot honour, with why."""
        return {}

    def schema(self) -> dict[str, Option]:
        """The options a request to this served model may set."""
        return {n: o for n, o in self.declared.items() if n not in self.refused_options()}

    def unsupported(self, name: str) -> InvalidRequestError:
        why = self.refused_options().get(name)
        return InvalidRequestError(f"{name} is not supported by {self.spec.pipeline_class}"
                                   + (f": {why}" if why else ""), param=name,
                                   code="unsupported_parameter")

    def check_options(self, values: dict[str, Any],
                      schema: dict[str, Option] | None = None) -> None:
        """``schema``: this model's, under the server's limits when it has any."""
        schema = schema or self.schema()
        for name in sorted(values):
            if name not in schema:
                raise self.unsupported(name)
            schema[name].check(values[name])

    def option_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        """Keyword arguments of the options passed as they are (the request's own fields carry
        the negative prompt and CFG scales)."""
        kwargs = {}
        for o in self.schema().values():
            value = req.options.get(o.name, getattr(req, o.name, None))
            value = o.default if value is None else value
            if o.kwarg and value is not None:
                kwargs[o.name if o.kwarg is True else o.kwarg] = value
        return kwargs

    def check_images(self, n: int) -> None:
        """The one check of a request's image count (the edit route's, before decoding)."""
        lo, hi = self.image_inputs
        if not lo <= n <= hi:
            if hi == 0:
                why = "it generates from text alone; use /v1/images/generations"
            elif n == 0:
                why = "it edits input images; send them to /v1/images/edits"
            elif lo == hi:
                why = f"it takes exactly {lo} input image{'s' if lo > 1 else ''}"
            else:
                why = f"it takes {lo} to {hi} input images"
            raise InvalidRequestError(
                f"{n} input images given to {self.spec.pipeline_class}: {why}", param="image")

    def validate(self, req: DiffusionRequest, given: set[str]) -> None:
        """Checks across fields once the options passed ``check_options``. ``given``: "size"
        and "mask" when the user set them."""
        if "mask" in given:
            raise self.unsupported("mask")
        if req.num_inference_steps < self.spec.min_steps:
            raise InvalidRequestError(
                f"num_inference_steps={req.num_inference_steps} is too few for "
                f"{self.spec.pipeline_class}'s scheduler (it needs at least {self.spec.min_steps})",
                param="num_inference_steps")
        self.check_images(len(req.images))
        if "size" in given and not self.sized:
            raise InvalidRequestError(
                f"size is not supported by {self.spec.pipeline_class}: the model sets the output "
                "size from its input image; use size=auto", param="size",
                code="unsupported_parameter")
        m = self.spec.size_multiple
        for name, v in (("width", req.width), ("height", req.height)):
            if v % m or not m <= v <= self.max_side:
                lo, hi = max(m, v // m * m), max(m, (v + m - 1) // m * m)
                hint = f"{lo}" if lo == hi else f"{lo} or {hi}"
                raise InvalidRequestError(
                    f"{name}={v} is not supported by {self.spec.pipeline_class}: it must be a "
                    f"multiple of {m} between {m} and {self.max_side} (nearest: {hint})",
                    param="size",
                )

    def default_size(self, images: list[Any],
                     options: dict[str, Any]) -> tuple[int, int]:
        """(width, height) when the request names no size: the model's default, or for models
        that edit an image, the first input's size rounded to what the model accepts."""
        if not images:
            return self.spec.default_width, self.spec.default_height
        m = self.spec.size_multiple
        w, h = source_size(images[0])
        return (min(self.max_side, max(m, round(w / m) * m)),
                min(self.max_side, max(m, round(h / m) * m)))

    def check_loaded(self, pipe: Any, req: DiffusionRequest) -> None:
        """Checks that need the loaded pipeline (run in the worker)."""

    # -- memory (vllm_omni.worker.memory) ------------------------------------------------------
    def memory_configs(self, model_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (VAE, transformer) configs the memory estimate reads: diffusers' own files."""
        return (read_json(model_dir, "vae", "config.json"),
                read_json(model_dir, "transformer", "config.json"))

    def vae_input_sizes(self, req: DiffusionRequest) -> list[tuple[int, int]]:
        """(width, height) at which the pipeline VAE-encodes each input image; their latents also
        join the transformer's sequence. Default: as given."""
        return [im.size for im in req.images]

    def decoded_pixels(self, req: DiffusionRequest) -> int:
        """Pixels of each frame the VAE decodes (for audio: samples per waveform)."""
        return req.width * req.height

    def output_tokens(self, req: DiffusionRequest, token_side: int) -> int:
        """The transformer's tokens for one output (one per ``token_side``² pixels per latent
        frame)."""
        return (req.width // token_side) * (req.height // token_side) * self.latent_frames(req)

    def output_frames(self, req: DiffusionRequest) -> int:
        """Images the VAE decodes (and latent frames the transformer sees) per output image."""
        return 1

    def latent_frames(self, req: DiffusionRequest) -> int:
        """Latent frames the transformer sees per output (a video VAE packs several frames into
        one latent frame)."""
        return self.output_frames(req)

    def frames_decoded_at_once(self, req: DiffusionRequest) -> int:
        """Frames whose full-resolution activations the VAE decoder holds at once (a causal
        video VAE decodes chunk by chunk)."""
        return self.output_frames(req)

    def pipeline_kwargs(self, req: DiffusionRequest) -> dict[str, Any]:
        raise NotImplementedError

    def pipeline_for(self, pipe: Any, reqs: list[DiffusionRequest]) -> Any:
        """The pipeline that runs ``reqs``: the loaded one, unless the model's pipeline class
        depends on the inputs (TI2V-5B given an image: a sibling sharing its modules)."""
        return pipe

    def on_load(self, pipe: Any) -> None:
        """Worker-side setup once the pipeline is loaded (before parallel and cache hooks)."""

    def output_extra(self, pipe: Any) -> dict[str, Any]:
        """Model-specific results of the call that just ran (returned beside the images); the
        adapter forgets them once read."""
        return {}

    def artifacts(self, output: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        """The pipeline call's results for ``reqs``, one per generated item in request order:
        images here; a video adapter returns ``Video``s (with each request's fps), an audio
        adapter ``Audio``s."""
        return list(output.images)

    def flatten_output(self, images: list[Any]) -> list[Any]:
        """One request's output images as the flat list the client receives."""
        return images

    def preview(self, pipe: Any, latents: Any, reqs: list[DiffusionRequest]) -> list[Any]:
        """Decoded PIL images of the current latents (streaming's partial images)."""
        raise NotImplementedError(f"{type(self).__name__} has no previews")

    # -- batching ----------------------------------------------------------------------------------
    def batch_key(self, req: DiffusionRequest):
        """Requests with equal keys can run as one pipeline call (None: never batched)."""
        return None

    def batch_pipeline_kwargs(self, reqs: list[DiffusionRequest]) -> dict[str, Any]:
        """One pipeline call for requests of equal ``batch_key``, images in request order."""
        raise NotImplementedError

    # -- parallelism -------------------------------------------------------------------------------
    # The parallel plan's code, as "module:attribute" (see ParallelPlan).
    sp_processor: ClassVar[str | None] = None
    tp_plan: ClassVar[str | None] = None
    cp_plan: ClassVar[str | None] = None
    # FP8 (ParallelPlan.fp8_layers / fp8_ignore): the Linears in the transformer blocks, less the
    # ones kept in full precision.
    fp8_layers: ClassVar[tuple[str, ...]] = ()
    fp8_ignore: ClassVar[tuple[str, ...]] = ()

    def parallel_plan(self):
        """How this model's declared features apply to it (``ParallelPlan``, pure data)."""
        from vllm_omni.distributed.apply import ParallelPlan

        return ParallelPlan(model=self.spec.pipeline_class, num_heads=self.spec.num_heads,
                            cfg_calls=self.cfg_calls, sp_processor=self.sp_processor,
                            tp_plan=self.tp_plan, cp_plan=self.cp_plan,
                            fp8_layers=self.fp8_layers, fp8_ignore=self.fp8_ignore)

    def check_features(self, config) -> None:
        from vllm_omni.features import requested

        missing = [f for f in requested(config) if f not in self.features]
        if missing:
            names = ", ".join(FEATURES[f] for f in missing)
            have = ", ".join(v for f, v in FEATURES.items() if f in self.features) or "none"
            model = self.models[0][0] if self.models else self.name
            raise ValueError(f"{self.spec.pipeline_class} ({model}) does not support {names}. "
                             f"Supported with this model: {have}")

    def check_parallel(self, parallel) -> None:
        from vllm_omni.distributed.apply import check_layout

        check_layout(self.parallel_plan(), parallel)

    # -- caching ---------------------------------------------------------------------------------
    # TeaCache's rescaling polynomial (highest power first); None: the model refuses TeaCache.
    teacache_coefficients: ClassVar[list[float] | None] = None
    # Named rel_l1_thresh values: cache_config {"preset": name}. Off unless asked for.
    teacache_presets: ClassVar[dict[str, float]] = {}
    # Named cache_dit settings: cache_config {"preset": name, ...other keys override}.
    cache_dit_presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def teacache_modulated_input(self, block: Any, kwargs: dict[str, Any]) -> Any:
        """The first block's timestep-modulated image input, which TeaCache compares."""
        raise NotImplementedError

    def teacache_blocks(self, transformer: Any) -> Any:
        """The block stack TeaCache skips as a whole."""
        return transformer.transformer_blocks

    # The streams a block of the stack takes, by argument name (TeaCache caches their residuals),
    # and where they leave it for blocks diffusers' block registry does not describe.
    teacache_inputs: ClassVar[tuple[str, ...]] = ("hidden_states", "encoder_hidden_states")
    teacache_outputs: ClassVar[tuple[int, ...] | None] = (1, 0)

    def teacache_io(self, block: Any):
        """Where ``block``'s streams enter and leave it (``cache.teacache.BlockIO``): the output
        positions from diffusers' ``TransformerBlockRegistry`` where it knows the block class."""
        from diffusers.hooks._helpers import TransformerBlockRegistry

        from vllm_omni.cache.teacache import BlockIO

        try:
            meta = TransformerBlockRegistry.get(type(block))
        except ValueError:
            return BlockIO(self.teacache_inputs, self.teacache_outputs)
        if meta.return_encoder_hidden_states_index is None:  # one stream, returned alone
            return BlockIO(self.teacache_inputs[:1], None)
        return BlockIO(self.teacache_inputs, (meta.return_hidden_states_index,
                                              meta.return_encoder_hidden_states_index))

    def check_cache(self, backend: str, cache_config: dict[str, Any]) -> None:
        if backend == "none":
            return
        if backend == "tea_cache":
            if self.teacache_coefficients is None and "coefficients" not in cache_config:
                raise ValueError(f"{self.spec.pipeline_class} has no TeaCache support (no "
                                 "rescaling coefficients for it); use --cache-backend none")
            from vllm_omni.cache.teacache import TeaCacheConfig

            TeaCacheConfig.from_dict(cache_config).resolve(self.teacache_presets,
                                                           self.spec.pipeline_class)
        if backend == "cache_dit":
            if "cache_dit" not in self.features:
                raise ValueError(f"{self.spec.pipeline_class} has no Cache-DiT support; "
                                 "use --cache-backend none")
            from vllm_omni.cache.cache_dit import CacheDiTConfig

            CacheDiTConfig.resolve(cache_config, self.cache_dit_presets,
                                   self.spec.pipeline_class).check_model(self.spec.pipeline_class,
                                                                    self.spec.num_blocks)
        name = self.stochastic_scheduler()
        if name:
            raise ValueError(f"{backend} reuses transformer outputs across steps, which a "
                             f"stochastic scheduler ({name}) breaks; use a deterministic scheduler "
                             "or --cache-backend none")

    def stochastic_scheduler(self) -> str | None:
        """The scheduler's class name if it draws fresh noise at each step, else None."""
        scheduler = read_json(self.spec.model_dir, "scheduler", "scheduler_config.json")
        name = scheduler.get("_class_name", "")
        if scheduler.get("stochastic_sampling") or "Ancestral" in name or "SDE" in name:
            return name
        return None

    def check_engine(self, config) -> None:
        """The one gate for an engine config (CLI, offline API, every worker): settles what was
        left to the model (step batching), then the declared matrix and each requested
        feature's own check."""
        from vllm_omni.features import feature_classes

        if config.step_batching is None:  # left to the model: on wherever it runs
            config.step_batching = config.max_num_seqs > 1 and not self.step_batching_refused
            config.check_step_batching()
        elif config.step_batching and self.step_batching_refused:
            raise ValueError(self.step_batching_refused)
        self.check_features(config)
        for feature in feature_classes(config):
            feature.check(self, config)

    # Step batching (worker/step_batching.py): why the model cannot run it (None: it can, its
    # pipeline calling a denoiser whose inputs the batcher concatenates), and the denoiser
    # inputs whose length may differ between requests, as input name -> (dim, name of the bool
    # mask input the denoiser honours).
    step_batching_refused: ClassVar[str | None] = None
    step_padding: ClassVar[dict[str, tuple[int, str]]] = {}

    def uses_cfg(self, kwargs: dict[str, Any]) -> bool:
        """Whether a request with these pipeline kwargs runs classifier-free guidance."""
        return False

    def cache_dit_target(self, transformer: Any) -> Any:
        """What cache-dit is enabled on: the transformer when cache-dit knows its class, else a
        ``cache_dit.BlockAdapter`` naming its block stack and forward pattern."""
        return transformer
