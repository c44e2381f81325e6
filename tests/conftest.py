"""Shared, session-scoped fixtures: each heavy thing (tiny model, engine, server) is built once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from vllm_omni.utils.proc import free_port

VENV_BIN = os.path.dirname(sys.executable)

# The edit and layered pipelines resize their inputs to ~1 megapixel, seconds of VAE work on a
# CPU even for tiny models; cap it for every process the tests start (vllm_omni.testing.edit_area).
os.environ.setdefault("VLLM_OMNI_TEST_EDIT_AREA", str(64 * 64))
# Test-only hooks (edit-area cap, fault injection) reach every process the tests start through
# tests/hooks/sitecustomize.py; production code never imports them.
HOOKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (HOOKS_DIR, os.environ.get("PYTHONPATH")) if p)
from vllm_omni.testing import hooks  # noqa: E402

hooks.install()  # and in this process


def metric(server, name: str, **labels) -> float:
    """The value of one sample of ``/metrics`` summed over matching labels (0 when absent)."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def kill_later(pid: int, after_s: float) -> list[float]:
    """SIGKILLs ``pid`` from a thread after ``after_s``; the list gets the kill's monotonic time."""
    import threading

    killed_at: list[float] = []

    def kill():
        time.sleep(after_s)
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    return killed_at


def decode(b64: str):
    """A ``b64_json`` image from a response, as a PIL image."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> str:
    from vllm_omni.testing.tiny_models import build

    return build("qwen-image", str(tmp_path_factory.mktemp("models") / "tiny-qwen-image"))


# The seed's image models (tests/test_models.py, tests/test_model_features.py).
FAMILIES = ("qwen-image-2512", "qwen-image-edit", "qwen-image-edit-2509", "qwen-image-layered",
            "z-image-turbo", "flux.1-dev", "flux.2-klein-4b", "sd3.5", "longcat-image",
            "longcat-image-edit", "ovis-image", "glm-image")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """family -> a tiny random-weight pipeline directory, built once per test run."""
    from vllm_omni.testing.tiny_models import build

    root = tmp_path_factory.mktemp("family-models")
    return {f: build(f, str(root / f)) for f in FAMILIES}


# Limits that keep requests small (a fuzzer's too); the shared edit server runs with them.
SMALL_LIMITS = ("--max-pixels", str(64 * 64), "--max-inference-steps", "2",
                "--max-images-per-request", "2", "--request-timeout", "30")


@pytest.fixture(scope="session")
def edit_server(tiny_models, tmp_path_factory):
    """Qwen-Image-Edit-2509 (one to three input images) under SMALL_LIMITS, shared by the model,
    fuzz and playground tests."""
    s = Server(tiny_models["qwen-image-edit-2509"], *SMALL_LIMITS,
               log_path=str(tmp_path_factory.mktemp("logs") / "edit.log"))
    yield s
    s.stop()


# The seed's video models (tests/test_video_models.py, tests/test_model_features.py).
VIDEO_FAMILIES = ("wan2.2-t2v", "wan2.2-i2v", "wan2.2-ti2v")


@pytest.fixture(scope="session")
def video_models(tmp_path_factory) -> dict[str, str]:
    from vllm_omni.testing.tiny_models import build

    root = tmp_path_factory.mktemp("video-models")
    return {f: build(f, str(root / f)) for f in VIDEO_FAMILIES}


@pytest.fixture(scope="session")
def omni(tiny_qwen_image):
    from vllm_omni import Omni

    engine = Omni(model=tiny_qwen_image)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_qwen_image):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_qwen_image)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_preforked = None


def preforked():
    """One interpreter with vLLM's CLI imported, forked for each server (see
    vllm_omni.testing.preforked): a server is healthy in ~2 s instead of ~17 s."""
    global _preforked
    if _preforked is None:
        from vllm_omni.testing.preforked import Preforked

        _preforked = Preforked(os.path.join(VENV_BIN, "vllm"))
    return _preforked


def pytest_sessionfinish(session):
    if _preforked is not None:
        _preforked.close()


class Server:
    """A real ``vllm serve DIR --omni`` on a free port: vLLM's CLI ``main`` with these
    arguments, in a process of its own."""

    def __init__(self, model: str, *extra: str, log_path: str, wait: bool = True,
                 warmup_sizes: str | None = "64x64", env: dict[str, str] | None = None,
                 fresh: bool = False):
        """``warmup_sizes``: None warms up at the model's defaults (an audio model has no
        size). ``env``: set for the server, over this process's environment. ``fresh``: start
        the ``vllm`` script as a new interpreter, as a user does, not a fork of ``preforked()``
        (same code, but every import paid again)."""
        if "--warmup-sizes" not in extra and warmup_sizes is not None:
            # The tiny edit models warm up at 1024x1024 (their input's size) in seconds; tests
            # need not.
            extra = (*extra, "--warmup-sizes", warmup_sizes)
        self.model, self.extra, self.log_path = model, extra, log_path
        self.env = {**os.environ, **(env or {})}
        self.fresh = fresh
        self._start()
        if wait:
            self.wait_healthy(180)

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["serve", self.model, "--omni", "--host", "127.0.0.1", "--port", str(self.port),
                *self.extra]
        if self.fresh:
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [os.path.join(VENV_BIN, "vllm"), *argv], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        else:
            self.proc = preforked().start(argv, self.env, self.log_path)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        retries = 2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if retries and "address already in use" in self.logs().lower():
                    # The free port we picked was taken by a server starting beside this one.
                    retries -= 1
                    self._start()
                    continue
                raise RuntimeError(f"server exited:\n{self.logs()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="session")
def server(tiny_qwen_image, tmp_path_factory):
    # At the model's own defaults, as README command 1 starts it (test_playground checks them).
    s = Server(tiny_qwen_image, "--served-model-name", "tiny-qwen-image",
               log_path=str(tmp_path_factory.mktemp("logs") / "server.log"), warmup_sizes=None,
               fresh=True)
    yield s
    s.stop()


# -- the playground, in a real browser ---------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/test.sh installs it)
# Headless, and no calls home: this machine's closed network refuses them, many at a time.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Set to a directory to keep each playground test's final screenshot there (docs/ uses them).
SCREENSHOTS = os.environ.get("VLLM_OMNI_SCREENSHOTS")


@pytest.fixture
def page(request):
    """A fresh headless Chromium tab; the test fails on any uncaught script error in it.

    Per test, not per session: Playwright's sync API keeps an event loop running in this thread
    while it is open, and other tests call asyncio.run()."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the playground tests drive Debian's chromium "
                    "(scripts/test.sh installs it; or apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1100, "height": 760})
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.set_default_timeout(60_000)
        try:
            yield tab
            if SCREENSHOTS:
                tab.screenshot(path=os.path.join(SCREENSHOTS, f"{request.node.name}.png"),
                               full_page=True)
        finally:
            browser.close()
    assert not errors, errors
