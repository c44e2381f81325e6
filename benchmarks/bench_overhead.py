"""Serving overhead: HTTP end-to-end latency through ``vllm serve --omni`` vs a direct diffusers call.

Same model directory, prompt, seed, size and steps. Runs are interleaved (diffusers, HTTP,
diffusers, ...) so both sides see the same machine state, and the ratio of medians is reported.
Also measures cold start: ``vllm serve`` launch until the first image is returned.

    .venv/bin/python benchmarks/bench_overhead.py            # tiny and bench models
    .venv/bin/python benchmarks/bench_overhead.py --models qwen-image --repeats 20

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

# Each case: tiny-model family, size, steps.
CASES = {
    "qwen-image": [(64, 4), (256, 20)],
    "qwen-image-bench": [(256, 20)],
}


def free_port() -> int:
    from vllm_omni.utils.proc import free_port as fp

    return fp()


def start_server(model_dir: str, log_path: str) -> tuple[subprocess.Popen, str, float]:
    """Returns the process, its URL and the launch time (monotonic)."""
    port = free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    t0 = time.monotonic()
    proc = subprocess.Popen([vllm, "serve", model_dir, "--omni", "--host", "127.0.0.1",
                             "--port", str(port), "--disable-uvicorn-access-log"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", t0


def first_image(url: str, proc: subprocess.Popen, body: dict, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            r = requests.post(url + "/v1/images/generations", json=body, timeout=600)
            if r.status_code == 200:
                return time.monotonic()
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError("no image before timeout")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model-root", default=os.path.join(tempfile.gettempdir(), "vllm_omni_models"))
    args = ap.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    from vllm_omni.testing.tiny_models import build

    results = []
    for family in args.models:
        model_dir = build(family, os.path.join(args.model_root, family))
        log = os.path.join(tempfile.gettempdir(), f"bench_overhead_{family}.log")
        proc, url, launched = start_server(model_dir, log)
        try:
            size, steps = CASES[family][0]
            probe = {"prompt": "a red fox", "size": f"{size}x{size}", "num_inference_steps": 2,
                     "seed": 0}
            cold_start_s = first_image(url, proc, probe) - launched

            pipe = DiffusionPipeline.from_pretrained(model_dir)
            pipe.set_progress_bar_config(disable=True)
            for size, steps in CASES[family]:
                prompt, seed = "a red fox in the snow", 1234

                def direct():
                    t = time.perf_counter()
                    pipe(prompt, height=size, width=size, num_inference_steps=steps,
                         true_cfg_scale=1.0, generator=[torch.Generator().manual_seed(seed)])
                    return time.perf_counter() - t

                body = {"prompt": prompt, "size": f"{size}x{size}", "num_inference_steps": steps,
                        "seed": seed}

                def http():
                    t = time.perf_counter()
                    r = requests.post(url + "/v1/images/generations", json=body, timeout=600)
                    r.raise_for_status()
                    r.json()["data"][0]["b64_json"]
                    return time.perf_counter() - t

                direct(), http()  # warm-up both sides
                d, h = [], []
                for _ in range(args.repeats):
                    d.append(direct())
                    h.append(http())
                results.append({
                    "model": family, "size": f"{size}x{size}", "steps": steps,
                    "diffusers_median_s": round(statistics.median(d), 5),
                    "http_median_s": round(statistics.median(h), 5),
                    "overhead_ratio": round(statistics.median(h) / statistics.median(d), 4),
                    "overhead_ms": round((statistics.median(h) - statistics.median(d)) * 1e3, 2),
                    "cold_start_s": round(cold_start_s, 2),
                })
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)

    print(json.dumps({
        "benchmark": "bench_overhead",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads "
                   f"{torch.get_num_threads()}",
        "repeats": args.repeats,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
