"""CFG parallelism for pipelines that call the denoiser once per branch (cond, then uncond).

Rank i of the CFG group computes only branch i; after the last branch of a step the results are
all-gathered, so every rank returns every branch and the pipeline's own guidance formula runs
unchanged. A rank that does not compute the first branch returns a correctly shaped placeholder
for it, filled in place when the gather arrives: the pipeline reads the cond prediction only
after the uncond call (views of it, e.g. Qwen-Image-Edit's slice, see the fill too).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from vllm_omni.distributed.comm import GroupComm
from vllm_omni.features import ParallelFeature
from vllm_omni.utils.tasks import TaskLocal

HOOK_NAME = "vllm_omni_cfg_parallel"


def _per_call() -> dict[str, Any]:
    """A pipeline call's branch count: per task, as step batching runs calls side by side
    (the hook is then outside the batcher, so a rank submits only its branch's forwards, and
    the gathers run in the calls' agreed turns)."""
    return {"active": False, "call": 0, "mine": None, "placeholders": []}


class CFGParallelHook(ModelHook):
    def __init__(self, comm: GroupComm):
        super().__init__()
        self.comm = comm
        self.state = TaskLocal(_per_call)

    def begin_request(self, uses_cfg: bool) -> None:
        """Each rank computes every call redundantly when a request runs without CFG."""
        s = self.state
        s.active, s.call, s.mine, s.placeholders = uses_cfg, 0, None, []

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.state
        if not s.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        branches = self.comm.world_size
        branch = s.call % branches
        s.call += 1
        return_dict = kwargs.get("return_dict", True)
        if branch == self.comm.rank:
            out = self.fn_ref.original_forward(*args, **kwargs)
            sample = out.sample if return_dict else out[0]
            s.mine = sample
        else:
            sample = proj_out_like(module, kwargs)
        s.placeholders.append(sample)
        if branch == branches - 1:
            everyone = self.comm.all_gather(s.mine.unsqueeze(0), 0)
            for i, ph in enumerate(s.placeholders):
                if i != self.comm.rank:
                    ph.copy_(everyone[i])
            sample = s.placeholders[-1]
            s.placeholders, s.mine = [], None
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class BatchedCFGParallelHook(CFGParallelHook):
    """CFG parallelism for pipelines that run both branches as one doubled batch (SD3, whose
    transformer gets ``cat([uncond, cond])``): rank i runs batch half i, and the halves are
    all-gathered back into the full batch, which the pipeline splits itself."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        if args:
            raise ValueError("batched CFG-parallel expects keyword arguments")
        full = kwargs["hidden_states"].shape[0]
        n, rank = self.comm.world_size, self.comm.rank
        if full % n:
            raise ValueError(f"a CFG batch of {full} does not split over {n} ranks")
        part = full // n

        def mine(v):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == full:
                return v.narrow(0, rank * part, part)
            return v

        out = self.fn_ref.original_forward(**{k: mine(v) for k, v in kwargs.items()})
        return_dict = kwargs.get("return_dict", True)
        sample = out.sample if return_dict else out[0]
        sample = self.comm.all_gather(sample.contiguous(), 0)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


def proj_out_like(transformer: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """An empty tensor shaped like the output of a DiT whose token-wise ``proj_out`` ends it
    (Qwen-Image, FLUX.1/2, LongCat, Ovis): the input tokens, ``proj_out.out_features`` wide. A
    video DiT (Wan) takes and returns latent videos [B, C, F, H, W]: its ``out_channels`` then."""
    x = kwargs["hidden_states"]
    if x.dim() == 5:
        return x.new_empty(x.shape[0], transformer.config.out_channels, *x.shape[2:])
    return x.new_empty(*x.shape[:2], transformer.proj_out.out_features)


class CFGParallelFeature(ParallelFeature):
    name = "cfg_parallel"
    # Under step batching each call's branch forwards are counted in its own task, and only
    # this rank's go to the batcher.
    outside_batcher = True

    def apply(self, pipe, groups) -> None:
        self.groups, self.hooks = groups, []
        for model in self.denoisers(pipe):
            # The pipeline doubles the batch for CFG or calls once per branch (``cfg_calls``).
            hook = BatchedCFGParallelHook(groups.cfg) if self.plan.cfg_calls == "batched" else \
                CFGParallelHook(groups.cfg)
            HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
            self.hooks.append((model, hook))

    def begin_request(self, num_steps: int, uses_cfg: bool) -> None:
        for _, hook in self.hooks:
            hook.begin_request(uses_cfg)

    def remove(self) -> None:
        for model, _ in self.hooks:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
        self.hooks = []
