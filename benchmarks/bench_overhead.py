"""Serving overhead: HTTP end-to-end latency through ``vllm serve --omni`` vs direct diffusers.

Same model directory, prompt, seed, shape and steps: images through /v1/images/generations,
audio through /v1/audio/generate (the wav bytes, encoding included). Runs are interleaved
(diffusers, HTTP, diffusers, ...) so both sides see the same machine state, and the ratio of
medians is reported. Also measures cold start: ``vllm serve`` launch until ``/health`` answers 200
(``healthy_s``, README command 1's wait) and until the first output is returned
(``cold_start_s``).

    .venv/bin/python benchmarks/bench_overhead.py            # every case
    .venv/bin/python benchmarks/bench_overhead.py --models stable-audio --repeats 20

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import requests

from common import machine, start_server, stop_server

# Each case: tiny-model family, then (shape, steps): an image side, or audio seconds.
CASES = {
    "qwen-image": [(64, 4), (256, 20)],
    "qwen-image-bench": [(256, 20)],
    "stable-audio": [(0.25, 20), (0.5, 100)],
    # Our own BAGEL modelling (text guidance on: three sequences a step, packed in one forward).
    "bagel": [(64, 10), (128, 20)],
}
# What the direct call passes to match the server's defaults for that model (Qwen-Image: the
# server leaves CFG off unless asked; BAGEL: its pipeline's defaults are the server's).
DIRECT_KWARGS = {"qwen-image": dict(true_cfg_scale=1.0), "qwen-image-bench": dict(true_cfg_scale=1.0)}
PROMPTS = {"image": "a red fox in the snow", "audio": "rain on a tin roof"}


def image_case(pipe, url: str, size: int, steps: int, seed: int, **kwargs):
    """(direct call, HTTP call) of one image case."""
    import torch

    def direct():
        pipe(PROMPTS["image"], height=size, width=size, num_inference_steps=steps,
             generator=[torch.Generator().manual_seed(seed)], **kwargs)

    body = {"prompt": PROMPTS["image"], "size": f"{size}x{size}", "num_inference_steps": steps,
            "seed": seed}

    def http():
        r = requests.post(url + "/v1/images/generations", json=body, timeout=600)
        r.raise_for_status()
        r.json()["data"][0]["b64_json"]

    return direct, http


def audio_case(pipe, url: str, seconds: float, steps: int, seed: int):
    import torch

    def direct():
        pipe(PROMPTS["audio"], audio_end_in_s=seconds, num_inference_steps=steps,
             generator=[torch.Generator().manual_seed(seed)])

    body = {"input": PROMPTS["audio"], "audio_length": seconds, "num_inference_steps": steps,
            "seed": seed}

    def http():
        r = requests.post(url + "/v1/audio/generate", json=body, timeout=600)
        r.raise_for_status()
        r.content

    return direct, http


def healthy(url: str, proc, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic()
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError("not healthy before timeout")


def first_output(url: str, proc, route: str, body: dict, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            if requests.post(url + route, json=body, timeout=600).status_code == 200:
                return time.monotonic()
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise TimeoutError("no output before timeout")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
        audio = family == "stable-audio"
        model_dir = build(family, os.path.join(args.model_root, family))
        log = os.path.join(tempfile.gettempdir(), f"bench_overhead_{family}.log")
        proc, url, launched = start_server(model_dir, log, wait=False)
        try:
            shape = CASES[family][0][0]
            route, probe = (("/v1/audio/generate", {"input": "rain", "audio_length": shape,
                                                    "num_inference_steps": 2, "seed": 0})
                            if audio else
                            ("/v1/images/generations", {"prompt": "a red fox", "seed": 0,
                                                        "size": f"{shape}x{shape}",
                                                        "num_inference_steps": 2}))
            healthy_s = healthy(url, proc) - launched
            cold_start_s = first_output(url, proc, route, probe) - launched

            if family == "bagel":  # not a diffusers directory: our loader
                from vllm_omni.models.bagel.pipeline import load_bagel

                pipe = load_bagel(model_dir, torch.float32)
            else:
                pipe = DiffusionPipeline.from_pretrained(model_dir)
            pipe.set_progress_bar_config(disable=True)
            for shape, steps in CASES[family]:
                if audio:
                    direct, http = audio_case(pipe, url, shape, steps, seed=1234)
                else:
                    direct, http = image_case(pipe, url, shape, steps, seed=1234,
                                              **DIRECT_KWARGS.get(family, {}))
                direct(), http()  # warm-up both sides
                d, h = [], []
                for _ in range(args.repeats):
                    d.append(timed(direct))
                    h.append(timed(http))
                results.append({
                    "model": family, "shape": f"{shape} s" if audio else f"{shape}x{shape}",
                    "steps": steps,
                    "diffusers_median_s": round(statistics.median(d), 5),
                    "http_median_s": round(statistics.median(h), 5),
                    "overhead_ratio": round(statistics.median(h) / statistics.median(d), 4),
                    "overhead_ms": round((statistics.median(h) - statistics.median(d)) * 1e3, 2),
                    "healthy_s": round(healthy_s, 2),
                    "cold_start_s": round(cold_start_s, 2),
                })
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            stop_server(proc)

    print(json.dumps({
        "benchmark": "bench_overhead",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(),
        "repeats": args.repeats,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
