"""The Ray executor (``--distributed-executor-backend ray``) on a real Ray cluster that this
module starts and stops: a head and a second node (``ray start --address``) on this machine,
CPU only, on a loopback address, each node with a custom resource so that the two ranks of a
U2 layout are placed on different nodes. Outputs equal the mp executor's; a killed actor
fails its request within seconds and the next request is served by new actors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import psutil
import pytest
import requests

from conftest import VENV_BIN, Server, decode, kill_later, metric
from vllm_omni.utils.proc import free_port

# Ray refuses 127.0.0.1 for a cluster (it swaps in the host's address); the rest of
# 127.0.0.0/8 is loopback as well.
NODE_IP = "127.0.0.2"
BUNDLES = json.dumps([{"omni_node_a": 1}, {"omni_node_b": 1}])
PARAMS = dict(num_inference_steps=2, seed=11, output_type="np", width=80, height=48,
              true_cfg_scale=3.0)
PROMPT = {"prompt": "a red fox", "negative_prompt": "blurry watercolour"}


# Token authentication, as a cluster should run (Ray turns it on by itself for a new cluster
# once ~/.ray/auth_token exists, and refuses a node that joins without the token): every node
# and driver reads the token from one file (filled in by ray_cluster).
AUTH: dict[str, str] = {}


@pytest.fixture(scope="module")
def ray_cluster():
    ray_bin = os.path.join(VENV_BIN, "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
    temp = tempfile.mkdtemp(prefix="omni-ray-", dir="/tmp")
    token = os.path.join(temp, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    AUTH.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    env.update(AUTH)
    address = f"{NODE_IP}:{free_port()}"
    common = ["--node-ip-address", NODE_IP, "--num-cpus", "1", "--disable-usage-stats"]

    def ray(*args):
        r = subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    try:
        ray("start", "--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", temp,
            "--include-dashboard=false", "--resources", json.dumps({"omni_node_a": 1}), *common)
        ray("start", "--address", address, "--resources", json.dumps({"omni_node_b": 1}),
            *common)
        yield address
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_cluster(ray_cluster, monkeypatch):
    """This process joins the cluster (offline ``Omni`` is the Ray driver) and leaves after."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    monkeypatch.setenv("VLLM_OMNI_RAY_BUNDLE_RESOURCES", BUNDLES)
    for k, v in AUTH.items():  # before Ray is imported: it reads its settings once
        monkeypatch.setenv(k, v)
    import ray

    yield ray_cluster
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def mp_output(tiny_qwen_image):
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.diffusion.data import DiffusionParallelConfig

    with Omni(tiny_qwen_image,
              parallel_config=DiffusionParallelConfig(ulysses_degree=2)) as engine:
        return engine.generate(PROMPT, OmniDiffusionSamplingParams(**PARAMS),
                               use_tqdm=False)[0].images[0]


def _node_of_resource(name: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"])


def test_ranks_on_two_nodes_equal_mp_and_a_killed_actor_is_replaced(
        on_cluster, tiny_qwen_image, mp_output):
    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.diffusion.data import DiffusionParallelConfig

    params = OmniDiffusionSamplingParams(**PARAMS)
    with Omni(tiny_qwen_image, parallel_config=DiffusionParallelConfig(ulysses_degree=2),
              distributed_executor_backend="ray") as engine:
        executor = engine._engine.executor
        # Each rank runs on the node that has its resource: two nodes, one group.
        nodes = [_node_of_resource("omni_node_a"), _node_of_resource("omni_node_b")]
        assert executor.nodes == nodes and executor.addresses == [NODE_IP, NODE_IP]
        got = engine.generate(PROMPT, params, use_tqdm=False)[0].images[0]
        assert np.array_equal(got, mp_output)

        # Rank 1's actor dies in the middle of a long request.
        before = engine.worker_pids
        slow = OmniDiffusionSamplingParams(num_inference_steps=5000, seed=1, width=64,
                                           height=64)
        killed_at = kill_later(before[1], 3)
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(Ray actor.*died"):
            engine.generate("a slow fox", slow, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 5
        # New actors serve the next request, with the same result.
        again = engine.generate(PROMPT, params, use_tqdm=False)[0].images[0]
        assert np.array_equal(again, mp_output)
        assert not set(engine.worker_pids) & set(before)
        assert engine._engine.executor.nodes == nodes


def test_a_cluster_without_room_fails_at_once(on_cluster, tiny_qwen_image, monkeypatch):
    from vllm_omni import Omni
    from vllm_omni.diffusion.data import DiffusionParallelConfig

    u2 = DiffusionParallelConfig(ulysses_degree=2)
    monkeypatch.setenv("VLLM_OMNI_RAY_BUNDLE_RESOURCES",
                       json.dumps([{"omni_node_c": 1}, {"omni_node_b": 1}]))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot place 2 rank\(s\): omni_node_c: 1 needed, 0 "):
        Omni(tiny_qwen_image, parallel_config=u2, distributed_executor_backend="ray")
    assert time.monotonic() - t0 < 30
    for bad, why in (('[{"omni_node_a": 1}]', "list of 2 objects"), ("{", "not JSON"),
                     ('[{"a": -1}, {}]', "positive amount")):
        monkeypatch.setenv("VLLM_OMNI_RAY_BUNDLE_RESOURCES", bad)
        with pytest.raises(RuntimeError, match=why):
            Omni(tiny_qwen_image, parallel_config=u2, distributed_executor_backend="ray")
    monkeypatch.delenv("VLLM_OMNI_RAY_BUNDLE_RESOURCES")
    monkeypatch.setenv("VLLM_OMNI_RAY_PLACEMENT_STRATEGY", "SCATTER")
    with pytest.raises(RuntimeError, match="STRICT_SPREAD"):
        Omni(tiny_qwen_image, parallel_config=u2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="must be one of mp, ray"):
        Omni(tiny_qwen_image, distributed_executor_backend="uni")


def _actor_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if "ray::RankActor" in " ".join(p.info["cmdline"] or [])}


def test_serve_with_the_ray_backend(ray_cluster, tiny_qwen_image, mp_output, tmp_path):
    # Unpinned this time: PACK places the two bundles on the two one-CPU nodes, and the ranks
    # are ordered by node.
    server = Server(tiny_qwen_image, "--distributed-executor-backend", "ray", "--usp", "2",
                    "--max-inference-steps", "100000", log_path=str(tmp_path / "ray.log"),
                    env={"RAY_ADDRESS": ray_cluster, **AUTH})
    body = {"prompt": PROMPT["prompt"], "negative_prompt": PROMPT["negative_prompt"],
            "size": "80x48", "num_inference_steps": 2, "seed": 11, "true_cfg_scale": 3.0}
    url = server.url + "/v1/images/generations"
    try:
        r = requests.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), np.int16)
        assert np.abs(got - np.round(mp_output * 255).astype(np.int16)).max() <= 1
        # A client that leaves cancels its request on both actors: they stop at the next step
        # and keep serving (a cancel that did not reach them would restart them after the
        # 10 s grace).
        actors = _actor_pids()
        assert len(actors) == 2
        with pytest.raises(requests.Timeout):
            requests.post(url, json={**body, "num_inference_steps": 50000}, timeout=3)
        deadline = time.monotonic() + 8
        while metric(server, "vllm_omni:engine_requests_total", outcome="cancelled") < 1:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.2)
        assert _actor_pids() == actors
        # An actor that dies while the server is idle is replaced before the next request.
        os.kill(min(actors), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (len(_actor_pids() - actors) == 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_actor_pids() - actors) == 2, server.logs()
        r = requests.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert "restarting workers" in server.logs()
    finally:
        server.stop()
    # The actors go with the server (their driver, the engine core).
    deadline = time.monotonic() + 20
    while _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _actor_pids()


def test_replicas_on_ray(ray_cluster, tiny_qwen_image, tmp_path):
    """--data-parallel-size 2 with the Ray backend: each replica's engine core places its own
    one-rank group (one per one-CPU node), and both take requests."""
    server = Server(tiny_qwen_image, "--distributed-executor-backend", "ray",
                    "--data-parallel-size", "2", log_path=str(tmp_path / "dp.log"),
                    env={"RAY_ADDRESS": ray_cluster, **AUTH})
    try:
        assert len(_actor_pids()) == 2
        body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2}

        def post(seed):
            return requests.post(server.url + "/v1/images/generations",
                                 json={**body, "seed": seed}, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(post, range(8))) == [200] * 8
        served = [metric(server, "vllm_omni:engine_requests_total", replica=str(r),
                         outcome="ok") for r in (0, 1)]
        assert sum(served) >= 8 and min(served) > 0, served
    finally:
        server.stop()
