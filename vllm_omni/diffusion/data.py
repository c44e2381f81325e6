"""Engine-wide configuration, validated once when the engine is built."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

CACHE_BACKENDS = ("none", "tea_cache", "cache_dit")


@dataclass
class DiffusionParallelConfig:
    """How the denoiser is spread over ranks. World size = ulysses x ring x cfg x tp.

    ``data_parallel_size`` replicas of that world (vLLM's name) serve requests side by side,
    each with its own engine core and workers; ``data_parallel_rank`` is one replica's index.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel_size: int = 1
    tensor_parallel_size: int = 1
    vae_patch_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree", "cfg_parallel_size",
                     "tensor_parallel_size", "vae_patch_parallel_size", "data_parallel_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, {self.data_parallel_size}), got "
                             f"{self.data_parallel_rank!r}")

        self.layout  # refuses impossible combinations now, not in the workers

    @property
    def layout(self):
        from vllm_omni.distributed.layout import RankLayout

        return RankLayout(ulysses=self.ulysses_degree, ring=self.ring_degree,
                          cfg=self.cfg_parallel_size, tp=self.tensor_parallel_size,
                          vae=self.vae_patch_parallel_size)

    @property
    def world_size(self) -> int:
        """Ranks of one replica: ulysses x ring x cfg x tp (VAE patch parallelism reuses them)."""
        return self.layout.world_size

    def replica(self, rank: int) -> "DiffusionParallelConfig":
        return replace(self, data_parallel_rank=rank)


@dataclass
class OmniEngineConfig:
    """Everything the engine core, executor and workers need. Crosses process boundaries."""

    model: str  # resolved local directory of a diffusers pipeline
    model_name: str  # what the user called it (path or hub id)
    served_model_names: list[str] = field(default_factory=list)
    dtype: str = "auto"
    parallel: DiffusionParallelConfig = field(default_factory=DiffusionParallelConfig)
    cache_backend: str = "none"
    cache_config: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None  # "fp8"
    # vLLM's field: for fp8, {"ignore": [layer-name patterns kept in full precision]}.
    quantization_config: dict[str, Any] | None = None
    # Weights off the device until they run: whole components, or the denoisers' blocks.
    enable_cpu_offload: bool = False
    enable_layerwise_offload: bool = False
    # LoRA (vLLM's flags): an adapter applied to every request, named adapters (name -> path),
    # how many are active at once (least recently used evicted) and kept in host memory, and
    # the directories request paths may name. enable_lora alone allows registered names only.
    lora_path: str | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_loras: int = 1
    max_cpu_loras: int | None = None
    allowed_lora_dirs: list[str] = field(default_factory=list)
    enable_lora: bool = False
    default_seed: int | None = None
    # Compatible waiting requests run together, up to this many (vLLM's --max-num-seqs).
    max_num_seqs: int = 1
    # Seconds to wait for workers to load the model before giving up.
    load_timeout_s: float = 1800.0
    device: str | None = None  # None: CUDA when available, else CPU
    # A worker whose heartbeat (a thread beating even during compute) is older than this is
    # treated as dead (stopped, or frozen holding the interpreter) and the workers restart.
    heartbeat_timeout_s: float = 30.0
    # After a running batch is cancelled (timeout, disconnect), the workers get this long to
    # stop; then they are restarted so the queue moves.
    cancel_grace_s: float = 10.0
    # Largest estimated peak memory (bytes, or e.g. "8GiB") one batch may take beyond the loaded
    # model; the device's free memory limits it in any case. None: only free memory; 0: no check.
    max_request_memory: int | str | None = None
    # What runs the workers (vLLM's --distributed-executor-backend): "mp", processes on this
    # host, or "ray", actors placed on a Ray cluster (executor/ray.py).
    distributed_executor_backend: str = "mp"
    # Step-level batching (--step-batching): the max_num_seqs requests in flight each run their
    # own pipeline call and share denoiser forwards step by step (worker/step_batching.py).
    # None: on wherever it can run (max_num_seqs > 1 and a model that has it), settled by the
    # model's gate (ModelAdapter.check_engine); False: request batching.
    step_batching: bool | None = None

    @property
    def lora_enabled(self) -> bool:
        return bool(self.enable_lora or self.lora_path or self.lora_modules)

    def check_step_batching(self) -> None:
        """Also once the model has settled ``None`` (ModelAdapter.check_engine)."""
        if self.step_batching and self.max_num_seqs < 2:
            raise ValueError("step_batching (--step-batching) does not run with max_num_seqs 1: "
                             "there is nothing to batch; set --max-num-seqs N")
        if self.max_num_seqs > 1 and self.cache_backend != "none" and self.step_batching is False:
            raise ValueError("max_num_seqs > 1 with a cache backend and without step batching: "
                             "the cache decides for a whole batch, so an image would depend on "
                             "the requests batched with it; use max_num_seqs 1 (--max-num-seqs 1) "
                             "with caching, or step batching (each request keeps its own cache "
                             "state)")

    def _check_lora(self) -> None:
        from vllm_omni.lora import NAME

        for name in ("max_loras", "max_cpu_loras"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                             f"({self.max_loras}), as in vLLM")
        for name in self.lora_modules:
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ValueError(f"LoRA module name {name!r}: use 1-64 letters, digits, '.', '_' "
                                 "or '-'")
            if name in self.served_model_names:
                raise ValueError(f"LoRA module name {name!r} is the served model's name")
        for d in self.allowed_lora_dirs:
            if not os.path.isdir(d):
                raise ValueError(f"allowed_lora_dirs: {d!r} is not a directory")
        if self.lora_path is not None and self.max_loras < 2 and self.lora_modules:
            raise ValueError("lora_path is active on every request, so a named adapter needs "
                             "max_loras >= 2 (--max-loras 2)")

    def __post_init__(self) -> None:
        if isinstance(self.cache_config, str):
            self.cache_config = parse_json_config(self.cache_config, "cache_config")
        if isinstance(self.quantization_config, str):
            self.quantization_config = parse_json_config(self.quantization_config,
                                                         "quantization_config")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be fp8 or None, got {self.quantization!r}")
        if self.quantization_config and self.quantization is None:
            raise ValueError("quantization_config was given without a quantization method; add "
                             "--quantization fp8 (or quantization=\"fp8\")")
        if self.cache_backend is None:
            self.cache_backend = "none"
        if self.cache_backend not in CACHE_BACKENDS:
            raise ValueError(f"cache_backend must be one of {', '.join(CACHE_BACKENDS)}, got "
                             f"{self.cache_backend!r}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) \
                or not 1 <= self.max_num_seqs <= 256:
            raise ValueError(f"max_num_seqs must be an integer from 1 to 256, got "
                             f"{self.max_num_seqs!r}")
        self.check_step_batching()
        for name in ("heartbeat_timeout_s", "cancel_grace_s", "load_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.max_request_memory is not None:
            from vllm_omni.worker.memory import parse_memory_size

            try:
                self.max_request_memory = parse_memory_size(self.max_request_memory)
            except ValueError as e:
                raise ValueError(f"max_request_memory: {e}") from None
        self._check_lora()
        from vllm_omni.executor.base import check_backend

        check_backend(self.distributed_executor_backend)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cache_backend == "none" and self.cache_config:
            raise ValueError("cache_config was given without a cache backend; "
                             "add --cache-backend tea_cache (or cache_backend=...)")
        if self.cache_backend == "tea_cache":
            from vllm_omni.cache.teacache import TeaCacheConfig

            TeaCacheConfig.from_dict(self.cache_config)
        if self.cache_backend == "cache_dit":
            from vllm_omni.cache.cache_dit import CacheDiTConfig

            CacheDiTConfig.from_dict(self.cache_config)
        if self.enable_cpu_offload and self.enable_layerwise_offload:
            raise ValueError("enable_cpu_offload and enable_layerwise_offload are two granularities "
                             "of one feature; choose one (--enable-cpu-offload moves whole "
                             "components, --enable-layerwise-offload the transformer's blocks)")

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")


def parse_json_config(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value
