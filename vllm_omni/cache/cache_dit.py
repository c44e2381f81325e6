"""Cache-DiT backend: DBCache (+ TaylorSeer, SCM step masks) from the pinned ``cache-dit`` library.

DBCache always computes the first ``Fn_compute_blocks`` blocks; it compares their residual with the
previous step's and, while the relative L1 change stays under ``residual_diff_threshold``, reuses
the cached residual of the middle blocks (the last ``Bn_compute_blocks`` blocks still compute).

The library is applied to the transformer alone (its persistent-context mode) rather than to the
pipeline, for three reasons:
- it would otherwise patch ``__call__`` on the pipeline *class*;
- its pipeline mode fixes CFG handling once, while here each request says whether it runs CFG.
  cache-dit tells the cond and uncond calls apart by the parity of the call count, so a request
  without CFG must run with ``enable_separate_cfg=False``, or every other step would be treated as
  the uncond branch;
- SCM masks depend on the request's step count.
So every request rebuilds the context with its own settings (``begin_request``).

Parallel layouts: the residual-diff metric is replaced (``_BranchSimilarity``) by one whose sums
are all-reduced over the ranks of one CFG branch. The library's own parallel path uses AVG on
the world group, which gloo lacks, which mixes CFG branches, and whose mean of per-rank means is
wrong for uneven shards. Under CFG parallelism each rank sees a single branch, so it runs with
``enable_separate_cfg=False``. Its own cond/uncond state is then exactly the state that one
process keeps per branch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from vllm_omni.cache import cache_dit_rows
from vllm_omni.cache.common import CacheFeature, CacheStats, preset_settings
from vllm_omni.distributed.comm import GroupComm
from vllm_omni.engine.request import InvalidRequestError
from vllm_omni.utils.tasks import TaskLocal

# cache-dit logs its configuration at INFO on stdout from every rank; keep stdout for our logs
# unless the user asks for its messages (CACHE_DIT_LOG_LEVEL=info). Read when it is imported.
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

SCM_MASK_POLICIES = ("slow", "medium", "fast", "ultra")
SCM_STEPS_POLICIES = ("dynamic", "static")


def mask_supports(num_steps: int) -> bool:
    """Whether cache-dit has a predefined step mask for this step count."""
    return num_steps >= 8 or num_steps in (4, 6)


@dataclass
class CacheDiTConfig:
    """``cache_config`` for ``--cache-backend cache_dit``; defaults are vLLM-Omni's."""

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    max_warmup_steps: int = 4
    residual_diff_threshold: float = 0.24
    max_continuous_cached_steps: int = 3
    max_cached_steps: int = -1  # -1: no limit
    enable_taylorseer: bool = False
    taylorseer_order: int = 1
    scm_steps_mask_policy: str | None = None
    scm_steps_policy: str = "dynamic"
    preset: str | None = None  # a model's named settings (see the adapters); other keys override it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheDiTConfig":
        keys = [f.name for f in fields(cls)]
        unknown = set(d) - set(keys)
        if unknown:
            raise ValueError(f"unknown cache_dit cache_config key(s): "
                             f"{', '.join(sorted(unknown))}; accepted: {', '.join(keys)}")
        c = cls(**d)
        c._check()
        return c

    def _check(self) -> None:
        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        for name in ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps"):
            integer(name, 0)
        integer("max_continuous_cached_steps", -1)
        integer("max_cached_steps", -1)
        integer("taylorseer_order", 1)
        if self.Fn_compute_blocks < 1:
            raise ValueError("Fn_compute_blocks must be >= 1: DBCache measures the change of "
                             "the first blocks' residual")
        t = self.residual_diff_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"residual_diff_threshold must be a number >= 0, got {t!r}")
        if not isinstance(self.enable_taylorseer, bool):
            raise ValueError(f"enable_taylorseer must be true or false, got "
                             f"{self.enable_taylorseer!r}")
        if self.scm_steps_mask_policy not in (None, *SCM_MASK_POLICIES):
            raise ValueError(f"scm_steps_mask_policy must be null or one of "
                             f"{', '.join(SCM_MASK_POLICIES)}, got {self.scm_steps_mask_policy!r}")
        if self.scm_steps_policy not in SCM_STEPS_POLICIES:
            raise ValueError(f"scm_steps_policy must be one of {', '.join(SCM_STEPS_POLICIES)}, "
                             f"got {self.scm_steps_policy!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError(f"preset must be a string, got {self.preset!r}")

    @classmethod
    def resolve(cls, d: dict[str, Any], presets: dict[str, dict[str, Any]],
                model: str) -> "CacheDiTConfig":
        """Parses ``d``; a ``preset`` supplies defaults that the other keys override."""
        given = cls.from_dict(d)
        if given.preset is None:
            return given
        base = preset_settings(presets, given.preset, "cache_dit", model)
        merged = {**base, **{k: v for k, v in d.items() if k != "preset"}}
        return cls.from_dict(merged)

    def check_model(self, model: str, num_blocks: int) -> None:
        if self.Fn_compute_blocks + self.Bn_compute_blocks > num_blocks:
            raise ValueError(
                f"Fn_compute_blocks + Bn_compute_blocks = "
                f"{self.Fn_compute_blocks + self.Bn_compute_blocks} exceeds the {num_blocks} "
                f"transformer blocks of {model}")

    def db_cache_config(self, num_steps: int | None, separate_cfg: bool):
        import cache_dit

        mask = None
        if self.scm_steps_mask_policy is not None and num_steps is not None:
            if not mask_supports(num_steps):
                raise InvalidRequestError(
                    f"num_inference_steps={num_steps} cannot run with this server's cache-dit "
                    f"step mask ({self.scm_steps_mask_policy!r}, e.g. from a cache preset): "
                    "it supports 4, 6, or 8 and more steps", param="num_inference_steps")
            mask = cache_dit.steps_mask(total_steps=num_steps,
                                        mask_policy=self.scm_steps_mask_policy)
        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.Fn_compute_blocks,
            Bn_compute_blocks=self.Bn_compute_blocks,
            max_warmup_steps=self.max_warmup_steps,
            residual_diff_threshold=float(self.residual_diff_threshold),
            max_continuous_cached_steps=self.max_continuous_cached_steps,
            max_cached_steps=self.max_cached_steps,
            enable_separate_cfg=separate_cfg,
            num_inference_steps=num_steps,
            steps_computation_mask=mask,
            steps_computation_policy=self.scm_steps_policy,
        )

    def calibrator_config(self):
        if not self.enable_taylorseer:
            return None
        import cache_dit

        return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)


class _BranchSimilarity:
    """cache-dit's residual-diff test with its sums all-reduced over one CFG branch's ranks.

    Installed on every rank, so one process and N ranks evaluate the same formula (only the
    summation order differs).
    """

    def __init__(self, manager: Any, comm: GroupComm | None):
        self.manager = manager
        self.comm = comm
        self.original = manager.similarity

    def __call__(self, t1: torch.Tensor, t2: torch.Tensor, *, threshold: float,
                 parallelized: bool = False, prefix: str = "Fn") -> bool:
        m = self.manager
        reuses_cond_diff = (m.enable_separate_cfg() and m.is_separate_cfg_step()
                            and not m.cfg_diff_compute_separate())
        if threshold <= 0.0 or threshold >= 1.0 or t1.shape != t2.shape or reuses_cond_diff:
            # Decided without looking at the tensors: identical on every rank already.
            return self.original(t1, t2, threshold=threshold, parallelized=False, prefix=prefix)
        sums = torch.stack([(t1 - t2).abs().sum(), t1.abs().sum()]).double()
        if self.comm is not None and self.comm.world_size > 1:
            self.comm.all_reduce(sums)
        diff = float(sums[0] / sums[1].clamp_min(1e-30))
        m.add_residual_diff(diff)
        return diff < threshold


class CacheDiT:
    """DBCache on one transformer; ``begin_request`` before each pipeline call.

    Under step batching every request keeps contexts of its own (``use_batcher``): a context
    holds all of DBCache's state. A forward of one call runs with the call's contexts put in
    place by name; one shared by several calls decides per call (``cache_dit_rows``)."""

    def __init__(self, transformer: torch.nn.Module, config: CacheDiTConfig,
                 reduce: GroupComm | None = None, cfg_parallel: bool = False, target=None):
        import cache_dit

        self.config = config
        self.cfg_parallel = cfg_parallel
        self.target = target if target is not None else transformer
        # The module cache-dit wraps: the denoiser, or the part of it a BlockAdapter names.
        self.transformer = getattr(self.target, "transformer", None) or transformer
        cache_dit.enable_cache(self.target, cache_config=config.db_cache_config(None, False),
                               calibrator_config=config.calibrator_config())
        self.manager = self.transformer._context_manager
        self._forward = self.transformer.forward  # the library's, before other hooks wrap it
        self.manager.similarity = _BranchSimilarity(self.manager, reduce)
        self.batcher = None

    @property
    def _contexts(self) -> dict[str, Any]:  # the library's contexts by name, the live ones
        return self.manager._cached_context_manager

    @property
    def capture_key(self) -> str:  # its entry in each step-batched call's ``captured``
        return f"cache_dit:{id(self)}"

    def use_batcher(self, batcher) -> None:
        self.batcher = batcher
        self.local = TaskLocal()  # each step-batched call's contexts
        # Never used in a forward: refresh_context rebuilds each request's from these (and
        # clears the buffers of the one it replaces, which must not be another request's).
        self.templates = {n: self._contexts[n] for n in self.transformer._context_names}
        batcher.captures[self.capture_key] = lambda: getattr(self.local, "contexts", {})
        batcher.before_forward.append(self._put_in_place)
        batcher.after_forward.append(self._keep)
        self.wrappers = cache_dit_rows.cached_blocks(self._forward)
        cache_dit_rows.install(self.wrappers, batcher, self.capture_key)
        # Prompts of other lengths do not share a forward: a request's cached encoder residual
        # (and its calibrators' history) keeps its own length, step after step.
        batcher.padding = {}

    def _put_in_place(self, group) -> None:
        self._contexts.update(group[0].captured[self.capture_key])

    def _keep(self, group) -> None:
        # The library may have replaced a context during the forward (a refresh): keep that.
        mine = group[0].captured[self.capture_key]
        for name in mine:
            mine[name] = self._contexts[name]

    def begin_request(self, num_steps: int, uses_cfg: bool) -> None:
        import cache_dit

        separate_cfg = uses_cfg and not self.cfg_parallel
        live = dict(self._contexts) if self.batcher is not None else None
        if live is not None:
            self._contexts.update(self.templates)
        cache_dit.refresh_context(
            self.transformer, cache_config=self.config.db_cache_config(num_steps, separate_cfg),
            calibrator_config=self.config.calibrator_config())
        if live is not None:
            self.local.contexts = {n: self._contexts[n] for n in self.templates}
            self._contexts.update({n: live[n] for n in self.templates})

    @property
    def stats(self) -> CacheStats:
        """Calls of the last request that ran the whole block stack, and those served from cache
        (only the Fn and Bn blocks ran)."""
        name = self.transformer._context_names[0]
        ctx = (self.local.contexts[name] if self.batcher is not None
               else self.manager.get_context(name))
        calls = max(ctx.transformer_executed_steps, 0)
        skipped = len(ctx.get_cached_steps()) + len(ctx.get_cfg_cached_steps())
        return CacheStats(computed=calls - skipped, skipped=skipped)

    def remove(self) -> None:
        import cache_dit

        if self.batcher is not None:
            cache_dit_rows.remove(self.wrappers)
            self._contexts.update(self.templates)
        cache_dit.disable_cache(self.target)


class CacheDiTFeature(CacheFeature):
    name = "cache_dit"

    @classmethod
    def check(cls, adapter, config) -> None:
        super().check(adapter, config)
        experts = adapter.parallel_plan().denoisers
        cache = CacheDiTConfig.resolve(config.cache_config, adapter.cache_dit_presets,
                                       adapter.spec.pipeline_class)
        if cache.scm_steps_mask_policy is not None and len(experts) > 1:
            # Each expert counts its own steps; a mask over the request's steps would land on
            # the wrong ones for the expert that starts later.
            raise ValueError(f"scm_steps_mask_policy: {adapter.spec.pipeline_class} runs "
                             f"{len(experts)} transformers ({', '.join(experts)}) in turn, and a "
                             "cache-dit step mask spans one; use the residual threshold alone")

    def apply(self, pipe, groups) -> None:
        config = CacheDiTConfig.resolve(self.config.cache_config, self.adapter.cache_dit_presets,
                                        self.adapter.spec.pipeline_class)
        self.groups = groups
        self.caches = [CacheDiT(model, config, reduce=groups.branch,
                                cfg_parallel=groups.cfg.world_size > 1,
                                target=self.adapter.cache_dit_target(model))
                       for model in self.denoisers(pipe)]

    def use_batcher(self, batcher) -> None:
        for cache in self.caches:
            cache.use_batcher(batcher)
