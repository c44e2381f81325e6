"""What the API server admits: queue length, deadlines, request sizes, connections, and the
warm-up it runs before it reports healthy. Set by ``vllm serve`` flags, validated once here."""

from __future__ import annotations

from dataclasses import dataclass


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,512x768"`` -> [(1024, 1024), (512, 768)]; ``"none"`` -> []."""
    if text.strip().lower() == "none":
        return []
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"bad size {part!r} in --warmup-sizes: expected WIDTHxHEIGHT, "
                             "comma-separated, or 'none'") from None
        sizes.append((w, h))
    return sizes


@dataclass
class ServingLimits:
    # Requests that may wait beyond the running batch; more get 429 with Retry-After.
    max_queue_len: int = 64
    max_num_seqs: int = 1  # requests run together (the scheduler's batch)
    data_parallel_size: int = 1  # replicas, each running a batch of its own
    request_timeout_s: float | None = None  # deadline per request; None: none
    max_images_per_request: int = 10  # OpenAI's own limit on n
    max_inference_steps: int = 1000
    max_pixels: int | None = None  # width x height; None: only the model's own limit
    max_body_bytes: int = 50 * 2**20  # request bodies (uploads included); larger: 413
    # Warm-up before /health says ready: (width, height) pairs; None: the model's default size.
    warmup_sizes: list[tuple[int, int]] | None = None
    warmup_steps: int = 2
    # Slow and numerous clients (connections.py): a request head, a request body, open connections.
    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 60.0  # the whole body: a 50 MiB upload needs ~7 Mbit/s
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in ("max_queue_len", "max_num_seqs", "data_parallel_size",
                     "max_images_per_request", "max_inference_steps", "max_body_bytes",
                     "warmup_steps", "max_connections"):
            v = getattr(self, name)
            lo = 0 if name in ("max_queue_len", "warmup_steps") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        for name in ("header_read_timeout_s", "body_read_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels!r}")

    @property
    def caps(self) -> dict[str, tuple[int, str]]:
        """The limits on request options, applied to the served model's option schema."""
        return {"num_images_per_prompt": (self.max_images_per_request,
                                          "--max-images-per-request"),
                "num_inference_steps": (self.max_inference_steps, "--max-inference-steps")}

    @property
    def max_in_flight(self) -> int:
        """Requests admitted at once: the running batches and --max-queue-len waiting, for the
        whole server (replicas share one queue limit)."""
        return self.max_queue_len + self.max_num_seqs * self.data_parallel_size
