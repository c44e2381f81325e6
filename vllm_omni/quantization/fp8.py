"""FP8 weights for a DiT's linear layers (``--quantization fp8``).

Online, like vLLM's ``fp8`` shorthand: when the model loads, each targeted Linear's weight becomes
``float8_e4m3fn`` with one fp32 scale per output feature (its row's largest magnitude / 448).
On GPUs with FP8 tensor cores (compute capability >= 8.9) and a bf16 model the activations are
quantized too, per token with a scale taken from each call (dynamic), and the product runs
through ``torch._scaled_mm`` (W8A8). Elsewhere, CPU included, each layer dequantizes its weight
to the compute dtype when it runs (weight-only): the weights take half the memory of bf16 and
the arithmetic is the model's own.

Which layers: the adapter's plan names the Linears inside the transformer blocks
(``fp8_layers``) and those kept in full precision (``fp8_ignore``: modulation, and layers whose
quantization costs the most quality, e.g. Qwen-Image's ``img_mlp``); ``quantization_config
{"ignore": [...]}`` (vLLM's field, fnmatch patterns) replaces the latter.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm_omni.features import Feature

logger = logging.getLogger("vllm_omni")

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = torch.finfo(torch.float32).tiny  # an all-zero row's scale: any positive number works


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as FP8 with one fp32 scale per row (``w ~= q * scale[:, None]``)."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def w8a8_available(device: torch.device, dtype: torch.dtype) -> bool:
    """FP8 tensor cores (Ada, Hopper and later) and a bf16 model: ``_scaled_mm`` with row-wise
    scales writes bf16."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _quantize_tokens(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (token) of ``x2`` as FP8 with its own fp32 scale."""
    from vllm_omni.quantization import fp8_triton

    if fp8_triton.supports(x2):  # CUDA only
        return fp8_triton.quantize_rows(x2)
    return _quantize_tokens_torch(x2)


def _quantize_tokens_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: five passes over the activations (two in fp32), which on an H200 cost more
    than the FP8 GEMM saves; the Triton kernel does it in one read and one write."""
    xs = (x2.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    return (x2 / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8), xs


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               w8a8: bool) -> torch.Tensor:
    """``x @ (q * scale).T + bias``: W8A8 quantizes ``x`` per token for one FP8 GEMM."""
    if not w8a8:
        return F.linear(x, dequantize(q, scale, x.dtype), bias)
    shape = x.shape
    xq, xs = _quantize_tokens(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.unsqueeze(0), bias=bias,
                           out_dtype=x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


def gemm_shape_ok(out_features: int, in_features: int) -> bool:
    """``_scaled_mm`` wants both sides of the weight in multiples of 16; others run weight-only."""
    return out_features % 16 == 0 and in_features % 16 == 0


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is FP8 with per-output-feature scales (``weight_scale``). A Linear
    still, so tensor parallelism shards it (``ParallelLinear`` shards the scales with the rows)."""

    def __init__(self, full: torch.nn.Linear, w8a8: bool):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = full.in_features, full.out_features
        q, scale = quantize_rows(full.weight)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = full.bias
        self.w8a8 = w8a8 and gemm_shape_ok(self.out_features, self.in_features)
        # What it computes in; peft reads it (as for bitsandbytes layers) to give a LoRA adapter
        # on this layer that dtype instead of the weight's float8.
        self.compute_dtype = full.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.w8a8)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={'w8a8' if self.w8a8 else 'weight-only'}"


def targets(model: torch.nn.Module, layers: tuple[str, ...], ignore: tuple[str, ...]
            ) -> list[str]:
    """The names of ``model``'s Linears that ``layers`` match and ``ignore`` does not."""
    def hit(name, patterns):
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return [name for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and hit(name, layers) and not hit(name, ignore)]


def quantize_model(model: torch.nn.Module, names: list[str], w8a8: bool
                   ) -> list[tuple[torch.nn.Module, str, str]]:
    """Replaces each named Linear by its ``Fp8Linear``, one at a time (so the full-precision
    copy of only one layer exists at once); returns (parent, attribute, name) for each."""
    modules = dict(model.named_modules())
    replaced = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        full = getattr(parent, attr)
        with torch.no_grad():
            setattr(parent, attr, Fp8Linear(full, w8a8))
        full.weight.data = full.weight.data.new_empty(0)
        replaced.append((parent, attr, name))
    return replaced


class Fp8Feature(Feature):
    name = "fp8"

    @classmethod
    def check(cls, adapter, config) -> None:
        settings(adapter.parallel_plan(), config.quantization_config)

    def apply(self, pipe, groups) -> None:
        self.groups = groups
        layers, ignore = settings(self.plan, self.config.quantization_config)
        # denoiser attribute -> its compute dtype and (parent, attribute, name) per layer
        self.replaced: dict[str, tuple[torch.dtype, list]] = {}
        self.mode = "weight-only"
        bf16_bytes = self.fp8_bytes = 0
        for attr in self.plan.denoisers:
            model = getattr(pipe, attr, None)
            if not isinstance(model, torch.nn.Module):
                continue
            param = next(model.parameters())
            names = targets(model, layers, ignore)
            if not names:
                raise ValueError(f"fp8: no Linear of {attr} matches {list(layers)} outside "
                                 f"the ignored {list(ignore)}")
            # The device it computes on (under offload its weights wait on the host now).
            done = quantize_model(model, names, w8a8_available(self.device, param.dtype))
            self.replaced[attr] = (param.dtype, done)
            for parent, a, _ in done:
                q = getattr(parent, a)
                bf16_bytes += 2 * q.weight.numel()
                self.fp8_bytes += q.weight.numel() + 4 * q.weight_scale.numel()
                if q.w8a8:
                    self.mode = "w8a8"
        self.ratio = self.fp8_bytes / max(bf16_bytes, 1)
        logger.info("fp8 (%s): %d Linear layers quantized; their weights take %.1f MiB, "
                    "%.3fx of bf16", self.mode, sum(len(d) for _, d in self.replaced.values()),
                    self.fp8_bytes / 2**20, self.ratio)

    def stats(self) -> dict[str, Any]:
        return {"fp8_mode": self.mode, "fp8_weight_bytes": self.fp8_bytes}

    def remove(self) -> None:
        """The original layers back, their weights read again from the checkpoint (FP8 kept
        none): the same tensors the model loaded."""
        from safetensors import safe_open

        for attr, (dtype, done) in self.replaced.items():
            wanted = {f"{name}.weight": (parent, a) for parent, a, name in done}
            for path in sorted(Path(self.adapter.spec.model_dir, attr).glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    for key in wanted.keys() & set(f.keys()):
                        parent, a = wanted.pop(key)
                        q = getattr(parent, a)
                        full = torch.nn.Linear(q.in_features, q.out_features, bias=False,
                                               device="meta")
                        full.weight = torch.nn.Parameter(
                            f.get_tensor(key).to(q.weight.device, dtype), requires_grad=False)
                        full.bias = q.bias
                        setattr(parent, a, full)
            if wanted:
                raise RuntimeError(f"fp8: the checkpoint of {attr} lacks {sorted(wanted)[:3]}")
        self.replaced = {}


def settings(plan, quantization_config: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The plan's quantized layers and the ignored ones, after ``quantization_config``."""
    config = dict(quantization_config or {})
    unknown = set(config) - {"ignore"}
    if unknown:
        raise ValueError(f"quantization_config: unknown field(s) {', '.join(sorted(unknown))}; "
                         "fp8 takes only \"ignore\" (a list of layer-name patterns kept in full "
                         "precision)")
    if not plan.fp8_layers:
        raise ValueError(f"{plan.model} declares no layers for fp8")
    ignore = config.get("ignore", plan.fp8_ignore)
    if not isinstance(ignore, (list, tuple)) or not all(isinstance(p, str) for p in ignore):
        raise ValueError("quantization_config.ignore must be a list of layer-name patterns")
    return tuple(plan.fp8_layers), tuple(ignore)
