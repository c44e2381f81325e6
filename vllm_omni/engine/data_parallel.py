"""Data-parallel replicas (vLLM's ``--data-parallel-size``) behind one API server.

Each replica is a whole engine: its own engine core, scheduler and workers, on its own devices
(replica r takes the r-th run of world-size GPUs; on a CPU the ranks of all replicas share the
cores). A request goes to the healthy replica with the fewest requests in flight. Admission
(``--max-queue-len``) stays in the API server, so it is a promise for the whole server, while
batching happens inside each replica. A replica whose workers die restarts them as it does alone;
the others keep serving meanwhile, and the server is healthy while any replica is.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.async_engine import AsyncOmniEngine, EngineCoreProcess
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest


class DataParallelEngine:
    """The ``AsyncOmniEngine`` interface over several replicas of it."""

    def __init__(self, config: OmniEngineConfig, core: EngineCoreProcess | None = None):
        """``core``: one started early, for replica 0."""
        self.config = config
        configs = [dataclasses.replace(config, parallel=config.parallel.replica(r))
                   for r in range(config.parallel.data_parallel_size)]
        # Every core starts before any is waited for, so the replicas load side by side.
        cores = [core if r == 0 and core is not None else EngineCoreProcess(c, fork=True)
                 for r, c in enumerate(configs)]
        if core is not None:
            core.configure(configs[0])
        self.replicas: list[AsyncOmniEngine] = []
        try:
            for c, k in zip(configs, cores):
                self.replicas.append(AsyncOmniEngine(c, core=k))
        except BaseException:
            for replica in self.replicas:
                replica.shutdown()
            for k in cores[len(self.replicas) + 1:]:
                k.proc.kill()
                k.proc.join(5)
            raise
        self.in_flight = [0] * len(self.replicas)
        self._where: dict[str, int] = {}  # request id -> its replica, while it runs
        self._turn = itertools.count()  # breaks ties in turn, so idle replicas all get work
        self._on_output: Callable | None = None

    @property
    def on_output(self) -> Callable | None:
        return self._on_output

    @on_output.setter
    def on_output(self, observe: Callable[..., None] | None) -> None:
        """``observe(output, replica=r)`` sees every output of every replica."""
        self._on_output = observe
        for r, replica in enumerate(self.replicas):
            replica.on_output = None if observe is None else \
                (lambda out, r=r: observe(out, replica=r))

    @property
    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    @property
    def state(self) -> str:
        if self.healthy:
            return "ready"
        return ", ".join(f"replica {i} {r.state}" for i, r in enumerate(self.replicas))

    @property
    def worker_pids(self) -> list[int]:
        return [pid for r in self.replicas for pid in r.worker_pids]

    def pick(self) -> int:
        """The healthy replica with the fewest requests in flight (any, when none is healthy:
        it answers that the engine is not running)."""
        live = [i for i, r in enumerate(self.replicas) if r.healthy] or \
            list(range(len(self.replicas)))
        turn = next(self._turn)
        n = len(self.replicas)
        return min(live, key=lambda i: (self.in_flight[i], (i - turn) % n))

    async def generate(self, request: DiffusionRequest, on_partial=None,
                       on_progress=None) -> DiffusionOutput:
        r = self.pick()
        self.in_flight[r] += 1
        self._where[request.request_id] = r
        try:
            return await self.replicas[r].generate(request, on_partial, on_progress)
        finally:
            self.in_flight[r] -= 1
            self._where.pop(request.request_id, None)

    def set_abort_reason(self, request_id: str, reason: str) -> None:
        r = self._where.get(request_id)
        if r is not None:
            self.replicas[r].set_abort_reason(request_id, reason)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()


def start_engine(config: OmniEngineConfig, core: EngineCoreProcess | None = None) -> Any:
    """The engine for ``config``: one replica, or ``DataParallelEngine`` over several."""
    if config.parallel.data_parallel_size > 1:
        return DataParallelEngine(config, core)
    return AsyncOmniEngine(config, core=core)
