"""Cache backends: wall-time speedup and PSNR against the uncached image with the same seed.

Each configuration runs in its own offline engine on the same model, prompt, seed, size and
steps (true CFG on). The speedup is the uncached engine's median time over the cached one's, the
two timed alternately in this run; PSNR compares the cached image with the uncached one (float
output, peak 1.0). Random-weight models only approximate real quality: their step-to-step
changes differ from a trained model's, so the thresholds that reach a given PSNR differ too.

    .venv/bin/python benchmarks/bench_cache.py
    .venv/bin/python benchmarks/bench_cache.py --steps 50 --size 256x256 --thresholds 0.2,0.4

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

# The seed defaults (Fn 1, Bn 0, warmup 4, threshold 0.24, at most 3 cached steps in a row), then
# thresholds that random weights need (their residual changes 0.45-0.85 per step), TaylorSeer.
# The step-mask presets follow (--presets).
CACHE_DIT_CONFIGS = [
    {},
    {"residual_diff_threshold": 0.6},
    {"residual_diff_threshold": 0.8},
    {"residual_diff_threshold": 0.8, "max_continuous_cached_steps": 5},
    {"residual_diff_threshold": 0.8, "enable_taylorseer": True},
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=50)
    ap.add_argument("--thresholds", default="0.1,0.2,0.4,0.6,1.0",
                    help="TeaCache rel_l1_thresh values")
    ap.add_argument("--cache-dit", default=";".join(json.dumps(c) for c in CACHE_DIT_CONFIGS),
                    help="';'-separated JSON cache_config objects for cache_dit")
    ap.add_argument("--presets", default="tea_cache:balanced,tea_cache:fast,cache_dit:balanced,"
                    "cache_dit:fast,cache_dit:ultra", help="comma-separated BACKEND:NAME presets")
    args = ap.parse_args()
    model, params = model_and_params(args)

    from vllm_omni import Omni

    def timed(engine):
        t0 = time.perf_counter()
        out = engine.generate(PROMPT, params, use_tqdm=False)[0]
        return time.perf_counter() - t0, out

    configs = [("tea_cache", {"rel_l1_thresh": float(t)}) for t in args.thresholds.split(",") if t]
    configs += [("cache_dit", json.loads(c)) for c in args.cache_dit.split(";") if c.strip()]
    configs += [(p.split(":")[0], {"preset": p.split(":")[1]}) for p in args.presets.split(",") if p]
    rows, base_times = [], []
    # The uncached engine stays up and is timed alternately with each cached one, so a drift in
    # the machine's speed during the run (large on shared CPUs) cancels out of every ratio.
    with Omni(model=model) as base_engine:
        _, base = timed(base_engine)  # warm-up, and the reference image
        for backend, cfg in configs:
            with Omni(model=model, cache_backend=backend, cache_config=cfg) as engine:
                timed(engine)  # warm-up
                pairs = [(timed(base_engine)[0], timed(engine)) for _ in range(args.repeats)]
            b = statistics.median(t for t, _ in pairs)
            s = statistics.median(t for _, (t, _) in pairs)
            out = pairs[-1][1][1]
            base_times += [t for t, _ in pairs]
            rows.append({"backend": backend, "cache_config": cfg, "seconds": s,
                         "uncached_seconds": b, "speedup": b / s,
                         "psnr_db": psnr(out.images[0], base.images[0]),
                         "computed": out.metrics.get("transformer_calls_computed"),
                         "skipped": out.metrics.get("transformer_calls_skipped")})
    base_s = statistics.median(base_times)

    print(f"uncached: {base_s:.2f} s/image ({args.steps} steps, {args.size}, CFG on)")
    print(f"{'backend':<10} {'cache_config':<86} {'s/image':>8} {'speedup':>8} {'PSNR dB':>8} "
          f"{'computed/skipped':>17}")
    for r in rows:
        print(f"{r['backend']:<10} {json.dumps(r['cache_config'], separators=(',', ':')):<86} {r['seconds']:>8.2f} "
              f"{r['speedup']:>8.2f} {r['psnr_db']:>8.1f} {r['computed']:>8}/{r['skipped']:<8}")
    print(json.dumps({
        "command": "benchmarks/bench_cache.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "uncached_s": base_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
