"""Builds the configured step cache on a loaded pipeline (after the parallel hooks)."""

from __future__ import annotations

from typing import Any


def apply_cache(pipe: Any, backend: str, cache_config: dict[str, Any], adapter, spec, groups):
    """A ``TeaCache`` or ``CacheDiT`` on ``pipe.transformer``; None without a backend.

    Both offer ``begin_request(num_steps, uses_cfg)`` and ``stats`` (a ``CacheStats``).
    """
    transformer = pipe.transformer
    if backend == "tea_cache":
        from diffusers.hooks import HookRegistry

        from vllm_omni.cache.teacache import TeaCache, TeaCacheConfig, apply_teacache

        config = TeaCacheConfig.from_dict(cache_config).resolve(adapter.teacache_presets,
                                                                spec.pipeline_class)
        cache = TeaCache(config, config.coefficients or adapter.teacache_coefficients,
                         adapter.teacache_modulated_input, io=adapter.teacache_io,
                         reduce=groups.branch)
        apply_teacache(adapter.teacache_blocks(transformer), cache)
        # diffusers caches which submodules carry hooks; ours were just added below it.
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        return cache
    if backend == "cache_dit":
        from vllm_omni.cache.cache_dit import CacheDiT, CacheDiTConfig

        config = CacheDiTConfig.resolve(cache_config, adapter.cache_dit_presets,
                                        spec.pipeline_class)
        return CacheDiT(transformer, config, reduce=groups.branch,
                        cfg_parallel=groups.cfg.world_size > 1,
                        target=adapter.cache_dit_target(transformer))
    return None
