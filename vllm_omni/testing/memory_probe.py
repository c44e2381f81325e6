"""Measures requests' peak memory and sets it beside the worker's estimate (Linux, CPU).

    python -m vllm_omni.testing.memory_probe MODEL_DIR --sizes 256x256,512x512,1024x1024

Loads MODEL_DIR in this process with the worker's ``ModelRunner`` (CPU, fp32), runs a warm-up
request at 64x64 (first calls allocate thread pools and kernel caches once), then one request per
size in the order given, and prints a JSON line for each: measured and estimated bytes, their
ratio, and the estimate's parts. Give sizes in increasing order.

"Measured" is the peak resident set size during the call less the resident size just before it:
freed heap is returned to the system first (``malloc_trim``) and the kernel's peak counter (VmHWM)
reset through ``/proc/self/clear_refs``, so each number is that call's own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re

_STATUS = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v) * 1024 for k, v in _STATUS.findall(f.read())}


def peak_memory_of(fn):
    """(fn(), peak resident bytes during the call beyond the resident bytes before it)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status()["VmRSS"]
    result = fn()
    return result, _status()["VmHWM"] - before


def supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ctypes.CDLL("libc.so.6").malloc_trim
        return "VmHWM" in _status()
    except (OSError, AttributeError):
        return False


def request(spec, width: int, height: int, n: int, steps: int, **params):
    """A resolved request like the server's warm-up: edit models get a gray input of that size."""
    from PIL import Image

    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    adapter = spec.adapter
    sized = {"width": width, "height": height} if adapter.sized else {}
    p = OmniDiffusionSamplingParams(num_inference_steps=steps, seed=0, num_images_per_prompt=n,
                                    **sized, **params)
    mode = "RGBA" if adapter.task == "image-layers" else "RGB"
    images = [Image.new(mode, (width, height), (128,) * len(mode))] * adapter.image_inputs[0]
    return InputProcessor(spec).process("a red fox in the snow", p, images=images)


def measure(model_dir: str, sizes: list[tuple[int, int]], n: int = 1, steps: int = 2,
            **params):
    """Yields one dict per size: measured and estimated peak bytes beyond the loaded model."""
    import torch

    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.worker.model_runner import ModelRunner

    runner = ModelRunner(OmniEngineConfig(model=model_dir, model_name=model_dir, dtype="float32"),
                         0, torch.device("cpu"))
    runner.load()
    m = runner.spec.size_multiple
    warm = max(m, 64 // m * m)
    [out] = runner.execute([request(runner.spec, warm, warm, 1, steps, **params)])
    assert out.error is None, out.error
    for width, height in sizes:
        req = request(runner.spec, width, height, n, steps, **params)
        est = runner.estimate_memory([req])
        [out], peak = peak_memory_of(lambda: runner.execute([req]))
        if out.error is not None:
            raise RuntimeError(out.error.message)
        yield {"size": f"{width}x{height}", "n": n, "measured": peak, "estimated": est.total,
               "ratio": round(est.total / peak, 3), "largest": est.largest,
               "parts": est.parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--sizes", default="256x256,512x512,1024x1024")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--params", default="{}",
                        help="extra sampling params as JSON, e.g. '{\"guidance_scale\": 3}'")
    args = parser.parse_args(argv)
    if not supported():
        raise SystemExit("needs Linux's /proc/self/clear_refs and glibc's malloc_trim")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    for row in measure(args.model_dir, sizes, args.n, args.steps, **json.loads(args.params)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
