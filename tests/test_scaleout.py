"""Data-parallel replicas (``--data-parallel-size``) behind one API server: both serve, each
image equals the one-replica server's, and a replica whose worker dies leaves the other serving."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import psutil
import pytest
import requests

from conftest import Server, metric

GEN = "/v1/images/generations"
BODY = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def dp_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--served-model-name", "tiny-qwen-image",
               "--data-parallel-size", "2",
               log_path=str(tmp_path_factory.mktemp("logs") / "dp.log"))
    yield s
    s.stop()


def _served(server, replica: int) -> float:
    return metric(server, "vllm_omni:engine_requests_total", replica=str(replica), outcome="ok")


def _workers(server) -> dict[int, psutil.Process]:
    """Replica -> its rank-0 worker (titled vllm_omni::worker_dp<r>_rank0)."""
    found = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        for r in (0, 1):
            if f"vllm_omni::worker_dp{r}_rank0" in " ".join(p.cmdline()):
                found[r] = p
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_both_replicas_serve_and_match_one_replica(dp_server, server):
    assert len(_workers(dp_server)) == 2
    assert "--data-parallel-size" not in requests.get(
        dp_server.url + "/v1/models", timeout=10).text
    before = [_served(dp_server, r) for r in (0, 1)]
    seeds = list(range(100, 108))

    def run(url, seed):
        r = requests.post(url + GEN, json={**BODY, "seed": seed}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda s: run(dp_server.url, s), seeds))
    after = [_served(dp_server, r) for r in (0, 1)]
    assert sum(after) - sum(before) == len(seeds)
    assert all(a > b for a, b in zip(after, before)), (before, after)  # both replicas worked
    # Each image is the one a single-replica server makes for that request.
    assert got == [run(server.url, s) for s in seeds]
    assert metric(dp_server, "vllm_omni:replica_ready", replica="0") == 1
    assert metric(dp_server, "vllm_omni:replica_ready", replica="1") == 1


def test_a_replica_whose_worker_dies_leaves_the_other_serving(dp_server):
    victim = _workers(dp_server)[1]
    os.kill(victim.pid, signal.SIGKILL)
    _wait(lambda: metric(dp_server, "vllm_omni:replica_ready", replica="1") == 0, 30,
          "replica 1 out of service")
    # Meanwhile the server stays healthy and replica 0 takes the requests. Replica 1 may be back
    # before the last (its restart forks a worker in about a second) and take its share.
    assert requests.get(dp_server.url + "/health", timeout=5).status_code == 200
    before = [_served(dp_server, 0), _served(dp_server, 1)]
    for seed in range(4):
        r = requests.post(dp_server.url + GEN, json={**BODY, "seed": seed}, timeout=120)
        assert r.status_code == 200, r.text
    grew = [_served(dp_server, r) - b for r, b in enumerate(before)]
    assert grew[0] >= 1 and sum(grew) == 4, grew
    # Replica 1 restarts its workers and takes requests again.
    _wait(lambda: metric(dp_server, "vllm_omni:replica_ready", replica="1") == 1, 120,
          "replica 1 back")
    assert _workers(dp_server)[1].pid != victim.pid
    before = _served(dp_server, 1)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda s: requests.post(
            dp_server.url + GEN, json={**BODY, "seed": s}, timeout=120).status_code, range(4)))
    assert codes == [200] * 4 and _served(dp_server, 1) > before


def test_queue_limit_is_server_wide(tiny_qwen_image, tmp_path):
    """--max-queue-len is one promise for the whole server: with two replicas and a queue of
    one, three requests are admitted (one running on each replica, one waiting), a fourth is
    refused."""
    s = Server(tiny_qwen_image, "--data-parallel-size", "2", "--max-queue-len", "1",
               "--max-inference-steps", "100000", log_path=str(tmp_path / "q.log"))
    try:
        assert metric(s, "vllm_omni:max_requests_in_flight") == 3
        slow = {**BODY, "num_inference_steps": 20000}  # minutes: these clients give up first

        def post(body):
            try:
                return requests.post(s.url + GEN, json=body, timeout=6).status_code
            except requests.Timeout:
                return "gave up"

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            admitted = [pool.submit(post, slow) for _ in range(3)]
            _wait(lambda: metric(s, "vllm_omni:num_requests_in_flight") == 3, 10, "3 admitted")
            fourth = requests.post(s.url + GEN, json=BODY, timeout=30)
            assert fourth.status_code == 429 and fourth.json()["error"]["code"] == "queue_full"
            assert [f.result() for f in admitted] == ["gave up"] * 3
        # The clients that gave up are cancelled; the server takes requests again.
        _wait(lambda: metric(s, "vllm_omni:num_requests_in_flight") == 0, 60, "queue drained")
        assert requests.post(s.url + GEN, json=BODY, timeout=60).status_code == 200
    finally:
        s.stop()


def test_replica_settings_are_checked_and_offline_refuses_them(tiny_qwen_image):
    from vllm_omni import Omni
    from vllm_omni.diffusion.data import DiffusionParallelConfig

    for bad in ({"data_parallel_size": 0}, {"data_parallel_size": 2, "data_parallel_rank": 2}):
        with pytest.raises(ValueError, match="data_parallel"):
            DiffusionParallelConfig(**bad)
    with pytest.raises(ValueError, match="vllm serve --omni --data-parallel-size"):
        Omni(tiny_qwen_image, parallel_config=DiffusionParallelConfig(data_parallel_size=2))
