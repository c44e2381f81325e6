"""Prometheus metrics of the API server (``GET /metrics``), named ``vllm_omni:*`` like vLLM's
``vllm:*``.

HTTP outcomes are counted where the answer is sent; engine-side figures (queue wait, denoise and
VAE time, steps, batch size, cache skips, peak memory) come from every engine output, including
those of requests whose client has gone (a cancelled request's steps show up here), labelled by
the data-parallel ``replica`` that ran it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vllm_omni.engine.request import DiffusionOutput

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_in_flight: int):
        # One registry per app: several servers (tests) can live in one process.
        self.registry = r = CollectorRegistry()
        self._labels = {"model_name": model_name}
        names = ["model_name"]
        engine = [*names, "replica"]  # series fed by engine outputs
        self.requests = Counter("vllm_omni:requests", "HTTP requests answered, by route and "
                                "status code", [*names, "route", "status"], registry=r)
        self.engine_outcomes = Counter("vllm_omni:engine_requests", "Requests the engine "
                                       "finished, by outcome (ok, cancelled, timed_out, error)",
                                       [*engine, "outcome"], registry=r)
        self.rejected = Counter("vllm_omni:requests_rejected", "Requests refused before reaching "
                                "the engine, by reason", [*names, "reason"], registry=r)
        self.queue_wait = Histogram("vllm_omni:queue_wait_seconds", "Time from arrival to the "
                                    "start of execution", engine, buckets=_SECONDS, registry=r)
        self.first_step = Histogram("vllm_omni:time_to_first_step_seconds", "Time from arrival "
                                    "to the first denoiser call", engine, buckets=_SECONDS,
                                    registry=r)
        self.denoise = Histogram("vllm_omni:denoise_seconds", "Denoising loop time per request",
                                 engine, buckets=_SECONDS, registry=r)
        self.vae = Histogram("vllm_omni:vae_decode_seconds", "VAE decode time per request", engine,
                             buckets=_SECONDS, registry=r)
        self.e2e = Histogram("vllm_omni:e2e_request_latency_seconds", "Arrival to result, in the "
                             "engine", engine, buckets=_SECONDS, registry=r)
        self.steps = Counter("vllm_omni:denoise_steps", "Denoising steps completed (cancelled "
                             "requests count the steps they ran)", engine, registry=r)
        self.steps_per_request = Histogram(
            "vllm_omni:request_denoise_steps", "Denoising steps completed per request", engine,
            buckets=(1, 2, 4, 8, 16, 20, 28, 30, 40, 50, 75, 100, 250, 500, 1000), registry=r)
        self.batch_size = Histogram("vllm_omni:batch_size", "Size of the batch each request ran "
                                    "in (step batching: requests per denoiser forward, the "
                                    "request's mean)", engine, buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.cache_skip_ratio = Histogram(
            "vllm_omni:cache_skip_ratio", "Share of transformer calls served from the step cache",
            engine, buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.peak_memory = Gauge("vllm_omni:peak_memory_bytes", "Peak device memory of rank 0 "
                                 "(CUDA allocator; on CPU the worker's peak resident set)", engine,
                                 registry=r)
        self.features = Gauge("vllm_omni:memory_feature", "1 for each memory feature the model "
                              "runs with, by mode (offload: model or layerwise; fp8: w8a8 or "
                              "weight-only)", [*engine, "feature", "mode"], registry=r)
        self.fp8_weight_bytes = Gauge("vllm_omni:fp8_weight_bytes", "Bytes of the FP8 layers' "
                                      "weights and scales on rank 0", engine, registry=r)
        self.lora_active = Gauge("vllm_omni:lora_adapters_active", "LoRA adapters active in the "
                                 "last call", engine, registry=r)
        self.lora_switch = Histogram("vllm_omni:lora_switch_seconds", "Time to put a call's "
                                     "LoRA adapters in place (0 when they already were)", engine,
                                     buckets=(0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
                                     registry=r)
        self.running = Gauge("vllm_omni:num_requests_in_flight", "Requests admitted and not yet "
                             "answered", names, registry=r)
        self.max_in_flight = Gauge("vllm_omni:max_requests_in_flight", "Admission limit "
                                   "(--max-queue-len plus one running batch)", names, registry=r)
        self.max_in_flight.labels(**self._labels).set(max_in_flight)
        self.healthy = Gauge("vllm_omni:healthy", "1 when /health answers 200", names, registry=r)
        self.replica_ready = Gauge("vllm_omni:replica_ready", "1 while a data-parallel replica "
                                   "takes requests (0 while its workers restart)", engine,
                                   registry=r)

    def set_state(self, in_flight: int | None = None, healthy: bool | None = None,
                  replicas: list[bool] | None = None) -> None:
        if in_flight is not None:
            self.running.labels(**self._labels).set(in_flight)
        if healthy is not None:
            self.healthy.labels(**self._labels).set(1 if healthy else 0)
        for r, ready in enumerate(replicas or ()):
            self.replica_ready.labels(**self._labels, replica=str(r)).set(1 if ready else 0)

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(**self._labels, route=route, status=str(status)).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(**self._labels, reason=reason).inc()

    def observe(self, out: DiffusionOutput, replica: int = 0) -> None:
        """One engine output (success, error or cancellation) of data-parallel ``replica``."""
        m, lab = out.metrics, {**self._labels, "replica": str(replica)}
        outcome = "ok" if out.error is None else {
            "cancelled": "cancelled", "timeout": "timed_out"}.get(out.error.code, "error")
        self.engine_outcomes.labels(**lab, outcome=outcome).inc()
        for key, series in (("queue_wait_s", self.queue_wait), ("batch_size", self.batch_size),
                            ("first_step_s", self.first_step), ("e2e_s", self.e2e)):
            if key in m:
                series.labels(**lab).observe(m[key])
        for key, series in (("denoise_s", self.denoise), ("vae_s", self.vae)):
            if m.get(key):
                series.labels(**lab).observe(m[key])
        if "steps_completed" in m:
            self.steps.labels(**lab).inc(m["steps_completed"])
            self.steps_per_request.labels(**lab).observe(m["steps_completed"])
        calls = m.get("transformer_calls_computed", 0) + m.get("transformer_calls_skipped", 0)
        if calls:
            self.cache_skip_ratio.labels(**lab).observe(m["transformer_calls_skipped"] / calls)
        if "peak_memory_bytes" in m:
            self.peak_memory.labels(**lab).set(m["peak_memory_bytes"])
        for feature in ("offload", "fp8"):
            if isinstance(m.get(f"{feature}_mode"), str):
                self.features.labels(**lab, feature=feature, mode=m[f"{feature}_mode"]).set(1)
        if "fp8_weight_bytes" in m:
            self.fp8_weight_bytes.labels(**lab).set(m["fp8_weight_bytes"])
        if "lora_adapters" in m:
            self.lora_active.labels(**lab).set(m["lora_adapters"])
            self.lora_switch.labels(**lab).observe(m["lora_switch_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
