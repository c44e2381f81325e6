"""First-come, first-served queue of requests waiting for the executor, batched by key.

The oldest waiting request always runs next, so nobody starves. Later requests with the same
batch key (same size, steps, guidance, ...: whatever makes them one pipeline call) join its
batch, up to ``max_num_seqs``; the others keep their place in the queue.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest


class Scheduler:
    def __init__(self, max_num_seqs: int = 1,
                 batch_key: Callable[[DiffusionRequest], Hashable] | None = None):
        self.max_num_seqs = max_num_seqs
        self.batch_key = batch_key  # None: one request at a time
        self.waiting: OrderedDict[str, DiffusionRequest] = OrderedDict()

    def add(self, request: DiffusionRequest) -> None:
        if request.request_id in self.waiting:
            raise ValueError(f"duplicate request id {request.request_id}")
        self.waiting[request.request_id] = request

    def abort(self, request_id: str) -> DiffusionRequest | None:
        return self.waiting.pop(request_id, None)

    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def schedule(self) -> list[DiffusionRequest]:
        batch: list[DiffusionRequest] = []
        key = None
        for rid, req in list(self.waiting.items()):
            if len(batch) == self.max_num_seqs:
                break
            if batch:
                # A None key never batches: not even with another None.
                if key is None or self.batch_key(req) != key:
                    continue
            elif self.batch_key is not None:
                key = self.batch_key(req)
            batch.append(req)
            del self.waiting[rid]
        now = time.monotonic()
        for req in batch:
            req.scheduled_time = now
        return batch

    def take(self, n: int) -> list[DiffusionRequest]:
        """The ``n`` oldest waiting requests, whatever their keys (step batching: they share
        work per denoiser call, not per pipeline call)."""
        batch = [self.waiting.pop(rid) for rid in list(self.waiting)[:max(0, n)]]
        now = time.monotonic()
        for req in batch:
            req.scheduled_time = now
        return batch

    def finish(self, batch: list[DiffusionRequest],
               outputs: list[DiffusionOutput]) -> list[DiffusionOutput]:
        now = time.monotonic()
        for req, out in zip(batch, outputs):
            out.metrics.setdefault("e2e_s", now - req.arrival_time)
            out.metrics["queue_wait_s"] = req.scheduled_time - req.arrival_time
            if "first_step_s" in out.metrics:  # from the start of its execution, until here
                out.metrics["first_step_s"] += out.metrics["queue_wait_s"]
            out.metrics.setdefault("batch_size", len(batch))
        return outputs

    def drain(self) -> list[DiffusionRequest]:
        reqs = list(self.waiting.values())
        self.waiting.clear()
        return reqs
