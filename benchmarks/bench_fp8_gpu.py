"""The full-size Qwen-Image transformer (random weights, bf16) on one GPU: first its Linear shapes
alone (bf16 against W8A8 with the Triton activation quantizer and with the eager reference, which
must give the same bytes), then a denoising step at 1024x1024 in bf16, FP8 W8A8 (the model's
default ignored layers, then every block Linear), FP8 weight-only, then layerwise and model-level
offload of the FP8 model; peak device memory and the FP8 output's error. Needs torch and diffusers only (the GPU machine has no vLLM); prints JSON.

    python benchmarks/bench_fp8_gpu.py            # a GPU: the real config, 1024x1024
    python benchmarks/bench_fp8_gpu.py --tiny     # a CPU: the code paths on a 2-layer model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, timed  # noqa: E402
from vllm_omni.models.qwen_image import QwenImageAdapter  # noqa: E402  (plain data; no vLLM)
from vllm_omni.offload.offload import Unit  # noqa: E402
from vllm_omni.quantization.fp8 import (  # noqa: E402
    Fp8Linear,
    _quantize_tokens_torch,
    dequantize,
    quantize_model,
    quantize_rows,
    targets,
)


def peak(device, fn) -> int:
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def linear_shapes(device, tokens: int, repeats: int = 50) -> dict:
    """Each (in, out) shape of a Qwen-Image block's Linears at ``tokens`` tokens: bf16, then W8A8
    with the Triton quantizer (what ``Fp8Linear`` runs) and with the eager reference."""
    from vllm_omni.quantization import fp8_triton

    results = {"triton": fp8_triton.available()}
    for k, n in ((3072, 3072), (3072, 12288), (12288, 3072)):
        torch.manual_seed(0)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=device, dtype=torch.bfloat16)
        q, scale = quantize_rows(w)

        def w8a8(quantize):
            xq, xs = quantize(x)
            return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.unsqueeze(0), bias=b,
                                    out_dtype=torch.bfloat16)

        r = {"bf16_us": timed(lambda: torch.nn.functional.linear(x, w, b), device, 5, repeats)}
        for name, quantize in (("triton", fp8_triton.quantize_rows),
                               ("eager", _quantize_tokens_torch)):
            r[f"{name}_quantize_us"] = timed(lambda: quantize(x), device, 5, repeats)
            r[f"{name}_linear_us"] = timed(lambda: w8a8(quantize), device, 5, repeats)
            r[f"{name}_speedup_vs_bf16"] = r["bf16_us"] / r[f"{name}_linear_us"]
        (tq, ts), (eq, es) = fp8_triton.quantize_rows(x), _quantize_tokens_torch(x)
        r["same_bytes_as_eager"] = bool(torch.equal(tq.view(torch.uint8), eq.view(torch.uint8))
                                        and torch.equal(ts, es))
        results[f"{k}->{n}"] = {key: round(v * 1e6, 1) if key.endswith("_us") else v
                                for key, v in r.items()}
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-offload", action="store_true")
    args = ap.parse_args()
    from diffusers import QwenImageTransformer2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2,
                  joint_attention_dim=64, axes_dims_rope=(8, 12, 12)) if args.tiny else {}
    size = 128 if args.tiny else args.size
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = QwenImageTransformer2DModel(**config).eval()
    torch.set_default_dtype(default)
    with torch.no_grad():  # default init leaves some layers at zero; every weight random
        for p in model.parameters():
            p.normal_(0, 0.02)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    side = size // 16
    gen = torch.Generator(device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=gen, device=device,
                                  dtype=dtype),
        encoder_hidden_states=torch.randn(1, args.text_tokens, cfg.joint_attention_dim,
                                          generator=gen, device=device, dtype=dtype),
        encoder_hidden_states_mask=torch.ones(1, args.text_tokens, dtype=torch.long,
                                              device=device),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_shapes=[[(1, side, side)]], return_dict=False)

    @torch.inference_mode()
    def step():
        return model(**inputs)[0]

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "params": params,
           "size": f"{size}x{size}", "text_tokens": args.text_tokens, "build_s": round(build_s, 1)}
    if device.type == "cuda":
        out["linears"] = linear_shapes(device, side * side + args.text_tokens)
        print(json.dumps({"linears": out["linears"]}), flush=True)
    rep = args.repeats
    ref = step().float()
    out["bf16"] = {"step_s": timed(step, device, 2, rep), "peak_bytes": peak(device, step),
                   "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    print(json.dumps(out), flush=True)

    def offload_runs(label):
        # Layerwise offload (diffusers' group offloading, a block per group, prefetch on a stream).
        if device.type == "cuda" and not args.skip_offload:
            from diffusers.hooks import HookRegistry, apply_group_offloading

            base = step().float()
            base_s = timed(step, device, 1, rep)
            t0 = time.perf_counter()
            apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=True, non_blocking=True)
            setup = time.perf_counter() - t0
            torch.cuda.empty_cache()
            lw = {"setup_s": setup, "step_s": timed(step, device, 2, rep),
                  "peak_bytes": peak(device, step)}
            lw["max_abs_diff_vs_no_offload"] = (step().float() - base).abs().max().item()
            lw["step_ratio_vs_no_offload"] = lw["step_s"] / base_s
            registry = HookRegistry.check_if_exists_or_initialize(model)
            for hook in ("group_offloading", "layer_execution_tracker",
                         "lazy_prefetch_group_offloading"):
                registry.remove_hook(hook, recurse=True)
            model.to(device)
            out[f"{label}layerwise_offload"] = lw
            print(json.dumps({f"{label}layerwise_offload": lw}), flush=True)
            # Model-level: the whole transformer onloaded once per request from pinned memory.
            t0 = time.perf_counter()
            unit = Unit(model, device, None)
            pin_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            unit.onload()
            sync(device)
            onload_s = time.perf_counter() - t0
            unit.offload()
            unit.restore()
            sync(device)
            out[f"{label}model_offload"] = {"pin_s": pin_s, "onload_s": onload_s}
            print(json.dumps({f"{label}model_offload": out[f"{label}model_offload"]}), flush=True)
            del unit
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    def fp8_run(names, label):
        quantize_model(model, names, w8a8=device.type == "cuda")
        layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        r = {"layers": len(layers), "w8a8": any(m.w8a8 for m in layers),
             "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
             "step_s": timed(step, device, 2, rep), "peak_bytes": peak(device, step)}
        got = step().float()
        r["rel_l2_error"] = ((got - ref).norm() / ref.norm()).item()
        r["cosine"] = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), 0).item()
        r["speedup_vs_bf16"] = out["bf16"]["step_s"] / r["step_s"]
        if r["w8a8"]:
            # One layer's own error (its output against bf16 with the dequantized weight, same
            # input), apart from how errors grow through 60 random blocks.
            errs = []
            for m in layers[:: max(1, len(layers) // 8)]:
                seen = {}
                h = m.register_forward_pre_hook(lambda mod, a, seen=seen: seen.update(x=a[0]))
                step()
                h.remove()
                x = seen["x"]
                want = torch.nn.functional.linear(x, dequantize(m.weight, m.weight_scale, x.dtype),
                                                  m.bias).float()
                errs.append(((m(x).float() - want).norm() / want.norm()).item())
            r["single_layer_rel_error_max"] = max(errs)
        if r["w8a8"]:  # the same FP8 weights, dequantized per layer instead (weight-only)
            for m in layers:
                m.w8a8 = False
            r["weight_only_step_s"] = timed(step, device, 1, max(2, rep // 2))
            for m in layers:
                m.w8a8 = True
        out[label] = r
        print(json.dumps({label: r}), flush=True)

    if device.type == "cuda":  # does _scaled_mm take a bias with row-wise scales here?
        a = torch.randn(64, 128, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(32, 128, device=device).to(torch.float8_e4m3fn)
        try:
            torch._scaled_mm(a, b.t(), scale_a=torch.ones(64, 1, device=device),
                             scale_b=torch.ones(1, 32, device=device),
                             bias=torch.zeros(32, device=device, dtype=torch.bfloat16),
                             out_dtype=torch.bfloat16)
            out["scaled_mm_rowwise_bias"] = "ok"
        except Exception as e:  # noqa: BLE001 - a probe: the answer is the error
            out["scaled_mm_rowwise_bias"] = repr(e)[:300]
    plan = QwenImageAdapter.fp8_layers, QwenImageAdapter.fp8_ignore
    for names, label in ((targets(model, *plan), "fp8_default_ignore"),
                         (targets(model, plan[0], ("*img_mod*", "*txt_mod*")),
                          "fp8_all_block_linears")):
        try:
            fp8_run(names, label)
        except Exception as e:  # noqa: BLE001 - report it and still print what was measured
            import traceback

            traceback.print_exc()
            out[label] = {"error": repr(e)[:500]}
    try:  # on the FP8 model (FP8 + layerwise, one of the bench's modes)
        offload_runs("fp8_")
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        out["offload_error"] = repr(e)[:500]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
