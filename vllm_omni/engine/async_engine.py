"""The API server's handle on the engine core process.

Requests go in through a queue; one thread reads the core's outputs and resolves the matching
asyncio futures. If the core process disappears, every pending request is failed at once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.core import run_engine_core
from vllm_omni.engine.errors import EngineDeadError
from vllm_omni.engine import messages as m
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest
from vllm_omni.utils.proc import start_process

logger = logging.getLogger(__name__)


class EngineStartupError(RuntimeError):
    pass


class _Listeners(NamedTuple):
    loop: asyncio.AbstractEventLoop
    on_partial: Callable[[int, Any], None] | None
    on_progress: Callable[[int, int], None] | None


def _fork_safe() -> bool:
    """No thread of ours to copy half-way, and no CUDA context, which a fork cannot use."""
    import sys

    torch = sys.modules.get("torch")
    return threading.active_count() == 1 and not (torch and torch.cuda.is_initialized())


class EngineCoreProcess:
    """The engine core process, started before its config is known (``start()``, then
    ``AsyncOmniEngine(config, core)``): its workers' fork server then imports torch and diffusers
    while the API server is still importing vLLM's argument parser, seconds of each."""

    def __init__(self, config: OmniEngineConfig | None = None, fork: bool = False):
        """``fork``: a fork of this process, not a fresh interpreter, so that the core and its
        workers' fork server inherit what this process has imported (vLLM and torch: ~10 s of
        CPU each time). Only from a process whose one thread is the caller's."""
        fork = fork and _fork_safe()
        ctx = mp.get_context("fork" if fork else "spawn")
        if fork:  # one resource tracker, this process's, as a spawned core would share it
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        self.in_queue, self.out_queue = ctx.Queue(), ctx.Queue()
        # Not a daemon: the core starts worker processes of its own.
        self.proc = ctx.Process(target=run_engine_core, name="vllm_omni_engine_core",
                                args=(config, self.in_queue, self.out_queue, fork))
        start_process(self.proc)
        self.claimed = config is not None

    @classmethod
    def start(cls) -> "EngineCoreProcess":
        """At the start of ``vllm serve``, which has imported vLLM and started no thread."""
        return cls(None, fork=True)

    def configure(self, config: OmniEngineConfig) -> None:
        assert not self.claimed, "an engine core serves one engine"
        self.claimed = True
        self.in_queue.put(m.Configure(config))

    def stop(self) -> None:
        """For a core never configured (the server did not start): it and its fork server go."""
        if self.claimed:
            return
        self.claimed = True
        self.in_queue.put(m.Shutdown())
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)


class AsyncOmniEngine:
    def __init__(self, config: OmniEngineConfig,
                 on_output: Callable[[DiffusionOutput], None] | None = None,
                 core: EngineCoreProcess | None = None):
        """``core``: one started early (``EngineCoreProcess.start``); default: a new one."""
        self.config = config
        # Sees every engine output, also those of requests nobody waits for any more (metrics).
        self.on_output = on_output
        if core is None:
            core = EngineCoreProcess(config)
        elif not core.claimed:
            core.configure(config)
        self._in, self._out, self._proc = core.in_queue, core.out_queue, core.proc
        self.state = "starting"
        self.worker_pids: list[int] = []
        self._pending: dict[str, asyncio.Future] = {}
        # Request id -> its live listeners (run on its event loop).
        self._listeners: dict[str, _Listeners] = {}
        self._abort_reasons: dict[str, str] = {}  # set_abort_reason(), before the wait is cancelled
        self._lock = threading.Lock()
        self._closed = False
        self._wait_ready()
        self._reader = threading.Thread(target=self._read_outputs, name="engine-output", daemon=True)
        self._reader.start()

    @property
    def replicas(self) -> list["AsyncOmniEngine"]:
        """The data-parallel replicas (``DataParallelEngine`` has several)."""
        return [self]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.load_timeout_s + 60
        while True:
            try:
                msg = self._out.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise EngineStartupError(
                        f"engine core exited with code {self._proc.exitcode} during startup")
                if time.monotonic() > deadline:
                    self.shutdown()
                    raise EngineStartupError("engine core did not start in time")
                continue
            if isinstance(msg, m.EngineStartupFailed):
                self._proc.join(5)
                raise EngineStartupError(msg.message)
            if isinstance(msg, m.EngineReady):
                self.worker_pids = msg.worker_pids
                self.state = "ready"
                return

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self._proc.is_alive()

    async def generate(self, request: DiffusionRequest,
                       on_partial: Callable[[int, Any], None] | None = None,
                       on_progress: Callable[[int, int], None] | None = None) -> DiffusionOutput:
        """The request's output; ``on_partial(index, image)`` gets its previews (streaming),
        ``on_progress(step, total)`` its denoising progress; both run on the caller's loop."""
        if self.state == "dead" or self._closed:
            return DiffusionOutput(request.request_id,
                                   error=EngineDeadError("the engine is not running"))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._pending[request.request_id] = fut
            if on_partial is not None or on_progress is not None:
                self._listeners[request.request_id] = _Listeners(loop, on_partial, on_progress)
        self._in.put(m.AddRequest(request))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._lock:
                self._pending.pop(request.request_id, None)
            self._in.put(m.AbortRequest(request.request_id,
                                      self._abort_reasons.get(request.request_id, "cancelled")))
            raise
        finally:
            with self._lock:
                self._listeners.pop(request.request_id, None)
            self._abort_reasons.pop(request.request_id, None)  # also if it finished first

    def set_abort_reason(self, request_id: str, reason: str) -> None:
        """Why the request's ``generate`` is about to be cancelled ("timeout" or "cancelled"),
        so the engine can count and answer it as such."""
        self._abort_reasons[request_id] = reason

    def _resolve(self, out: DiffusionOutput) -> None:
        with self._lock:
            fut = self._pending.pop(out.request_id, None)
        if fut is not None:
            fut.get_loop().call_soon_threadsafe(_set_result, fut, out)

    def _read_outputs(self) -> None:
        while not self._closed:
            try:
                msg = self._out.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    self._core_died()
                    return
                continue
            except (EOFError, OSError):
                self._core_died()
                return
            if isinstance(msg, DiffusionOutput):
                if self.on_output is not None:
                    try:
                        self.on_output(msg)
                    except Exception:
                        logger.exception("output observer failed")
                self._resolve(msg)
            elif isinstance(msg, m.PartialImage):
                self._notify(msg.request_id, "on_partial", msg.index, msg.image)
            elif isinstance(msg, m.Progress):
                for rid in msg.request_ids:
                    self._notify(rid, "on_progress", msg.step, msg.total)
            elif isinstance(msg, m.EngineStatus):
                self.state, self.worker_pids = msg.state, msg.worker_pids or self.worker_pids
                logger.info("engine state: %s", self.state)

    def _notify(self, request_id: str, which: str, *args) -> None:
        with self._lock:
            listeners = self._listeners.get(request_id)
        callback = getattr(listeners, which, None)
        if callback is not None:
            listeners.loop.call_soon_threadsafe(callback, *args)

    def _core_died(self) -> None:
        if self._closed:
            return
        self.state = "dead"
        logger.error("engine core process exited (code %s)", self._proc.exitcode)
        with self._lock:
            pending, self._pending = self._pending, {}
        for rid, fut in pending.items():
            fut.get_loop().call_soon_threadsafe(_set_result, fut, DiffusionOutput(
                rid, error=EngineDeadError("the engine core process died")))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._in.put(m.Shutdown())
        except (ValueError, OSError):
            pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)
        for q in (self._in, self._out):
            q.cancel_join_thread()
            q.close()


def _set_result(fut: asyncio.Future, out: DiffusionOutput) -> None:
    if not fut.done():
        fut.set_result(out)
