"""Loads a diffusers pipeline and runs requests on it with seeded generators."""

from __future__ import annotations

import logging
import os
import time
import traceback
import torch

from vllm_omni.cache.apply import apply_cache
from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.distributed.apply import apply_parallel
from vllm_omni.distributed.groups import ParallelGroups
from vllm_omni.engine.request import (
    DiffusionOutput,
    DiffusionRequest,
    InvalidRequestError,
    ProgressFn,
    RequestError,
)
from vllm_omni.models.registry import load_model_spec

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


FAULT_MARKER = "__vllm_omni_test_fault__"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is the released precision of the served DiTs; CPUs run fp32 much faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def make_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded ``seed + i``.

    Per-image generators make image i of a request independent of how many images were asked
    for or what else ran beside it; CPU generators give the same noise on every device.
    """
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]


class ModelRunner:
    def __init__(self, config: OmniEngineConfig, rank: int, device: torch.device,
                 groups: ParallelGroups | None = None):
        self.config = config
        self.rank = rank
        self.device = device
        self.groups = groups or ParallelGroups.single()
        self.spec = load_model_spec(config.model)
        self.adapter = self.spec.adapter
        self.pipe = None
        self.parallel: dict = {}
        self.cache = None
        # Tests make one rank fail a marked request, to prove a desynchronised group recovers.
        self._fault_rank = int(os.environ.get("VLLM_OMNI_TEST_FAIL_RANK", "-1"))

    def load(self) -> None:
        from diffusers import DiffusionPipeline

        dtype = resolve_dtype(self.config.dtype, self.device)
        t0 = time.perf_counter()
        self.pipe = DiffusionPipeline.from_pretrained(self.config.model, dtype=dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if self.groups.layout.world_size > 1:
            plan = self.adapter.parallel_plan(self.spec, loaded=True)
            self.parallel = apply_parallel(self.pipe, plan, self.groups)
        # After the parallel hooks, as DESIGN.md orders features.
        self.cache = apply_cache(self.pipe, self.config.cache_backend, self.config.cache_config,
                                 self.adapter, self.spec, self.groups)
        logger.info("rank %d loaded %s (%s, %s) in %.2fs", self.rank, self.spec.pipeline_class,
                    dtype, self.device, time.perf_counter() - t0)

    def _cache_metrics(self) -> dict[str, int]:
        stats = torch.tensor([self.cache.stats.computed, self.cache.stats.skipped])
        cfg = self.parallel.get("cfg")
        if cfg is not None and cfg.active:
            # Each rank saw one branch's calls; count both. (Without CFG every rank ran them all.)
            self.groups.cfg.all_reduce(stats)
        return {"transformer_calls_computed": int(stats[0]), "transformer_calls_skipped": int(stats[1])}

    @torch.inference_mode()
    def execute(self, batch: list[DiffusionRequest],
                progress: ProgressFn | None = None) -> list[DiffusionOutput]:
        return [self._run_one(req, progress) for req in batch]

    def _run_one(self, req: DiffusionRequest, progress: ProgressFn | None) -> DiffusionOutput:
        t0 = time.perf_counter()
        try:
            self.adapter.check_loaded(self.pipe, req)
            if self._fault_rank == self.rank and FAULT_MARKER in req.prompt:
                raise RuntimeError(f"fault injected on rank {self.rank} (tests)")
            kwargs = self.adapter.pipeline_kwargs(self.spec, req)
            if progress is not None:
                ids, total = [req.request_id], req.num_inference_steps

                def on_step_end(pipe, step, timestep, callback_kwargs):
                    progress(ids, step + 1, total)
                    return callback_kwargs

                kwargs["callback_on_step_end"] = on_step_end
            uses_cfg = self.adapter.uses_cfg(kwargs)
            if "cfg" in self.parallel:
                self.parallel["cfg"].begin_request(uses_cfg)
            self.groups.reset_counters()
            if self.cache is not None:
                self.cache.begin_request(req.num_inference_steps, uses_cfg)
            images = self.pipe(**kwargs, generator=make_generators(req.seed, req.num_images),
                               output_type=req.output_type).images
        except InvalidRequestError as e:
            return DiffusionOutput(req.request_id, error=RequestError.invalid(e))
        except Exception as e:  # the worker survives a bad request or an OOM; the client is told
            logger.error("request %s failed:\n%s", req.request_id, traceback.format_exc())
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return DiffusionOutput(req.request_id, error=RequestError(
                500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
        metrics = {"execute_s": time.perf_counter() - t0}
        if self.cache is not None:
            metrics.update(self._cache_metrics())
        if self.parallel:
            metrics["comm_bytes_rank0"] = self.groups.bytes_sent()
        return DiffusionOutput(req.request_id, images=list(images), metrics=metrics)
