"""What the engine benchmarks share: the model argument and one fixed request."""

from __future__ import annotations

import argparse
import os
import tempfile

PROMPT = "a lighthouse on a rocky coast at dusk, oil painting"


def add_model_args(ap: argparse.ArgumentParser, steps: int, size: str = "256x256") -> None:
    ap.add_argument("--model", default="qwen-image-bench", help="tiny family to build, or a dir")
    ap.add_argument("--size", default=size)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=3)


def model_and_params(args: argparse.Namespace):
    """The model directory (building a tiny family once) and the request: seed 0, true CFG 4,
    float output."""
    from vllm_omni import OmniDiffusionSamplingParams
    from vllm_omni.testing.tiny_models import FAMILIES, build

    model = args.model
    if model in FAMILIES:
        model = build(model, os.path.join(tempfile.gettempdir(), "vllm_omni_bench", model))
    width, height = (int(v) for v in args.size.split("x"))
    params = OmniDiffusionSamplingParams(num_inference_steps=args.steps, width=width,
                                         height=height, seed=0, true_cfg_scale=4.0,
                                         output_type="np")
    return model, params
