"""The lifecycle every model feature shares, and the one ordered list that applies them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Feature:
    """One feature on one loaded pipeline.

    ``check`` runs before anything loads (the CLI, the offline API and every worker call it through
    ``ModelAdapter.check_engine``); ``apply`` installs it with its process groups; ``begin_request``
    runs before each pipeline call and ``stats`` after it; ``remove`` restores the model exactly
    (state dict and outputs). Every rank calls each step together: some of them communicate.
    """

    name: ClassVar[str]  # its support-matrix column (models.base.FEATURES)
    # True: the feature puts the pipeline's modules on the device itself (offload); else the
    # runner moves the whole pipeline there before the features apply.
    places_model: ClassVar[bool] = False
    # True: under step batching, its hooks wrap each pipeline call's denoiser calls (outside
    # the batcher's hook); else they see the batched forwards.
    outside_batcher: ClassVar[bool] = False
    adapter: Any
    config: Any  # OmniEngineConfig
    plan: Any  # the adapter's ParallelPlan
    device: Any = None  # the torch.device the model computes on
    groups: Any = field(default=None, init=False)  # ParallelGroups, set by apply

    @classmethod
    def check(cls, adapter, config) -> None:
        """Raises ValueError for settings this model cannot run (beyond the declared matrix)."""

    def denoisers(self, pipe) -> list[torch.nn.Module]:
        """The plan's denoisers this pipeline has (Wan2.2 A14B: two; a one-stage model: one)."""
        return self.plan.denoiser_modules(pipe)

    def apply(self, pipe, groups) -> None:
        raise NotImplementedError

    def prepare_call(self, reqs) -> None:
        """Before each pipeline call, with its requests (all of one batch key); an
        ``InvalidRequestError`` fails them with a 400."""

    def use_batcher(self, batcher) -> None:
        """Step batching is on: pipeline calls run side by side and their denoiser forwards
        in rounds (``worker.step_batching.StepBatcher``)."""

    def begin_request(self, num_steps: int, uses_cfg: bool) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def remove(self) -> None:
        raise NotImplementedError


class ParallelFeature(Feature):
    """A feature that splits each call's work over a process group."""

    @classmethod
    def check(cls, adapter, config) -> None:
        adapter.check_parallel(config.parallel)  # the layout as a whole (heads: usp x tp)

    def stats(self) -> dict[str, Any]:
        return {"comm_bytes_rank0": self.groups.bytes_sent()}


def requested(config) -> list[str]:
    """The support-matrix features an engine config turns on."""
    p = config.parallel
    asked = {
        "tea_cache": config.cache_backend == "tea_cache",
        "cache_dit": config.cache_backend == "cache_dit",
        "sequence_parallel": p.ulysses_degree > 1 or p.ring_degree > 1,
        "cfg_parallel": p.cfg_parallel_size > 1,
        "tensor_parallel": p.tensor_parallel_size > 1,
        "vae_patch_parallel": p.vae_patch_parallel_size > 1,
        "cpu_offload": config.enable_cpu_offload or config.enable_layerwise_offload,
        "lora": config.lora_enabled,
        "fp8": config.quantization == "fp8",
    }
    return [name for name, on in asked.items() if on]


# Every feature in the order it is applied (DESIGN.md §4), with the class of each built one.
ORDER = {
    # First: it replaces the weights that the features after it shard or wrap.
    "fp8": "vllm_omni.quantization.fp8:Fp8Feature",
    "tensor_parallel": "vllm_omni.distributed.tensor_parallel:TensorParallelFeature",
    # After TP: its factors over a parallel layer are cut like the layer (shard_lora).
    "lora": "vllm_omni.lora.feature:LoraFeature",
    "cpu_offload": "vllm_omni.offload.offload:OffloadFeature",
    "sequence_parallel": "vllm_omni.distributed.sequence_parallel:SequenceParallelFeature",
    "cfg_parallel": "vllm_omni.distributed.cfg_parallel:CFGParallelFeature",
    "vae_patch_parallel": "vllm_omni.distributed.vae_patch_parallel:VaePatchParallelFeature",
    # Last: a cache sees the calls each rank makes, and agrees its decisions over them.
    "tea_cache": "vllm_omni.cache.teacache:TeaCacheFeature",
    "cache_dit": "vllm_omni.cache.cache_dit:CacheDiTFeature",
}


def resolve(path: str) -> Any:
    """What a "module:attribute" path names: plans and this list name code as data, imported
    only where it runs (most of it needs diffusers)."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def feature_classes(config) -> list[type[Feature]]:
    """The built features ``config`` asks for, in order."""
    wanted = requested(config)
    return [resolve(path) for name, path in ORDER.items() if name in wanted]


def build_features(adapter, config, device=None) -> list[Feature]:
    """The features ``config`` asks for, in application order, past the one gate."""
    adapter.check_engine(config)
    plan = adapter.parallel_plan()
    device = torch.device(device or "cpu")
    return [cls(adapter, config, plan, device) for cls in feature_classes(config)]
