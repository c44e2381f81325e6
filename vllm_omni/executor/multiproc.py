"""The ``mp`` executor: one worker process per rank on this host.

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
from typing import Any

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.errors import WorkerDiedError
from vllm_omni.engine import messages as m
from vllm_omni.executor.base import Executor, WorkerStartupError
from vllm_omni.utils.proc import set_process_title, start_process
from vllm_omni.worker.worker import worker_main

logger = logging.getLogger(__name__)

POLL_S = 0.2


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


def start_fork_server(fork: bool = False) -> None:
    """Starts the fork server now rather than at the first worker (it preloads for seconds).

    ``fork``: as a fork of this process, which then must have no thread but the caller's; it
    inherits the modules imported here and imports only the rest. Otherwise (and where the
    standard library's fork server is not the one this knows) a fresh interpreter."""
    from multiprocessing import forkserver

    worker_context()
    if fork:
        _fork_fork_server(forkserver._forkserver)
    forkserver.ensure_running()


def _fork_fork_server(server) -> None:
    """``ForkServer.ensure_running`` (Python 3.10-3.12), with ``os.fork`` where it starts a
    fresh interpreter: the same listener, "alive" pipe and ``forkserver.main`` loop."""
    import socket
    from multiprocessing import connection, forkserver, resource_tracker

    fields = ("_lock", "_forkserver_pid", "_forkserver_address", "_forkserver_alive_fd",
              "_preload_modules")
    if not all(hasattr(server, f) for f in fields) or hasattr(server, "_forkserver_authkey"):
        return
    resource_tracker.ensure_running()
    with server._lock:
        if server._forkserver_pid is not None:
            return
        address = connection.arbitrary_address("AF_UNIX")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        keep = {0, 1, 2, listener.fileno(), alive_r}
        pid = os.fork()
        if pid == 0:  # the fork server: nothing of the engine's open but its streams
            code = 1
            try:
                set_process_title("worker_fork_server")
                for fd in map(int, os.listdir("/proc/self/fd")):
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                forkserver.main(listener.fileno(), alive_r, server._preload_modules)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0
            finally:
                os._exit(code)
        os.close(alive_r)
        listener.close()
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid


class MultiprocExecutor(Executor):
    def __init__(self, config: OmniEngineConfig):
        super().__init__(config)
        ctx = worker_context()
        self.result_queue = ctx.Queue()
        self.work_queues = [ctx.Queue() for _ in range(config.world_size)]
        # A file rendezvous, not a TCP port: a port picked free here can be taken by another
        # engine starting at the same moment (two servers on one machine collided this way).
        self._rendezvous = tempfile.mkdtemp(prefix="vllm_omni_dist_")
        init_method = f"file://{os.path.join(self._rendezvous, 'store')}"
        # Each rank's last heartbeat (time.monotonic, which is system-wide on Linux), written
        # by a thread of the worker every HEARTBEAT_S, also while it computes.
        self.heartbeats = ctx.RawArray("d", [time.monotonic()] * config.world_size)
        self.workers = []
        for rank in range(config.world_size):
            p = ctx.Process(
                target=worker_main, name=f"vllm_omni_worker{rank}", daemon=True,
                args=(rank, config, init_method, self.work_queues[rank], self.result_queue,
                      self.heartbeats, dict(os.environ)),
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

    def unhealthy(self) -> str | None:
        for rank, p in enumerate(self.workers):
            if not p.is_alive():
                return f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
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
            self._check(deadline, poll)

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
            if isinstance(msg, m.WorkerLoadFailed):
                raise WorkerStartupError(
                    f"worker rank {msg.rank} failed to load the model:\n{msg.traceback}")
            if isinstance(msg, m.WorkerReady):
                ready.add(msg.rank)

    def send_all(self, msg: Any) -> None:
        for q in self.work_queues:
            q.put(msg)

    def _post(self, call: m.CollectiveRpc) -> None:
        self.send_all(call)

    def shutdown(self, timeout: float = 5.0) -> None:
        for q, p in zip(self.work_queues, self.workers):
            if p.is_alive():
                try:
                    q.put(m.Shutdown())
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
