"""What one batch may cost: its peak memory beyond the loaded weights, estimated before it runs.

A diffusion call goes through phases one after the other, and its peak is the largest of them:

- **encode** (edit and layered models): the VAE encoder on each input image, at the size the
  pipeline resizes it to (about 1 MP for the Qwen and LongCat edit models, whatever size the output
  is). The images are encoded one at a time.
- **denoise**: the transformer on ``batch x tokens`` hidden states, where a token is one 2x2 patch
  of latents (``token_side`` = 16 pixels for every served family) and the sequence also holds the
  input images' latents (edit) and the prompt.
- **decode**: the VAE decoder on every output image of the batch at once (no pipeline slices it),
  at full resolution. On the CPU this dominates by far: the last decoder stage keeps several
  ``channels x H x W`` activations alive, and the Qwen-Image VAE's causal convolutions also keep a
  copy of every convolution input in their frame cache until the decode ends.
- **post**: the decoded images converted to numpy and PIL.

With ``b`` bytes per activation, ``P = W x H`` output pixels, ``N`` output images in the call
(``n`` summed over the batch, times the frames per image):

    decode  = N * P * (b * U_dec * C_dec + 24) + slack
    encode  = (largest input's working pixels) * b * U_enc * C_enc + slack
    denoise = sum over requests of n * (2 if CFG doubles the batch) * T * hidden * b * 40 + 16 MiB
    post    = N * P * 64
    peak    = max(encode, denoise, decode, post)

where ``C`` is the VAE width that runs at full resolution, ``U`` its coefficient (below) and
``T = P / 16² + input tokens + 512 prompt tokens``. For a video, ``N`` counts frames in the output
and post terms, but the decoder's working set is the frames it decodes at once (a chunk: the
adapter's ``frames_decoded_at_once``) and ``T`` counts latent frames (``latent_frames``). For
audio, ``P`` is the samples the VAE decodes per waveform (the adapter's ``decoded_pixels``:
Stable Audio decodes its whole window and then cuts the clip) and ``T`` its latents.

Attention scores are not a term: on the CPU, ``scaled_dot_product_attention`` (torch 2.13) takes
the flash kernel for these models (no mask, or a ``B x 1 x 1 x L`` key-padding mask), which never
materialises the ``L x L`` scores (measured: 2 MiB extra for L=8192, 2 heads, where scores would
be 512 MiB); CUDA's flash and memory-efficient kernels do not either. Only a full ``L x L`` mask
costs ``L^2`` (the mask itself), and no served transformer builds one.

The coefficients below are in "units": elements per output pixel per channel of the layer width
they name, times the activation element size. They were measured on the tiny random-weight models
(``vllm_omni.testing.tiny_models``) and on stand-alone VAEs of other widths, fp32 on a 2-core CPU,
as the peak resident set size (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``, after ``malloc_trim``) minus the resident size before the call, at
256² to 2048², after a warm-up call; ``python -m vllm_omni.testing.memory_probe MODEL_DIR``
repeats the measurement for a model. Where a coefficient fell between measurements the larger
side was taken: the estimate errs high. Half-precision activations (CUDA) were not measured here;
the VAEs upcast norms and upsampling to fp32, so half precision is counted at 3 bytes, not 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

MiB = 2**20
GiB = 2**30

# -- VAE decoders and encoders --------------------------------------------------------------------
# AutoencoderKL / AutoencoderKLFlux2 (FLUX.1, FLUX.2, SD3, Z-Image, LongCat, Ovis, GLM-Image): the
# last up block receives ``block_out_channels[1]`` channels upsampled to full resolution, and its
# first resnet holds input, GroupNorm output and SiLU output at that width at once. Measured:
# 4.3-5.0 units at 1024²-2048² (widths 8/16 and 16/32, 1-2 layers per block); 5.0 was measured
# once on CI with the estimate 70 KB short, so the margin sits above the highest reading.
KL_DECODE_UNITS = 5.5  # x block_out_channels[1]
# The encoder's first stage runs at full resolution at block_out_channels[0]: 4.3-6.0 units.
KL_ENCODE_UNITS = 6.0  # x block_out_channels[0]
# Allocator slack: tensors under glibc's 32 MiB mmap threshold come from the heap, which fragments;
# measured +4 to +14 MiB over the per-pixel term at 256²-512².
KL_SLACK = 8 * MiB

# AutoencoderKLQwenImage (every Qwen-Image model): the full-resolution stage runs at ``base_dim``
# channels; besides its transients (the 2x upsample at 2*base_dim, the three-frame causal padding)
# each causal convolution caches its input until the decode ends, two per residual block.
# Measured: 18.9-20.3 units with 1 residual block per stage, 22.4-24.4 with 2 (base_dim 8 and 16).
QWEN_DECODE_UNITS = 15.0
QWEN_DECODE_UNITS_PER_RES_BLOCK = 4.0
# Encoder: 11.4-12.6 units with 1 residual block, 13.4-15.0 with 2.
QWEN_ENCODE_UNITS = 10.0
QWEN_ENCODE_UNITS_PER_RES_BLOCK = 2.5
# Many more heap-sized allocations (pads, cache clones) than the KL VAE: measured +75 to +290 MiB
# over the per-pixel term at 256²-768².
QWEN_SLACK = 192 * MiB

# AutoencoderOobleck (Stable Audio): the last decoder block runs at ``decoder_channels`` at the full
# sample rate (an upsampling transposed convolution, three dilated residual units with Snake
# activations, whose sin/pow/mul temporaries are full-size). On the CPU the resident set grows by
# 5.7-14.9 units at 2^18-2^20 samples (widths 16 and 32, 3-5 blocks), the most on a process's
# first large decode (oneDNN's convolution buffers, heap growth: 244-608 MiB for the same decode
# at 2^19 samples, width 16; the highest, 608 MiB, in a CI run on a busy machine). The spread is
# glibc's heap, which fragments differently from run to run of one script: with the mmap threshold
# pinned, freed buffers leave the resident set and the tensors alone peak at 5.5-6.2 units, the
# same every run. On an H200 the tensors peak at 4.5 (fp32) to 5.5 (bf16) units.
OOBLECK_DECODE_UNITS = 14.0
OOBLECK_DECODE_UNITS_CUDA = 7.0
OOBLECK_SLACK = 192 * MiB

# The decoded batch (float RGB, then clamped) at the end of the decode, in bytes per pixel.
DECODE_OUTPUT_BYTES_PER_PIXEL = 24
# Post-processing: float numpy copy, x255, rounding, uint8 and PIL images. Measured 51-60.
POST_BYTES_PER_PIXEL = 64

# -- transformer ----------------------------------------------------------------------------------
# Live activations per token, in units of the hidden size: hidden states of both streams, q/k/v,
# the MLP's 4x expansion, modulation, RoPE tables. Measured 28-35 units (Qwen-Image widths 32 and
# 256, Z-Image width 48 with batched CFG) at 1024².
DIT_UNITS = 40.0
DIT_SLACK = 16 * MiB
# Prompt tokens counted into the sequence: a generous prompt (the Qwen text templates are ~34
# tokens, a long prompt a few hundred).
TEXT_TOKENS = 512

# -- the budget -----------------------------------------------------------------------------------
# Kept free for everything else (the other processes, the API server, page cache pressure).
SAFETY_MARGIN_FRACTION = 0.05
SAFETY_MARGIN_MIN = 512 * MiB


@dataclass(frozen=True)
class VaeCost:
    """How a VAE's activations scale: ``units`` elements per pixel per ``width`` channel."""

    decode_width: int
    decode_units: float
    encode_width: int
    encode_units: float
    slack: int
    cuda_decode_units: float | None = None  # where CUDA's differs from the CPU's, measured


def vae_cost(config: dict[str, Any]) -> VaeCost:
    """The cost model of a VAE from its ``vae/config.json``."""
    cls = config.get("_class_name", "")
    if "base_dim" in config:  # AutoencoderKLQwenImage (and its Wan-style relatives)
        base, blocks = int(config["base_dim"]), int(config.get("num_res_blocks", 2))
        return VaeCost(decode_width=base,
                       decode_units=QWEN_DECODE_UNITS + QWEN_DECODE_UNITS_PER_RES_BLOCK * blocks,
                       encode_width=base,
                       encode_units=QWEN_ENCODE_UNITS + QWEN_ENCODE_UNITS_PER_RES_BLOCK * blocks,
                       slack=QWEN_SLACK)
    if "block_out_channels" in config:  # AutoencoderKL, AutoencoderKLFlux2
        enc = [int(c) for c in config["block_out_channels"]]
        dec = [int(c) for c in (config.get("decoder_block_out_channels") or enc)]
        return VaeCost(decode_width=dec[1] if len(dec) > 1 else dec[0],
                       decode_units=KL_DECODE_UNITS, encode_width=enc[0],
                       encode_units=KL_ENCODE_UNITS, slack=KL_SLACK)
    if cls == "AutoencoderOobleck":  # no encoder term: nothing is encoded from a request
        return VaeCost(decode_width=int(config.get("decoder_channels", 128)),
                       decode_units=OOBLECK_DECODE_UNITS, encode_width=0, encode_units=0,
                       slack=OOBLECK_SLACK, cuda_decode_units=OOBLECK_DECODE_UNITS_CUDA)
    raise ValueError(f"no memory model for VAE {cls or config!r}: it has neither base_dim nor "
                     "block_out_channels")


def transformer_hidden(config: dict[str, Any]) -> int:
    """The transformer's hidden size from its ``transformer/config.json``."""
    if "dim" in config:  # Z-Image
        return int(config["dim"])
    if "num_attention_heads" in config and "attention_head_dim" in config:
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    for key in ("hidden_size", "inner_dim"):
        if key in config:
            return int(config[key])
    raise ValueError(f"no hidden size in the config of {config.get('_class_name', 'transformer')}")


def activation_bytes(element_size: int) -> float:
    """Bytes per activation element: fp32 as measured; half precision at 3 (see module doc)."""
    return 4.0 if element_size >= 4 else 1.5 * element_size


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs to know about a loaded model."""

    vae: VaeCost
    hidden: int
    token_side: int  # output pixels per side of one transformer token
    element_size: int  # bytes per element of the loaded weights' dtype
    cfg_calls: str  # "batched": CFG runs as one call on a doubled batch

    @classmethod
    def from_model_dir(cls, model_dir: str, adapter: Any, spec: Any,
                       element_size: int, device_type: str = "cpu") -> "ModelDims":
        vae_config, transformer_config = adapter.memory_configs(model_dir)
        vae = vae_cost(vae_config)
        if device_type == "cuda" and vae.cuda_decode_units is not None:
            vae = replace(vae, decode_units=vae.cuda_decode_units)
        hidden = transformer_hidden(transformer_config)
        vae_scale = getattr(adapter, "vae_scale", None)
        # Every served DiT takes one token per 2x2 latent patch (patch 2, or FLUX-style packing).
        token_side = vae_scale(model_dir) * 2 if vae_scale else spec.size_multiple
        return cls(vae=vae, hidden=hidden, token_side=token_side, element_size=element_size,
                   cfg_calls=adapter.cfg_calls)


@dataclass
class MemoryEstimate:
    total: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.get) if self.parts else "total"


def estimate(dims: ModelDims, adapter: Any, reqs: Sequence[Any],
             uses_cfg: Callable[[Any], bool] | None = None) -> MemoryEstimate:
    """The peak extra memory of running ``reqs`` (requests of one batch key) as one call.

    ``uses_cfg(req)`` says whether a request runs classifier-free guidance; it only matters for
    adapters whose CFG doubles the transformer batch (``cfg_calls == "batched"``).
    """
    first = reqs[0]
    pixels = adapter.decoded_pixels(first)
    frames = adapter.output_frames(first)
    items = sum(r.num_images_per_prompt for r in reqs)
    act = activation_bytes(dims.element_size)
    vae = dims.vae

    # Every decoded frame's output stays; a video VAE's working set is one chunk's frames.
    decode = (items * pixels * (act * vae.decode_units * vae.decode_width
                                * adapter.frames_decoded_at_once(first)
                                + DECODE_OUTPUT_BYTES_PER_PIXEL * frames) + vae.slack)
    post = items * frames * pixels * POST_BYTES_PER_PIXEL

    inputs = [adapter.vae_input_sizes(r) for r in reqs]
    encode = 0
    if any(inputs):
        largest = max(w * h for sizes in inputs for w, h in sizes)
        encode = int(largest * act * vae.encode_units * vae.encode_width + vae.slack)

    side = dims.token_side
    out_tokens = adapter.output_tokens(first, side)
    batch = 0
    for r, sizes in zip(reqs, inputs):
        in_tokens = sum((w // side) * (h // side) for w, h in sizes)
        doubled = 2 if dims.cfg_calls == "batched" and uses_cfg is not None and uses_cfg(r) else 1
        batch += r.num_images_per_prompt * doubled * (out_tokens + in_tokens + TEXT_TOKENS)
    denoise = batch * dims.hidden * act * DIT_UNITS + DIT_SLACK

    parts = {"encode": int(encode), "denoise": int(denoise), "decode": int(decode),
             "post": int(post)}
    return MemoryEstimate(total=max(parts.values()), parts=parts)


# -- the budget -----------------------------------------------------------------------------------
def free_memory(device: Any) -> tuple[int, int]:
    """(memory a call on ``device`` may still take, the safety margin already taken off it): on
    CUDA the device's free memory plus what the caching allocator holds unused; on the CPU the
    host's available RAM."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        import psutil

        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
    margin = max(SAFETY_MARGIN_MIN, int(total * SAFETY_MARGIN_FRACTION))
    return max(0, free - margin), margin


def format_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory_size(value: int | str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1.5G"`` or a number of bytes -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"not a memory size: {value!r} (e.g. 8GiB, 512MiB, or bytes)")
        n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if n < 0 or math.isnan(n) or math.isinf(n):
        raise ValueError(f"memory size must be >= 0, got {value!r}")
    return int(n)


# -- batches --------------------------------------------------------------------------------------
def plan_batch(count: int, cost: Callable[[tuple[int, ...]], int],
               limit: int) -> tuple[list[list[int]], list[int]]:
    """Splits a batch of ``count`` requests into consecutive calls that each fit ``limit``.

    ``cost(indices)`` is the estimate of running those requests as one call. Returns (the calls,
    as lists of indices; the indices of requests that do not fit even alone). A request that fits
    alone is never refused for what it was batched with: it runs in a later call of the batch.
    """
    calls: list[list[int]] = []
    refused: list[int] = []
    current: list[int] = []
    for i in range(count):
        if cost((i,)) > limit:
            refused.append(i)
            continue
        if current and cost(tuple(current) + (i,)) > limit:
            calls.append(current)
            current = []
        current.append(i)
    if current:
        calls.append(current)
    return calls, refused


def too_large_error(req: Any, estimate_one: Callable[[Any], MemoryEstimate], limit: int,
                    where: str, adapter: Any, size_multiple: int):
    """The 400 for a request that does not fit ``limit`` even alone, naming what would fit: a
    smaller n, a smaller size of the same aspect ratio, or both."""
    from vllm_omni.engine.errors import RequestTooLargeError

    est, count = estimate_one(req), req.num_images_per_prompt
    fits = lambda r: estimate_one(r).total <= limit  # noqa: E731
    n_fit = next((n for n in range(count - 1, 0, -1)
                  if fits(replace(req, num_images_per_prompt=n))), 0)
    phase = {"decode": "the VAE decode", "encode": "the VAE encode of the input images",
             "denoise": "the transformer", "post": "the output images"}.get(est.largest)
    with_n = f" with n={count}" if count > 1 else ""
    audio = adapter.output == "audio"
    what = ("a clip" if audio else f"{req.width}x{req.height}") + with_n
    message = (f"{what} needs an estimated {format_bytes(est.total)} of memory beyond the loaded "
               f"model (most of it in {phase}), more than the {format_bytes(limit)} {where}; ")
    if n_fit:
        message += f"use n={n_fit}{' or less' if n_fit > 1 else ''}" + (
            "" if audio else " at this size, or a smaller size")
        return RequestTooLargeError(message, param="n")
    if audio:
        message += ("the model decodes its whole window whatever the clip's length, so no "
                    "shorter clip fits either")
        return RequestTooLargeError(message)
    smaller = largest_fitting_size(req, fits, size_multiple) if adapter.sized else None
    alone = (largest_fitting_size(replace(req, num_images_per_prompt=1), fits, size_multiple)
             if adapter.sized and count > 1 and smaller is None else None)
    if smaller:
        message += f"use a smaller size (about {smaller[0]}x{smaller[1]} fits{with_n})"
    elif alone:
        message += f"use n=1 and a smaller size (about {alone[0]}x{alone[1]} fits)"
    elif not adapter.sized:
        message += "the model sets the output size from its input; nothing smaller fits"
    else:
        message += "no size fits within it"
    return RequestTooLargeError(message, param="size")


def largest_fitting_size(req: Any, fits: Callable[[Any], bool], m: int) -> tuple[int, int] | None:
    """The largest size of ``req``'s aspect ratio (and n) that fits, or None."""
    lo, hi = 0, req.width // m  # widths in multiples of m: lo fits (or is 0), hi does not

    def size(k: int) -> tuple[int, int]:
        return k * m, max(m, round(k * req.height / req.width) * m)

    while hi - lo > 1:
        mid = (lo + hi) // 2
        w, h = size(mid)
        if fits(replace(req, width=w, height=h)):
            lo = mid
        else:
            hi = mid
    return size(lo) if lo else None
