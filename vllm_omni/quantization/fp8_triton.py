"""Per-token FP8 quantization of activations in one Triton kernel (CUDA).

W8A8 quantizes every Linear's input on each call. In eager PyTorch that is five passes over the
activations (abs, row max, divide in fp32, clamp, cast); on an H200 at Qwen-Image's 1024x1024
shapes they took 150-590 us per layer against a 70-270 us FP8 GEMM, so W8A8 ran slower than bf16.
One program per row reads it once, takes its largest magnitude, and writes the FP8 row and its
scale: 24-53 us, which makes the FP8 Linear 1.06-1.59x the speed of bf16 there
(``benchmarks/bench_fp8_gpu.py``, docs/memory.md). The arithmetic is the reference's
(``fp8._quantize_tokens_torch``): an fp32 scale of max|x| / 448 per row and x / scale (IEEE
division) rounded to nearest even in FP8, so both give the same bytes (checked on an H200).
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0
TINY = torch.finfo(torch.float32).tiny
MAX_BLOCK = 32768  # a row in one program's registers; wider rows take the reference path


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, fp8_max, tiny, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / fp8_max, tiny)
        q = tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max)  # IEEE division, as torch
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask)
        tl.store(s_ptr + row, scale)

    return triton, quantize_rows_kernel


@functools.cache
def available() -> bool:
    try:
        _kernel()
    except Exception:  # no Triton, or one without a GPU backend
        return False
    return True


def supports(x2: torch.Tensor) -> bool:
    return (x2.is_cuda and x2.dim() == 2 and x2.shape[1] <= MAX_BLOCK and x2.shape[0] > 0
            and x2.dtype in (torch.bfloat16, torch.float16, torch.float32) and available())


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 rows, fp32 scales of shape (M, 1)) of a 2-D CUDA tensor."""
    triton, kernel = _kernel()
    x2 = x2.contiguous()
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(m, 1, device=x2.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    kernel[(m,)](x2, q, scales, k, FP8_MAX, TINY, BLOCK=block,
                 num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return q, scales
