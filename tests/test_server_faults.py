"""A second server (with --api-key) whose worker is killed mid-request."""

import time

import psutil
import pytest
import requests

from conftest import Server

KEY = "sk-test"


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--api-key", KEY, "--seed", "1", "--disable-playground",
               log_path=str(tmp_path_factory.mktemp("logs") / "keyed.log"))
    yield s
    s.stop()


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_api_key_protects_v1(keyed_server):
    body = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2}
    r = requests.post(keyed_server.url + "/v1/images/generations", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(keyed_server.url + "/v1/models", timeout=10).status_code == 401
    assert requests.get(keyed_server.url + "/health", timeout=10).status_code == 200
    r = requests.post(keyed_server.url + "/v1/images/generations", json=body, headers=auth(),
                      timeout=60)
    assert r.status_code == 200, r.text


def test_disable_playground_serves_no_page(keyed_server):
    for path in ("/", "/playground", "/playground.js", "/playground.css"):
        for headers in ({}, auth()):
            r = requests.get(keyed_server.url + path, headers=headers, timeout=10,
                             allow_redirects=False)
            assert r.status_code == 404, (path, r.status_code)
    assert "try it at" not in open(keyed_server.log_path).read()


def _worker(server) -> psutil.Process:
    procs = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
             if "vllm_omni::worker_rank0" in " ".join(p.cmdline())]
    assert len(procs) == 1, [p.cmdline() for p in procs]
    return procs[0]


def test_killed_worker_fails_request_fast_then_recovers(keyed_server):
    import threading

    worker = _worker(keyed_server)
    result = {}

    def slow_request():
        t0 = time.monotonic()
        r = requests.post(keyed_server.url + "/v1/images/generations", headers=auth(), timeout=60,
                          json={"prompt": "a fox", "size": "512x512", "num_inference_steps": 500})
        result.update(status=r.status_code, body=r.json(), t=time.monotonic())

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(2.0)  # let the request reach the worker
    killed_at = time.monotonic()
    worker.kill()
    t.join(30)
    assert not t.is_alive(), "request hung after its worker died"
    assert result["status"] == 500
    assert "worker rank 0" in result["body"]["error"]["message"]
    assert result["t"] - killed_at < 5.0

    # The engine restarts its workers and serves again.
    keyed_server.wait_healthy(120)
    r = requests.post(keyed_server.url + "/v1/images/generations", headers=auth(), timeout=60,
                      json={"prompt": "a fox", "size": "32x32", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert _worker(keyed_server).pid != worker.pid
