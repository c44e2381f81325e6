"""The ``ray`` executor (``--distributed-executor-backend ray``): one Ray actor per rank, placed
by a placement group with one bundle per rank, on one node or across many.

The engine core is the Ray driver: it joins the cluster named by ``RAY_ADDRESS``, else the one
``ray start`` began on this node, else starts a private one. Ranks meet over TCP at rank 0's
node, so a parallel group can span hosts. Each actor runs the same ``Worker`` as a worker
process of the ``mp`` executor, and every wait is bounded the same way: a dead actor fails the
call it was in (and an idle one is noticed by its ping), then the engine recreates the actors.

Placement is tuned with two environment variables, read when the actors start:
``VLLM_OMNI_RAY_PLACEMENT_STRATEGY`` (Ray's PACK, the default, SPREAD, STRICT_PACK or
STRICT_SPREAD), and ``VLLM_OMNI_RAY_BUNDLE_RESOURCES``, a JSON list with one object of extra
resources per rank, e.g. ``[{"node_a": 1}, {"node_b": 1}]`` with nodes started as
``ray start --resources '{"node_a": 1}'``: rank r then runs on a node that has its resources.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine import messages as m
from vllm_omni.engine.errors import WorkerDiedError
from vllm_omni.executor.base import Executor, WorkerStartupError

logger = logging.getLogger(__name__)

POLL_S = 0.2
PING_S = 1.0  # how often an idle rank is asked whether it is alive
STRATEGY_ENV = "VLLM_OMNI_RAY_PLACEMENT_STRATEGY"
BUNDLES_ENV = "VLLM_OMNI_RAY_BUNDLE_RESOURCES"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CALL_DONE = "vllm_omni:call-done"  # what rank 0's actor puts after each call's messages
# What the actors take from the engine's environment. Not all of it: PATH, HOME and the like
# belong to each node.
ENV_PREFIXES = ("VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH_",
                "OMP_", "MKL_", "GLOO_", "NCCL_", "PYTHONPATH")


class RankActor:
    """Hosts one rank's ``Worker`` in a Ray actor. ``run`` calls go one at a time (the
    "compute" group); cancels, pings and the message drain answer meanwhile ("control")."""

    def __init__(self) -> None:
        self.worker = None
        self.messages: queue.Queue = queue.Queue()  # rank 0's Progress and PartialImage

    def rendezvous(self) -> str:
        """A ``tcp://`` address on this node for the group to meet at (rank 0's)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"

    def load(self, rank: int, config: OmniEngineConfig, init_method: str,
             local_rank: int) -> tuple[int, str, str]:
        """Builds the rank's worker; its pid, node address and Ray node id."""
        import ray

        from vllm_omni.worker.worker import Worker

        logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"),
                            format=f"%(levelname)s %(asctime)s [worker{rank}] %(message)s")
        self.worker = Worker(rank, config, init_method, self.messages, local_rank)
        return os.getpid(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def run(self, call: m.CollectiveRpc) -> m.RpcResult:
        if call.method == "execute":
            # A cancel may arrive before its batch starts (another thread takes it); what is
            # kept is what concerns this batch.
            ids = {r.request_id for r in call.args[0]}
            for stale in set(self.worker.cancelled) - ids:
                self.worker.cancelled.pop(stale, None)
        try:
            return self.worker.run(call)
        finally:
            # Ends the drain that is waiting, so the driver has this call's last messages as
            # soon as its result, not a poll interval later.
            self.messages.put(CALL_DONE)

    def cancel(self, request_id: str, reason: str) -> None:
        if self.worker is not None:
            self.worker.cancelled[request_id] = reason

    def join(self, msg: m.Join) -> None:
        self.worker.joins.put(msg)

    def ping(self) -> bool:
        return True

    def drain(self, timeout: float) -> list[Any]:
        """The messages put since the last drain, waiting up to ``timeout`` for the first."""
        try:
            out = [self.messages.get(timeout=timeout) if timeout > 0
                   else self.messages.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out


def bundles(world_size: int, gpu: bool) -> list[dict[str, float]]:
    """One bundle per rank: a GPU (or a CPU), plus the rank's entry of ``BUNDLES_ENV``."""
    base = {"GPU": 1.0} if gpu else {"CPU": 1.0}
    raw = os.environ.get(BUNDLES_ENV)
    if not raw:
        return [dict(base) for _ in range(world_size)]
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{BUNDLES_ENV} is not JSON: {e}") from None
    if not (isinstance(extra, list) and len(extra) == world_size and all(
            isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                        and not isinstance(v, bool) and v > 0
                                        for k, v in d.items()) for d in extra)):
        raise ValueError(f"{BUNDLES_ENV} must be a JSON list of {world_size} objects (one per "
                         f"rank) of resource name -> positive amount, got {raw!r}")
    return [{**base, **{k: float(v) for k, v in d.items()}} for d in extra]


def _strategy() -> str:
    strategy = os.environ.get(STRATEGY_ENV, "PACK")
    if strategy not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV} must be one of {', '.join(STRATEGIES)}, "
                         f"got {strategy!r}")
    return strategy


def _connect():
    import ray

    if not ray.is_initialized():
        # No address: RAY_ADDRESS, else the cluster `ray start` began on this node, else a
        # private one for this process.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 logging_level=logging.WARNING)
    return ray


class RayExecutor(Executor):
    def __init__(self, config: OmniEngineConfig):
        super().__init__(config)
        try:
            ray = _connect()
        except Exception as e:
            raise WorkerStartupError(f"could not join a Ray cluster: {e}") from e
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.actors: list[Any] = []
        self._pg = None
        self._pids: list[int] = []
        self.addresses: list[str] = []  # each rank's node address
        self.nodes: list[str] = []  # each rank's Ray node id (two nodes may share an address)
        self._calls: dict[Any, int] = {}  # running call -> rank
        self._inbox: collections.deque = collections.deque()
        self._drain = None
        self._calls_done = 0  # end markers drained whose call's result is not yet taken
        self._pings: list[tuple[Any, float]] = []  # per rank: (pending ping or None, when)
        world = config.world_size
        gpu = config.device != "cpu" and (
            (config.device or "").startswith("cuda")
            or ray.cluster_resources().get("GPU", 0) >= 1)
        try:
            wanted = bundles(world, gpu)
            strategy = _strategy()
        except ValueError as e:
            raise WorkerStartupError(str(e)) from None
        self._check_room(wanted)
        try:
            self._pg = placement_group(wanted, strategy=strategy)
            ready, _ = ray.wait([self._pg.ready()], timeout=config.load_timeout_s)
            if not ready:
                raise WorkerStartupError(
                    f"the Ray cluster did not place {world} bundle(s) {wanted} ({strategy}) "
                    f"within {config.load_timeout_s:.0f}s: see `ray status`")
            actor_class = ray.remote(concurrency_groups={"compute": 1, "control": 4})(RankActor)
            env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
            order = self._bundle_order(pinned=BUNDLES_ENV in os.environ)
            for rank in range(world):
                self.actors.append(actor_class.options(
                    num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=0,
                    runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._pg, placement_group_bundle_index=order[rank]),
                ).remote())
            self._load(gpu)
        except BaseException:
            self.shutdown()
            raise
        self._drain = self._control(0, "drain", POLL_S)
        self._pings = [(None, time.monotonic())] * world

    def _check_room(self, wanted: list[dict[str, float]]) -> None:
        """Fails now, not after ``load_timeout_s``, when the cluster could never place them."""
        have = self._ray.cluster_resources()
        need: collections.Counter = collections.Counter()
        for b in wanted:
            need.update(b)
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
        if short:
            raise WorkerStartupError(
                f"the Ray cluster cannot place {len(wanted)} rank(s): "
                + ", ".join(f"{k}: {v:g} needed, {h:g} in the cluster"
                            for k, (v, h) in short.items()))

    def _bundle_order(self, pinned: bool) -> list[int]:
        """Rank -> bundle. Pinned bundles are the ranks'. Otherwise ranks fill nodes in turn
        (the driver's first): parallel groups are cut from consecutive ranks, so the innermost
        (Ulysses) stays within a node whenever a node holds it."""
        if pinned:
            return list(range(len(self._pg.bundle_specs)))
        from ray.util.placement_group import placement_group_table

        where = placement_group_table(self._pg)["bundles_to_node_id"]
        here = self._ray.get_runtime_context().get_node_id()
        return sorted(where, key=lambda b: (where[b] != here, where[b], b))

    def _control(self, rank: int, method: str, *args):
        return getattr(self.actors[rank], method).options(
            concurrency_group="control").remote(*args)

    def _load(self, gpu: bool) -> None:
        ray = self._ray
        init_method = ray.get(self._control(0, "rendezvous"), timeout=60)
        # Ray gives each GPU actor its own device as CUDA_VISIBLE_DEVICES, so it is device 0
        # there, whatever --device named on the driver.
        config = self.config
        loads = {
            actor.load.options(concurrency_group="compute").remote(
                rank, config, init_method, 0 if gpu else rank): rank
            for rank, actor in enumerate(self.actors)}
        deadline = time.monotonic() + config.load_timeout_s
        done: dict[int, tuple[int, str, str]] = {}
        while loads:
            ready, _ = ray.wait(list(loads), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise WorkerStartupError(
                    f"workers did not load the model within {config.load_timeout_s:.0f}s")
            rank = loads.pop(ready[0])
            try:
                done[rank] = ray.get(ready[0])
            except Exception as e:
                raise WorkerStartupError(
                    f"worker rank {rank} failed to load the model:\n{e}") from None
        self._pids, self.addresses, self.nodes = (
            [list(x) for x in zip(*(done[r] for r in range(len(self.actors))))])
        logger.info("ranks on Ray nodes %s at %s (pids %s)", self.nodes, self.addresses,
                    self._pids)

    def _where(self, rank: int) -> str:
        if rank < len(self._pids):
            return (f"worker rank {rank} (Ray actor, pid {self._pids[rank]} on "
                    f"{self.addresses[rank]})")
        return f"worker rank {rank} (Ray actor)"

    def _get(self, ref, rank: int):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkerDiedError(f"{self._where(rank)} died: {first}") from None

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    def unhealthy(self) -> str | None:
        ray, now = self._ray, time.monotonic()
        for rank, (ping, sent) in enumerate(self._pings):
            if ping is None:
                if now - sent >= PING_S:
                    self._pings[rank] = (self._control(rank, "ping"), now)
                continue
            ready, _ = ray.wait([ping], timeout=0)
            if ready:
                try:
                    self._get(ping, rank)
                except WorkerDiedError as e:
                    return str(e)
                self._pings[rank] = (None, now)
            elif now - sent > self.config.heartbeat_timeout_s:
                return (f"{self._where(rank)} did not answer a ping for {now - sent:.0f}s "
                        f"(limit {self.config.heartbeat_timeout_s:g}s): stopped or hung")
        return None

    def _post(self, call: m.CollectiveRpc) -> None:
        self._calls = {actor.run.options(concurrency_group="compute").remote(call): rank
                       for rank, actor in enumerate(self.actors)}

    def _recv(self, deadline: float | None = None, poll: Callable[[], None] | None = None):
        ray = self._ray
        while not self._inbox:
            ready, _ = ray.wait([*self._calls, self._drain], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref == self._drain:
                    self._take_drain()
                    continue
                rank = self._calls.pop(ref)
                result = self._get(ref, rank)
                if rank == 0:
                    # Rank 0's messages of this call come before its result, as through the
                    # single queue of the mp executor: drain up to the call's end marker.
                    while not self._calls_done:
                        self._take_drain()
                    self._calls_done -= 1
                self._inbox.append(result)
            if not self._inbox:
                self._check(deadline, poll)
        return self._inbox.popleft()

    def _take_drain(self) -> None:
        for msg in self._get(self._drain, 0):
            if msg == CALL_DONE:
                self._calls_done += 1
            else:
                self._inbox.append(msg)
        self._drain = self._control(0, "drain", POLL_S)

    def send_all(self, msg: Any) -> None:
        if not isinstance(msg, (m.Cancel, m.Join)):
            raise TypeError(f"the Ray executor sends calls, cancels and joins, not "
                            f"{type(msg).__name__}")
        for rank in range(len(self.actors)):
            if isinstance(msg, m.Cancel):
                self._control(rank, "cancel", msg.request_id, msg.reason)
            else:
                self._control(rank, "join", msg)

    def shutdown(self, timeout: float = 5.0) -> None:
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors, self._calls, self._inbox = [], {}, collections.deque()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None
