"""Runs one worker process per rank and turns their messages into results or errors.

Every wait here is bounded and checks that the workers are still alive, so a dead worker becomes
a ``WorkerDiedError`` within ``POLL_S`` instead of a hang.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.request import (
    CANCEL_CODES,
    DiffusionOutput,
    DiffusionRequest,
    PartialFn,
    ProgressFn,
)
from vllm_omni.utils.proc import start_process
from vllm_omni.worker.worker import worker_main

logger = logging.getLogger(__name__)

POLL_S = 0.2
MAX_BATCH = 256  # cancel-flag slots; far above any useful --max-num-seqs


class WorkerDiedError(RuntimeError):
    pass


# After a rank reports a failed request, how long its peers get to finish before the parallel
# group is declared out of step and the workers are restarted.
DESYNC_GRACE_S = float(os.environ.get("VLLM_OMNI_DESYNC_GRACE_S", "30"))


class WorkerStartupError(RuntimeError):
    pass


def worker_context():
    """Workers are forked from a fork server that has preloaded the heavy imports.

    Forking the engine itself would copy its threads and any CUDA state; the fork server is a
    fresh single-threaded process (started on first use, gone when its parent goes), and a
    worker whose fork server exits sees its parent change and exits too. The fork server keeps
    the environment it started with, so each worker is handed the engine's current one.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["vllm_omni.worker.preload"])
    return ctx


class MultiprocExecutor:
    def __init__(self, config: OmniEngineConfig):
        self.config = config
        ctx = worker_context()
        self.result_queue = ctx.Queue()
        self.work_queues = [ctx.Queue() for _ in range(config.world_size)]
        # A file rendezvous, not a TCP port: a port picked free here can be taken by another
        # engine starting at the same moment (two servers on one machine collided this way).
        self._rendezvous = tempfile.mkdtemp(prefix="vllm_omni_dist_")
        init_method = f"file://{os.path.join(self._rendezvous, 'store')}"
        # One flag per batch slot, shared with every rank: set to cancel that request, which the
        # ranks agree on at their next step end.
        self.cancel_flags = ctx.RawArray("b", MAX_BATCH)
        # Each rank's last heartbeat (time.monotonic, which is system-wide on Linux), written
        # by a thread of the worker every HEARTBEAT_S, also while it computes.
        self.heartbeats = ctx.RawArray("d", [time.monotonic()] * config.world_size)
        self.running: list[str] = []
        self.cancelled: dict[str, str] = {}  # running request id -> why it was cancelled
        self._stop_by: float | None = None  # when a fully cancelled batch must have stopped
        self.workers = []
        for rank in range(config.world_size):
            p = ctx.Process(
                target=worker_main, name=f"vllm_omni_worker{rank}", daemon=True,
                args=(rank, config, init_method, self.work_queues[rank], self.result_queue,
                      self.cancel_flags, self.heartbeats, dict(os.environ)),
            )
            start_process(p)
            self.workers.append(p)
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def _dead_worker(self) -> str | None:
        for rank, p in enumerate(self.workers):
            if not p.is_alive():
                return f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def unhealthy(self) -> str | None:
        """Why the workers cannot serve (one exited, or stopped beating), or None."""
        dead = self._dead_worker()
        if dead:
            return dead
        now, limit = time.monotonic(), self.config.heartbeat_timeout_s
        for rank, beat in enumerate(self.heartbeats):
            if now - beat > limit:
                return (f"worker rank {rank} (pid {self.workers[rank].pid}) sent no heartbeat "
                        f"for {now - beat:.0f}s (limit {limit:g}s): stopped or hung")
        return None

    def _recv(self, deadline: float | None = None, poll: Callable[[], None] | None = None):
        while True:
            try:
                return self.result_queue.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if poll is not None:
                poll()
            why = self.unhealthy()
            if why:
                raise WorkerDiedError(why)
            if self._stop_by is not None and time.monotonic() > self._stop_by:
                raise WorkerDiedError(
                    f"the workers did not stop within {self.config.cancel_grace_s:g}s of the "
                    "request being cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for workers")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.load_timeout_s
        ready: set[int] = set()
        while len(ready) < len(self.workers):
            try:
                msg = self._recv(deadline)
            except WorkerDiedError as e:
                # A worker that failed to load reports why before exiting; prefer that message.
                try:
                    msg = self.result_queue.get(timeout=1.0)
                except queue.Empty:
                    raise WorkerStartupError(f"{e} while loading the model") from None
            except TimeoutError:
                raise WorkerStartupError(
                    f"workers did not load the model within {self.config.load_timeout_s:.0f}s"
                ) from None
            if msg[0] == "load_error":
                raise WorkerStartupError(f"worker rank {msg[1]} failed to load the model:\n{msg[2]}")
            if msg[0] == "ready":
                ready.add(msg[1])

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stops a running request at its next step end (alone on one rank: at its next block
        or decode tile); False if it is not running. Once every request of the batch is
        cancelled, the workers have ``cancel_grace_s`` to stop before they are restarted."""
        if request_id not in self.running:
            return False
        self.cancel_flags[self.running.index(request_id)] = CANCEL_CODES[reason]
        self.cancelled[request_id] = reason
        if self._stop_by is None and set(self.running) <= set(self.cancelled):
            self._stop_by = time.monotonic() + self.config.cancel_grace_s
        return True

    def execute(self, batch: list[DiffusionRequest], on_progress: ProgressFn | None = None,
                poll: Callable[[], None] | None = None,
                on_partial: PartialFn | None = None) -> list[DiffusionOutput]:
        """Runs ``batch`` on every rank; ``poll`` is called while waiting (to take aborts)."""
        if len(batch) > MAX_BATCH:
            raise ValueError(f"batch of {len(batch)} exceeds {MAX_BATCH}")
        for i in range(len(batch)):
            self.cancel_flags[i] = 0
        self.running = [r.request_id for r in batch]
        self.cancelled, self._stop_by = {}, None
        try:
            return self._execute(batch, on_progress, poll, on_partial)
        finally:
            self.running, self._stop_by = [], None

    def _execute(self, batch, on_progress, poll, on_partial) -> list[DiffusionOutput]:
        # Progress costs a queue message per step; only ask for it when someone listens.
        for q in self.work_queues:
            q.put(("execute", batch, on_progress is not None))
        outputs, done, failed = None, set(), []
        deadline = None
        while outputs is None or len(done) < len(self.workers):
            try:
                msg = self._recv(deadline, poll)
            except TimeoutError:
                stuck = sorted(set(range(len(self.workers))) - done)
                raise WorkerDiedError(
                    f"rank(s) {failed} failed mid-request and rank(s) {stuck} did not finish within "
                    f"{DESYNC_GRACE_S:.0f}s (blocked in a collective with the failed rank)") from None
            if msg[0] == "result":
                outputs = msg[1]
            elif msg[0] == "done":
                done.add(msg[1])
                if msg[2]:
                    failed.append(msg[1])
            elif msg[0] == "progress" and on_progress is not None:
                on_progress(msg[1], msg[2], msg[3])
            elif msg[0] == "partial" and on_partial is not None:
                on_partial(msg[1], msg[2], msg[3])
            if poll is not None:
                poll()
            if failed and deadline is None and len(self.workers) > 1:
                deadline = time.monotonic() + DESYNC_GRACE_S
        return outputs

    def shutdown(self, timeout: float = 5.0) -> None:
        for q, p in zip(self.work_queues, self.workers):
            if p.is_alive():
                try:
                    q.put(("shutdown",))
                except (ValueError, OSError):
                    pass
        deadline = time.monotonic() + timeout
        for p in self.workers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for q in [*self.work_queues, self.result_queue]:
            q.cancel_join_thread()
            q.close()
        shutil.rmtree(self._rendezvous, ignore_errors=True)
