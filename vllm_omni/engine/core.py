"""The engine core: schedule -> execute -> finish, in a loop.

``EngineCore`` is used in-process by the offline ``Omni`` and inside its own process
(``run_engine_core``) behind the API server, so both paths run the same code.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
from collections.abc import Callable

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine import errors
from vllm_omni.engine.errors import EngineDeadError, WorkerDiedError
from vllm_omni.engine import messages as m
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest, PartialFn, ProgressFn
from vllm_omni.engine.scheduler import Scheduler
from vllm_omni.executor.base import Executor
from vllm_omni.models.registry import load_model_spec
from vllm_omni.utils.proc import set_process_title, watch_parent

logger = logging.getLogger(__name__)

# How often an idle engine checks its workers (a dead one is restarted before the next request).
IDLE_POLL_S = 0.2


def batch_key(adapter, req):
    """The adapter's key plus the request's LoRA adapters: one call runs one adapter set."""
    key = adapter.batch_key(req)
    return None if key is None else (key, req.loras)


class EngineCore:
    def __init__(self, config: OmniEngineConfig):
        self.config = config
        adapter = load_model_spec(config.model).adapter
        self.scheduler = Scheduler(config.max_num_seqs, functools.partial(batch_key, adapter)
                                   if config.max_num_seqs > 1 and not config.step_batching
                                   else None)
        self.executor_class = Executor.get_class(config.distributed_executor_backend)
        self.executor: Executor | None = self.executor_class(config)
        self.state = "ready"  # ready | restarting | dead
        self.needs_restart = False
        self._immediate: list[DiffusionOutput] = []

    @property
    def worker_pids(self) -> list[int]:
        return self.executor.pids if self.executor else []

    def add_request(self, request: DiffusionRequest) -> None:
        if self.state == "dead":
            self._immediate.append(_failed(request, EngineDeadError(
                "the engine is not running: its workers died and could not be restarted")))
            return
        self.scheduler.add(request)

    def abort_request(self, request_id: str, reason: str = "cancelled") -> bool:
        """Drops a waiting request, or stops a running one at its next step end. ``reason``:
        "cancelled" (the client left) or "timeout" (its deadline passed)."""
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._immediate.append(_cancelled(req, reason, "before it started"))
            return True
        return self.executor is not None and self.executor.cancel(request_id, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_waiting() or bool(self._immediate)

    def check_workers(self) -> bool:
        """Whether the workers can serve; if not, they are restarted before the next batch
        (called while idle too, so no request that arrives afterwards is lost)."""
        if self.executor is None or self.needs_restart:
            return not self.needs_restart
        why = self.executor.unhealthy()
        if why:
            logger.error("%s; restarting workers", why)
            self.needs_restart = True
        return why is None

    def step(self, on_progress: ProgressFn | None = None,
             poll: Callable[[], None] | None = None,
             on_partial: PartialFn | None = None,
             on_output: Callable[[DiffusionOutput], None] | None = None
             ) -> list[DiffusionOutput]:
        """Runs one batch. ``poll`` is called while it runs, to take new requests and aborts.
        With step batching the batch runs on as long as requests arrive, each output going to
        ``on_output`` (if given) as its request finishes."""
        self.check_workers()
        if self.needs_restart:
            self.restart()
        outputs, self._immediate = self._immediate, []
        if self.config.step_batching:
            batch = self.scheduler.take(self.config.max_num_seqs)
            return outputs + (self._run_steps(batch, on_progress, poll, on_partial, on_output)
                              if batch else [])
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        try:
            results = self.executor.execute(batch, on_progress, poll, on_partial)
        except WorkerDiedError as e:
            results = self._workers_died(e, batch)
        return outputs + self.scheduler.finish(batch, results)

    def _workers_died(self, e: Exception, reqs: list[DiffusionRequest]
                      ) -> list[DiffusionOutput]:
        """The answers to the requests in flight when the workers died (those cancelled: as
        such). Answered first; the (slow) restart happens on the next step."""
        logger.error("%s; failing %d in-flight request(s) and restarting workers", e, len(reqs))
        self.needs_restart = True
        cancelled = self.executor.cancelled
        return [_cancelled(r, cancelled[r.request_id], "and its workers were restarted")
                if r.request_id in cancelled
                else _failed(r, WorkerDiedError(f"generation failed: {e}")) for r in reqs]

    def _run_steps(self, batch: list[DiffusionRequest], on_progress, poll, on_partial,
                   on_output) -> list[DiffusionOutput]:
        """Step batching: keeps ``max_num_seqs`` requests in flight in one ``execute`` call,
        topping it up from the queue as requests finish, until the queue is empty."""
        running = {r.request_id: r for r in batch}
        done: list[DiffusionOutput] = []
        sealed = False

        def top_up() -> None:
            nonlocal sealed
            if sealed:
                return
            room = self.config.max_num_seqs - len(running)
            if room > 0 and self.scheduler.has_waiting():
                more = self.scheduler.take(room)
                running.update((r.request_id, r) for r in more)
                self.executor.join(more)
            elif not running:
                sealed = True
                self.executor.seal()

        def output(out: DiffusionOutput) -> None:
            req = running.pop(out.request_id, None)
            if req is None:
                return
            self.scheduler.finish([req], [out])
            if on_output is not None:
                on_output(out)
            else:
                done.append(out)

        def poll_and_top_up() -> None:  # after every message from the workers, and while idle
            if poll is not None:
                poll()
            top_up()

        try:
            self.executor.execute(batch, on_progress, poll_and_top_up, on_partial, output)
        except Exception as e:  # a dead worker, or a failure of the step loop itself
            sealed = True  # nothing joins a call that is over
            for out in self._workers_died(e, list(running.values())):
                output(out)
        return done

    def restart(self) -> None:
        self.needs_restart = False
        self.state = "restarting"
        if self.executor is not None:
            self.executor.shutdown(timeout=2.0)
            self.executor = None
        try:
            self.executor = self.executor_class(self.config)
            self.state = "ready"
            logger.info("workers restarted")
        except Exception as e:
            logger.error("could not restart workers: %s", e)
            self.state = "dead"
            for req in self.scheduler.drain():
                self._immediate.append(_failed(req, EngineDeadError(
                    f"the engine could not restart its workers: {e}")))

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


def _failed(req: DiffusionRequest, error: errors.OmniError) -> DiffusionOutput:
    return DiffusionOutput(req.request_id, error=error)


def _cancelled(req: DiffusionRequest, reason: str, when: str) -> DiffusionOutput:
    return DiffusionOutput(req.request_id, error=errors.cancelled(reason, when))


def run_engine_core(config: OmniEngineConfig | None, in_queue, out_queue,
                    forked: bool = False) -> None:
    """Engine core process. In: (``Configure`` first when ``config`` is None) then
    ``AddRequest`` | ``AbortRequest`` | ``Shutdown``. Out: ``EngineReady`` or
    ``EngineStartupFailed``, then ``DiffusionOutput``, ``Progress``, ``PartialImage`` and
    ``EngineStatus`` (see engine/messages.py). ``forked``: this process is a fork of the API
    server (``EngineCoreProcess``), with one thread until ``watch_parent``."""
    set_process_title("engine_core")
    logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"), force=True,
                        format="%(levelname)s %(asctime)s [engine_core] %(message)s")
    if config is None or (forked and config.distributed_executor_backend == "mp"):
        # Started early: the workers' fork server imports torch and diffusers while the API
        # server is still parsing its flags. Before any thread of ours, so that it may fork.
        from vllm_omni.executor.multiproc import start_fork_server

        try:
            start_fork_server(fork=forked)
        except Exception as e:  # the first worker starts it then; only the head start is lost
            logger.warning("could not start the fork server early: %s", e)
    watch_parent()  # the API server died: exit; our workers then exit by the same watch
    if config is None:
        msg = in_queue.get()
        if not isinstance(msg, m.Configure):
            return  # Shutdown: the server did not start after all
        config = msg.config
    if config.parallel.data_parallel_size > 1:
        set_process_title(f"engine_core_dp{config.parallel.data_parallel_rank}")
    try:
        core = EngineCore(config)
    except Exception as e:
        out_queue.put(m.EngineStartupFailed(str(e)))
        return
    out_queue.put(m.EngineReady(core.worker_pids))

    class Stop(Exception):
        pass

    def handle(msg) -> None:
        if isinstance(msg, m.AddRequest):
            core.add_request(msg.request)
        elif isinstance(msg, m.AbortRequest):
            core.abort_request(msg.request_id, msg.reason)
        elif isinstance(msg, m.Shutdown):
            raise Stop

    def poll() -> None:
        """Takes everything queued so far (while a batch runs, too: aborts reach it)."""
        while True:
            try:
                msg = in_queue.get_nowait()
            except queue.Empty:
                return
            handle(msg)

    def progress(ids, step, total) -> None:
        out_queue.put(m.Progress(ids, step, total))

    def partial(request_id, index, image) -> None:
        out_queue.put(m.PartialImage(request_id, index, image))

    try:
        while True:
            if not core.has_work() and core.check_workers():
                try:
                    handle(in_queue.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    continue
            poll()
            if core.needs_restart:
                out_queue.put(m.EngineStatus("restarting"))
                core.restart()
                out_queue.put(m.EngineStatus(core.state, core.worker_pids))
            for out in core.step(progress, poll=poll, on_partial=partial,
                                 on_output=out_queue.put):
                out_queue.put(out)
    except Stop:
        pass
    finally:
        core.shutdown()
