"""Step-level batching (``--step-batching``): every running request drives its own unmodified
pipeline call on a thread of its own; their denoiser calls meet here, and those that fit together
run as one batched forward whose output is split back to each request.

A round runs once every running call is either waiting at a denoiser call or finished, so which
calls share a forward depends on the calls, not on timing. Pipeline code runs one call at a time,
in turns fixed by the calls (start order, then each round's order), and calls that join are
admitted only as a round is about to run, at a point every rank agrees on (``admit``): so every
rank of a parallel layout runs the same code, collectives included, in the same order.

Calls fit together when the denoiser is the same and everything but the per-sample inputs is
equal: the per-sample inputs (latents, text embeddings, masks, timesteps, guidance, shapes) may
differ in content but not in shape (prompt lengths aside, where the adapter declares a
``Padding``), so requests of one size share work whatever their steps, guidance, seeds or
progress. A request enters at its first denoiser
call and leaves after its last; ``ModelRunner.execute_steps`` starts the calls and those that
join.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

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
    done: bool = False
    requests: int = 1  # requests of the pipeline call it came from
    shared: int = 1  # requests in the forward that served it
    tag: Any = None  # model state its forward needs (a LoRA adapter set): equal to share one
    turn: Any = None  # its request thread's turn token (StepBatcher.started)
    # What each feature noted on the request thread as it called (``StepBatcher.captures``):
    # a step cache's state for this request and CFG branch.
    captured: dict[str, Any] | None = None


def _sample_count(kwargs: dict[str, Any]) -> int | None:
    hs = kwargs.get("hidden_states")
    return hs.shape[0] if isinstance(hs, torch.Tensor) and hs.ndim >= 1 else None


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


class StepBatcher:
    """Where the request threads' denoiser calls wait until every running request has reached
    one (or finished); the thread that completes the round runs it for all."""

    def __init__(self, padding: dict[str, Padding] | None = None) -> None:
        self.padding = dict(padding or {})
        self.cv = threading.Condition()
        # The request threads that may run pipeline code, by turn token, in order: only the
        # first runs. Pipelines and their modules keep per-call state on themselves (a causal
        # VAE's feature cache, a prior model's generation state) that two calls side by side
        # would share; only the forwards of a round run for many, and only while no thread has
        # a turn, so a call that changes the model (loads a LoRA adapter, swaps an offloaded
        # component) never does it under a round.
        self.turns: deque[object] = deque()
        self.pending: list[_Call] = []
        self.leading = False  # a thread is running a round
        # Per request thread: its turn, its call's request count (``requests``), how many
        # requests shared each of its forwards (``sizes``), and the model state its forwards
        # need (``tag``, set by a feature in ``prepare_call``).
        self.local = threading.local()
        # Called with a group's calls around its forward (the LoRA feature activates their
        # adapter set; Cache-DiT puts their cache contexts in place, and keeps what became of
        # them).
        self.before_forward: list[Callable[[list[_Call]], None]] = []
        self.after_forward: list[Callable[[list[_Call]], None]] = []
        # Called on the request thread as it submits a call, results kept on the call by name;
        # while a forward runs, ``group`` is its calls, in the order of their samples (a step
        # cache reads each call's state there, to decide per request).
        self.captures: dict[str, Any] = {}
        self.group: list[_Call] | None = None
        # Called by the thread about to run a round, on every rank at the same point: starts
        # the calls that joined (which then go first and take part in the round).
        self.admit: Callable[[], None] | None = None

    # -- request threads --------------------------------------------------------------------
    def started(self) -> object:
        """A request thread is about to start: its turn, queued behind the others."""
        turn = object()
        with self.cv:
            self.turns.append(turn)
        return turn

    def enter(self, turn: object) -> None:
        """On the request thread, before its pipeline code: waits for its turn."""
        self.local.turn = turn
        with self.cv:
            while self.turns[0] is not turn:
                self.cv.wait()

    def _pass_turn(self) -> None:
        with self.cv:
            assert self.turns[0] is self.local.turn
            self.turns.popleft()
            self.cv.notify_all()

    def finished(self) -> None:
        """A request thread is done; if the others all wait, it runs their round first."""
        self._pass_turn()
        self._lead()

    def submit(self, module, forward, args: tuple, kwargs: dict[str, Any]) -> Any:
        if args:  # diffusers pipelines call their denoisers by keyword; name what is not
            import inspect

            params = list(inspect.signature(forward).parameters)
            kwargs = {**dict(zip(params, args)), **kwargs}
        size = _sample_count(kwargs)
        tag = getattr(self.local, "tag", None)
        call = _Call(module, forward, kwargs, size or 0,
                     (tag, *_key(module, kwargs, size, self.padding)),
                     requests=getattr(self.local, "requests", 1), tag=tag,
                     captured={name: f() for name, f in self.captures.items()},
                     turn=self.local.turn)
        with self.cv:
            self.pending.append(call)
        self._pass_turn()
        # The thread that completes a round runs it: the forwards stay on a thread that was
        # computing anyway (a lone request runs its own, with no hand-off).
        self._lead()
        with self.cv:
            while not call.done or self.turns[0] is not call.turn:
                self.cv.wait()
        sizes = getattr(self.local, "sizes", None)
        if sizes is not None:
            sizes.append(call.shared)
        if call.error is not None:
            raise call.error
        return call.result

    def _lead(self) -> None:
        """Runs the round if every running request waits at a denoiser call (or has finished)
        and no other thread is running one."""
        with self.cv:
            if self.leading or self.turns or not self.pending:
                return
            self.leading = True
        calls: list[_Call] = []
        try:
            if self.admit is not None:
                try:
                    self.admit()
                except BaseException as e:  # the waiting calls fail with it, none hangs
                    with self.cv:
                        calls, self.pending = self.pending, []
                    for c in calls:
                        c.error = e
                    return
                with self.cv:
                    if self.turns:  # calls joined: they run up to their first forward first
                        return
            with self.cv:
                calls, self.pending = self.pending, []
            # inference_mode also when run from a thread that has left its pipeline call.
            with torch.inference_mode():
                self._run(calls)
        finally:
            with self.cv:
                for c in calls:
                    c.done = True
                self.turns.extend(c.turn for c in calls)  # in the round's order
                self.leading = False
                self.cv.notify_all()

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
                finally:
                    for f in self.after_forward:
                        f(group)
            except BaseException as e:  # every request of the forward fails with it
                for c in group:
                    c.error = e
            finally:
                self.group = None
            for c in group:
                c.shared = sum(x.requests for x in group)


class Joins:
    """The requests the engine sends to a running step batch, staged until every rank starts
    them at the same point: rank 0 says how many (one all-reduce) and the others wait for as
    many. Only the runner's own thread reads the queue (``pull``), so every rank stages them in
    the order sent."""

    def __init__(self, messages: queue.Queue, batch_id: str, world, device) -> None:
        self.messages, self.batch_id, self.world, self.device = messages, batch_id, world, device
        self.staged: deque[list] = deque()
        self.sealed = threading.Event()  # the engine has no more
        self.arrived = threading.Condition()

    def pull(self, timeout: float) -> None:
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        if msg.batch != self.batch_id:  # left over from an earlier, failed call
            return
        if msg.requests:
            self.staged.append(msg.requests)
        else:
            self.sealed.set()
        with self.arrived:
            self.arrived.notify_all()

    def _until(self, ready, idle: bool) -> None:
        while not ready():
            if idle:  # the runner's thread, with no request thread left: it pulls
                self.pull(1.0)
            else:  # a request thread about to run a round: the runner's thread pulls
                with self.arrived:
                    self.arrived.wait(0.05)

    def agree(self, idle: bool) -> int:
        """How many staged joins start now: rank 0's count (when ``idle``, it waits for one or
        for the end), waited for by the others. -1: the engine has no more."""
        if self.world.rank == 0:
            self._until(lambda: not idle or self.staged or self.sealed.is_set(), idle)
            n = len(self.staged) if self.staged else -1 if idle else 0
        if self.world.world_size > 1:  # rank 0's count wins: the others give -1
            t = torch.tensor([n + 1 if self.world.rank == 0 else 0], dtype=torch.int64,
                             device=self.device)
            n = int(self.world.all_reduce(t, op="max")[0]) - 1
            self._until(lambda: len(self.staged) >= n and (n >= 0 or self.sealed.is_set()),
                        idle)
        return n

    def take(self, n: int) -> list:
        """The first ``n`` staged joins' requests, together: those that arrived during one round
        and have one batch key share a pipeline call, as without step batching."""
        return [req for _ in range(max(n, 0)) for req in self.staged.popleft()]


class _BatchingHook(ModelHook):
    """Sends a request thread's denoiser call to the batcher (the runner's own calls, e.g. a
    warm-up outside step batching, run as usual)."""

    def __init__(self, batcher: StepBatcher, threads: set[int]):
        super().__init__()
        self.batcher = batcher
        self.threads = threads

    def new_forward(self, module, *args, **kwargs):
        if threading.get_ident() not in self.threads:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.batcher.submit(module, self.fn_ref.original_forward, args, kwargs)


def install(denoisers: list[torch.nn.Module], batcher: StepBatcher, threads: set[int]) -> None:
    for module in denoisers:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _BatchingHook(batcher, threads), HOOK)


def pipeline_view(pipe: Any) -> Any:
    """A pipeline sharing ``pipe``'s modules with a scheduler of its own: a call keeps its
    timesteps and step index on the scheduler, and its guidance and the like on the pipeline
    object, so concurrent calls each need their own."""
    view = copy.copy(pipe)
    object.__setattr__(view, "scheduler", copy.deepcopy(pipe.scheduler))
    return view
