"""Tensor parallelism by replacing a loaded model's Linear layers with parallel ones.

The plan is diffusers' ``_tp_plan`` format (module pattern -> "colwise" | "rowwise" | a packed
style): a column-parallel layer keeps its slice of output features, a row-parallel layer its slice
of input features and all-reduces its output before adding the bias. A packed layer (FLUX's fused
QKV+MLP projections) is several such layers side by side: each block is sliced on its own, so
every rank keeps matching slices of every block. Attention processors that reshape by head_dim
then see ``heads / tp`` heads and need no change. An RMSNorm over features that were split (Wan's
query/key norms span all heads: plan style "sharded_rmsnorm") keeps its slice of the weight and
sums the squares over the ranks.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vllm_omni.distributed.comm import GroupComm
from vllm_omni.features import ParallelFeature, resolve
from vllm_omni.quantization.fp8 import Fp8Linear, fp8_linear, gemm_shape_ok


class Sharded:
    """A layer holding this rank's slices of a full layer's tensors (``comm``, ``blocks`` and
    ``split_dim`` set by the layer)."""

    comm: GroupComm
    blocks: list[int] | None
    split_dim: ClassVar[int]

    def shard_weight(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of a tensor laid out like the full layer along ``dim`` (its weight,
        bias, a LoRA factor or FP8 scales): each packed block split on its own."""
        parts = full.split(self.blocks or [full.shape[dim]], dim)
        n, rank = self.comm.world_size, self.comm.rank
        for p in parts:
            if p.shape[dim] % n:
                raise ValueError(f"cannot split {p.shape[dim]} features over {n} "
                                 "tensor-parallel ranks")
        return torch.cat([p.narrow(dim, rank * (p.shape[dim] // n), p.shape[dim] // n)
                          for p in parts], dim).clone()

    def gather_weight(self, shard: torch.Tensor, dim: int) -> torch.Tensor:
        """The full tensor from every rank's ``shard_weight`` (exact: the shards are slices)."""
        n, blocks = self.comm.world_size, self.blocks or [shard.shape[dim] * self.comm.world_size]
        dtype = shard.dtype
        if dtype.itemsize == 1 and dtype.is_floating_point:  # FP8: gloo moves it as bytes
            shard = shard.view(torch.uint8)
        ranks = [r.split([b // n for b in blocks], dim)
                 for r in self.comm.all_gather(shard.contiguous(), dim).chunk(n, dim)]
        return torch.cat([r[i] for i in range(len(blocks)) for r in ranks], dim).view(dtype)


class ParallelLinear(Sharded, torch.nn.Linear):
    """This rank's shard of a full Linear along ``split_dim`` of its weight (0: output features,
    1: input features); ``blocks`` are the packed blocks' sizes along it. An FP8 layer
    (``Fp8Linear``) keeps its per-output-feature scales with its rows."""

    def __init__(self, full: torch.nn.Linear, comm: GroupComm, blocks: list[int] | None = None):
        torch.nn.Module.__init__(self)
        self.comm, self.blocks = comm, blocks
        self.weight_scale = None
        with torch.no_grad():
            self.weight = torch.nn.Parameter(self.shard_weight(full.weight, self.split_dim),
                                             requires_grad=False)
            self.bias = None if full.bias is None else torch.nn.Parameter(
                self.shard_bias(full.bias), requires_grad=False)
            if isinstance(full, Fp8Linear):
                self.weight_scale = torch.nn.Parameter(self.shard_bias(full.weight_scale),
                                                       requires_grad=False)
        self.out_features, self.in_features = self.weight.shape
        self.w8a8 = getattr(full, "w8a8", False) and gemm_shape_ok(*self.weight.shape)

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        """A tensor over output features (the bias, FP8 scales)."""
        return self.shard_weight(full, 0)

    def shard_lora(self, tensor: torch.Tensor, factor: str) -> torch.Tensor:
        """This rank's part of a LoRA factor on this layer ("A": rank x in, "B": out x rank)."""
        raise NotImplementedError

    def local(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(x, self.weight, bias)
        return fp8_linear(x, self.weight, self.weight_scale, bias, self.w8a8)


class ColumnParallelLinear(ParallelLinear):
    split_dim = 0  # its output stays split: the next row-parallel layer consumes it as is

    def shard_lora(self, tensor: torch.Tensor, factor: str) -> torch.Tensor:
        # B's rows are output features: the delta comes out split like the layer's output.
        return self.shard_weight(tensor, 0) if factor == "B" else tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x, self.bias)


class RowParallelLinear(ParallelLinear):
    split_dim = 1

    def shard_lora(self, tensor: torch.Tensor, factor: str) -> torch.Tensor:
        # A's columns are input features: each rank projects its slice of the input, and
        # ``ReducedLinear`` sums the rank-r products before B.
        return self.shard_weight(tensor, 1) if factor == "A" else tensor

    def shard_bias(self, full: torch.Tensor) -> torch.Tensor:
        return full.clone()  # whole: added once, after the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_reduce(self.local(x, None))
        return out if self.bias is None else out + self.bias  # the bias once, not once per rank


class ReducedLinear(torch.nn.Linear):
    """A LoRA A factor over a row-parallel layer's slice of the input: its (tokens x rank)
    products are all-reduced, so B sees A applied to the whole input. peft keeps calling it as
    its ``lora_A`` Linear (same weight)."""

    def __init__(self, local: torch.nn.Linear, comm: GroupComm):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = local.in_features, local.out_features
        self.weight, self.bias, self.comm = local.weight, local.bias, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(F.linear(x, self.weight, self.bias))


def shard_lora_state(state: dict[str, torch.Tensor], model: torch.nn.Module,
                     prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict (``<prefix><module>.lora_A.weight`` / ``lora_B``) with
    the factors of ``model``'s parallel layers cut to this rank's parts."""
    modules = dict(model.named_modules())
    out = {}
    for key, tensor in state.items():
        for suffix, factor in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.startswith(prefix) and key.endswith(suffix):
                layer = modules.get(key[len(prefix):-len(suffix)])
                if isinstance(layer, ParallelLinear):
                    tensor = layer.shard_lora(tensor, factor)
        out[key] = tensor
    return out


def reduce_lora_inputs(model: torch.nn.Module) -> None:
    """After peft loaded adapters over ``model``'s parallel layers: the A factors over
    row-parallel layers all-reduce their products (see ``ReducedLinear``)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        lora_a = getattr(module, "lora_A", None)
        if isinstance(base, RowParallelLinear) and isinstance(lora_a, torch.nn.ModuleDict):
            for key, factor in lora_a.items():
                if not isinstance(factor, ReducedLinear):
                    lora_a[key] = ReducedLinear(factor, base.comm)


class ShardedRMSNorm(Sharded, torch.nn.Module):
    """An RMSNorm over features split across the ranks (by the column-parallel layer before it):
    the sum of squares is all-reduced, so each rank divides by the whole vector's RMS."""

    split_dim = 0

    def __init__(self, full: torch.nn.RMSNorm, comm: GroupComm):
        torch.nn.Module.__init__(self)
        self.comm, self.blocks = comm, None
        self.features = full.normalized_shape[-1]
        self.eps = full.eps
        with torch.no_grad():
            self.weight = None if full.weight is None else torch.nn.Parameter(
                self.shard_weight(full.weight, 0), requires_grad=False)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        xf = x.float()  # the sum of squares in fp32, as torch's fused kernel accumulates
        squares = self.comm.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        out = (xf * torch.rsqrt(squares / self.features + eps)).type_as(x)
        return out if self.weight is None else out * self.weight


def _layer(style, module: torch.nn.Module, name: str) -> tuple[type[ParallelLinear], Any]:
    """The parallel class for a plan entry, and its packed blocks' absolute sizes (or None)."""
    if isinstance(style, str):
        kinds = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear}
        if style not in kinds:
            raise ValueError(f"unknown tensor-parallel style {style!r} for {name}")
        return kinds[style], None
    from diffusers.hooks.tensor_parallel import (
        PackedColwiseParallel,
        _blocks_to_block_sizes,
        _packed_blocks,
    )

    col = isinstance(style, PackedColwiseParallel)
    total = module.out_features if col else module.in_features
    sizes = _blocks_to_block_sizes(total, _packed_blocks(style, module, name))
    return (ColumnParallelLinear if col else RowParallelLinear), sizes


def apply_tensor_parallel(model: torch.nn.Module, plan: dict[str, Any], comm: GroupComm
                          ) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """Replaces every Linear the plan names by its parallel shard; returns (parent, attribute,
    original Linear) for each. The originals give up their storage (tensor parallelism exists to
    hold 1/tp of the weights) until ``restore`` gathers it back."""
    replaced = []
    if comm.world_size == 1:
        return replaced
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        style = next((s for p, s in plan.items()
                      if name.count(".") == p.count(".") and fnmatch.fnmatchcase(name, p)), None)
        if style is None:
            continue
        if style == "sharded_rmsnorm" and isinstance(module, torch.nn.RMSNorm):
            layer = ShardedRMSNorm(module, comm)
        elif not isinstance(module, torch.nn.Linear):
            raise ValueError(f"tensor-parallel plan names {name}, a {type(module).__name__}, "
                             "not a Linear")
        else:
            cls, blocks = _layer(style, module, name)
            layer = cls(module, comm, blocks)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name], attr, layer)
        for p in module.parameters():
            p.data = p.data.new_empty(0)
        replaced.append((modules[parent_name], attr, module))
    return replaced


def restore(replaced: list[tuple[torch.nn.Module, str, torch.nn.Linear]]) -> None:
    """Puts the original Linears back with their full weights (all TP ranks together)."""
    for parent, attr, original in reversed(replaced):
        layer = getattr(parent, attr)
        if original.weight is not None:
            original.weight.data = layer.gather_weight(layer.weight.data, layer.split_dim)
        for name in ("bias", "weight_scale"):
            if getattr(original, name, None) is not None:
                shard = getattr(layer, name).data
                getattr(original, name).data = (layer.gather_weight(shard, 0)
                                                if layer.split_dim == 0 else shard.clone())
        setattr(parent, attr, original)


class TensorParallelFeature(ParallelFeature):
    name = "tensor_parallel"

    def apply(self, pipe, groups) -> None:
        self.groups, tp = groups, groups.tp
        self.replaced: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
        self.heads: list[torch.nn.Module] = []
        for model in self.denoisers(pipe):
            plan = resolve(self.plan.tp_plan)(model) if self.plan.tp_plan else type(model)._tp_plan
            self.replaced += apply_tensor_parallel(model, plan, tp)
            # Attention modules whose projections were split now hold heads / tp heads.
            # Processors that reshape by head count (LongCat's) must be told; those reshaping by
            # head_dim are unaffected.
            for module in model.modules():
                if isinstance(getattr(module, "to_q", None), ColumnParallelLinear) \
                        and isinstance(getattr(module, "heads", None), int):
                    self.heads.append(module)
                    module.heads //= tp.world_size
                    if isinstance(getattr(module, "inner_dim", None), int):
                        module.inner_dim //= tp.world_size

    def remove(self) -> None:
        n = self.groups.tp.world_size
        for module in self.heads:
            module.heads *= n
            if isinstance(getattr(module, "inner_dim", None), int):
                module.inner_dim *= n
        restore(self.replaced)
        self.replaced, self.heads = [], []
