"""What the step-cache backends share: their lifecycle, per-request counts and preset lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from vllm_omni.features import Feature
from vllm_omni.utils.tasks import TaskLocal

T = TypeVar("T")


@dataclass
class CacheStats:
    """Denoiser calls of the last request: run in full, and served from the cache."""

    computed: int = 0
    skipped: int = 0


def preset_settings(presets: dict[str, T], name: str, backend: str, model: str) -> T:
    """A model's named preset for ``backend``, or a ValueError listing the ones it has."""
    if name not in presets:
        names = ", ".join(sorted(presets)) or "none"
        raise ValueError(f"unknown {backend} preset {name!r} for {model} (available: {names})")
    return presets[name]


class CacheFeature(Feature):
    """A step cache on each denoiser (``self.caches``: objects with ``begin_request``, ``stats``
    and ``remove``), installed after the parallel features so it sees each rank's calls."""

    @classmethod
    def check(cls, adapter, config) -> None:
        adapter.check_cache(config.cache_backend, config.cache_config)

    def begin_request(self, num_steps: int, uses_cfg: bool) -> None:
        if not hasattr(self, "call"):  # per pipeline call (step batching runs several)
            self.call = TaskLocal()
        self.call.split_branches = uses_cfg and self.groups.cfg.world_size > 1
        for cache in self.caches:  # per-branch cache state only when branches are calls
            cache.begin_request(num_steps, uses_cfg and self.adapter.cfg_calls == "separate")

    def stats(self) -> dict[str, Any]:
        counts = torch.tensor([sum(c.stats.computed for c in self.caches),
                               sum(c.stats.skipped for c in self.caches)])
        if self.call.split_branches:
            # Each rank saw one branch's calls; count both. (Without CFG every rank ran them all.)
            self.groups.cfg.all_reduce(counts)
        return {"transformer_calls_computed": int(counts[0]),
                "transformer_calls_skipped": int(counts[1])}

    def remove(self) -> None:
        for cache in self.caches:
            cache.remove()
        self.caches = []
