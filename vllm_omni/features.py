"""The lifecycle every model feature shares, and the one ordered list that applies them."""

from __future__ import annotations

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
    adapter: Any
    spec: Any
    config: Any  # OmniEngineConfig
    plan: Any  # the adapter's loaded ParallelPlan
    groups: Any = field(default=None, init=False)  # ParallelGroups, set by apply

    @classmethod
    def check(cls, adapter, spec, config) -> None:
        """Raises ValueError for settings this model cannot run (beyond the declared matrix)."""

    def denoisers(self, pipe) -> list[torch.nn.Module]:
        """The plan's denoisers this pipeline has (Wan2.2 A14B: two; a one-stage model: one)."""
        found = [getattr(pipe, n, None) for n in self.plan.denoisers]
        return [m for m in found if isinstance(m, torch.nn.Module)]

    def apply(self, pipe, groups) -> None:
        raise NotImplementedError

    def begin_request(self, num_steps: int, uses_cfg: bool) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def remove(self) -> None:
        raise NotImplementedError


class ParallelFeature(Feature):
    """A feature that splits each call's work over a process group."""

    @classmethod
    def check(cls, adapter, spec, config) -> None:
        adapter.check_parallel(spec, config.parallel)  # the layout as a whole (heads: usp x tp)

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
        "cpu_offload": config.enable_cpu_offload,
        "lora": config.lora_path is not None,
        "fp8": config.quantization == "fp8",
    }
    return [name for name, on in asked.items() if on]


def ordered() -> list[type[Feature]]:
    """Every feature in the order it is applied (DESIGN.md §4): quantization (FP8) first, as it
    replaces weights the others shard or wrap; tensor parallel, then LoRA (its deltas are sharded
    like the layer) and offload; then sequence, CFG and VAE patch parallel, which split the work of
    each call; the step cache last, so it sees the calls as the pipeline makes them. FP8, LoRA and
    offload take their places here when they land. Imported late: they need diffusers."""
    from vllm_omni.cache.cache_dit import CacheDiTFeature
    from vllm_omni.cache.teacache import TeaCacheFeature
    from vllm_omni.distributed.cfg_parallel import CFGParallel
    from vllm_omni.distributed.sequence_parallel import SequenceParallelFeature
    from vllm_omni.distributed.tensor_parallel import TensorParallel
    from vllm_omni.distributed.vae_patch_parallel import VaePatchParallelFeature

    return [TensorParallel, SequenceParallelFeature, CFGParallel, VaePatchParallelFeature,
            TeaCacheFeature, CacheDiTFeature]


def build_features(adapter, spec, config) -> list[Feature]:
    """The features ``config`` asks for, in application order, checked by the one gate."""
    adapter.check_engine(spec, config)
    plan = adapter.parallel_plan(spec, loaded=True)
    wanted = requested(config)
    return [cls(adapter, spec, config, plan) for cls in ordered() if cls.name in wanted]
