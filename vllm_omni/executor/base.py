"""What the engine core needs from the workers, whatever runs them (vLLM's
``--distributed-executor-backend``): processes on this host (``mp``) or Ray actors placed
across a cluster (``ray``)."""

from __future__ import annotations

import importlib.util
import itertools
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine import messages as m
from vllm_omni.engine.errors import WorkerDiedError
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest, PartialFn, ProgressFn

BACKENDS = ("mp", "ray")

# After a rank reports a failed call, how long its peers get to finish before the parallel
# group is declared out of step and the workers are restarted.
DESYNC_GRACE_S = float(os.environ.get("VLLM_OMNI_DESYNC_GRACE_S", "30"))


def check_backend(backend: str) -> None:
    """Refuses a backend this release does not have, or whose package is not installed (the
    config's check, and the class lookup's)."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)} "
                         f"(worker processes on this host, or Ray actors), got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("distributed_executor_backend ray needs Ray: pip install "
                         "'vllm-omni[ray]' (on every node of the cluster)")


class WorkerStartupError(RuntimeError):
    pass


class Executor(ABC):
    """Runs the world's ranks. Every wait is bounded: a dead or hung worker surfaces as a
    ``WorkerDiedError``, never a hang."""

    def __init__(self, config: OmniEngineConfig):
        self.config = config
        self.running: list[str] = []  # the ids of the batch being executed
        self.stop_by: float | None = None  # when a fully cancelled batch must have stopped
        # Running request id -> why it was cancelled (the engine answers it as such if the
        # workers die before they stop).
        self.cancelled: dict[str, str] = {}
        self._call_ids = itertools.count()
        self._batch_id = ""  # the running execute call's first request id

    @staticmethod
    def get_class(backend: str) -> type["Executor"]:
        check_backend(backend)
        if backend == "ray":
            from vllm_omni.executor.ray import RayExecutor

            return RayExecutor
        from vllm_omni.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor

    @abstractmethod
    def _post(self, call: m.CollectiveRpc) -> None:
        """Sends ``call`` to every rank."""

    @abstractmethod
    def _recv(self, deadline: float | None = None, poll: Callable[[], None] | None = None):
        """The next message from any rank (``RpcResult``, ``Progress``, ``PartialImage``),
        in the order each rank sent them; calls ``_check`` while it waits."""

    def _check(self, deadline: float | None, poll: Callable[[], None] | None) -> None:
        """What every wait does between messages: take aborts, and turn a dead or hung worker,
        an unstoppable cancelled batch or a passed deadline into an error."""
        if poll is not None:
            poll()
        why = self.unhealthy()
        if why:
            raise WorkerDiedError(why)
        if self.stop_by is not None and time.monotonic() > self.stop_by:
            raise WorkerDiedError(
                f"the workers did not stop within {self.config.cancel_grace_s:g}s of the "
                "request being cancelled")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for workers")

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None, poll: Callable[[], None] | None = None,
                       on_progress: ProgressFn | None = None,
                       on_partial: PartialFn | None = None,
                       on_output: Callable[[DiffusionOutput], None] | None = None) -> list[Any]:
        """``Worker.<method>(*args, **kwargs)`` on every rank; their results by rank."""
        if method.startswith("_"):
            raise ValueError(f"{method!r} is not a public worker method")
        call = m.CollectiveRpc(next(self._call_ids), method, tuple(args), dict(kwargs or {}))
        self._post(call)
        world = self.config.world_size
        results: dict[int, m.RpcResult] = {}
        failed: list[int] = []
        end = None if timeout is None else time.monotonic() + timeout
        grace_end = None
        while len(results) < world:
            deadline = min((t for t in (end, grace_end) if t is not None), default=None)
            try:
                msg = self._recv(deadline, poll)
            except TimeoutError:
                stuck = sorted(set(range(world)) - set(results))
                if grace_end is None:
                    raise TimeoutError(f"{method}: rank(s) {stuck} did not answer within "
                                       f"{timeout:g}s") from None
                raise WorkerDiedError(
                    f"rank(s) {failed} failed mid-request and rank(s) {stuck} did not finish "
                    f"within {DESYNC_GRACE_S:.0f}s (blocked in a collective with the failed "
                    "rank)") from None
            if isinstance(msg, m.RpcResult) and msg.call_id == call.call_id:
                results[msg.rank] = msg
                if msg.failed:
                    failed.append(msg.rank)
            elif isinstance(msg, m.Progress) and on_progress is not None:
                on_progress(msg.request_ids, msg.step, msg.total)
            elif isinstance(msg, m.PartialImage) and on_partial is not None:
                on_partial(msg.request_id, msg.index, msg.image)
            elif isinstance(msg, m.RequestOutputs) and on_output is not None:
                for out in msg.outputs:
                    on_output(out)
            if poll is not None:
                poll()
            if failed and grace_end is None and world > 1:
                grace_end = time.monotonic() + DESYNC_GRACE_S
        errors = [r for r in results.values() if r.error is not None]
        if errors:
            raise RuntimeError(f"{method} failed on rank {errors[0].rank}:\n{errors[0].error}")
        return [results[rank].value for rank in range(world)]

    def execute(self, batch: list[DiffusionRequest], on_progress: ProgressFn | None = None,
                poll: Callable[[], None] | None = None,
                on_partial: PartialFn | None = None,
                on_output: Callable[[DiffusionOutput], None] | None = None
                ) -> list[DiffusionOutput]:
        """Runs ``batch`` on every rank; ``poll`` is called while waiting (to take aborts).
        With step batching, requests may ``join`` the running call, each output goes to
        ``on_output`` as its request finishes, and the call returns after ``seal``."""
        self.running, self.cancelled, self.stop_by = [r.request_id for r in batch], {}, None
        self._batch_id = batch[0].request_id

        def output(out: DiffusionOutput) -> None:
            if out.request_id in self.running:
                self.running.remove(out.request_id)
            if on_output is not None:
                on_output(out)

        try:
            # Progress costs a message per step; only ask for it when someone listens.
            return self.collective_rpc("execute", (batch, on_progress is not None), poll=poll,
                                       on_progress=on_progress, on_partial=on_partial,
                                       on_output=output)[0]
        finally:
            self.running, self.stop_by = [], None

    def join(self, reqs: list[DiffusionRequest]) -> None:
        """Step batching: ``reqs`` start in the running ``execute`` call at its next step."""
        self.running.extend(r.request_id for r in reqs)
        self.stop_by = None  # a live request again
        self.send_all(m.Join(self._batch_id, list(reqs)))

    def seal(self) -> None:
        """Step batching: nothing more joins; the call returns once its requests finished."""
        self.send_all(m.Join(self._batch_id, []))

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Stops a running request at its next cancel point (alone on one rank: at its next
        block or decode layer; in a group: at the next step end, where the ranks agree); False
        if it is not running. Once every request of the batch is cancelled, the workers have
        ``cancel_grace_s`` to stop before they count as hung."""
        if request_id not in self.running:
            return False
        self.cancelled[request_id] = reason
        self.send_all(m.Cancel(request_id, reason))
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
