"""Loads a diffusers pipeline and runs requests on it with seeded generators."""

from __future__ import annotations

import functools
import logging
import os
import resource
import time
import traceback
from dataclasses import dataclass

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
                 groups: ParallelGroups | None = None, cancel_flags=None):
        self.config = config
        self.rank = rank
        self.device = device
        self.groups = groups or ParallelGroups.single()
        self.spec = load_model_spec(config.model)
        self.adapter = self.spec.adapter
        self.pipe = None
        self.parallel: dict = {}
        self.cache = None
        self.cancel_flags = cancel_flags  # shared per-slot flags set by the engine (or None)
        self.timing = StepTiming()
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
        self._install_timing()
        logger.info("rank %d loaded %s (%s, %s) in %.2fs", self.rank, self.spec.pipeline_class,
                    dtype, self.device, time.perf_counter() - t0)

    def _install_timing(self) -> None:
        """Times the denoising loop (from the first transformer call) and the VAE decode."""
        def first_call(module, args):
            if self.timing.denoise_start is None:
                self.timing.denoise_start = time.perf_counter()

        self.pipe.transformer.register_forward_pre_hook(first_call)
        decode = self.pipe.vae.decode

        @functools.wraps(decode)
        def timed_decode(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                self.timing.vae_s += time.perf_counter() - t0

        self.pipe.vae.decode = timed_decode

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
        return [self._run_one(slot, req, progress) for slot, req in enumerate(batch)]

    def _cancelled(self, slot: int) -> bool:
        """Whether the engine cancelled batch slot ``slot``, agreed by every rank."""
        flag = int(self.cancel_flags[slot]) if self.cancel_flags is not None else 0
        if self.groups.world.world_size > 1:
            # Ranks read the flag at slightly different moments; all must stop at the same step.
            t = torch.tensor([flag], dtype=torch.int32)
            flag = int(self.groups.world.all_reduce(t)[0])
        return flag > 0

    def _step_callback(self, slot: int, req: DiffusionRequest, progress: ProgressFn | None):
        ids, total, timing = [req.request_id], req.num_inference_steps, self.timing

        def on_step_end(pipe, step, timestep, callback_kwargs):
            timing.steps = step + 1
            timing.denoise_end = time.perf_counter()
            if progress is not None:
                progress(ids, step + 1, total)
            if self._cancelled(slot):
                raise RequestCancelled
            return callback_kwargs

        return on_step_end

    def _run_one(self, slot: int, req: DiffusionRequest,
                 progress: ProgressFn | None) -> DiffusionOutput:
        t0 = time.perf_counter()
        self.timing = timing = StepTiming()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.adapter.check_loaded(self.pipe, req)
            if self._fault_rank == self.rank and FAULT_MARKER in req.prompt:
                raise RuntimeError(f"fault injected on rank {self.rank} (tests)")
            kwargs = self.adapter.pipeline_kwargs(self.spec, req)
            kwargs["callback_on_step_end"] = self._step_callback(slot, req, progress)
            uses_cfg = self.adapter.uses_cfg(kwargs)
            if "cfg" in self.parallel:
                self.parallel["cfg"].begin_request(uses_cfg)
            self.groups.reset_counters()
            if self.cache is not None:
                self.cache.begin_request(req.num_inference_steps, uses_cfg)
            images = self.pipe(**kwargs, generator=make_generators(req.seed, req.num_images),
                               output_type=req.output_type).images
        except RequestCancelled:
            logger.info("request %s cancelled after %d of %d steps", req.request_id, timing.steps,
                        req.num_inference_steps)
            return DiffusionOutput(req.request_id, metrics=self._metrics(t0), error=RequestError(
                499, f"cancelled after {timing.steps} of {req.num_inference_steps} steps",
                "cancelled", code="cancelled"))
        except InvalidRequestError as e:
            return DiffusionOutput(req.request_id, error=RequestError.invalid(e))
        except Exception as e:  # the worker survives a bad request or an OOM; the client is told
            logger.error("request %s failed:\n%s", req.request_id, traceback.format_exc())
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return DiffusionOutput(req.request_id, metrics=self._metrics(t0), error=RequestError(
                500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
        metrics = self._metrics(t0)
        if self.cache is not None:
            metrics.update(self._cache_metrics())
        if self.parallel:
            metrics["comm_bytes_rank0"] = self.groups.bytes_sent()
        return DiffusionOutput(req.request_id, images=list(images), metrics=metrics)

    def _metrics(self, t0: float) -> dict:
        t = self.timing
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:  # the worker process's peak resident memory (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"execute_s": time.perf_counter() - t0, "steps_completed": t.steps,
                "denoise_s": t.denoise_s, "vae_s": t.vae_s, "peak_memory_bytes": peak}


class RequestCancelled(Exception):
    """Raised at a step end on every rank when the engine cancelled the request."""


@dataclass
class StepTiming:
    """Where one request's time went, filled by the step callback and the timing hooks."""

    steps: int = 0
    denoise_start: float | None = None  # the first transformer call
    denoise_end: float | None = None  # the last step end
    vae_s: float = 0.0

    @property
    def denoise_s(self) -> float:
        if self.denoise_start is None or self.denoise_end is None:
            return 0.0
        return self.denoise_end - self.denoise_start
