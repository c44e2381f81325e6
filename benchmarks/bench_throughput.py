"""Serving throughput: images/s and latency at several concurrencies, against plain diffusers.

The baseline is what a user without a server does: one diffusers pipeline, one request after the
other, same model, size, steps and seeds, same process count (one). The server is a real
``vllm serve MODEL --omni`` process with the batching scheduler (``--max-num-seqs``); clients
send ``--requests`` requests at each concurrency over HTTP (b64 PNG responses, so encoding and
transfer are paid too). Everything runs in this one invocation, on this machine.

    .venv/bin/python benchmarks/bench_throughput.py                       # tiny model
    .venv/bin/python benchmarks/bench_throughput.py --model qwen-image-bench --size 256x256

Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = ["a lighthouse on a rocky coast at dusk", "a red fox in the snow",
           "an astronaut riding a horse on the moon", "a painting of a city street in the rain"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def diffusers_baseline(model: str, width: int, height: int, steps: int, n: int) -> float:
    """Images per second of one plain diffusers pipeline serving ``n`` requests in turn."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def one(i):
        return pipe(prompt=PROMPTS[i % len(PROMPTS)], width=width, height=height,
                    num_inference_steps=steps, true_cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(i)).images[0]

    one(0)  # warm-up, as the server's
    t0 = time.perf_counter()
    for i in range(n):
        one(i)
    return n / (time.perf_counter() - t0)


async def load(url: str, concurrency: int, n: int, size: str, steps: int):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/images/generations", json={
                    "prompt": PROMPTS[i % len(PROMPTS)], "size": size,
                    "num_inference_steps": steps, "seed": i})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return n / wall, latencies


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from common import add_model_args, model_dir  # noqa: E402

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The tiny model at 32x32 spends its time in the transformer steps, which batching shares;
    # at 128x128 its full-resolution VAE dominates (docs/serving.md).
    add_model_args(ap, steps=20, size="32x32")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--server-threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the server (default: its own choice)")
    ap.set_defaults(model="qwen-image")
    args = ap.parse_args()

    from vllm_omni.utils.proc import free_port

    model = model_dir(args.model)
    width, height = (int(v) for v in args.size.split("x"))

    base_ips = diffusers_baseline(model, width, height, args.steps, args.requests)

    port = free_port()
    log = open(os.path.join(tempfile.gettempdir(), "bench_throughput_server.log"), "w")
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    server = subprocess.Popen(
        [vllm, "serve", model, "--omni", "--port", str(port), "--host", "127.0.0.1",
         "--max-num-seqs", str(args.max_num_seqs), "--max-queue-len", "1024",
         "--warmup-sizes", args.size, "--disable-uvicorn-access-log"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **({"OMP_NUM_THREADS": str(args.server_threads)}
                               if args.server_threads else {})})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        import requests

        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited; see {log.name}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.5)
        for c in (int(v) for v in args.concurrency.split(",")):
            ips, lat = asyncio.run(load(url, c, args.requests, args.size, args.steps))
            rows.append({"concurrency": c, "images_per_s": ips, "vs_diffusers": ips / base_ips,
                         "p50_s": statistics.median(lat), "p99_s": percentile(lat, 99)})
    finally:
        server.terminate()
        server.wait(30)

    print(f"plain diffusers, one at a time: {base_ips:.2f} images/s "
          f"({args.size}, {args.steps} steps, {args.requests} requests)")
    print(f"{'concurrency':>11} {'images/s':>9} {'vs diffusers':>13} {'p50 s':>7} {'p99 s':>7}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['images_per_s']:>9.2f} {r['vs_diffusers']:>12.2f}x "
              f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f}")
    print(json.dumps({
        "command": "benchmarks/bench_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "diffusers_images_per_s": base_ips, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
