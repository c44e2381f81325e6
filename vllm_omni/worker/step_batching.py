"""Step-level batching (``--step-batching``): every running request drives its own unmodified
pipeline call, as a task (a greenlet) on the runner's thread; their denoiser calls meet here,
and those that fit together run as one batched forward whose output is split back to each
request. Greenlets rather than threads: only one call runs at a time anyway, and torch on a
CPU runs 15-25% slower on a second thread (``utils/tasks.py``).

A round runs once every running call is either waiting at a denoiser call or finished, so which
calls share a forward depends on the calls, not on timing. Pipeline code runs one call at a time,
in turns fixed by the calls (start order, then each round's order), and calls that join are
admitted only as a round is about to run, at a point every rank agrees on (``admit``): so every
rank of a parallel layout runs the same code, collectives included, in the same order.

Calls fit together when the denoiser is the same and everything but the per-sample inputs is
equal: the per-sample inputs (latents, text embeddings, masks, timesteps, guidance, shapes) may
differ in content but not in shape (prompt lengths aside, where the adapter declares a
``Padding``), so requests of one size share work whatever their steps, guidance, seeds or
progress. A request enters at its first denoiser call and leaves after its last;
``ModelRunner.execute_steps`` starts the calls and those that join.
"""

from __future__ import annotations

import copy
import logging
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import greenlet
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput as _Output

from vllm_omni.distributed.cfg_parallel import proj_out_like
from vllm_omni.utils.tasks import TaskLocal

logger = logging.getLogger(__name__)

HOOK = "vllm_omni.step_batching"
# The denoiser inputs that carry one entry per sample (dim 0 of a tensor, or a list), by the
# names diffusers' transformers give them. Any other input must be equal for calls to share a
# forward.
PER_SAMPLE = frozenset({
    "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
    "guidance", "pooled_projections", "encoder_attention_mask", "attention_mask", "img_shapes",
    "txt_seq_lens", "encoder_hidden_states_image", "timestep_proj", "global_hidden_states",
})


@dataclass(eq=False)
class _Call:
    module: torch.nn.Module
    forward: Any  # the denoiser's own forward
    kwargs: dict[str, Any]
    size: int  # samples in this call
    key: tuple
    result: Any = None
    error: BaseException | None = None
    requests: int = 1  # requests of the pipeline call it came from
    shared: int = 1  # requests in the forward that served it
    tag: Any = None  # model state its forward needs (a LoRA adapter set): equal to share one
    task: Any = None  # the greenlet of the pipeline call it came from (StepBatcher.start)
    # What each feature noted in the call's task as it called (``StepBatcher.captures``):
    # a step cache's state for this request and CFG branch.
    captured: dict[str, Any] | None = None
    # A CFG branch that is not the step's last: what its task got back at once, filled in
    # when the round runs (StepBatcher.begin_call).
    placeholder: torch.Tensor | None = None


@dataclass(frozen=True)
class Padding:
    """A per-sample input whose length may differ between calls (a prompt's tokens): padded
    with zeros along ``dim`` to the longest, with ``mask`` (another input, bool per token)
    marking the real tokens. The model's adapter declares it where the denoiser honours the
    mask exactly (Qwen-Image), so requests with prompts of different lengths share a forward."""

    dim: int
    mask: str


def _is_per_sample(name: str, value: Any, size: int) -> bool:
    if name not in PER_SAMPLE:
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim >= 1 and value.shape[0] == size
    return _uniform(value) or (isinstance(value, list) and len(value) == size)


def _uniform(value: Any) -> bool:
    """A list of one repeated entry (Qwen-Image's ``img_shapes``: one per prompt, not per image,
    and read for its first entry): it stands for any number of samples."""
    return isinstance(value, list) and bool(value) and all(x == value[0] for x in value)


def _key(module, kwargs: dict[str, Any], size: int | None,
         padding: dict[str, Padding]) -> tuple:
    """What must match for two calls to share a forward (content of the shared inputs is
    compared after, in ``_same_shared``)."""
    if size is None:
        return (id(module), "alone", id(kwargs))
    masks = {p.mask for p in padding.values()}
    parts: list[Any] = [id(module)]
    for name in sorted(kwargs):
        v = kwargs[name]
        if name in masks:  # rebuilt by _merge, whatever each call had
            parts.append((name, "mask"))
        elif _is_per_sample(name, v, size):
            if isinstance(v, torch.Tensor):
                shape = list(v.shape[1:])
                if name in padding:
                    shape[padding[name].dim - 1] = None
                parts.append((name, "each", tuple(shape), v.dtype, v.device))
            elif _uniform(v):
                parts.append((name, "uniform-list", repr(v[0])))
            else:
                parts.append((name, "each-list"))
        elif isinstance(v, torch.Tensor):
            parts.append((name, tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
                parts.append((name, v))
            except TypeError:  # dicts (attention kwargs) and the like: compared after
                parts.append((name, type(v).__name__))
    return tuple(parts)


def _same_shared(a: _Call, b: _Call, masks: set[str]) -> bool:
    for name, v in a.kwargs.items():
        if name in masks or _is_per_sample(name, v, a.size):
            continue
        w = b.kwargs[name]
        if isinstance(v, torch.Tensor):
            if not (v is w or torch.equal(v, w)):
                return False
        elif v is not w and v != w:
            return False
    return True


def _merge(calls: list[_Call], padding: dict[str, Padding]) -> dict[str, Any]:
    first = calls[0]
    masks = {p.mask for p in padding.values()}
    merged = {}
    for name, v in first.kwargs.items():
        if name in masks:  # built with the input it masks (a call may have passed None)
            continue
        if name in padding and isinstance(v, torch.Tensor):
            pad = padding[name]
            lengths = [c.kwargs[name].shape[pad.dim] for c in calls]
            if len(set(lengths)) > 1:
                longest = max(lengths)
                parts, real = [], []
                for c, n in zip(calls, lengths):
                    x = c.kwargs[name]
                    widths = [0, 0] * (x.ndim - 1 - pad.dim) + [0, longest - n]
                    parts.append(torch.nn.functional.pad(x, widths))
                    mask = c.kwargs.get(pad.mask)
                    if mask is None:
                        mask = torch.ones(x.shape[:pad.dim + 1], dtype=torch.bool,
                                          device=x.device)
                    real.append(torch.nn.functional.pad(mask.to(torch.bool), [0, longest - n]))
                merged[name] = torch.cat(parts)
                merged[pad.mask] = torch.cat(real)
                continue
        if not _is_per_sample(name, v, first.size):
            merged[name] = v
        elif isinstance(v, torch.Tensor):
            merged[name] = torch.cat([c.kwargs[name] for c in calls])
        elif _uniform(v):  # all calls' lists repeat this entry (the key says so)
            merged[name] = [v[0]] * sum(c.size for c in calls)
        else:
            merged[name] = [x for c in calls for x in c.kwargs[name]]
    for name, pad in padding.items():  # equal lengths: each call's mask, or none at all
        if pad.mask in merged or pad.mask not in first.kwargs:
            continue
        given = [c.kwargs.get(pad.mask) for c in calls]
        merged[pad.mask] = None if all(m is None for m in given) else torch.cat([
            m.to(torch.bool) if m is not None else torch.ones(
                c.kwargs[name].shape[:pad.dim + 1], dtype=torch.bool,
                device=c.kwargs[name].device) for c, m in zip(calls, given)])
    return merged


def _split(out: Any, sizes: list[int]) -> list[Any]:
    """The batched output, cut back into each call's share (tensors by their first dim)."""
    total = sum(sizes)
    if isinstance(out, torch.Tensor):
        if out.ndim == 0 or out.shape[0] != total:
            raise ValueError(f"a denoiser output of shape {tuple(out.shape)} has no batch of "
                             f"{total} to split")
        return list(torch.split(out, sizes))
    if isinstance(out, (tuple, list)):
        parts = [_split(x, sizes) for x in out]
        return [type(out)(p[i] for p in parts) for i in range(len(sizes))]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # diffusers' BaseOutput
        fields = {k: _split(out[k], sizes) for k in out.keys()}
        return [type(out)(**{k: v[i] for k, v in fields.items()}) for i in range(len(sizes))]
    if out is None:
        return [None] * len(sizes)
    raise ValueError(f"cannot split a denoiser output of type {type(out).__name__}")


def _same_timestep(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ta, tb = a.get("timestep"), b.get("timestep")
    if not (isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor)):
        return True
    return ta.shape == tb.shape and torch.equal(ta, tb)


class StepBatcher:
    """Runs the pipeline calls of step batching as tasks (greenlets) on the runner's thread,
    in turns; their denoiser calls wait here until every running call has reached one (or
    finished), and then run as a round of batched forwards."""

    def __init__(self, padding: dict[str, Padding] | None = None) -> None:
        self.padding = dict(padding or {})
        # The calls' tasks, by whose turn is next: only one runs at a time, as pipelines and
        # their modules keep per-call state on themselves (a causal VAE's feature cache, a
        # prior model's generation state) that two calls side by side would share. A round's
        # forwards run only while no task has a turn, so a call that changes the model (loads
        # a LoRA adapter, swaps an offloaded component) never does it under a round.
        self.ready: deque[greenlet.greenlet] = deque()
        self.tasks: set[greenlet.greenlet] = set()  # started and not finished
        self.pending: list[_Call] = []
        self.hub: greenlet.greenlet | None = None  # the runner's own greenlet, running rounds
        # Per task: its call's request count (``requests``), how many requests shared each of
        # its forwards (``sizes``, when counted), the model state its forwards need (``tag``,
        # set by a feature in ``prepare_call``), and its CFG branches (``begin_call``).
        self.local = TaskLocal(lambda: {"requests": 1, "sizes": None, "tag": None,
                                        "branches": 1, "branch": 0, "deferred": []})
        # Called with a group's calls around its forward (the LoRA feature activates their
        # adapter set; Cache-DiT puts their cache contexts in place, and keeps what became of
        # them).
        self.before_forward: list[Callable[[list[_Call]], None]] = []
        self.after_forward: list[Callable[[list[_Call]], None]] = []
        # Called in the task as it submits a call, results kept on the call by name; while a
        # forward runs, ``group`` is its calls, in the order of their samples (a step cache
        # reads each call's state there, to decide per request).
        self.captures: dict[str, Any] = {}
        self.group: list[_Call] | None = None
        # Called before each round, on every rank at the same point: starts the calls that
        # joined (which then go first and take part in the round).
        self.admit: Callable[[], None] | None = None

    def start(self, fn: Callable[[], None]) -> None:
        """A pipeline call as a task, its turn queued behind the others' (``run`` runs it).
        ``fn`` must not raise: it reports its own failure."""
        task = greenlet.greenlet(fn, parent=greenlet.getcurrent())
        self.tasks.add(task)
        self.ready.append(task)

    def in_task(self) -> bool:
        return greenlet.getcurrent() in self.tasks

    def run(self) -> None:
        """On the runner's thread: gives the tasks their turns and runs their rounds until
        every task has finished."""
        self.hub = greenlet.getcurrent()
        while self.ready or self.pending:
            while self.ready:
                task = self.ready.popleft()
                if task.dead:  # ended between a step's branches (its error is its own)
                    self.tasks.discard(task)
                    continue
                try:
                    task.switch()  # back when it submits a denoiser call or finishes
                except Exception:  # it could not report its outcome: the others go on
                    logger.exception("a step batching call failed")
                if task.dead:
                    self.tasks.discard(task)
            if self.pending:
                self._round()

    def begin_call(self, branches: int) -> None:
        """In a task, as its pipeline call starts: how many denoiser calls (CFG branches, one
        call each) make one of its steps. Every branch but the last gets a placeholder at
        once, filled in when the round runs, so the step's branches share one round (and one
        forward) instead of taking one round each. That is the pipelines' own order: the
        first branches' outputs are read only after the last branch's call returns, which
        CFG parallel relies on too; so ``branches`` > 1 only where the adapter declares it."""
        self.local.branches, self.local.branch, self.local.deferred = branches, 0, []

    def submit(self, module, forward, args: tuple, kwargs: dict[str, Any]) -> Any:
        """In a task: its denoiser call, run in the next round."""
        if args:  # diffusers pipelines call their denoisers by keyword; name what is not
            import inspect

            params = list(inspect.signature(forward).parameters)
            kwargs = {**dict(zip(params, args)), **kwargs}
        hs = kwargs.get("hidden_states")
        size = hs.shape[0] if isinstance(hs, torch.Tensor) and hs.ndim >= 1 else None
        local = self.local
        call = _Call(module, forward, kwargs, size or 0,
                     (local.tag, *_key(module, kwargs, size, self.padding)),
                     requests=local.requests, tag=local.tag,
                     captured={name: f() for name, f in self.captures.items()},
                     task=greenlet.getcurrent())
        self.pending.append(call)
        if local.branches > 1:
            branch = local.branch
            local.branch = (branch + 1) % local.branches
            if branch < local.branches - 1:
                call.placeholder = proj_out_like(module, kwargs)
                local.deferred.append(call)
                return (_Output(sample=call.placeholder) if kwargs.get("return_dict", True)
                        else (call.placeholder,))
            if not all(_same_timestep(d.kwargs, kwargs) for d in local.deferred):
                # The pipeline read a placeholder before it was filled: fail, never an image
                # made from it.
                raise RuntimeError("a step's CFG branches were called at different timesteps: "
                                   "the model's adapter declares CFG calls its pipeline does "
                                   "not make")
        self.hub.switch()  # back once the round has run
        calls, local.deferred = [*local.deferred, call], []
        for c in calls:
            if local.sizes is not None:
                local.sizes.append(c.shared)
            if c.error is not None:
                raise c.error
        return call.result

    def _round(self) -> None:
        """Every task waits at a denoiser call (or has finished): the calls that joined start
        first, then the round runs, and its tasks resume in its order."""
        if self.admit is not None:
            try:
                self.admit()
            except BaseException as e:  # the waiting calls fail with it, none hangs
                calls, self.pending = self.pending, []
                for c in calls:
                    c.error = e
                self.ready.extend(dict.fromkeys(c.task for c in calls))
                return
            if self.ready:  # calls joined: they run up to their first forward first
                return
        calls, self.pending = self.pending, []
        try:
            self._run(calls)
        finally:
            self.ready.extend(dict.fromkeys(c.task for c in calls))  # each task once

    def _run(self, calls: list[_Call]) -> None:
        """The waiting calls, grouped by what fits together, one forward per group."""
        groups: list[list[_Call]] = []
        masks = {p.mask for p in self.padding.values()}
        for call in calls:
            for g in groups:
                if g[0].key == call.key and _same_shared(g[0], call, masks):
                    g.append(call)
                    break
            else:
                groups.append([call])
        for group in groups:
            try:
                for f in self.before_forward:
                    f(group)
                self.group = group
                try:
                    if len(group) == 1:
                        group[0].result = group[0].forward(**group[0].kwargs)
                    else:
                        out = group[0].forward(**_merge(group, self.padding))
                        for c, part in zip(group, _split(out, [c.size for c in group])):
                            c.result = part
                    for c in group:
                        if c.placeholder is not None:
                            c.placeholder.copy_(c.result[0] if isinstance(c.result, tuple)
                                                else c.result.sample)
                finally:
                    for f in self.after_forward:
                        f(group)
            except BaseException as e:  # every request of the forward fails with it
                for c in group:
                    c.error = e
            finally:
                self.group = None
            # Requests, not calls: a step's CFG branches may share the forward.
            shared = sum({c.task: c.requests for c in group}.values())
            for c in group:
                c.shared = shared


class Joins:
    """The requests the engine sends to a running step batch, staged until every rank starts
    them at the same point: rank 0 says how many (one all-reduce) and the others wait for as
    many. Only the runner's thread reads the queue, between rounds, so every rank stages them
    in the order sent."""

    def __init__(self, messages: queue.Queue, batch_id: str, world, device) -> None:
        self.messages, self.batch_id, self.world, self.device = messages, batch_id, world, device
        self.staged: deque[list] = deque()
        self.sealed = False  # the engine has no more

    def _pull(self, timeout: float | None) -> bool:
        """Stages the next message, waiting up to ``timeout`` (None: not at all); False if
        there was none."""
        try:
            msg = (self.messages.get_nowait() if timeout is None
                   else self.messages.get(timeout=timeout))
        except queue.Empty:
            return False
        if msg.batch != self.batch_id:  # left over from an earlier, failed call
            return True
        if msg.requests:
            self.staged.append(msg.requests)
        else:
            self.sealed = True
        return True

    def _until(self, ready) -> None:
        while not ready():
            self._pull(1.0)

    def agree(self, idle: bool) -> int:
        """How many staged joins start now: rank 0's count (when ``idle``, it waits for one or
        for the end), waited for by the others. -1: the engine has no more."""
        while self._pull(None):  # what arrived while the calls ran
            pass
        if self.world.rank == 0:
            self._until(lambda: not idle or self.staged or self.sealed)
            n = len(self.staged) if self.staged else -1 if idle else 0
        if self.world.world_size > 1:  # rank 0's count wins: the others give -1
            t = torch.tensor([n + 1 if self.world.rank == 0 else 0], dtype=torch.int64,
                             device=self.device)
            n = int(self.world.all_reduce(t, op="max")[0]) - 1
            self._until(lambda: len(self.staged) >= n and (n >= 0 or self.sealed))
        return n

    def take(self, n: int) -> list:
        """The first ``n`` staged joins' requests, together: those that arrived during one round
        and have one batch key share a pipeline call, as without step batching."""
        return [req for _ in range(max(n, 0)) for req in self.staged.popleft()]


class _BatchingHook(ModelHook):
    """Sends a step batching call's denoiser call to the batcher (the runner's own calls, e.g.
    a warm-up outside step batching, run as usual)."""

    def __init__(self, batcher: StepBatcher):
        super().__init__()
        self.batcher = batcher

    def new_forward(self, module, *args, **kwargs):
        if not self.batcher.in_task():
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.batcher.submit(module, self.fn_ref.original_forward, args, kwargs)


def install(denoisers: list[torch.nn.Module], batcher: StepBatcher) -> None:
    for module in denoisers:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _BatchingHook(batcher), HOOK)


def pipeline_view(pipe: Any) -> Any:
    """A pipeline sharing ``pipe``'s modules with a scheduler of its own: a call keeps its
    timesteps and step index on the scheduler, and its guidance and the like on the pipeline
    object, so concurrent calls each need their own."""
    view = copy.copy(pipe)
    object.__setattr__(view, "scheduler", copy.deepcopy(pipe.scheduler))
    return view
