"""First-come, first-served queue of requests waiting for the executor."""

from __future__ import annotations

import time
from collections import OrderedDict

from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest


class Scheduler:
    def __init__(self, max_batch_size: int = 1):
        self.max_batch_size = max_batch_size
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
        batch = []
        now = time.monotonic()
        while self.waiting and len(batch) < self.max_batch_size:
            _, req = self.waiting.popitem(last=False)
            req.scheduled_time = now
            batch.append(req)
        return batch

    def finish(self, batch: list[DiffusionRequest],
               outputs: list[DiffusionOutput]) -> list[DiffusionOutput]:
        now = time.monotonic()
        for req, out in zip(batch, outputs):
            out.metrics.setdefault("e2e_s", now - req.arrival_time)
            out.metrics["queue_wait_s"] = req.scheduled_time - req.arrival_time
            out.metrics["batch_size"] = len(batch)
        return outputs

    def drain(self) -> list[DiffusionRequest]:
        reqs = list(self.waiting.values())
        self.waiting.clear()
        return reqs
