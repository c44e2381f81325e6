"""The engine core: schedule -> execute -> finish, in a loop.

``EngineCore`` is used in-process by the offline ``Omni`` and inside its own process
(``run_engine_core``) behind the API server, so both paths run the same code.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.request import (
    DiffusionOutput,
    DiffusionRequest,
    PartialFn,
    ProgressFn,
    RequestError,
)
from vllm_omni.engine.scheduler import Scheduler
from vllm_omni.executor.multiproc import MultiprocExecutor, WorkerDiedError
from vllm_omni.models.registry import load_model_spec
from vllm_omni.utils.proc import set_process_title, watch_parent

logger = logging.getLogger(__name__)

# How often an idle engine checks its workers (a dead one is restarted before the next request).
IDLE_POLL_S = 0.2


class EngineCore:
    def __init__(self, config: OmniEngineConfig):
        self.config = config
        adapter = load_model_spec(config.model).adapter
        self.scheduler = Scheduler(config.max_num_seqs, adapter.batch_key
                                   if config.max_num_seqs > 1 else None)
        self.executor: MultiprocExecutor | None = MultiprocExecutor(config)
        self.state = "ready"  # ready | restarting | dead
        self.needs_restart = False
        self._immediate: list[DiffusionOutput] = []

    @property
    def worker_pids(self) -> list[int]:
        return self.executor.pids if self.executor else []

    def add_request(self, request: DiffusionRequest) -> None:
        if self.state == "dead":
            self._immediate.append(_error(request, 503, "the engine is not running: its workers "
                                          "died and could not be restarted"))
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
             on_partial: PartialFn | None = None) -> list[DiffusionOutput]:
        """Runs one batch. ``poll`` is called while it runs, to take new requests and aborts."""
        self.check_workers()
        if self.needs_restart:
            self.restart()
        outputs, self._immediate = self._immediate, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        try:
            results = self.executor.execute(batch, on_progress, poll, on_partial)
        except WorkerDiedError as e:
            logger.error("%s; failing %d in-flight request(s) and restarting workers", e, len(batch))
            cancelled = self.executor.cancelled
            results = [_cancelled(r, cancelled[r.request_id], "and its workers were restarted")
                       if r.request_id in cancelled else _error(r, 500, f"generation failed: {e}")
                       for r in batch]
            # Answer the failed requests first; the (slow) restart happens on the next step.
            self.needs_restart = True
        return outputs + self.scheduler.finish(batch, results)

    def restart(self) -> None:
        self.needs_restart = False
        self.state = "restarting"
        if self.executor is not None:
            self.executor.shutdown(timeout=2.0)
            self.executor = None
        try:
            self.executor = MultiprocExecutor(self.config)
            self.state = "ready"
            logger.info("workers restarted")
        except Exception as e:
            logger.error("could not restart workers: %s", e)
            self.state = "dead"
            for req in self.scheduler.drain():
                self._immediate.append(_error(req, 503, f"the engine could not restart its workers: {e}"))

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


def _error(req: DiffusionRequest, status: int, message: str) -> DiffusionOutput:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return DiffusionOutput(req.request_id, error=RequestError(status, message, kind))


def _cancelled(req: DiffusionRequest, reason: str, when: str) -> DiffusionOutput:
    return DiffusionOutput(req.request_id, error=RequestError.cancelled(reason, when))


def run_engine_core(config: OmniEngineConfig, in_queue, out_queue) -> None:
    """Engine core process. In: ("add", req) | ("abort", id, reason) | ("shutdown",).
    Out: ("ready", pids) | ("startup_failed", text) | ("output", out) |
    ("partial", id, index, image) | ("status", state, pids)."""
    set_process_title("engine_core")
    logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"),
                        format="%(levelname)s %(asctime)s [engine_core] %(message)s")
    watch_parent()  # the API server died: exit; our workers then exit by the same watch
    try:
        core = EngineCore(config)
    except Exception as e:
        out_queue.put(("startup_failed", str(e)))
        return
    out_queue.put(("ready", core.worker_pids))

    class Shutdown(Exception):
        pass

    def handle(msg) -> None:
        if msg[0] == "add":
            core.add_request(msg[1])
        elif msg[0] == "abort":
            core.abort_request(msg[1], msg[2])
        elif msg[0] == "shutdown":
            raise Shutdown

    def poll() -> None:
        """Takes everything queued so far (while a batch runs, too: aborts reach it)."""
        while True:
            try:
                msg = in_queue.get_nowait()
            except queue.Empty:
                return
            handle(msg)

    def partial(request_id, index, image) -> None:
        out_queue.put(("partial", request_id, index, image))

    try:
        while True:
            if not core.has_work() and core.check_workers():
                try:
                    handle(in_queue.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    continue
            poll()
            if core.needs_restart:
                out_queue.put(("status", "restarting", []))
                core.restart()
                out_queue.put(("status", core.state, core.worker_pids))
            for out in core.step(poll=poll, on_partial=partial):
                out_queue.put(("output", out))
    except Shutdown:
        pass
    finally:
        core.shutdown()
