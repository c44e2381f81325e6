"""What the engine benchmarks share: the model argument and one fixed request."""

from __future__ import annotations

import argparse
import os
import tempfile

PROMPT = "a lighthouse on a rocky coast at dusk, oil painting"


def add_model_args(ap: argparse.ArgumentParser, steps: int, size: str = "256x256") -> None:
    ap.add_argument("--model", default="qwen-image-bench", help="tiny family to build, or a dir")
    ap.add_argument("--size", default=size)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=3)


def model_dir(model: str) -> str:
    """``model`` itself, or for a tiny family's name its build (made once per machine)."""
    from vllm_omni.testing.tiny_models import FAMILIES, build

    if model in FAMILIES:
        return build(model, os.path.join(tempfile.gettempdir(), "vllm_omni_bench", model))
    return model


def model_and_params(args: argparse.Namespace):
    """The model directory (building a tiny family once) and the request: seed 0, true CFG 4,
    float output."""
    from vllm_omni import OmniDiffusionSamplingParams

    model = model_dir(args.model)
    width, height = (int(v) for v in args.size.split("x"))
    params = OmniDiffusionSamplingParams(num_inference_steps=args.steps, width=width,
                                         height=height, seed=0, true_cfg_scale=4.0,
                                         output_type="np")
    return model, params


# -- a served model --------------------------------------------------------------------------------
def start_server(model_dir: str, log_path: str, *extra: str, wait: bool = True,
                 env: dict[str, str] | None = None):
    """``vllm serve MODEL --omni`` on a free port: (process, URL, launch time (monotonic)),
    once healthy unless ``wait`` is False. ``env``: set for the server, over this process's."""
    import subprocess
    import sys
    import time

    import requests

    from vllm_omni.utils.proc import free_port

    port = free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    launched = time.monotonic()
    proc = subprocess.Popen([vllm, "serve", model_dir, "--omni", "--host", "127.0.0.1",
                             "--port", str(port), "--disable-uvicorn-access-log", *extra],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while wait and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    else:
        if wait:
            stop_server(proc)
            raise TimeoutError(f"server not healthy; see {log_path}")
    return proc, url, launched


def stop_server(proc) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


# -- timing on a device --------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after ``warmup``, the device synced."""
    import time

    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats
