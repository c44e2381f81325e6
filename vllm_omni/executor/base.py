"""What the engine core needs from the workers, whatever runs them (vLLM's
``--distributed-executor-backend``): processes on this host (``mp``), later Ray actors."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.messages import Cancel
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest, PartialFn, ProgressFn

BACKENDS = ("mp",)


def check_backend(backend: str) -> None:
    """Refuses a backend this release does not have (the config's check, and the class lookup's)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed_executor_backend {backend!r} is not available in this "
                         f"release of vllm_omni; use {' or '.join(BACKENDS)} (worker processes "
                         "on this host)")


class WorkerStartupError(RuntimeError):
    pass


class Executor(ABC):
    """Runs the world's ranks. Every wait is bounded: a dead or hung worker surfaces as a
    ``WorkerDiedError``, never a hang."""

    config: OmniEngineConfig
    running: list[str] = []  # the ids of the batch being executed
    stop_by: float | None = None  # when a fully cancelled batch must have stopped
    # Running request id -> why it was cancelled (the engine answers it as such if the workers
    # die before they stop).
    cancelled: dict[str, str] = {}

    @staticmethod
    def get_class(backend: str) -> type["Executor"]:
        check_backend(backend)
        from vllm_omni.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None, poll: Callable[[], None] | None = None,
                       on_progress: ProgressFn | None = None,
                       on_partial: PartialFn | None = None) -> list[Any]:
        """``Worker.<method>(*args, **kwargs)`` on every rank; their results by rank."""

    def execute(self, batch: list[DiffusionRequest], on_progress: ProgressFn | None = None,
                poll: Callable[[], None] | None = None,
                on_partial: PartialFn | None = None) -> list[DiffusionOutput]:
        """Runs ``batch`` on every rank; ``poll`` is called while waiting (to take aborts)."""
        self.running, self.cancelled, self.stop_by = [r.request_id for r in batch], {}, None
        try:
            # Progress costs a message per step; only ask for it when someone listens.
            return self.collective_rpc("execute", (batch, on_progress is not None), poll=poll,
                                       on_progress=on_progress, on_partial=on_partial)[0]
        finally:
            self.running, self.stop_by = [], None

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stops a running request at its next cancel point (alone on one rank: at its next
        block or decode layer; in a group: at the next step end, where the ranks agree); False
        if it is not running. Once every request of the batch is cancelled, the workers have
        ``cancel_grace_s`` to stop before they count as hung."""
        if request_id not in self.running:
            return False
        self.cancelled[request_id] = reason
        self.send_all(Cancel(request_id, reason))
        if self.stop_by is None and set(self.running) <= set(self.cancelled):
            self.stop_by = time.monotonic() + self.config.cancel_grace_s
        return True

    @abstractmethod
    def send_all(self, msg: Any) -> None:
        """Delivers ``msg`` to every rank, also while they compute."""

    @abstractmethod
    def unhealthy(self) -> str | None:
        """Why the workers cannot serve (one exited or stopped answering), or None."""

    @property
    @abstractmethod
    def pids(self) -> list[int]:
        """The worker processes (on this host), for operators and tests."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        pass
