"""Data-parallel replicas: throughput of ``--data-parallel-size 2`` (one CPU thread per replica)
against one replica (two threads), same model, requests and concurrency, in one run.

Each arm is a real ``vllm serve MODEL --omni`` process; clients keep ``--concurrency`` requests
in flight until ``--requests`` have been answered (distinct seeds, b64 PNG responses). The
replicas' share of the requests comes from the server's own metrics.

    .venv/bin/python benchmarks/bench_scaleout.py
    .venv/bin/python benchmarks/bench_scaleout.py --model qwen-image-bench --size 256x256
    .venv/bin/python benchmarks/bench_scaleout.py --ray   # and the two replicas as Ray actors

With ``--ray`` a third arm runs the two replicas' workers as Ray actors on a one-node Ray
cluster the script starts (``ray start --head``, one CPU per replica) and stops, against the
same replicas as worker processes: the cost of the Ray executor.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

import requests

from common import machine, model_dir, percentile, start_server, stop_server


def served_by_replica(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm_omni:engine_requests_total{") and 'outcome="ok"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            counts[replica] = counts.get(replica, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def arm(model_dir: str, flags: list[str], args: argparse.Namespace) -> dict:
    log = os.path.join(tempfile.gettempdir(), f"bench_scaleout_{len(flags)}.log")
    proc, url, _ = start_server(model_dir, log, "--max-num-seqs", str(args.max_num_seqs), *flags)
    try:
        body = {"prompt": "a lighthouse on a rocky coast at dusk", "size": args.size,
                "num_inference_steps": args.steps}

        def one(seed: int) -> float:
            t = time.perf_counter()
            r = requests.post(url + "/v1/images/generations", json={**body, "seed": seed},
                              timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.concurrency)))  # warm both replicas' first calls
            before = served_by_replica(url)
            t0 = time.perf_counter()
            latencies = list(pool.map(one, range(1000, 1000 + args.requests)))
            wall = time.perf_counter() - t0
        after = served_by_replica(url)
        latencies.sort()
        return {"flags": " ".join(flags) or "(one replica)",
                "images_per_s": round(args.requests / wall, 3),
                "p50_s": round(latencies[len(latencies) // 2], 3),
                "p99_s": round(percentile(latencies, 99), 3),
                "requests_by_replica": {r: after[r] - before.get(r, 0) for r in sorted(after)}}
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen-image", help="tiny family to build, or a dir")
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=1)
    ap.add_argument("--ray", action="store_true", help="also the two replicas on Ray")
    args = ap.parse_args()

    model = model_dir(args.model)
    cores = os.cpu_count() or 2
    # The same cores in both arms: one replica with all of them, or two with half each (the
    # workers split the host's cores among all ranks of all replicas).
    one = arm(model, [], args)
    two = arm(model, ["--data-parallel-size", "2"], args)
    extra = {}
    if args.ray:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2",
                        "--include-dashboard=false"], env=env, check=True,
                       capture_output=True)
        try:
            on_ray = arm(model, ["--data-parallel-size", "2", "--distributed-executor-backend",
                                 "ray"], args)
        finally:
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        extra = {"two_replicas_on_ray": on_ray,
                 "ray_vs_processes": round(on_ray["images_per_s"] / two["images_per_s"], 3)}
    print(json.dumps({
        "benchmark": "bench_scaleout",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(), "cores": cores, "model": args.model, "size": args.size,
        "steps": args.steps, "concurrency": args.concurrency, "requests": args.requests,
        "one_replica": one, "two_replicas": two,
        "throughput_ratio": round(two["images_per_s"] / one["images_per_s"], 3), **extra,
    }, indent=2))


if __name__ == "__main__":
    main()
