"""Every message that crosses a process boundary, as a plain dataclass.

API server <-> engine core: ``AddRequest``, ``AbortRequest``, ``Shutdown`` in;
``EngineReady``, ``EngineStartupFailed``, ``DiffusionOutput``, ``Progress``, ``PartialImage``,
``EngineStatus`` out. Executor <-> workers: ``CollectiveRpc``, ``Cancel``, ``Shutdown`` in;
``WorkerReady``, ``WorkerLoadFailed``, ``RpcResult``, ``Progress``, ``PartialImage`` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_omni.engine.request import DiffusionRequest

# Why a request is stopped: its client left, or its deadline passed.
CANCEL_REASONS = ("cancelled", "timeout")


@dataclass
class Configure:
    """The config of an engine core started before it was known (``EngineCoreProcess``)."""

    config: Any


@dataclass
class AddRequest:
    request: DiffusionRequest


@dataclass
class AbortRequest:
    request_id: str
    reason: str = "cancelled"  # one of CANCEL_REASONS


@dataclass
class Shutdown:
    pass


@dataclass
class EngineReady:
    worker_pids: list[int]


@dataclass
class EngineStartupFailed:
    message: str


@dataclass
class EngineStatus:
    state: str  # ready | restarting | dead
    worker_pids: list[int] = field(default_factory=list)


@dataclass
class Progress:
    """``step`` of ``total`` denoising steps done for the requests of a running batch."""

    request_ids: list[str]
    step: int
    total: int


@dataclass
class PartialImage:
    """A preview decoded while denoising (streaming's ``partial_images``)."""

    request_id: str
    index: int
    image: Any


@dataclass
class CollectiveRpc:
    """Call ``Worker.<method>(*args, **kwargs)`` on every rank."""

    call_id: int
    method: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cancel:
    """Stop this running request at its next cancel point (the ranks agree at step ends)."""

    request_id: str
    reason: str = "cancelled"


@dataclass
class WorkerReady:
    rank: int


@dataclass
class WorkerLoadFailed:
    rank: int
    traceback: str


@dataclass
class RpcResult:
    """One rank's answer to a ``CollectiveRpc``. ``failed``: the rank may be out of step with
    its peers (it raised, or a request failed on it), so they may never finish."""

    call_id: int
    rank: int
    value: Any = None
    error: str | None = None  # the traceback, when the method raised
    failed: bool = False


@dataclass
class Join:
    """Engine -> every rank, with step batching: requests that join the running ``execute``
    call named by ``batch`` (its first request's id); no requests: the engine has no more, so
    the call returns once its requests have finished."""

    batch: str
    requests: list[DiffusionRequest] = field(default_factory=list)


@dataclass
class RequestOutputs:
    """Rank 0 -> engine, with step batching: the requests of one pipeline call finished (the
    others run on). Together, so the engine tops up with as many at once."""

    outputs: list[Any]
