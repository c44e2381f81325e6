"""Loads a diffusers pipeline and runs requests on it with seeded generators."""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import resource
import time
import traceback
from typing import Any

import torch

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.distributed.groups import ParallelGroups
from vllm_omni.engine import errors
from vllm_omni.engine.core import batch_key
from vllm_omni.engine.errors import InvalidRequestError
from vllm_omni.engine.messages import CANCEL_REASONS
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest, PartialFn, ProgressFn
from vllm_omni.features import Feature, build_features
from vllm_omni.models.registry import load_model_spec
from vllm_omni.utils.tasks import TaskLocal
from vllm_omni.worker import memory, step_batching
from vllm_omni.worker.steps import (
    NonFiniteError,
    RequestCancelled,
    StepTiming,
    cancel_points,
    check_finite,
    preview_steps,
    scheduler_steps,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


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
                 groups: ParallelGroups | None = None, cancelled: dict[str, str] | None = None):
        self.config = config
        self.rank = rank
        self.device = device
        self.groups = groups or ParallelGroups.single()
        self.spec = load_model_spec(config.model)
        self.adapter = self.spec.adapter
        self.pipe = None
        self.features: list[Feature] = []  # applied in load, in their order
        # Request id -> why it was cancelled, filled as the engine's messages arrive (or None).
        self.cancelled = cancelled
        self._local = TaskLocal(lambda: {"timing": StepTiming()})  # of the call this task runs
        self._running: list[str] = []  # the ids of the call being run
        self.memory_dims: memory.ModelDims | None = None  # set by load()
        # Step batching: the pipeline calls run as the batcher's tasks.
        self.batcher = (step_batching.StepBatcher(
            {k: step_batching.Padding(*v) for k, v in self.adapter.step_padding.items()})
            if config.step_batching else None)

    @property
    def timing(self) -> "StepTiming":
        return self._local.timing

    @timing.setter
    def timing(self, value: "StepTiming") -> None:
        self._local.timing = value

    def load(self) -> None:
        dtype = resolve_dtype(self.config.dtype, self.device)
        t0 = time.perf_counter()
        self.pipe = self.adapter.load(dtype)
        self.features = build_features(self.adapter, self.config, self.device)
        if not any(f.places_model for f in self.features):
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._takes_step_callback = "callback_on_step_end" in inspect.signature(
            self.pipe.__call__).parameters
        self.adapter.on_load(self.pipe)
        self.denoisers = self.adapter.parallel_plan().denoiser_modules(self.pipe)
        # Under step batching, the features that wrap each call's denoiser calls go on after
        # the batcher's hook (so around it), the rest before: a cache's hooks then see the
        # batched forwards as they run, whatever their place in the order.
        outside = [f for f in self.features if self.batcher is not None and f.outside_batcher]
        for feature in self.features:
            if feature not in outside:
                feature.apply(self.pipe, self.groups)
        if self.batcher is not None:
            step_batching.install(self.denoisers, self.batcher)
        for feature in outside:
            feature.apply(self.pipe, self.groups)
        if self.batcher is not None:
            for feature in self.features:
                feature.use_batcher(self.batcher)
        self._install_timing()
        self._install_cancel_points()
        try:
            self.memory_dims = memory.ModelDims.from_model_dir(self.config.model, self.adapter,
                                                               self.spec, dtype.itemsize,
                                                               self.device.type)
        except ValueError as e:
            logger.warning("requests are not checked against free memory: %s", e)
        logger.info("rank %d loaded %s (%s, %s) in %.2fs", self.rank, self.spec.pipeline_class,
                    dtype, self.device, time.perf_counter() - t0)

    def _install_timing(self) -> None:
        """Times the denoising loop (from a denoiser's first call) and the VAE decoder, whose
        output must be finite."""
        def first_call(module, args):
            if self.timing.denoise_start is None:
                self.timing.denoise_start = time.perf_counter()

        def decode_start(module, args):
            self.timing.decode_start = time.perf_counter()

        def decode_end(module, args, out):
            self.timing.vae_s += time.perf_counter() - self.timing.decode_start
            check_finite(out, "the decoded image")

        for denoiser in self.denoisers:
            denoiser.register_forward_pre_hook(first_call)
        self.pipe.vae.decoder.register_forward_pre_hook(decode_start)
        self.pipe.vae.decoder.register_forward_hook(decode_end)

    @torch.inference_mode()
    def execute(self, batch: list[DiffusionRequest], progress: ProgressFn | None = None,
                partial: PartialFn | None = None) -> list[DiffusionOutput]:
        """Runs ``batch`` (requests of one batch key) as one pipeline call; as several in turn
        where the whole batch would not fit in memory, and refusing (400) each request whose
        estimated memory does not fit even alone."""
        runnable, outputs = self._loadable(batch)
        if runnable:
            calls, refused = self._plan_memory(runnable)
            for i, e in refused.items():
                outputs[runnable[i].request_id] = DiffusionOutput(runnable[i].request_id, error=e)
            try:
                for call in calls:  # one pipeline call each, in order (see memory.plan_batch)
                    outputs.update(self._run([runnable[i] for i in call], progress, partial))
            finally:
                self._running = []
        return [outputs[r.request_id] for r in batch]

    @torch.inference_mode()  # the calls' too: torch's modes are per thread, not per greenlet
    def execute_steps(self, batch: list[DiffusionRequest], progress: ProgressFn | None,
                      partial: PartialFn | None, emit, joins: queue.Queue, batch_id: str) -> None:
        """Step batching: runs ``batch`` and the requests that join it (``joins``: lists of
        requests; an empty list when the engine has no more) until all have finished, each
        pipeline call as a task of the batcher; ``emit`` gets each call's outputs as it
        finishes."""
        joined = step_batching.Joins(joins, batch_id, self.groups.world, self.device)

        def start(reqs: list[DiffusionRequest]) -> None:
            """Requests that arrive together with one batch key run as one pipeline call, as
            without step batching."""
            runnable, refused = self._loadable(reqs)
            if refused:
                emit(list(refused.values()))
            groups: dict[Any, list[DiffusionRequest]] = {}
            for req in runnable:
                # A step cache decides per call: each request its own, to skip as it would alone.
                key = (batch_key(self.adapter, req) if self.config.cache_backend == "none"
                       else None)
                groups.setdefault(req.request_id if key is None else key, []).append(req)
            for group in groups.values():
                calls, refused = self._plan_memory(group)
                if refused:
                    emit([DiffusionOutput(group[i].request_id, error=e)
                          for i, e in refused.items()])
                for call in calls:
                    reqs = [group[i] for i in call]
                    self.batcher.start(lambda reqs=reqs: self._run_call(reqs, progress, partial,
                                                                        emit))

        self.batcher.admit = lambda: start(joined.take(joined.agree(idle=False)))
        start(batch)
        try:
            while True:  # when no call runs, the next joins start (or it ends)
                self.batcher.run()
                n = joined.agree(idle=True)
                if n < 0:
                    return
                start(joined.take(n))
        finally:
            self.batcher.admit = None

    def _loadable(self, reqs: list[DiffusionRequest]
                  ) -> tuple[list[DiffusionRequest], dict[str, DiffusionOutput]]:
        """The requests that pass the checks needing the loaded pipeline, and the refusal of
        each other (the same answer on every rank: it depends on the request alone)."""
        runnable, refused = [], {}
        for req in reqs:
            try:
                self.adapter.check_loaded(self.pipe, req)
                runnable.append(req)
            except InvalidRequestError as e:
                refused[req.request_id] = DiffusionOutput(req.request_id, error=e)
        return runnable, refused

    def _run_call(self, reqs: list[DiffusionRequest], progress: ProgressFn | None,
                  partial: PartialFn | None, emit) -> None:
        """One pipeline call of step batching, in its task."""
        self.batcher.local.sizes = sizes = []
        self.batcher.local.requests = len(reqs)
        try:
            outs = self._run(reqs, progress, partial)
            for out in outs.values():
                if sizes:  # requests per denoiser forward it took part in, on average
                    out.metrics["batch_size"] = sum(sizes) / len(sizes)
        except BaseException as e:  # never lose a request
            outs = {r.request_id: DiffusionOutput(r.request_id, error=errors.GenerationError(
                f"generation failed: {type(e).__name__}: {e}")) for r in reqs}
        emit([outs[req.request_id] for req in reqs])

    # -- memory ----------------------------------------------------------------------------------
    def estimate_memory(self, reqs: list[DiffusionRequest]) -> memory.MemoryEstimate:
        """Peak memory beyond the loaded model of running ``reqs`` as one call (estimated)."""
        def uses_cfg(req):
            return self.adapter.uses_cfg(self.adapter.pipeline_kwargs(req))

        return memory.estimate(self.memory_dims, self.adapter, reqs, uses_cfg)

    def memory_limit(self) -> tuple[int, str]:
        """(bytes one call may take, what sets it), the same on every rank."""
        free, margin = memory.free_memory(self.device)
        world = self.groups.world.world_size
        if self.device.type == "cpu":
            free //= world  # every rank of this engine runs on this host and allocates its share
        where = (f"{'GPU memory' if self.device.type == 'cuda' else 'RAM'} free "
                 f"{'per rank ' if world > 1 and self.device.type == 'cpu' else ''}"
                 f"(after a {memory.format_bytes(margin)} safety margin)")
        if world > 1:  # ranks read slightly different numbers; all must decide alike
            t = torch.tensor([free], dtype=torch.int64, device=self.device)
            free = int(self.groups.world.all_reduce(t, op="min")[0])
        cap = self.config.max_request_memory
        if cap is not None and cap < free:
            return cap, "limit set by max_request_memory (--max-request-memory)"
        return free, where

    def _plan_memory(self, reqs: list[DiffusionRequest]
                     ) -> tuple[list[list[int]], dict[int, InvalidRequestError]]:
        """Which of ``reqs`` run in which call, and the refusal of each that cannot fit."""
        everything = [list(range(len(reqs)))]
        if self.memory_dims is None or self.config.max_request_memory == 0:
            return everything, {}
        limit, where = self.memory_limit()
        try:  # a request the estimate cannot describe runs as it would have without the check
            calls, refused = memory.plan_batch(
                len(reqs), lambda idx: self.estimate_memory([reqs[i] for i in idx]).total, limit)
            errors = {i: memory.too_large_error(reqs[i], lambda r: self.estimate_memory([r]),
                                                limit, where, self.adapter,
                                                self.spec.size_multiple) for i in refused}
        except Exception:  # the same on every rank: it depends on the requests and model alone
            logger.exception("memory estimate failed; running the batch unchecked")
            return everything, {}
        if len(calls) > 1:
            logger.info("batch of %d split into %d calls to fit %s", len(reqs), len(calls),
                        memory.format_bytes(limit))
        return calls, errors

    def _cancel_code(self, request_id: str) -> int:
        """0: run on; else 1 + the reason's index in ``CANCEL_REASONS``."""
        reason = self.cancelled.get(request_id) if self.cancelled is not None else None
        return 0 if reason is None else 1 + CANCEL_REASONS.index(reason)

    def _cancelled(self, ids: list[str]) -> list[int]:
        """Each request's cancel code, agreed by every rank."""
        flags = [self._cancel_code(rid) for rid in ids]
        if self.groups.world.world_size > 1:
            # Ranks read the flags at slightly different moments; all must stop at the same step.
            t = torch.tensor(flags, dtype=torch.int32, device=self.device)  # NCCL: on the GPU
            flags = self.groups.world.all_reduce(t, op="max").tolist()
        return flags

    def _install_cancel_points(self) -> None:
        """Lets a lone rank stop a cancelled request inside a step: before each transformer
        block and each piece of the VAE decoder, not only at step ends (one step or one decode
        of a large image can take minutes on a CPU). Ranks of a parallel group must stop
        together, so they stop at step ends only (the engine restarts them if that is late)."""
        if self.groups.world.world_size > 1 or self.cancelled is None:
            return

        def check(module, args):
            ids = self._running
            if ids and all(rid in self.cancelled for rid in ids):
                self.timing.cancelled = [self._cancel_code(rid) for rid in ids]
                raise RequestCancelled

        for module in cancel_points(self.denoisers, self.pipe.vae):
            module.register_forward_pre_hook(check)

    def _step_callback(self, reqs: list[DiffusionRequest],
                       progress: ProgressFn | None, partial: PartialFn | None):
        ids, total, timing = [r.request_id for r in reqs], reqs[0].num_inference_steps, self.timing
        previews = preview_steps(total, reqs[0].partial_images)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            timing.steps = step + 1
            check_finite(callback_kwargs["latents"], f"the latents after step {step + 1}")
            timing.denoise_end = time.perf_counter()
            if progress is not None:
                progress(ids, step + 1, total)
            if step in previews:  # every rank decodes: a patch-parallel VAE is collective
                images = self.adapter.preview(pipe, callback_kwargs["latents"], reqs)
                if partial is not None:
                    offset = 0
                    for req in reqs:
                        partial(req.request_id, previews.index(step), images[offset])
                        offset += req.num_images_per_prompt
            timing.cancelled = self._cancelled(ids)
            if all(timing.cancelled):  # a batch runs on while any of its requests is wanted
                raise RequestCancelled
            return callback_kwargs

        return on_step_end

    def _run(self, reqs: list[DiffusionRequest], progress: ProgressFn | None,
             partial: PartialFn | None = None) -> dict[str, DiffusionOutput]:
        t0 = time.perf_counter()
        self.timing = timing = StepTiming(cancelled=[0] * len(reqs))
        if self.batcher is None:  # the lone-rank cancel points stop the one call running
            self._running = [r.request_id for r in reqs]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ids = ", ".join(r.request_id for r in reqs)
        try:
            kwargs = (self.adapter.pipeline_kwargs(reqs[0]) if len(reqs) == 1
                      else self.adapter.batch_pipeline_kwargs(reqs))
            on_step = self._step_callback(reqs, progress, partial)
            pipe = self.adapter.pipeline_for(self.pipe, reqs)
            if self.batcher is not None:  # calls run side by side: state of their own
                pipe = step_batching.pipeline_view(pipe)
            follow_steps = contextlib.nullcontext()
            if self._takes_step_callback:
                kwargs["callback_on_step_end"] = on_step
            else:
                follow_steps = scheduler_steps(pipe, on_step)
            uses_cfg = self.adapter.uses_cfg(kwargs)
            self.groups.reset_counters()
            for feature in self.features:
                feature.prepare_call(reqs)
            for feature in self.features:
                feature.begin_request(reqs[0].num_inference_steps, uses_cfg)
            if self.batcher is not None:  # a step's CFG branches in one round (begin_call)
                self.batcher.begin_call(2 if uses_cfg and self.adapter.cfg_calls == "separate"
                                        and "cfg_parallel" in self.adapter.features
                                        and self.groups.cfg.world_size == 1 else 1)
            # Per-request generators, in image order: each image's noise is what it would be alone.
            generators = [g for r in reqs for g in make_generators(r.seed, r.num_images_per_prompt)]
            self.adapter.output_extra(self.pipe)  # drops what a failed earlier call left behind
            with follow_steps:
                images = self.adapter.artifacts(pipe(
                    **kwargs, generator=generators, output_type=reqs[0].output_type), reqs)
        except RequestCancelled:
            images = None
        except InvalidRequestError as e:
            return {r.request_id: DiffusionOutput(r.request_id, error=e) for r in reqs}
        except Exception as e:  # the worker survives a bad request or an OOM; the client is told
            if isinstance(e, NonFiniteError):
                logger.error("request(s) %s: %s", ids, e)
                error = errors.GenerationError(f"generation failed: {e}", code="non_finite_output")
            else:
                logger.error("request(s) %s failed:\n%s", ids, traceback.format_exc())
                error = errors.GenerationError(f"generation failed: {type(e).__name__}: {e}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {r.request_id: DiffusionOutput(r.request_id, metrics=self._metrics(t0),
                                                  error=error) for r in reqs}
        metrics = self._metrics(t0)
        if self.memory_dims is not None:
            with contextlib.suppress(Exception):  # logged by _plan_memory already
                metrics["estimated_memory_bytes"] = self.estimate_memory(reqs).total
        extra = self.adapter.output_extra(self.pipe) if images is not None else {}
        for feature in self.features if images is not None else ():
            metrics.update(feature.stats())
        outputs, offset = {}, 0
        for req, cancelled in zip(reqs, timing.cancelled):
            n = req.num_images_per_prompt
            mine = (self.adapter.flatten_output(list(images[offset:offset + n]))
                    if images is not None else [])
            offset += n
            if cancelled or images is None:
                reason = CANCEL_REASONS[max(cancelled, 1) - 1]
                error = errors.cancelled(reason, f"after {timing.steps} of "
                                                 f"{req.num_inference_steps} steps")
                logger.info("request %s %s", req.request_id, error)
                outputs[req.request_id] = DiffusionOutput(req.request_id, metrics=dict(metrics),
                                                          error=error)
            else:
                outputs[req.request_id] = DiffusionOutput(req.request_id, metrics=dict(metrics),
                                                          extra=extra).add(mine)
        return outputs

    def _metrics(self, t0: float) -> dict:
        t = self.timing
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:  # the worker process's peak resident memory (Linux reports KiB)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = {"execute_s": time.perf_counter() - t0, "steps_completed": t.steps,
             "denoise_s": t.denoise_s, "vae_s": t.vae_s, "peak_memory_bytes": peak}
        if t.denoise_start is not None:  # the scheduler adds the queue wait before it
            m["first_step_s"] = t.denoise_start - t0
        return m
