"""Parallel layouts: per-step time and bytes communicated per step, against plain diffusers.

For each layout the offline engine generates the same image (same prompt, seed, size, steps,
true CFG on) a few times; the script reports the median denoise time per step, its ratio to a
direct diffusers call in the same run, the max abs difference from the single-rank image, and
the bytes rank 0 sent per step in each group (counted in the group wrappers). Bytes are what a
real deployment moves; times on a CPU box whose cores the ranks share are not parallel
speedups (see docs/parallelism.md for the scaling model on GPUs).

    .venv/bin/python benchmarks/bench_parallel.py
    .venv/bin/python benchmarks/bench_parallel.py --layouts 1,U2,CFG2 --size 512x512 --steps 4

Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from common import PROMPT, add_model_args, model_and_params

LAYOUTS = "1,U2,R2,U2xR2,CFG2,TP2,U2xCFG2,VAE-PP2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=8)
    ap.add_argument("--layouts", default=LAYOUTS, help="comma-separated, e.g. 1,U2,R2xCFG2,TP2")
    args = ap.parse_args()
    model, params = model_and_params(args)
    width, height = params.width, params.height

    from diffusers import DiffusionPipeline

    from vllm_omni import Omni
    from vllm_omni.diffusion.data import DiffusionParallelConfig
    from vllm_omni.testing.dist import parse_layout_name

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    import torch

    def diffusers_once() -> float:
        t0 = time.perf_counter()
        pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, width=width, height=height,
             num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    diffusers_once()
    base_s = statistics.median(diffusers_once() for _ in range(args.repeats))
    del pipe

    rows, reference = [], None
    for name in args.layouts.split(","):
        config = DiffusionParallelConfig(**parse_layout_name(name))
        with Omni(model=model, parallel_config=config) as engine:
            engine.generate(PROMPT, params, use_tqdm=False)  # warm-up
            runs = [engine.generate(PROMPT, params, use_tqdm=False)[0]
                    for _ in range(args.repeats)]
        image = runs[0].images[0]
        reference = image if reference is None else reference
        exec_s = statistics.median(r.metrics["execute_s"] for r in runs)
        sent = runs[0].metrics.get("comm_bytes_rank0", {})
        rows.append({
            "layout": name, "world_size": config.world_size,
            "step_s": exec_s / args.steps,
            "vs_diffusers": base_s / exec_s,
            "max_abs_diff_vs_first_layout": float(np.abs(image - reference).max()),
            "bytes_per_step_rank0": {k: v / args.steps for k, v in sent.items() if v},
        })

    print(f"{'layout':<9} {'ranks':>5} {'s/step':>8} {'x diffusers':>11} {'max|diff|':>10}  "
          "bytes/step sent by rank 0")
    for r in rows:
        sent = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in r["bytes_per_step_rank0"].items())
        print(f"{r['layout']:<9} {r['world_size']:>5} {r['step_s']:>8.4f} "
              f"{r['vs_diffusers']:>11.3f} {r['max_abs_diff_vs_first_layout']:>10.2e}  {sent or '-'}")
    print(json.dumps({
        "command": "benchmarks/bench_parallel.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "diffusers_step_s": base_s / args.steps,
        "layouts": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
