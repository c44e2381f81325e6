"""TeaCache: skip the transformer while its timestep-modulated input barely changes.

At each denoiser call the first block's modulated image input is compared with the previous
call's (relative L1). The change is rescaled with a per-model polynomial and accumulated; while the
sum stays under ``rel_l1_thresh`` the whole block stack is skipped and the cached residual of the
last computed call (stack output minus stack input) is added instead. The first and last steps
always compute. State is kept per cache context ("cond"/"uncond"), so the two CFG branches cache
independently.

Applied as diffusers hooks on the unmodified blocks: the head block decides, the others pass
through when skipping, the tail records the residual. Under sequence/tensor parallelism the L1
sums are all-reduced over the ranks of one CFG branch, so every rank takes the same decision.

Under step batching one forward carries several requests' calls: each request (and CFG branch)
keeps its own state and decides on its own samples. The stack is skipped when all of them skip;
otherwise it runs for all, and the tail gives each skipping request its cached residual instead
of the computed rows, so every request gets what it would alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from vllm_omni.cache.common import CacheFeature, CacheStats, preset_settings
from vllm_omni.distributed.comm import GroupComm
from vllm_omni.utils.tasks import TaskLocal

HEAD_HOOK, BLOCK_HOOK = "vllm_omni_teacache_head", "vllm_omni_teacache_block"


@dataclass
class TeaCacheConfig:
    rel_l1_thresh: float = 0.2
    coefficients: list[float] | None = None  # overrides the model's; highest power first
    preset: str | None = None  # a model's named threshold (see the adapters), instead of a number

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeaCacheConfig":
        unknown = set(d) - {"rel_l1_thresh", "coefficients", "preset"}
        if unknown:
            raise ValueError(f"unknown tea_cache cache_config key(s): {', '.join(sorted(unknown))}; "
                             "accepted: rel_l1_thresh, coefficients, preset")
        if "preset" in d and "rel_l1_thresh" in d:
            raise ValueError("give either preset or rel_l1_thresh in cache_config, not both")
        c = cls(**d)
        if c.preset is not None and not isinstance(c.preset, str):
            raise ValueError(f"preset must be a string, got {c.preset!r}")
        t = c.rel_l1_thresh
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"rel_l1_thresh must be a number >= 0, got {t!r}")
        if c.coefficients is not None and (
                not isinstance(c.coefficients, list) or len(c.coefficients) != 5
                or not all(isinstance(x, (int, float)) for x in c.coefficients)):
            raise ValueError("coefficients must be a list of 5 numbers (highest power first)")
        return c

    def resolve(self, presets: dict[str, float], model: str) -> "TeaCacheConfig":
        """Replaces a preset name by its threshold for this model."""
        if self.preset is None:
            return self
        thresh = preset_settings(presets, self.preset, "tea_cache", model)
        return TeaCacheConfig(rel_l1_thresh=thresh, coefficients=self.coefficients)


class _State(BaseState):
    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = 0
        self.prev_modulated: torch.Tensor | None = None
        self.accumulated = 0.0
        self.skip = False
        self.head_input: tuple[torch.Tensor, torch.Tensor] | None = None
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Request:
    """A pipeline call's cache state under step batching: per CFG branch, and its counts."""

    num_steps: int
    states: dict[str, _State] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)


@dataclass
class _Pass:
    """One batched forward: each call's sample count and state, and whether it computes."""

    rows: list[tuple[int, _State]]
    compute: list[bool]
    head_input: tuple[torch.Tensor, ...] | None = None


@dataclass
class BlockIO:
    """Where a block's streams are: input argument names and output tuple indices."""

    inputs: Sequence[str] = ("hidden_states", "encoder_hidden_states")
    # Qwen-Image blocks return (encoder_hidden_states, hidden_states); None: the block returns
    # one tensor, the new value of its first input (Z-Image's unified stream).
    outputs: Sequence[int] | None = (1, 0)


@dataclass
class TeaCache:
    config: TeaCacheConfig
    coefficients: list[float]
    modulated_input: Callable[[torch.nn.Module, dict], torch.Tensor]
    io: BlockIO = field(default_factory=BlockIO)
    reduce: GroupComm | None = None  # the ranks of one CFG branch
    num_steps: int = 0
    blocks: list[torch.nn.Module] = field(default_factory=list)  # hooked by apply_teacache
    batcher: Any = None  # step batching's StepBatcher (use_batcher)

    def __post_init__(self):
        # Its context is the branch diffusers' cache_context names (the running call's).
        self.state = StateManager(_State)
        self._stats = CacheStats()
        self.local = TaskLocal()  # step batching: each call's _Request
        self.pass_: _Pass | None = None

    @property
    def stats(self) -> CacheStats:
        return self.local.request.stats if self.batcher is not None else self._stats

    def use_batcher(self, batcher) -> None:
        self.batcher = batcher
        batcher.captures[self.capture_key] = self._capture

    @property
    def capture_key(self) -> str:  # its entry in each step-batched call's ``captured``
        return f"tea_cache:{id(self)}"

    def begin_request(self, num_steps: int, uses_cfg: bool = False) -> None:
        # CFG needs nothing here: the pipeline names each call's branch through cache_context.
        # Pipelines that never open a context (one call per step) share this default one.
        if self.batcher is not None:
            self.local.request = _Request(num_steps)
            return
        self.state.reset()
        self.state.set_context(CacheContext("default"))
        self.num_steps = num_steps
        self._stats = CacheStats()

    def _capture(self) -> tuple[_Request, _State]:
        """In a call's task, as it submits a denoiser call: its state for the current branch."""
        try:
            name = self.state.context.name
        except ValueError:  # a pipeline that opens no cache_context: one branch
            name = "default"
        req = self.local.request
        return req, req.states.setdefault(name, _State())

    def remove(self) -> None:
        for i, block in enumerate(self.blocks):
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(
                HEAD_HOOK if i == 0 else BLOCK_HOOK, recurse=False)
        self.blocks = []

    def rescale(self, x: float) -> float:
        y = 0.0
        for c in self.coefficients:
            y = y * x + c
        return max(y, 0.0)  # a negative "distance" would let the cache run ahead; floor it

    def decide(self, modulated: torch.Tensor, s: _State, num_steps: int) -> bool:
        """True: compute this call. Runs once per denoiser call, on every rank alike."""
        step = s.calls
        s.calls += 1
        prev, s.prev_modulated = s.prev_modulated, modulated
        # A call of another shape (BAGEL packs its CFG branches only inside the guidance
        # interval) cannot reuse the last residual.
        if prev is None or s.residual is None or step == 0 or step >= num_steps - 1 \
                or self.config.rel_l1_thresh <= 0 or prev.shape != modulated.shape:
            s.accumulated = 0.0
            return True
        sums = torch.stack([(modulated - prev).abs().sum(), prev.abs().sum()]).double()
        if self.reduce is not None and self.reduce.world_size > 1:
            self.reduce.all_reduce(sums)
        s.accumulated += self.rescale(float(sums[0] / sums[1].clamp_min(1e-30)))
        if s.accumulated < self.config.rel_l1_thresh:
            return False
        s.accumulated = 0.0
        return True


class _BlockHook(ModelHook):
    """A block after the head: passes its inputs through while the head skips."""

    _is_stateful = True

    def __init__(self, cache: TeaCache, is_tail: bool):
        super().__init__()
        self.cache = cache
        self.state_manager = cache.state  # diffusers sets the cond/uncond context through this
        self.is_tail = is_tail

    def new_forward(self, module, *args, **kwargs):
        if self.cache.batcher is not None and self.cache.batcher.group is not None:
            p = self.cache.pass_
            if p is not None and not any(p.compute):
                return _passthrough(self.cache, _bind(module, args, kwargs))
            out = self.fn_ref.original_forward(*args, **kwargs)
            return _finish_rows(self.cache, out) if self.is_tail and p is not None else out
        s = self.state_manager.get_state()
        if s.skip:
            return _passthrough(self.cache, _bind(module, args, kwargs))
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail and s.head_input is not None:
            _record(self.cache, s, out)
        return out

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _HeadHook(_BlockHook):
    """The first block: decides whether this call computes or reuses the cached residual."""

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        kwargs = _bind(module, args, kwargs)  # some models call their blocks positionally
        if cache.batcher is not None and cache.batcher.group is not None:
            return self._rows_forward(module, kwargs)
        s = self.state_manager.get_state()
        modulated = cache.modulated_input(module, kwargs)
        if modulated is None:  # not a denoising call (BAGEL extending a prompt): run as is
            s.skip, s.head_input = False, None
            return self.fn_ref.original_forward(**kwargs)
        compute = cache.decide(modulated, s, cache.num_steps)
        s.skip = not compute
        if compute:
            cache.stats.computed += 1
            s.head_input = tuple(kwargs[n] for n in cache.io.inputs)
            out = self.fn_ref.original_forward(**kwargs)
            if self.is_tail:
                _record(cache, s, out)
            return out
        cache.stats.skipped += 1
        return _passthrough(cache, kwargs, s.residual)

    def _rows_forward(self, module, kwargs):
        """Step batching: the forward's calls decide each on its own samples."""
        cache = self.cache
        calls = cache.batcher.group
        modulated = cache.modulated_input(module, kwargs)
        if modulated is None:
            cache.pass_ = None
            return self.fn_ref.original_forward(**kwargs)
        rows, compute = [], []
        for call, part in zip(calls, torch.split(modulated, [c.size for c in calls])):
            req, s = call.captured[cache.capture_key]
            rows.append((call.size, s))
            compute.append(cache.decide(part, s, req.num_steps))
            if compute[-1]:
                req.stats.computed += 1
            else:
                req.stats.skipped += 1
        head_input = tuple(kwargs[n] for n in cache.io.inputs)
        cache.pass_ = _Pass(rows, compute, head_input)
        if not any(compute):
            return _finish_rows(cache, _passthrough(cache, kwargs))
        out = self.fn_ref.original_forward(**kwargs)
        return _finish_rows(cache, out) if self.is_tail else out


def _finish_rows(cache: TeaCache, out):
    """The stack's output with each skipping call's samples replaced by its input plus its
    cached residual, and each computing call's residual recorded."""
    p = cache.pass_  # kept: when all skip, the blocks after the head pass through by it
    sizes = [n for n, _ in p.rows]
    streams = [out] if cache.io.outputs is None else [out[i] for i in cache.io.outputs]
    results = []
    residuals: list[list[torch.Tensor]] = [[] for _ in p.rows]
    for stream, given in zip(streams, p.head_input):
        outs, ins = list(torch.split(stream, sizes)), torch.split(given, sizes)
        for r, (_, s) in enumerate(p.rows):
            if p.compute[r]:
                residuals[r].append(outs[r] - ins[r])
            else:
                outs[r] = ins[r] + _fit(s.residual[len(residuals[r])], ins[r].shape)
                residuals[r].append(s.residual[len(residuals[r])])
        results.append(torch.cat(outs))
    for r, (_, s) in enumerate(p.rows):
        s.residual = tuple(residuals[r])
    if cache.io.outputs is None:
        return results[0]
    merged = list(out)
    for i, x in zip(cache.io.outputs, results):
        merged[i] = x
    return tuple(merged)


def _fit(residual: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A residual recorded at another padded prompt length (step batching pads prompts to the
    longest in the forward, real tokens first), cut or zero-padded to this forward's."""
    if residual.shape == shape:
        return residual
    for dim, (have, want) in enumerate(zip(residual.shape, shape)):
        if have > want:
            residual = residual.narrow(dim, 0, want)
        elif have < want:
            pad = [0, 0] * (residual.ndim - 1 - dim) + [0, want - have]
            residual = torch.nn.functional.pad(residual, pad)
    return residual


def _bind(module, args, kwargs) -> dict[str, Any]:
    """The call's arguments by parameter name."""
    if not args:
        return kwargs
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)


def _record(cache: TeaCache, s: _State, out) -> None:
    if cache.io.outputs is None:
        s.residual = (out - s.head_input[0],)
    else:
        s.residual = tuple(out[i] - x for i, x in zip(cache.io.outputs, s.head_input))
    s.head_input = None


def _passthrough(cache: TeaCache, kwargs, residual: tuple | None = None):
    """A skipped stack's output: its inputs, plus the cached ``residual`` when given."""
    ins = [kwargs[name] for name in cache.io.inputs]
    if residual is not None:
        ins = [x + r for x, r in zip(ins, residual)]
    if cache.io.outputs is None:
        return ins[0]
    out = [None] * len(cache.io.outputs)
    for i, x in zip(cache.io.outputs, ins):
        out[i] = x
    return tuple(out)


def apply_teacache(blocks: Sequence[torch.nn.Module], cache: TeaCache) -> TeaCache:
    """Hooks ``cache`` onto a transformer's block list (called with keyword arguments)."""
    cache.blocks = list(blocks)
    for i, block in enumerate(blocks):
        hook = (_HeadHook if i == 0 else _BlockHook)(cache, is_tail=i == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            hook, HEAD_HOOK if i == 0 else BLOCK_HOOK)
    return cache


class TeaCacheFeature(CacheFeature):
    name = "tea_cache"

    def apply(self, pipe, groups) -> None:
        a = self.adapter
        config = TeaCacheConfig.from_dict(self.config.cache_config).resolve(
            a.teacache_presets, a.spec.pipeline_class)
        self.groups, self.caches = groups, []
        for model in self.denoisers(pipe):
            blocks = a.teacache_blocks(model)
            cache = TeaCache(config, config.coefficients or a.teacache_coefficients,
                             a.teacache_modulated_input, io=a.teacache_io(blocks[0]),
                             reduce=groups.branch)
            self.caches.append(apply_teacache(blocks, cache))
            # diffusers caches which submodules carry hooks; ours were just added below it.
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def use_batcher(self, batcher) -> None:
        for cache in self.caches:
            cache.use_batcher(batcher)

