"""The hardening points, tried as an attacker or a careless client would, on real servers.

Edit-model inputs (alpha channels, decompression bombs) are tested beside the other edit tests
in tests/test_models.py, slow clients in tests/test_slow_clients.py, the memory estimate in
tests/test_memory_estimate.py and cache-dit step masks in tests/test_cache.py.
"""

import os
import re
import signal
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psutil
import pytest
import requests

from conftest import Server, metric

KEY = "sk-security"
ORIGIN = "https://app.example"  # --allowed-origins '["*"]': any page may call with the key
GEN = "/v1/images/generations"
SMALL = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2}


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def children(server, title: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if title in " ".join(p.cmdline())]


def worker(server) -> psutil.Process:
    procs = children(server, "vllm_omni::worker_rank0")
    assert len(procs) == 1, [p.cmdline() for p in procs]
    return procs[0]


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s: {what}")


def health(server) -> int:
    try:
        return requests.get(server.url + "/health", timeout=2).status_code
    except requests.RequestException:
        return 0


# -- auth under a root path, signed URLs, seeds, field hygiene, numbers -------------------------

@pytest.fixture(scope="module")
def root_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--api-key", KEY, "--root-path", "/api",
               "--allowed-origins", '["*"]',
               log_path=str(tmp_path_factory.mktemp("logs") / "root.log"))
    yield s
    s.stop()


@pytest.mark.parametrize("method, path", [
    ("POST", "/api" + GEN), ("POST", GEN), ("GET", "/api/v1/models"), ("GET", "/v1/models"),
    ("GET", "/api/v1/nothing"), ("POST", "/api/v1/images/edits"), ("GET", "/api/v1//models"),
])
def test_every_route_needs_the_key_under_a_root_path(root_server, method, path):
    before = metric(root_server, "vllm_omni:requests_total", status="401")
    r = requests.request(method, root_server.url + path, json=SMALL, timeout=30)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = requests.request(method, root_server.url + path, json=SMALL, timeout=30,
                         headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    # Refusals are counted like any other answer.
    if path.startswith(("/api/v1", "/v1")):
        assert metric(root_server, "vllm_omni:requests_total", status="401") == before + 2


def test_the_key_opens_routes_under_the_root_path(root_server):
    for path in ("/api" + GEN, GEN):
        r = requests.post(root_server.url + path, json=SMALL, headers=auth(), timeout=60)
        assert r.status_code == 200, r.text[:300]
    assert requests.get(root_server.url + "/api/v1/models", headers=auth(),
                        timeout=10).status_code == 200
    # Probes stay open, as in vLLM.
    for path in ("/health", "/api/health", "/metrics", "/version"):
        assert requests.get(root_server.url + path, timeout=10).status_code == 200, path


def test_the_playground_asks_for_the_key_and_never_shows_it(root_server, page):
    """The page is public (it holds nothing of the server's), under the root path too; every
    API call it makes needs the key the user types, and its snippets name $OPENAI_API_KEY."""
    for path in ("/api/playground", "/playground", "/api/playground.js"):
        r = requests.get(root_server.url + path, timeout=10)
        assert r.status_code == 200 and KEY not in r.text, path
    page.goto(root_server.url + "/api/")  # redirected to /api/playground
    assert page.url == root_server.url + "/api/playground"
    page.wait_for_selector("#error:not([hidden])")
    assert "401 invalid_api_key" in page.text_content("#error")
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes("
                           "'401') && document.getElementById('api-key').value === 'wrong'")
    assert page.locator("#fields label").count() == 0
    calls = []
    page.on("request", lambda req: calls.append((req.url, req.headers.get("authorization"))))
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#fields label")
    page.fill("#prompt", "a fox")
    page.fill("#field-size", "32x32")
    page.fill("#field-num_inference_steps", "2")
    page.click("#run")
    page.wait_for_selector(".result img")
    api_calls = [(url, a) for url, a in calls if "/v1/" in url]
    assert api_calls and all(url.startswith(root_server.url + "/api/v1/") and a == f"Bearer {KEY}"
                             for url, a in api_calls), api_calls
    page.click(".result button:text('curl')")
    curl = page.text_content(".snippet")
    assert KEY not in curl and "$OPENAI_API_KEY" in curl
    assert KEY not in page.content()


def test_cors_follows_the_flags_and_never_opens_a_route(root_server):
    """vLLM's default allows no origin; this server was given '["*"]' (once dropped: it equalled
    an older vLLM's default, which we skipped)."""
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = requests.options(root_server.url + "/api" + GEN, headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.headers
    # An allowed origin still needs the key; with it, the page may read the answer.
    r = requests.get(root_server.url + "/api/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert r.status_code == 401
    r = requests.get(root_server.url + "/api/v1/models", headers={"Origin": ORIGIN, **auth()},
                     timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_websockets_need_the_key_too():
    """No route is a WebSocket today; one added later is behind the key all the same."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from vllm_omni.entrypoints.openai.api_server import ApiKeyAuth

    async def echo(ws):
        await ws.accept()
        await ws.send_text("open")
        await ws.close()

    client = TestClient(ApiKeyAuth(Starlette(routes=[WebSocketRoute("/v1/ws", echo)]), [KEY]))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/v1/ws", headers=headers):
                pass
        assert e.value.code == 1008
    with client.websocket_connect("/v1/ws", headers=auth()) as ws:
        assert ws.receive_text() == "open"
    with pytest.raises(ValueError, match="non-empty"):
        ApiKeyAuth(None, [None])


def test_image_urls_are_signed_and_use_the_servers_own_address(root_server):
    r = requests.post(root_server.url + "/api" + GEN, timeout=60,
                      headers={**auth(), "Host": "evil.example.com"},
                      json={**SMALL, "response_format": "url", "n": 2})
    assert r.status_code == 200, r.text[:300]
    links = [d["url"] for d in r.json()["data"]]
    for link in links:
        assert link.startswith(f"{root_server.url}/api/v1/images/"), link
        assert "evil" not in link
        # Fetchable without the key (an <img src>), through the root path.
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"

    parts = urlsplit(links[0])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}

    def fetch(path=parts.path, **changes):
        q = urlencode({k: v for k, v in {**query, **changes}.items() if v is not None})
        return requests.get(urlunsplit(parts._replace(path=path, query=q)), timeout=10)

    forged = [fetch(signature="0" * 64),  # wrong signature
              fetch(expires=str(int(query["expires"]) + 3600)),  # extended life
              fetch(signature=None),  # unsigned
              fetch(path=urlsplit(links[1]).path)]  # another image's signature
    for r in forged:
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_signature", r.text


def test_image_store_signatures_expire():
    from vllm_omni.entrypoints.openai.image_store import ImageStore

    store = ImageStore(ttl_s=3600)
    expires = store.put("a", b"png", "png")
    sig = store.signature("a", expires)
    assert store.check_signature("a", str(expires), sig) is None
    past = int(time.time()) - 1
    assert "expired" in store.check_signature("a", str(past), store.signature("a", past))
    assert "invalid" in store.check_signature("b", str(expires), sig)
    assert "invalid" in ImageStore().check_signature("a", str(expires), sig)  # per-server secret
    # Unicode digits and non-ASCII signatures are refused, not a 500.
    assert "not signed" in store.check_signature("a", "\u00b2", sig)
    assert "not signed" in store.check_signature("a", "\u0661" * 10, sig)
    assert "invalid" in store.check_signature("a", str(expires), "\u00e9" * 64)


def test_seeds_come_from_os_entropy_without_seed_flag(root_server):
    seeds = []
    for _ in range(2):
        r = requests.post(root_server.url + GEN, json=SMALL, headers=auth(), timeout=60)
        seeds.append(r.json()["vllm_omni"]["seed"])
    # vLLM's default --seed 0 made this the first seed of every server.
    assert 7106521602475165645 not in seeds and seeds[0] != seeds[1]


def test_seed_flag_keeps_seeds_reproducible(tiny_qwen_image):
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams
    from vllm_omni.models.registry import load_model_spec

    spec = load_model_spec(tiny_qwen_image)

    def first_seeds(seed):
        inputs = InputProcessor(spec, seed)
        params = OmniDiffusionSamplingParams(width=32, height=32)
        return [inputs.process("x", params).seed for _ in range(3)]

    assert first_seeds(1) == first_seeds(1)
    assert first_seeds(None) != first_seeds(None)


def test_client_strings_cannot_forge_log_lines(root_server):
    forged = "u1\nINFO 2026-01-01 [api_server] admin logged in\x1b[31m"
    r = requests.post(root_server.url + GEN, json={**SMALL, "user": forged}, headers=auth(),
                      timeout=60)
    assert r.status_code == 200, r.text[:300]
    logs = root_server.logs()
    assert "user=u1\\nINFO 2026-01-01 [api_server] admin logged in\\x1b[31m" in logs
    assert not re.search(r"^INFO 2026-01-01 \[api_server\] admin", logs, re.M)
    r = requests.post(root_server.url + GEN, json={**SMALL, "user": "u" * 10_000_000},
                      headers=auth(), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "x", "size": "32x32\\n"}', "size"),
    ('{"prompt": "x", "size": "32x32", "resolution": 512}', "resolution"),
    ('{"prompt": "x", "size": "32x32", "num_inference_steps": 1}', "num_inference_steps"),
    ('{"prompt": "x", "size": "32x32", "true_cfg_scale": Infinity}', "true_cfg_scale"),
    ('{"prompt": "x", "size": "32x32", "true_cfg_scale": -Infinity}', "true_cfg_scale"),
    ('{"prompt": "x", "size": "32x32", "true_cfg_scale": NaN}', "true_cfg_scale"),
    ('{"prompt": "x", "size": "32x32", "true_cfg_scale": 1e308}', "true_cfg_scale"),
    ('{"prompt": "x", "size": "32x32", "negative_prompt": "y", "true_cfg_scale": 1e308}',
     "true_cfg_scale"),
    ('{"prompt": "x", "size": "32x32", "n": 99}', "n"),
    ('{"prompt": "x", "size": "32x32", "style": "vivid"}', "style"),
    ('{"prompt": "x", "size": "31x32"}', "size"),
])
def test_bad_values_are_400_naming_their_field(root_server, body, param):
    r = requests.post(root_server.url + GEN, data=body, timeout=30,
                      headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param, r.text[:300]


def test_non_finite_latents_fail_the_request(tiny_qwen_image, tmp_path):
    """A checkpoint whose numbers overflow (weights scaled to the float32 limit) fails with a
    clear error instead of answering a black image."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_omni import Omni, OmniDiffusionSamplingParams

    model = str(tmp_path / "overflowing")
    shutil.copytree(tiny_qwen_image, model)
    weights = os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors")
    state = load_file(weights)
    state = {k: v * 3e38 if k.startswith("proj_out") else v for k, v in state.items()}
    save_file(state, weights)
    with Omni(model=model) as engine:
        with pytest.raises(RuntimeError, match="NaN or infinite"):
            engine.generate("a fox", OmniDiffusionSamplingParams(
                num_inference_steps=2, width=32, height=32, seed=0))


# -- workers: supervision while idle, heartbeats, orphans ---------------------------------------

@pytest.fixture(scope="module")
def supervised(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--worker-heartbeat-timeout", "3",
               log_path=str(tmp_path_factory.mktemp("logs") / "supervised.log"))
    yield s
    s.stop()


def test_idle_worker_death_is_noticed_and_no_later_request_fails(supervised):
    old = worker(supervised)
    old.kill()
    t0 = time.monotonic()
    wait_for(lambda: health(supervised) == 503, 2.0, "/health turned 503")
    noticed = time.monotonic() - t0
    # A request sent at once waits for the restart instead of being sacrificed.
    r = requests.post(supervised.url + GEN, json=SMALL, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert worker(supervised).pid != old.pid
    assert noticed < 1.5
    wait_for(lambda: health(supervised) == 200, 60, "healthy again")


def test_stopped_worker_is_detected_by_heartbeat_and_replaced(supervised):
    wait_for(lambda: health(supervised) == 200, 60, "healthy")
    old = worker(supervised)
    old.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: health(supervised) == 503, 3 + 3, "/health turned 503")
        wait_for(lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE, 10,
                 "the stopped worker was killed")
    finally:
        if old.is_running():
            old.send_signal(signal.SIGCONT)
    assert "sent no heartbeat" in supervised.logs()
    wait_for(lambda: health(supervised) == 200, 60, "healthy again")
    r = requests.post(supervised.url + GEN, json=SMALL, timeout=120)
    assert r.status_code == 200, r.text[:300]


def _exited(p: psutil.Process) -> bool:
    try:  # a zombie has exited; only its parent (here: PID 1) can reap it
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_engine_core_leaves_no_orphans(supervised):
    """Last on this server: it leaves the engine dead (the API server answers 503). The
    multiprocessing resource tracker is the API server's (shared by the engine), so it stays."""
    core = children(supervised, "vllm_omni::engine_core")
    assert len(core) == 1
    descendants = core[0].children(recursive=True)
    titles = " ".join(" ".join(p.cmdline()) for p in descendants)
    assert "worker_rank0" in titles and "worker_fork_server" in titles
    core[0].kill()
    t0 = time.monotonic()
    wait_for(lambda: all(_exited(p) for p in descendants), 2.0,
             "the engine core's workers and fork server exited")
    assert time.monotonic() - t0 <= 2.0
    wait_for(lambda: health(supervised) == 503, 5, "/health turned 503")
    r = requests.post(supervised.url + GEN, json=SMALL, timeout=30)
    assert r.status_code == 503


# -- cancellation frees the worker --------------------------------------------------------------

TIMEOUT_S = 4
GRACE_S = 3
# The tiny model decodes a 1024² image in ~17 s on two cores: a deadline there lands in the VAE.
SLOW = {"prompt": "a fox", "size": "1024x1024", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def deadline_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--request-timeout", str(TIMEOUT_S), "--cancel-grace-period",
               str(GRACE_S), "--worker-heartbeat-timeout", "120",
               log_path=str(tmp_path_factory.mktemp("logs") / "deadline.log"))
    yield s
    s.stop()


def test_timeout_stops_the_work_inside_the_vae_decode(deadline_server):
    before = metric(deadline_server, "vllm_omni:engine_requests_total", outcome="timed_out")
    t0 = time.monotonic()
    r = requests.post(deadline_server.url + GEN, json=SLOW, timeout=120)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text[:300]
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 2
    # The worker is free at once: the next request does not wait for the decode to finish.
    t0 = time.monotonic()
    r = requests.post(deadline_server.url + GEN, json=SMALL, timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 4, r.text[:300]
    wait_for(lambda: metric(deadline_server, "vllm_omni:engine_requests_total",
                            outcome="timed_out") == before + 1, 5, "counted as timed out")
    assert re.search(r"timed out after \d of 2 steps", deadline_server.logs())
    assert "restarting workers" not in deadline_server.logs()


def test_workers_that_do_not_stop_are_restarted_after_the_grace_period(deadline_server):
    """A worker stuck where it cannot be stopped (here: stopped by a signal, with heartbeats
    far off) is restarted once the grace period after the cancel has passed."""
    stuck = worker(deadline_server)
    result = {}

    def slow():
        r = requests.post(deadline_server.url + GEN, json=SLOW, timeout=120)
        result.update(status=r.status_code, t=time.monotonic())

    t = threading.Thread(target=slow)
    t0 = time.monotonic()
    t.start()
    time.sleep(1.5)
    stuck.send_signal(signal.SIGSTOP)
    try:
        t.join(30)
        assert result["status"] == 504
        wait_for(lambda: "did not stop within 3s" in deadline_server.logs(), TIMEOUT_S + GRACE_S
                 + 3, "restart after the grace period")
        assert time.monotonic() - t0 < TIMEOUT_S + GRACE_S + 4
    finally:
        if stuck.is_running():
            stuck.send_signal(signal.SIGCONT)
    r = requests.post(deadline_server.url + GEN, json=SMALL, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert worker(deadline_server).pid != stuck.pid


def test_a_killed_api_server_leaves_no_orphans(deadline_server):
    """Last on this server. SIGKILL to the API server alone (no process group): its engine core,
    the workers' fork server and the workers, all forks of it, exit at once, each watching its
    parent."""
    descendants = psutil.Process(deadline_server.proc.pid).children(recursive=True)
    titles = " ".join(" ".join(p.cmdline()) for p in descendants)
    assert all(t in titles for t in ("engine_core", "worker_fork_server", "worker_rank0"))
    deadline_server.proc.kill()
    deadline_server.proc.wait(10)
    wait_for(lambda: all(_exited(p) for p in descendants), 3.0,
             "the engine core, fork server and workers exited")
