"""Sequence parallelism applied to an unmodified diffusers transformer.

The split points come from the model's context-parallel plan (diffusers' ``_cp_plan``: which
inputs/outputs of which submodules are token streams), applied with plain torch module hooks:
token streams are cut into balanced shards (lengths may differ by one, so no size has to be
divisible by the degree), every token-local layer runs on its shard, attention runs through
``sequence_parallel_attention``, and the plan's output is gathered back. The model's attention
processors are swapped for sequence-parallel ones supplied by the model adapter.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vllm_omni.distributed.attention import balanced_sizes, offsets, sequence_parallel_attention
from vllm_omni.distributed.comm import GroupComm
from vllm_omni.features import ParallelFeature, resolve


class SequenceParallel:
    def __init__(self, ulysses: GroupComm, ring: GroupComm, sp: GroupComm):
        self.ulysses, self.ring, self.sp = ulysses, ring, sp
        self.world_size = ulysses.world_size * ring.world_size
        self.rank = ring.rank * ulysses.world_size + ulysses.rank
        assert sp.world_size == self.world_size and sp.rank == self.rank, (sp, ulysses, ring)
        self._handles: list[Any] = []  # torch hook handles
        self._described: list[Any] = []  # (diffusers HookRegistry, hook name)
        self._processors: list[Any] = []  # (attention module, its own processor)
        self.reset()

    def reset(self) -> None:
        """Forgets the previous forward's streams (run before each transformer forward)."""
        self.totals: dict[str, int] = {}  # stream name -> unsplit length
        self.full: dict[str, torch.Tensor] = {}  # stream name -> unsplit mask/index tensor
        self.memo: dict[str, Any] = {}  # per-forward values derived from the above

    # -- splitting and gathering ---------------------------------------------------------------
    def split(self, x: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        self.totals[name] = x.shape[dim]
        if x.dim() <= 2:  # masks and indices; activations are not kept past their split
            self.full[name] = x
        return self.shard(x, dim)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of ``x`` along ``dim``."""
        sizes = balanced_sizes(x.shape[dim], self.world_size)
        return x.narrow(dim, offsets(sizes)[self.rank], sizes[self.rank])

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        n = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
        sizes = [int(s) for s in self.sp.all_gather(n, 0).tolist()]
        return self.sp.all_gather(x, dim, sizes)

    # -- attention -------------------------------------------------------------------------------
    def joint_layout(self, streams: Sequence[str], masks: dict[str, str] | None = None,
                     ) -> tuple[list[int], list[torch.Tensor | None] | None]:
        """Per SP rank: local length and key mask of the concatenation of ``streams``' shards.

        ``masks`` maps a stream to the name of its (unsplit, [B, L] boolean) key-mask input.
        """
        key = f"joint:{','.join(streams)}"
        if key in self.memo:
            return self.memo[key]
        sizes = [balanced_sizes(self.totals[s], self.world_size) for s in streams]
        totals = [sum(sz[r] for sz in sizes) for r in range(self.world_size)]
        full_masks = {s: self.full.get((masks or {}).get(s, "")) for s in streams}
        if all(m is None or bool(m.all()) for m in full_masks.values()):
            result = (totals, None)
        else:
            per_rank = []
            for r in range(self.world_size):
                parts = []
                for s, sz in zip(streams, sizes):
                    m = full_masks[s]
                    if m is None:
                        ref = next(v for v in full_masks.values() if v is not None)
                        parts.append(torch.ones(ref.shape[0], sz[r], dtype=torch.bool, device=ref.device))
                    else:
                        parts.append(m.to(torch.bool).narrow(1, offsets(sz)[r], sz[r]))
                per_rank.append(torch.cat(parts, dim=1))
            result = (totals, per_rank)
        self.memo[key] = result
        return result

    def attention(self, q, k, v, seq_sizes, key_masks, scale=None) -> torch.Tensor:
        return sequence_parallel_attention(q, k, v, self.ulysses, self.ring, seq_sizes, key_masks,
                                           scale)

    # -- installing on a model ---------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, plan: dict[str, Any],
              make_processor: Callable[["SequenceParallel"], Any] | None = None) -> None:
        """Hooks ``plan`` (diffusers' ``_cp_plan`` format) into ``model``."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        self._handles.append(model.register_forward_pre_hook(lambda m, a: self.reset()))
        modules = dict(model.named_modules())
        for pattern, spec in plan.items():
            # "blocks.*" means every block, not every module inside the blocks; "" is the model.
            names = [""] if pattern == "" else [
                n for n in modules if n and n.count(".") == pattern.count(".")
                and fnmatch.fnmatchcase(n, pattern)]
            if not names:
                raise ValueError(f"sequence-parallel plan names {pattern!r}, which "
                                 f"{type(model).__name__} does not have")
            for name in names:
                module = modules[name]
                if isinstance(spec, ContextParallelOutput):
                    self._handles.append(module.register_forward_hook(
                        lambda m, args, out, dim=spec.gather_dim: self.gather(out, dim)))
                    continue
                inputs = {k: v for k, v in spec.items()
                          if isinstance(v, ContextParallelInput) and not v.split_output}
                outputs = {k: v for k, v in spec.items()
                           if isinstance(v, ContextParallelInput) and v.split_output}
                if inputs:
                    self._handles.append(module.register_forward_pre_hook(
                        _split_inputs_hook(self, module, inputs), with_kwargs=True))
                    self._described.append(_describe_split(self, module, inputs, pattern))
                if outputs:
                    self._handles.append(module.register_forward_hook(
                        _split_outputs_hook(self, name, outputs)))
        if make_processor is not None:
            for m in model.modules():
                if hasattr(m, "set_processor") and hasattr(m, "processor"):
                    self._processors.append((m, m.processor))
                    m.set_processor(make_processor(self))

    def remove(self) -> None:
        """Puts the model back as it was: hooks off, its own attention processors back."""
        for h in self._handles:
            h.remove()
        for registry, name in self._described:
            registry.remove_hook(name, recurse=False)
        for m, processor in self._processors:
            m.set_processor(processor)
        self._handles, self._described, self._processors = [], [], []


class SequenceParallelFeature(ParallelFeature):
    name = "sequence_parallel"

    def apply(self, pipe, groups) -> None:
        self.groups, self.applied = groups, []
        for model in self.denoisers(pipe):
            sp = SequenceParallel(groups.ulysses, groups.ring, groups.sp)
            plan = resolve(self.plan.cp_plan)(model) if self.plan.cp_plan else type(model)._cp_plan
            sp.apply(model, plan, self.plan.sp_processor and resolve(self.plan.sp_processor))
            self.applied.append(sp)

    def use_batcher(self, batcher) -> None:
        # The streams are forgotten before each forward by a pre-hook on the model's __call__,
        # which a batched forward does not go through (it calls the forward): a round of two
        # forwards (two sizes) would reuse the first one's layout.
        batcher.before_forward.append(self._forget_streams)

    def _forget_streams(self, group) -> None:
        for sp in self.applied:
            sp.reset()

    def remove(self) -> None:
        for sp in self.applied:
            sp.remove()


def _split_inputs_hook(sp: SequenceParallel, module: torch.nn.Module, inputs: dict[str, Any]):
    params = list(inspect.signature(module.forward).parameters)

    def splits(x, cpi) -> bool:
        # A plan entry may apply to one form of an input only (Wan's timestep: per token, 2-D,
        # for TI2V-5B; one per sample, 1-D, for the A14B models), as in diffusers.
        return torch.is_tensor(x) and (cpi.expected_dims is None or x.dim() == cpi.expected_dims)

    def hook(mod, args, kwargs):
        args = list(args)
        for name, cpi in inputs.items():
            if name in kwargs:
                if splits(kwargs[name], cpi):
                    kwargs[name] = sp.split(kwargs[name], cpi.split_dim, name)
            elif name in params and params.index(name) < len(args):
                i = params.index(name)
                if splits(args[i], cpi):
                    args[i] = sp.split(args[i], cpi.split_dim, name)
        return tuple(args), kwargs

    return hook


def _describe_split(sp: SequenceParallel, module: torch.nn.Module, inputs: dict[str, Any],
                    pattern: str) -> tuple[Any, str]:
    """Registers the split in diffusers' form, for libraries that replay it.

    cache-dit compares a block stack's output with its input. When the stack's first block
    splits its inputs, the input it holds is unsplit. It then looks for a diffusers
    ``ContextParallelSplitHook`` on that block and reshards the input with the hook's
    ``_prepare_cp_input``. This hook answers that call with our shard. It leaves the forward
    alone: the torch pre-hook above splits before any diffusers hook (TeaCache's included) runs.
    """
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    class SplitDescription(ContextParallelSplitHook):
        def __init__(self):
            ModelHook.__init__(self)
            self.metadata = inputs
            self.parallel_config = None

        pre_forward = ModelHook.pre_forward
        post_forward = ModelHook.post_forward

        def _prepare_cp_input(self, x, cp_input):
            if cp_input.expected_dims is not None and x.dim() != cp_input.expected_dims:
                return x
            return sp.shard(x, cp_input.split_dim)

    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(SplitDescription(), f"vllm_omni_sp_split:{pattern}")
    return registry, f"vllm_omni_sp_split:{pattern}"


def _split_outputs_hook(sp: SequenceParallel, module_name: str, outputs: dict[int, Any]):
    def hook(mod, args, output):
        single = torch.is_tensor(output)
        out = [output] if single else list(output)
        for index, cpi in outputs.items():
            out[index] = sp.split(out[index], cpi.split_dim, f"{module_name}.{index}")
        return out[0] if single else type(output)(out)

    return hook
