"""A model family's plan (its denoisers and what it supports in parallel) and the startup check
of a layout. The features that apply it are listed in order in ``vllm_omni.features``."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_omni.diffusion.data import DiffusionParallelConfig


@dataclass
class ParallelPlan:
    """Declared by a model adapter from the model's config files (no weights needed)."""

    model: str  # for messages
    num_heads: int
    # The pipeline attributes every denoiser feature applies to (Wan2.2 A14B: "transformer",
    # "transformer_2"); those a loaded pipeline lacks are skipped.
    denoisers: tuple[str, ...] = ("transformer",)
    # Which features the model has is its declared matrix (ModelAdapter.features); this is how.
    cfg_branches: int = 2  # denoiser calls per step with CFG on; 0: none to split
    cfg_reason: str = ""  # why there are none, when there are none
    # Code the plan names as "module:attribute" (features.resolve: imported where it runs).
    sp_processor: str | None = None  # SequenceParallel -> the model's SP attention processor
    # How CFG reaches the denoiser: "separate" calls per branch (split the calls) or one
    # "batched" call on a doubled batch (split the batch); the adapter's ``cfg_calls``.
    cfg_calls: str = "separate"
    tp_plan: str | None = None  # denoiser -> its TP plan, where diffusers has no ``_tp_plan``
    cp_plan: str | None = None  # likewise for ``_cp_plan``
    # FP8: fnmatch patterns (names inside a denoiser) of the Linears quantized, and of those kept
    # in full precision by default (quantization_config {"ignore": [...]} replaces these).
    fp8_layers: tuple[str, ...] = ()
    fp8_ignore: tuple[str, ...] = ()

    def denoiser_modules(self, pipe) -> list:
        """The denoisers ``pipe`` has, of those the plan names."""
        import torch

        found = [getattr(pipe, name, None) for name in self.denoisers]
        return [m for m in found if isinstance(m, torch.nn.Module)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(plan: ParallelPlan, p: DiffusionParallelConfig) -> None:
    """Raises ValueError naming a layout that works, for layouts of declared features that this
    model still cannot run (undeclared ones the matrix refused already)."""
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
