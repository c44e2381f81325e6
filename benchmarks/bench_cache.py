"""Cache backends: wall-time speedup and PSNR against the uncached image with the same seed.

Each configuration runs in its own offline engine on the same model, prompt, seed, size and
steps (true CFG on). The speedup is the uncached engine's median time over the cached one's,
measured in this run; PSNR compares the cached image with the uncached one (float output, peak
1.0). Random-weight models only approximate real quality: their step-to-step changes differ from a
trained model's, so the thresholds that reach a given PSNR differ too.

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



def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=50)
    ap.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.6,0.8,1.0")
    ap.add_argument("--presets", default="", help="comma-separated named presets to add")
    args = ap.parse_args()
    model, params = model_and_params(args)

    from vllm_omni import Omni

    def measure(**engine_kw):
        with Omni(model=model, **engine_kw) as engine:
            engine.generate(PROMPT, params, use_tqdm=False)  # warm-up
            times, out = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = engine.generate(PROMPT, params, use_tqdm=False)[0]
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    base_s, base = measure()
    configs = [("tea_cache", {"rel_l1_thresh": float(t)}) for t in args.thresholds.split(",")]
    configs += [("tea_cache", {"preset": p}) for p in args.presets.split(",") if p]
    rows = []
    for backend, cfg in configs:
        s, out = measure(cache_backend=backend, cache_config=cfg)
        rows.append({"backend": backend, "cache_config": cfg, "seconds": s,
                     "speedup": base_s / s, "psnr_db": psnr(out.images[0], base.images[0]),
                     "computed": out.metrics.get("transformer_calls_computed"),
                     "skipped": out.metrics.get("transformer_calls_skipped")})

    print(f"uncached: {base_s:.2f} s/image ({args.steps} steps, {args.size}, CFG on)")
    print(f"{'backend':<10} {'cache_config':<32} {'s/image':>8} {'speedup':>8} {'PSNR dB':>8} "
          f"{'computed/skipped':>17}")
    for r in rows:
        print(f"{r['backend']:<10} {json.dumps(r['cache_config']):<32} {r['seconds']:>8.2f} "
              f"{r['speedup']:>8.2f} {r['psnr_db']:>8.1f} {r['computed']:>8}/{r['skipped']:<8}")
    print(json.dumps({
        "command": "benchmarks/bench_cache.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "uncached_s": base_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
