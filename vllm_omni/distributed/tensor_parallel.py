"""Tensor parallelism by sharding a loaded model's Linear layers in place.

The plan is diffusers' ``_tp_plan`` format (module pattern -> "colwise" | "rowwise" | a packed
style): a colwise layer keeps its slice of output features, a rowwise layer its slice of input
features plus an all-reduce of its output, with the bias added on TP rank 0 only. A packed layer
(FLUX's fused QKV+MLP projections) is several such layers side by side: each block is sliced on
its own, so every rank keeps matching slices of every block. Attention processors that reshape
by head_dim then see ``heads / tp`` heads and need no change.
"""

from __future__ import annotations

import fnmatch

import torch

from vllm_omni.distributed.comm import GroupComm


def _shard(t: torch.Tensor, dim: int, comm: GroupComm, blocks: list[int] | None = None
           ) -> torch.Tensor:
    if blocks:
        return torch.cat([_shard(part, dim, comm) for part in t.split(blocks, dim)], dim)
    n = t.shape[dim]
    if n % comm.world_size:
        raise ValueError(f"cannot split {n} features over {comm.world_size} tensor-parallel ranks")
    size = n // comm.world_size
    return t.narrow(dim, comm.rank * size, size).clone()


def _style(style, module: torch.nn.Module, name: str) -> tuple[str, list[int] | None]:
    """("colwise" | "rowwise", absolute block sizes or None) for a plan entry."""
    if isinstance(style, str):
        return style, None
    from diffusers.hooks.tensor_parallel import (
        PackedColwiseParallel,
        _blocks_to_block_sizes,
        _packed_blocks,
    )

    kind = "colwise" if isinstance(style, PackedColwiseParallel) else "rowwise"
    total = module.out_features if kind == "colwise" else module.in_features
    return kind, _blocks_to_block_sizes(total, _packed_blocks(style, module, name))


def apply_tensor_parallel(model: torch.nn.Module, plan: dict[str, str], comm: GroupComm) -> int:
    """Shards every Linear the plan names; returns how many were sharded."""
    if comm.world_size == 1:
        return 0
    count = 0
    sharded: set[int] = set()
    for name, module in list(model.named_modules()):
        style = next((s for p, s in plan.items()
                      if name.count(".") == p.count(".") and fnmatch.fnmatchcase(name, p)), None)
        if style is None:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"tensor-parallel plan names {name}, a {type(module).__name__}, not a Linear")
        style, blocks = _style(style, module, name)
        with torch.no_grad():
            if style == "colwise":
                module.weight = torch.nn.Parameter(_shard(module.weight, 0, comm, blocks),
                                                   requires_grad=False)
                if module.bias is not None:
                    module.bias = torch.nn.Parameter(_shard(module.bias, 0, comm, blocks),
                                                     requires_grad=False)
                module.out_features //= comm.world_size
            elif style == "rowwise":
                module.weight = torch.nn.Parameter(_shard(module.weight, 1, comm, blocks),
                                                   requires_grad=False)
                if module.bias is not None and comm.rank != 0:
                    module.bias = None
                module.in_features //= comm.world_size
                module.register_forward_hook(lambda m, a, out: comm.all_reduce(out))
            else:
                raise ValueError(f"unknown tensor-parallel style {style!r} for {name}")
        sharded.add(id(module))
        count += 1
    # Attention modules whose projections were split now hold heads / tp heads. Processors that
    # reshape by head count (LongCat's) need to be told; those reshaping by head_dim are unaffected.
    for module in model.modules():
        to_q = getattr(module, "to_q", None)
        if id(to_q) in sharded and isinstance(getattr(module, "heads", None), int):
            module.heads //= comm.world_size
            if isinstance(getattr(module, "inner_dim", None), int):
                module.inner_dim //= comm.world_size
    return count
