"""Cache-DiT in a step-batched forward that carries several requests' calls: each decides on its
own samples, as it would alone.

cache-dit swaps each block stack of the denoiser for a wrapper whose forward runs the first
``Fn`` blocks, asks the current cache context whether the residual moved less than the
threshold, and then either applies the cached residual or runs the middle blocks and caches
theirs, before the last ``Bn`` blocks. That decision covers the whole forward. Here a hook on
the wrapper repeats its forward with the decision taken per call, each call with its own
context (its steps, CFG branch, buffers and calibrators): the Fn and Bn blocks run once for
all; the middle blocks are skipped when every call reuses its cache, and otherwise run for all,
with each reusing call's samples then replaced by what its cache gives. The library's own
methods do the work; only the order of its forward is restated, for its two forward families.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "vllm_omni.cache_dit_rows"


def cached_blocks(forward) -> list[torch.nn.Module]:
    """The block-stack wrappers behind the forward cache-dit installed on a transformer. The
    library keeps them only in that forward's closure (version-pinned; a test covers it)."""
    outer = inspect.getclosurevars(forward.func).nonlocals["new_forward"]
    unified = inspect.getclosurevars(outer).nonlocals["unified_blocks"]
    return [wrapper for stack in unified.values() for wrapper in stack]


class _Rows:
    """The calls of one forward: their sample counts and their contexts for one block stack."""

    def __init__(self, blocks, calls: list, key: str):
        self.blocks, self.m = blocks, blocks.context_manager
        self.name = blocks.cache_context
        self.sizes = [c.size for c in calls]
        self.mine = [c.captured[key] for c in calls]  # per call: its contexts by name
        for contexts in self.mine:  # as the wrapper does first: may refresh a finished one
            self.m._cached_context_manager[self.name] = contexts[self.name]
            contexts[self.name] = self.m.set_context(self.name)
        # The name keeps the first call's context, as the forward's other code expects.
        self.m._cached_context_manager[self.name] = self.mine[0][self.name]

    def each(self, *tensors):
        """Per call: its context made current, and its rows of each tensor (None stays)."""
        parts = [torch.split(t, self.sizes) if t is not None else [None] * len(self.sizes)
                 for t in tensors]
        for i, contexts in enumerate(self.mine):
            with self.m.enter_context(contexts[self.name]):
                yield (i, *(p[i] for p in parts))

    def decide(self, residual, hidden) -> list[bool]:
        """Per call: whether it reuses its cache (the wrapper's one decision, per call)."""
        m, prefix = self.m, self.blocks.cache_prefix
        reuse = []
        for _, r, h in self.each(residual, hidden):
            m.mark_step_begin()
            l1 = m.is_l1_diff_enabled()
            reuse.append(m.can_cache(
                h if l1 else r, parallelized=self.blocks._is_parallelized(),
                prefix=f"{prefix}_Fn_hidden_states" if l1 else f"{prefix}_Fn_residual"))
        return reuse

    def apply(self, hidden, encoder, which: list[bool]):
        """The cached result for the calls in ``which``; the others' rows as given."""
        m, prefix = self.m, self.blocks.cache_prefix
        hs, es = [], []
        for i, h, e in self.each(hidden, encoder):
            if which[i]:
                m.add_cached_step()
                h, e = m.apply_cache(
                    h, e, prefix=f"{prefix}_Bn_residual" if m.is_cache_residual()
                    else f"{prefix}_Bn_hidden_states",
                    encoder_prefix=f"{prefix}_Bn_residual" if m.is_encoder_cache_residual()
                    else f"{prefix}_Bn_hidden_states")
            hs.append(h)
            es.append(e)
        return torch.cat(hs), None if encoder is None else torch.cat(es)

    def keep_Fn(self, residual, hidden, computing: list[bool]) -> None:
        m, prefix = self.m, self.blocks.cache_prefix
        for i, r, h in self.each(residual, hidden):
            if computing[i]:
                m.set_Fn_buffer(r, prefix=f"{prefix}_Fn_residual")
                if m.is_l1_diff_enabled():
                    m.set_Fn_buffer(h, f"{prefix}_Fn_hidden_states")

    def keep_Bn(self, hidden, hidden_residual, encoder, encoder_residual,
                computing: list[bool], always_residual: bool = False) -> None:
        m, prefix = self.m, self.blocks.cache_prefix
        for i, h, hr, e, er in self.each(hidden, hidden_residual, encoder, encoder_residual):
            if not computing[i]:
                continue
            if m.is_cache_residual():
                m.set_Bn_buffer(hr, prefix=f"{prefix}_Bn_residual")
            else:
                m.set_Bn_buffer(h, prefix=f"{prefix}_Bn_hidden_states")
            if always_residual:  # the 3/4/5 family caches the encoder's residual either way
                if e is not None:
                    m.set_Bn_encoder_buffer(er, prefix=f"{prefix}_Bn_residual"
                                            if m.is_encoder_cache_residual()
                                            else f"{prefix}_Bn_hidden_states")
            elif m.is_encoder_cache_residual():
                m.set_Bn_encoder_buffer(er, prefix=f"{prefix}_Bn_residual")
            else:
                m.set_Bn_encoder_buffer(e, prefix=f"{prefix}_Bn_hidden_states")


def _swap_rows(computed, cached, reuse: list[bool], sizes: list[int]):
    parts = list(torch.split(computed, sizes))
    for i, part in enumerate(torch.split(cached, sizes)):
        if reuse[i]:
            parts[i] = part
    return torch.cat(parts)


def _forward(blocks, rows: _Rows, one_stream: bool, hidden_states, *args, **kwargs):
    """The wrapper's forward, decided per call. Its two families differ in their streams:
    patterns 0/1/2 (``CachedBlocks_Pattern_Base``) take and return the image and text streams;
    patterns 3/4/5 take one stream and may return a text stream, whose residual the forward
    computes itself."""
    if one_stream:
        streams = ()
    elif "encoder_hidden_states" in kwargs:
        streams = (kwargs.pop("encoder_hidden_states"),)
    else:
        streams, args = (args[0],), args[1:]
    blocks._check_cache_params()
    h, e = blocks.call_Fn_blocks(hidden_states, *streams, *args, **kwargs)
    residual = blocks._get_Fn_residual(hidden_states, h)
    reuse = rows.decide(residual, h)
    if all(reuse):
        h, e = rows.apply(h, e, reuse)
    else:
        computing = [not r for r in reuse]
        rows.keep_Fn(residual, h, computing)
        cached = rows.apply(h, e, reuse) if any(reuse) else None
        if one_stream:
            h2, e2, h_res = blocks.call_Mn_blocks(h, *args, **kwargs)
            e_res = e2 - e if e2 is not None else None
        else:
            h2, e2, h_res, e_res = blocks.call_Mn_blocks(h, e, *args, **kwargs)
        rows.keep_Bn(h2, h_res, e2, e_res, computing, always_residual=one_stream)
        if cached is not None:
            h2 = _swap_rows(h2, cached[0], reuse, rows.sizes)
            if e2 is not None and cached[1] is not None:
                e2 = _swap_rows(e2, cached[1], reuse, rows.sizes)
        h, e = h2, e2
    # With no Bn blocks the 3/4/5 family's call_Bn_blocks drops the text stream; the base
    # family's returns its inputs.
    if blocks.context_manager.Bn_compute_blocks() > 0:
        h, e = blocks.call_Bn_blocks(h, *(() if one_stream else (e,)), *args, **kwargs)
    return blocks._process_forward_outputs(h, e)


class _RowsHook(ModelHook):
    """On a block-stack wrapper: a forward of several calls decides per call."""

    def __init__(self, batcher, key: str):
        super().__init__()
        self.batcher, self.key = batcher, key

    def new_forward(self, module, *args, **kwargs):
        group = self.batcher.group
        if group is None or len(group) < 2:
            return self.fn_ref.original_forward(*args, **kwargs)
        from cache_dit.caching.cache_blocks.pattern_3_4_5 import CachedBlocks_Pattern_3_4_5

        return _forward(module, _Rows(module, group, self.key),
                        isinstance(module, CachedBlocks_Pattern_3_4_5), *args, **kwargs)


def install(wrappers: list[torch.nn.Module], batcher: Any, key: str) -> None:
    for wrapper in wrappers:
        HookRegistry.check_if_exists_or_initialize(wrapper).register_hook(
            _RowsHook(batcher, key), HOOK)


def remove(wrappers: list[torch.nn.Module]) -> None:
    for wrapper in wrappers:
        HookRegistry.check_if_exists_or_initialize(wrapper).remove_hook(HOOK, recurse=False)
