"""LoRA cost: denoising time with an unfused active adapter against none (target <= 1.10x),
plain diffusers with the adapter fused against none, and the time to switch between two
adapters: both resident (``set_adapters`` only) and under ``--max-loras 1`` (evict, then load
from the host copy; target <= 100 ms on the bench model).

Random adapters (``vllm_omni.testing.tiny_lora``) on the attention projections of every block,
at ``--rank``. Requests alternate (none, A, none, A, ...) on one engine so machine drift cancels;
ratios are of medians of the worker's denoising time (``denoise_s``).

    .venv/bin/python benchmarks/bench_lora.py
    .venv/bin/python benchmarks/bench_lora.py --model qwen-image --steps 4 --rank 64

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

from common import PROMPT, add_model_args, machine, model_and_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, steps=10)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    args.repeats = max(args.repeats, 5)
    model, params = model_and_params(args)

    import torch
    from diffusers import DiffusionPipeline

    from vllm_omni import Omni, OmniDiffusionSamplingParams
    from vllm_omni.testing.tiny_lora import build

    work = tempfile.mkdtemp(prefix="bench_lora_")
    a = build(model, os.path.join(work, "a.safetensors"), rank=args.rank, seed=1)
    b = build(model, os.path.join(work, "b.safetensors"), rank=args.rank, seed=2)

    def with_lora(name):
        fields = {k: v for k, v in params.to_dict().items() if v is not None}
        if name:
            fields["lora"] = {"name": name}
        return OmniDiffusionSamplingParams(**fields)

    out: dict = {"benchmark": "bench_lora", "command": " ".join(["python", *sys.argv]),
                 "machine": machine(), "model": args.model, "size": args.size,
                 "steps": args.steps, "rank": args.rank, "repeats": args.repeats}
    with Omni(model=model, lora_modules={"a": a, "b": b}, max_loras=2) as engine:
        def run(name):
            return engine.generate(PROMPT, with_lora(name), use_tqdm=False)[0].metrics

        run(None), run("a"), run("b")  # warm-up: both adapters loaded
        none, unfused, switches = [], [], []
        for _ in range(args.repeats):
            none.append(run(None)["denoise_s"])
            unfused.append(run("a")["denoise_s"])
            switches.append(run("b")["lora_switch_s"])  # a -> b, both resident
        out["unfused_vs_none"] = statistics.median(unfused) / statistics.median(none)
        out["denoise_none_s"] = statistics.median(none)
        out["denoise_unfused_s"] = statistics.median(unfused)
        out["switch_resident_ms"] = 1e3 * statistics.median(switches)
    with Omni(model=model, lora_modules={"a": a, "b": b}, max_loras=1) as engine:
        def switch(name):
            return engine.generate(PROMPT, with_lora(name), use_tqdm=False)[0].metrics

        switch("a"), switch("b")  # both read from disk once
        evicting = [switch(n)["lora_switch_s"] for n in ("a", "b") * args.repeats]
        out["switch_evict_reload_ms"] = 1e3 * statistics.median(evicting)

    # Plain diffusers: the same adapter fused into the weights, against none.
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, width=params.width, height=params.height,
                  num_inference_steps=args.steps, true_cfg_scale=params.true_cfg_scale,
                  negative_prompt=" ", output_type="np")

    def timed():
        t0 = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    timed()
    plain = [timed() for _ in range(args.repeats)]
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    timed()
    fused = [timed() for _ in range(args.repeats)]
    out["diffusers_fused_vs_none"] = statistics.median(fused) / statistics.median(plain)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
