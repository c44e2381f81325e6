"""Serving throughput: images/s, latency and time to first step at several concurrencies, for
plain diffusers, request batching and step batching, on two workloads.

- ``identical``: every request has the same size, steps and guidance (prompts and seeds vary).
- ``mixed``: steps drawn from 4-50, guidance 1.0 or 4.0 (true CFG), random seeds.

The baseline is what a user without a server does: one diffusers pipeline, one request after the
other, the same requests. Each server arm is a real ``vllm serve MODEL --omni`` process:
``batching`` is ``--max-num-seqs N --no-step-batching`` (requests of one batch key run as one
pipeline call), ``step`` is ``--max-num-seqs N --step-batching``, the default (each request runs
its own steps; denoiser calls are shared).
Clients send ``--requests`` requests at each concurrency over HTTP (b64 PNG responses, so encoding
and transfer are paid too). Time to first step is the server's own mean, from arrival to the
request's first denoiser call (``vllm_omni:time_to_first_step_seconds``). Everything runs in this
one invocation, on this machine.

    .venv/bin/python benchmarks/bench_throughput.py                       # tiny model
    .venv/bin/python benchmarks/bench_throughput.py --model qwen-image-bench --size 256x256
    .venv/bin/python benchmarks/bench_throughput.py --cache-backend cache_dit --cache-config JSON

With a cache both server arms cache, and request batching runs ``--max-num-seqs 1``: a cache
decides for a whole batch, so that is the only way it runs without step batching.

Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time

from common import add_model_args, model_dir, percentile, start_server, stop_server

PROMPTS = ["a lighthouse on a rocky coast at dusk", "a red fox in the snow",
           "an astronaut riding a horse on the moon", "a painting of a city street in the rain"]


def workload(kind: str, n: int, steps: int) -> list[dict]:
    """``n`` request bodies (the same list for every arm)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        if kind == "identical":
            out.append({"prompt": PROMPTS[i % len(PROMPTS)], "num_inference_steps": steps,
                        "seed": i})
        else:
            out.append({"prompt": PROMPTS[i % len(PROMPTS)],
                        "num_inference_steps": rng.randint(4, 50),
                        "true_cfg_scale": rng.choice([1.0, 4.0]),
                        "seed": rng.randrange(2**31)})
    return out


def diffusers_baseline(model: str, width: int, height: int, bodies: list[dict]) -> dict:
    """One plain diffusers pipeline serving ``bodies`` in turn."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def one(b):
        # A true CFG scale with no negative prompt: the server's empty negative, as here.
        extra = {"negative_prompt": " "} if b.get("true_cfg_scale", 1.0) > 1 else {}
        return pipe(prompt=b["prompt"], width=width, height=height,
                    num_inference_steps=b["num_inference_steps"],
                    true_cfg_scale=b.get("true_cfg_scale", 1.0), **extra,
                    generator=torch.Generator().manual_seed(b["seed"])).images[0]

    one(bodies[0])  # warm-up, as the server's
    latencies = []
    t0 = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        one(b)
        latencies.append(time.perf_counter() - t)
    return {"images_per_s": len(bodies) / (time.perf_counter() - t0),
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 99)}


async def load(url: str, concurrency: int, bodies: list[dict], size: str):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/images/generations", json={**body, "size": size})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return len(bodies) / wall, latencies


def first_step(url: str) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-step histogram."""
    import requests

    total = count = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm_omni:time_to_first_step_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm_omni:time_to_first_step_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The tiny model at 32x32 spends its time in the transformer steps, which batching shares;
    # at 128x128 its full-resolution VAE dominates (docs/serving.md).
    add_model_args(ap, steps=20, size="32x32")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--workloads", default="identical,mixed")
    ap.add_argument("--arms", default="batching,step", help="server arms: batching, step")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the server (default: its own choice)")
    ap.add_argument("--cache-backend", default=None, choices=["tea_cache", "cache_dit"],
                    help="both arms cache; request batching then runs --max-num-seqs 1, the only "
                         "way a cache runs without step batching (diffusers stays uncached)")
    ap.add_argument("--cache-config", default=None, help="JSON, as the server's flag")
    ap.set_defaults(model="qwen-image")
    args = ap.parse_args()

    model = model_dir(args.model)
    width, height = (int(v) for v in args.size.split("x"))
    kinds = args.workloads.split(",")
    levels = [int(v) for v in args.concurrency.split(",")]
    bodies = {k: workload(k, args.requests, args.steps) for k in kinds}
    baseline = {k: diffusers_baseline(model, width, height, bodies[k]) for k in kinds}

    flags = {"batching": ["--max-num-seqs", "1" if args.cache_backend else str(args.max_num_seqs),
                          "--no-step-batching"],
             "step": ["--max-num-seqs", str(args.max_num_seqs), "--step-batching"]}
    cache = ["--cache-backend", args.cache_backend] if args.cache_backend else []
    if args.cache_config:
        cache += ["--cache-config", args.cache_config]
    rows = []
    for arm in args.arms.split(","):
        server, url, _ = start_server(
            model, os.path.join(tempfile.gettempdir(), f"bench_throughput_{arm}.log"),
            "--max-queue-len", "1024", "--warmup-sizes", args.size, *flags[arm], *cache,
            env={"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else None)
        try:
            for kind in kinds:
                for c in levels:
                    before = first_step(url)
                    ips, lat = asyncio.run(load(url, c, bodies[kind], args.size))
                    after = first_step(url)
                    ttfs = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    rows.append({"arm": arm, "workload": kind, "concurrency": c,
                                 "images_per_s": round(ips, 3),
                                 "vs_diffusers": round(ips / baseline[kind]["images_per_s"], 3),
                                 "p50_s": round(statistics.median(lat), 3),
                                 "p99_s": round(percentile(lat, 99), 3),
                                 "first_step_mean_s": round(ttfs, 3)})
        finally:
            stop_server(server)

    ratios = {}
    for kind in kinds:
        for c in levels:
            got = {r["arm"]: r for r in rows if r["workload"] == kind and r["concurrency"] == c}
            if "batching" in got and "step" in got:
                b, s = got["batching"], got["step"]
                ratios[f"{kind}@{c}"] = {
                    "throughput": round(s["images_per_s"] / b["images_per_s"], 3),
                    "p99": round(s["p99_s"] / b["p99_s"], 3)}
    for kind in kinds:
        b = baseline[kind]
        print(f"{kind}: plain diffusers one at a time {b['images_per_s']:.2f} images/s "
              f"(p50 {b['p50_s']:.2f} s, p99 {b['p99_s']:.2f} s)")
    print(f"{'arm':>9} {'workload':>9} {'conc':>5} {'images/s':>9} {'vs diff':>8} {'p50 s':>7} "
          f"{'p99 s':>7} {'1st step':>9}")
    for r in rows:
        print(f"{r['arm']:>9} {r['workload']:>9} {r['concurrency']:>5} {r['images_per_s']:>9.2f} "
              f"{r['vs_diffusers']:>7.2f}x {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
              f"{r['first_step_mean_s']:>9.3f}")
    print(json.dumps({
        "command": "benchmarks/bench_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "size": args.size,
        "diffusers": baseline, "rows": rows, "step_vs_batching": ratios}, indent=1))


if __name__ == "__main__":
    main()
