"""Video jobs end to end: ``POST /v1/videos``, polling, and the mp4 download through
``vllm serve --omni``, against a direct diffusers call on the same model, frames, size, steps and
seed; then the same job with ``--cache-backend cache_dit`` against the uncached job.

Runs alternate (diffusers, job, diffusers, ...) so both sides see the same machine state; the
ratios are of medians. The job side includes what a client waits for: HTTP, the queue, H.264
encoding, the atomic write to the job store and the download (polled every 20 ms over one kept-alive
connection, so polling adds at most that).

    .venv/bin/python benchmarks/bench_video.py
    .venv/bin/python benchmarks/bench_video.py --size 128x128 --frames 17 --steps 10 --repeats 5

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

from common import machine, model_dir, start_server, stop_server

PROMPT = "a corgi surfing a wave at sunset"
# Between retrievals of a running job: each costs the server a little CPU, which on a small
# machine the denoising shares; the answer comes at most this much late.
POLL_S = 0.02


def run_job(http: requests.Session, url: str, body: dict) -> tuple[float, bytes]:
    t = time.perf_counter()
    r = http.post(url + "/v1/videos", json=body, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = http.get(f"{url}/v1/videos/{job_id}", timeout=60).json()
        if job["status"] == "completed":
            break
        if job["status"] == "failed":
            raise RuntimeError(job["error"])
        time.sleep(POLL_S)
    data = http.get(f"{url}/v1/videos/{job_id}/content", timeout=60).content
    elapsed = time.perf_counter() - t
    http.delete(f"{url}/v1/videos/{job_id}", timeout=60)
    return elapsed, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan2.2-t2v", help="tiny family to build, or a dir")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    model = model_dir(args.model)
    width, height = (int(v) for v in args.size.split("x"))
    seed = 1234
    body = {"prompt": PROMPT, "size": args.size, "num_frames": args.frames,
            "num_inference_steps": args.steps, "seed": seed}
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    # The adapter passes the model's released CFG defaults; the direct call says them too.
    from vllm_omni.models.registry import load_model_spec

    extra = load_model_spec(model).extra
    cfg = {k: extra[k] for k in ("guidance_scale", "guidance_scale_2") if k in extra}

    def direct() -> float:
        t = time.perf_counter()
        pipe(PROMPT, width=width, height=height, num_frames=args.frames,
             num_inference_steps=args.steps, generator=[torch.Generator().manual_seed(seed)],
             **cfg)
        return time.perf_counter() - t

    work = tempfile.mkdtemp(prefix="bench_video_")
    results: dict = {}
    for name, flags in (("plain", ()), ("cache_dit", ("--cache-backend", "cache_dit"))):
        proc, url, _ = start_server(model, os.path.join(work, name + ".log"),
                                    "--video-storage-dir", os.path.join(work, name), *flags)
        try:
            http = requests.Session()
            direct(), run_job(http, url, body)  # warm-up both sides
            d, j = [], []
            for _ in range(args.repeats):
                d.append(direct())
                j.append(run_job(http, url, body)[0])
            results[name] = {"diffusers_median_s": round(statistics.median(d), 4),
                             "job_median_s": round(statistics.median(j), 4),
                             "job_vs_diffusers": round(statistics.median(j) / statistics.median(d),
                                                       4)}
            print(json.dumps({name: results[name]}), file=sys.stderr)
        finally:
            stop_server(proc)
    print(json.dumps({
        "benchmark": "bench_video",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(),
        "model": args.model, "size": args.size, "frames": args.frames, "steps": args.steps,
        "repeats": args.repeats,
        "job_vs_diffusers": results["plain"]["job_vs_diffusers"],
        "cache_dit_speedup": round(results["plain"]["job_median_s"]
                                   / results["cache_dit"]["job_median_s"], 4),
        "runs": results,
    }, indent=2))


if __name__ == "__main__":
    main()
