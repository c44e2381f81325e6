"""A model family's plan (its denoisers and what it supports in parallel) and the startup check
of a layout. The features that apply it are listed in order in ``vllm_omni.features``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_omni.diffusion.data import DiffusionParallelConfig


@dataclass
class ParallelPlan:
    """Declared by a model adapter from the model's config files (no weights needed)."""

    model: str  # for messages
    num_heads: int
    # The pipeline attributes every denoiser feature applies to (Wan2.2 A14B: "transformer",
    # "transformer_2"); those a loaded pipeline lacks are skipped.
    denoisers: tuple[str, ...] = ("transformer",)
    sequence_parallel: bool = False
    tensor_parallel: bool = False
    cfg_branches: int = 0  # denoiser calls per step with CFG on; 0: CFG parallel unsupported
    cfg_reason: str = ""  # why CFG parallel is unavailable, when it is
    vae_patch_parallel: bool = False
    # Loaded-pipeline hooks, filled by the adapter (imports diffusers, so worker-side only).
    sp_processor: Callable[..., Any] | None = None
    cfg_output_like: Callable[..., Any] | None = None
    cfg_batched: bool = False  # CFG runs as one doubled batch (split the batch, not the calls)
    # transformer -> its tensor-parallel plan, for models without diffusers' ``_tp_plan``.
    tp_plan: Callable[[Any], dict[str, Any]] | None = None
    cp_plan: Callable[[Any], dict[str, Any]] | None = None  # likewise for ``_cp_plan``
    extra: dict[str, Any] = field(default_factory=dict)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(plan: ParallelPlan, p: DiffusionParallelConfig) -> None:
    """Raises ValueError naming a layout that works, for layouts this model cannot run."""
    if (p.ulysses_degree > 1 or p.ring_degree > 1) and not plan.sequence_parallel:
        raise ValueError(f"{plan.model} does not support sequence parallelism (--usp/--ring); "
                         "use --ulysses-degree 1 --ring-degree 1")
    if p.tensor_parallel_size > 1 and not plan.tensor_parallel:
        raise ValueError(f"{plan.model} does not support tensor parallelism; "
                         "use --tensor-parallel-size 1")
    if p.vae_patch_parallel_size > 1 and not plan.vae_patch_parallel:
        raise ValueError(f"{plan.model} does not support VAE patch parallelism; "
                         "use --vae-patch-parallel-size 1")
    if p.cfg_parallel_size > 1:
        if not plan.cfg_branches:
            raise ValueError(f"--cfg-parallel-size {p.cfg_parallel_size}: {plan.cfg_reason}; "
                             "use --cfg-parallel-size 1")
        if p.cfg_parallel_size != plan.cfg_branches:
            raise ValueError(f"{plan.model} makes {plan.cfg_branches} denoiser calls per step with "
                             f"CFG, so --cfg-parallel-size must be 1 or {plan.cfg_branches}, "
                             f"not {p.cfg_parallel_size}")
    split = p.ulysses_degree * p.tensor_parallel_size
    if plan.num_heads % split:
        ok = [d for d in _divisors(plan.num_heads) if d > 1]
        hint = ""
        if p.tensor_parallel_size == 1 or plan.num_heads % p.tensor_parallel_size:
            near = min(ok, key=lambda d: (abs(d - split), d))
            hint = f" (e.g. --usp {near} with --tensor-parallel-size 1)" if p.tensor_parallel_size == 1 \
                else f" (e.g. --tensor-parallel-size {near} with --usp 1)"
        else:
            per = plan.num_heads // p.tensor_parallel_size
            fits = [d for d in _divisors(per) if d > 1]
            near = min(fits or [1], key=lambda d: (abs(d - p.ulysses_degree), d))
            hint = f" (e.g. --usp {near} with --tensor-parallel-size {p.tensor_parallel_size})"
        raise ValueError(
            f"{plan.model} has {plan.num_heads} attention heads, which ulysses_degree x "
            f"tensor_parallel_size = {split} does not divide; the product must divide "
            f"{plan.num_heads}: one of {', '.join(map(str, ok))}{hint}. Ring attention "
            "(--ring) has no such limit.")
