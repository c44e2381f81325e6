"""Memory modes on the bench model, each in a fresh process: none, model-level offload,
layerwise offload, FP8, FP8 + layerwise. Prints JSON: peak memory (device memory on a GPU, the
process's peak RSS on a CPU, both while serving: after load and a warm-up), the denoising time ratio to none, and the output's difference to
none (max abs, PSNR). On a CPU offloaded weights wait in a file, so peak RSS is what drops.

    python benchmarks/bench_memory.py [--model qwen-image-bench] [--size 256x256] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PROMPT, add_model_args, model_and_params  # noqa: E402

MODES = {
    "none": {},
    "model_offload": {"enable_cpu_offload": True},
    "layerwise_offload": {"enable_layerwise_offload": True},
    "fp8": {"quantization": "fp8"},
    "fp8_layerwise": {"quantization": "fp8", "enable_layerwise_offload": True},
}


def _hwm() -> int:
    """The process's peak resident set since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _run(model: str, params, engine: dict, repeats: int, out) -> None:
    import numpy as np
    import torch

    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.worker.model_runner import ModelRunner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = ModelRunner(OmniEngineConfig(model=model, model_name=model, device=device.type,
                                          **engine), 0, device)
    runner.load()
    req = InputProcessor(runner.spec).process(PROMPT, params)
    runner.execute([req])  # warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the peak while serving, not while loading (which holds every weight once)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        image = runner.execute([req])[0].images[0]
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _hwm())
    out.put({"seconds": sorted(times)[len(times) // 2], "peak_bytes": peak,
             "image": np.asarray(image, dtype=np.float32)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, steps=8)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    model, params = model_and_params(args)
    ctx = mp.get_context("spawn")  # a fresh process per mode: its own peak RSS
    results = {}
    for mode in args.modes.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(model, params, MODES[mode], args.repeats, q))
        p.start()
        results[mode] = q.get()
        p.join()
    import numpy as np

    base = results["none"]
    report = {"command": " ".join(["python", *sys.argv]), "model": args.model,
              "size": args.size, "steps": args.steps, "modes": {}}
    for mode, r in results.items():
        diff = np.abs(r["image"] - base["image"])
        mse = float((diff.astype(np.float64) ** 2).mean())
        report["modes"][mode] = {
            "peak_mib": round(r["peak_bytes"] / 2**20, 1),
            "peak_ratio_to_none": round(r["peak_bytes"] / base["peak_bytes"], 3),
            "time_ratio_to_none": round(r["seconds"] / base["seconds"], 3),
            "max_abs_diff": float(diff.max()),
            "psnr_db": None if mse == 0 else round(10 * np.log10(1 / mse), 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
