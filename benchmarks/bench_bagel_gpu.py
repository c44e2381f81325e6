"""BAGEL-7B-MoT at full size (random bf16 weights, the published configs) on one GPU: the time
to encode a prompt and an edit input into contexts, and the time and peak memory of a denoising
step at 1024x1024 with 1, 2 and 3 packed sequences (no guidance; text guidance; text and image
guidance on an edit). Needs torch and transformers (and diffusers for the autoencoder's decode,
skipped without it); no vLLM. Prints JSON.

    python benchmarks/bench_bagel_gpu.py            # a GPU: the real configs, 1024x1024
    python benchmarks/bench_bagel_gpu.py --tiny     # a CPU: the code paths on a 2-layer model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import sync, timed  # noqa: E402
from vllm_omni.models.bagel.layout import BagelConfig  # noqa: E402
from vllm_omni.models.bagel.modeling import EMPTY, Bagel, sincos_2d  # noqa: E402

# BAGEL-7B-MoT's llm_config.json (Qwen2.5-7B) and vit_config.json (SigLIP so400m, less the last
# layer, as BAGEL uses it).
LLM = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
           num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
           rope_theta=1000000.0, rms_norm_eps=1e-6)
VIT = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
           num_attention_heads=16, patch_size=14, image_size=980)
TINY_LLM = {**LLM, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_VIT = {**VIT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 112}


def build(device, dtype, tiny: bool) -> Bagel:
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    llm = Qwen2Config(**(TINY_LLM if tiny else LLM))
    vit = SiglipVisionConfig(**(TINY_VIT if tiny else VIT))
    vit._attn_implementation = "sdpa"
    config = BagelConfig(max_latent_size=8 if tiny else 64,
                         vit_max_num_patch_per_side=8 if tiny else 70)
    with torch.device("meta"):
        # The vision markers: the last two ids of the vocabulary (any ids work here).
        model = Bagel(llm, vit, config, llm.vocab_size - 2, llm.vocab_size - 1)
    model.to(dtype).to_empty(device=device)  # no full-precision copy (an H100 lacks room)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(sincos_2d(int(p.shape[0] ** 0.5), p.shape[1]))
            elif p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=llm).to(device)
    return model.eval()


def peak_of(device, fn):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    return out, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="output side (default 1024; tiny 128)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build(device, dtype, args.tiny)
    cfg = model.config
    side = args.size or cfg.max_latent_size * cfg.latent_downsample
    h = w = side // cfg.latent_downsample
    vit_side = cfg.vit_max_num_patch_per_side * model.vit_patch_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = list(range(10, 10 + 40))  # a 40-token prompt (ids: any)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "size": f"{side}x{side}", "latent_tokens": h * w,
               "weights_gib": round(weights / 2**30, 2)}

    with torch.inference_mode():
        results["text_context_s"] = timed(lambda: model.add_text(EMPTY, prompt), device, 1,
                                          args.repeats)
        cond = model.add_text(EMPTY, prompt)
        latent = torch.randn(cfg.latent_channels, 2 * h, 2 * w, device=device, dtype=dtype)
        pixels = torch.rand(3, vit_side, vit_side, device=device, dtype=dtype) * 2 - 1

        def edit_contexts():
            base = model.add_vit_image(model.add_vae_image(EMPTY, latent), pixels)
            return model.add_text(base, prompt), base, cond

        results["edit_context_s"] = timed(edit_contexts, device, 1, args.repeats)
        (e_cond, e_base, e_noimg), results["edit_context_peak_gib"] = peak_of(device,
                                                                             edit_contexts)
        results["edit_context_peak_gib"] = round(results["edit_context_peak_gib"] / 2**30, 2)
        results["edit_context_tokens"] = int(e_cond.keys[0].shape[0])
        x = torch.randn(1, h * w, cfg.latent_patch_size ** 2 * cfg.latent_channels,
                        device=device, dtype=dtype)
        cases = {"t2i_1_sequence": [cond], "t2i_2_sequences": [cond, EMPTY],
                 "edit_3_sequences": [e_cond, e_base, e_noimg]}
        for name, contexts in cases.items():
            step = lambda: model(x, 0.5, contexts, [0] * len(contexts), h, w)  # noqa: E731
            results[f"{name}_step_s"] = timed(step, device, 1, args.repeats)
            _, peak = peak_of(device, step)
            results[f"{name}_peak_gib"] = round(peak / 2**30, 2)
        try:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(32,) * 4 if args.tiny else (128, 256, 512, 512),
                                layers_per_block=1 if args.tiny else 2, latent_channels=16,
                                use_quant_conv=False, use_post_quant_conv=False
                                ).to(device, dtype).eval()
            z = torch.randn(1, 16, 2 * h, 2 * w, device=device, dtype=dtype)
            results["vae_decode_s"] = timed(lambda: vae.decode(z).sample, device, 1, args.repeats)
        except ImportError as e:
            results["vae_decode_s"] = f"skipped: {e}"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
