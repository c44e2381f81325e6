"""Stable Audio Open at full size (random weights) on one GPU: the DiT's denoising step over the
whole 47.55 s window with CFG (batch 2), and the Oobleck VAE decode of one and two waveforms in
bf16 and fp32, with each decode's peak device memory beside the worker's estimate
(``vllm_omni.worker.memory``). Needs torch and diffusers only (the GPU machine has no vLLM or
transformers: the text encoder is left out, its 130 x 768 output is random); prints JSON.

    python benchmarks/bench_audio_gpu.py            # a GPU: the released configs
    python benchmarks/bench_audio_gpu.py --tiny     # a CPU: the code paths at toy widths
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, timed  # noqa: E402
from vllm_omni.worker import memory  # noqa: E402  (plain arithmetic; no vLLM)

# stabilityai/stable-audio-open-1.0's transformer/config.json and vae/config.json.
DIT = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
           num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
           cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
           cross_attention_input_dim=768)
VAE = dict(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
           channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128, decoder_input_channels=64,
           audio_channels=2, sampling_rate=44100)
TINY_DIT = dict(sample_size=256, in_channels=8, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, num_key_value_attention_heads=2, out_channels=8,
                cross_attention_dim=32, time_proj_dim=16, global_states_input_dim=64,
                cross_attention_input_dim=32)
TINY_VAE = dict(encoder_hidden_size=16, downsampling_ratios=[2, 4, 4], channel_multiples=[1, 2, 4],
                decoder_channels=16, decoder_input_channels=8, audio_channels=2,
                sampling_rate=16000)
TEXT_TOKENS = 130  # T5's 128 padded tokens and the start and end seconds


def decode_peak(vae, latents, device) -> int:
    """Peak memory of one decode beyond what was allocated before it."""
    if device.type != "cuda":
        vae.decode(latents)
        return 0
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    vae.decode(latents)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from diffusers import AutoencoderOobleck, StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dit_config, vae_config = (TINY_DIT, TINY_VAE) if args.tiny else (DIT, VAE)
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}

    torch.manual_seed(0)
    dit = StableAudioDiTModel(**dit_config).to(device, torch.bfloat16).eval()
    n = dit_config["sample_size"]
    x = torch.randn(2, dit_config["in_channels"], n, device=device, dtype=torch.bfloat16)
    text = torch.randn(2, TEXT_TOKENS, dit_config["cross_attention_input_dim"], device=device,
                       dtype=torch.bfloat16)
    seconds = torch.randn(2, 1, dit_config["global_states_input_dim"], device=device,
                          dtype=torch.bfloat16)
    rotary = get_1d_rotary_pos_embed(dit_config["attention_head_dim"] // 2, n + 1, use_real=True,
                                     repeat_interleave_real=False)
    t = torch.tensor([0.5], device=device)

    def step():
        dit(x, t, encoder_hidden_states=text, global_hidden_states=seconds,
            rotary_embedding=rotary, return_dict=False)

    out["dit_step_s"] = round(timed(step, device, 3, args.repeats), 5)
    out["dit_100_steps_s"] = round(100 * out["dit_step_s"], 3)
    del dit
    cost = memory.vae_cost({"_class_name": "AutoencoderOobleck", **vae_config})
    if device.type == "cuda":  # what the worker's estimate uses there
        cost = replace(cost, decode_units=cost.cuda_decode_units)
    hop = 1
    for r in vae_config["downsampling_ratios"]:
        hop *= r
    samples = n * hop
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        vae = AutoencoderOobleck(**vae_config).to(device, dtype).eval()
        act = memory.activation_bytes(torch.empty((), dtype=dtype).element_size())
        for batch in (1, 2):
            z = torch.randn(batch, vae_config["decoder_input_channels"], n, device=device,
                            dtype=dtype)
            seconds_taken = timed(lambda: vae.decode(z), device, 1, 2)
            measured = decode_peak(vae, z, device)
            estimate = batch * samples * (act * cost.decode_units * cost.decode_width
                                          + memory.DECODE_OUTPUT_BYTES_PER_PIXEL) + cost.slack
            key = f"decode_{str(dtype).split('.')[-1]}_x{batch}"
            out[key] = {"s": round(seconds_taken, 4), "peak_gib": round(measured / 2**30, 3),
                        "estimate_gib": round(estimate / 2**30, 3),
                        "estimate_over_peak": round(estimate / measured, 3) if measured else None}
            print(json.dumps({key: out[key]}), file=sys.stderr)
        del vae
    out["window_s"] = samples / vae_config["sampling_rate"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
