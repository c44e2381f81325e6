"""Run a function on N gloo ranks in fresh processes and collect what each returns (for tests)."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from vllm_omni.utils.proc import start_process


def _rank_main(fn, rank, world_size, store, args, results) -> None:
    try:
        import torch.distributed as dist

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size)
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank (a module-level function); results by rank."""
    from vllm_omni.executor.multiproc import worker_context

    ctx = worker_context()  # forked from the preloaded server: no 10 s of imports per rank
    results = ctx.Queue()
    # A file rendezvous: no port that a concurrently starting server could take first.
    tmp = tempfile.mkdtemp(prefix="vllm_omni_ranks_")
    store = os.path.join(tmp, "store")
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, store, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        start_process(p)
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish")
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return [out[r] for r in range(world_size)]


_NAME_KEYS = {"U": "ulysses_degree", "R": "ring_degree", "CFG": "cfg_parallel_size",
              "TP": "tensor_parallel_size", "VAE-PP": "vae_patch_parallel_size"}


def parse_layout_name(name: str) -> dict[str, int]:
    """"U2xCFG2" (the tests' and benchmarks' layout names) -> DiffusionParallelConfig keyword
    arguments; "1" is the single-rank layout."""
    if name == "1":
        return {}
    out: dict[str, int] = {}
    for part in name.split("x"):
        key = next((k for k in sorted(_NAME_KEYS, key=len, reverse=True)
                    if part.startswith(k) and part[len(k):].isdigit()), None)
        if key is None:
            raise ValueError(f"bad layout {name!r}: parts are U<n>, R<n>, CFG<n>, TP<n>, VAE-PP<n>")
        out[_NAME_KEYS[key]] = int(part[len(key):])
    return out
