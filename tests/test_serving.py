"""Production serving: admission limits, 429 under load, deadlines, cancellation, metrics, warm-up."""

import asyncio
import re
import socket
import time

import pytest
import requests

from conftest import Server, metric

QUEUE = 32
TIMEOUT_S = 8
GEN = "/v1/images/generations"
LONG = 50000  # steps: minutes on the tiny model (~4 ms a step at 256x256), so it is stopped


@pytest.fixture(scope="module")
def server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--max-queue-len", str(QUEUE), "--request-timeout", str(TIMEOUT_S),
               "--max-num-seqs", "4", "--no-step-batching",
               "--max-images-per-request", "2", "--max-inference-steps", str(LONG),
               "--max-pixels", str(256 * 256), "--max-upload-mb", "0.05",
               "--warmup-sizes", "64x64,48x80",
               log_path=str(tmp_path_factory.mktemp("logs") / "serving.log"))
    yield s
    s.stop()


def test_warmup_ran_through_the_request_path_before_health(server):
    log = server.logs()
    assert re.search(r"warmed up at 64x64, 48x80 in", log), log[-2000:]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    # The warm-up requests went through the engine like any other.
    assert metric(server, "vllm_omni:engine_requests_total", outcome="ok") >= 2


def test_limits_are_400_and_name_their_flag(server):
    cases = [({"n": 3}, "n", "--max-images-per-request"),
             ({"num_inference_steps": LONG + 1}, "num_inference_steps", "--max-inference-steps"),
             ({"size": "512x256"}, "size", "--max-pixels")]
    for extra, param, flag in cases:
        r = requests.post(server.url + GEN, json={"prompt": "a fox", "size": "64x64", **extra},
                          timeout=30)
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["param"] == param and flag in err["message"]


def test_oversized_bodies_are_413_declared_or_streamed(server):
    big = {"prompt": "a fox " * 20000}  # ~120 KB > 0.05 MiB
    r = requests.post(server.url + GEN, json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a fox " * 200
        yield b'"}'

    r = requests.post(server.url + GEN, data=chunks(), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_deadline_cancels_and_answers_504(server):
    t0 = time.monotonic()
    r = requests.post(server.url + GEN, timeout=60, json={
        "prompt": "a fox", "size": "256x256", "num_inference_steps": LONG})
    took = time.monotonic() - t0
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text[:300]
    assert TIMEOUT_S <= took < TIMEOUT_S + 5
    # The work stopped: a short request is answered promptly afterwards.
    t0 = time.monotonic()
    r = requests.post(server.url + GEN, timeout=60, json={
        "prompt": "a fox", "size": "64x64", "num_inference_steps": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < 5, r.text[:300]


def _disconnect_after(server, seconds: float, body: bytes) -> None:
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        time.sleep(seconds)


def test_disconnected_client_cancels_within_a_step(server):
    before = metric(server, "vllm_omni:engine_requests_total", outcome="cancelled")
    steps_before = metric(server, "vllm_omni:denoise_steps_total")
    _disconnect_after(server, 2.0, b'{"prompt": "a fox", "size": "256x256", '
                                   b'"num_inference_steps": %d}' % LONG)
    deadline = time.monotonic() + 10
    while metric(server, "vllm_omni:engine_requests_total", outcome="cancelled") == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.2)
    ran = metric(server, "vllm_omni:denoise_steps_total") - steps_before
    m = re.findall(rf"cancelled after (\d+) of {LONG} steps", server.logs())
    assert m and int(m[-1]) == ran < LONG
    # It stopped at once: the steps counter no longer moves.
    time.sleep(1.0)
    assert metric(server, "vllm_omni:denoise_steps_total") - steps_before == ran
    assert metric(server, "vllm_omni:requests_rejected_total", reason="client_disconnected") >= 1


def test_load_every_request_answered_once(server):
    """500 requests at concurrency 64 against --max-queue-len 32: each gets exactly one answer,
    200 or 429 (with Retry-After), and the server is healthy afterwards."""
    import httpx

    async def main():
        sem = asyncio.Semaphore(64)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            async def one(i):
                async with sem:
                    r = await client.post(GEN, json={"prompt": f"fox {i}", "size": "32x32",
                                                     "num_inference_steps": 2, "seed": i})
                    return i, r.status_code, r.headers.get("retry-after"), r.json()

            return await asyncio.gather(*(one(i) for i in range(500)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    took = time.monotonic() - t0
    assert sorted(i for i, *_ in results) == list(range(500))  # one answer each, none lost
    statuses = [s for _, s, _, _ in results]
    assert set(statuses) <= {200, 429}, {s for s in statuses if s not in (200, 429)}
    ok, busy = statuses.count(200), statuses.count(429)
    assert ok >= QUEUE and busy > 0, (ok, busy)
    for _, status, retry, body in results:
        if status == 429:
            assert int(retry) >= 1 and body["error"]["code"] == "queue_full"
        else:
            assert len(body["data"]) == 1
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert metric(server, "vllm_omni:requests_total", status="429") == busy
    print(f"load: {ok} x 200, {busy} x 429 in {took:.1f}s")


def test_metrics_cover_the_request_path(server):
    r = requests.post(server.url + GEN, timeout=60, json={
        "prompt": "a fox", "size": "64x64", "num_inference_steps": 3})
    assert r.status_code == 200, r.text[:300]
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("vllm_omni:requests_total", "vllm_omni:queue_wait_seconds_bucket",
                 "vllm_omni:denoise_seconds_count", "vllm_omni:vae_decode_seconds_count",
                 "vllm_omni:denoise_steps_total", "vllm_omni:batch_size_bucket",
                 "vllm_omni:peak_memory_bytes", "vllm_omni:num_requests_in_flight",
                 "vllm_omni:healthy"):
        assert name in text, name
    assert metric(server, "vllm_omni:requests_total", route=GEN, status="200") >= 1
    assert metric(server, "vllm_omni:peak_memory_bytes") > 0


def test_concurrent_requests_are_batched_with_their_own_images(server):
    """--max-num-seqs 4: concurrent compatible requests share a pipeline call, and each image is
    the one its seed gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from conftest import decode

    def gen(seed):
        r = requests.post(server.url + GEN, timeout=120, json={
            "prompt": f"a fox number {seed}", "size": "64x64", "num_inference_steps": 30,
            "seed": seed})
        assert r.status_code == 200, r.text[:300]
        return np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), np.int16)

    alone = {seed: gen(seed) for seed in range(4)}
    batches_before = metric(server, "vllm_omni:batch_size_sum")
    count_before = metric(server, "vllm_omni:batch_size_count")
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(range(8), pool.map(gen, [s % 4 for s in range(8)])))
    batched = metric(server, "vllm_omni:batch_size_sum") - batches_before
    executions = metric(server, "vllm_omni:batch_size_count") - count_before
    assert executions == 8 and batched / executions > 1, (batched, executions)
    for i, image in together.items():
        assert np.abs(image - alone[i % 4]).max() <= 1


def _sse(text: str) -> list[tuple[str, dict]]:
    import json

    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_sends_partial_images_then_the_completed_one(server):
    import numpy as np
    from conftest import decode

    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 8, "seed": 3}
    r = requests.post(server.url + GEN, json={**body, "stream": True, "partial_images": 2},
                      timeout=60, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [e for e, _ in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert [d["partial_image_index"] for _, d in events[:2]] == [0, 1]
    for kind, data in events:
        assert data["type"] == kind and data["size"] == "64x64" and data["output_format"] == "png"
    final = np.asarray(decode(events[-1][1]["b64_json"]).convert("RGB"), np.int16)
    plain = requests.post(server.url + GEN, json=body, timeout=60).json()["data"][0]["b64_json"]
    assert np.abs(final - np.asarray(decode(plain).convert("RGB"), np.int16)).max() <= 1
    # The previews are the denoising in progress: not the final image yet.
    first = np.asarray(decode(events[0][1]["b64_json"]).convert("RGB"), np.int16)
    assert np.abs(first - final).max() > 1


def test_stream_through_the_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kinds = [e.type for e in client.images.generate(
        prompt="a red fox", size="64x64", stream=True, partial_images=1,
        extra_body={"num_inference_steps": 4})]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]


def test_stream_options_are_checked_before_streaming(server):
    for extra, param in [({"partial_images": 2}, "partial_images"),
                         ({"stream": True, "n": 2}, "n"),
                         ({"stream": True, "response_format": "url"}, "response_format"),
                         ({"stream": True, "partial_images": 4}, "partial_images")]:
        r = requests.post(server.url + GEN, timeout=30,
                          json={"prompt": "a fox", "size": "64x64", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text[:200])
