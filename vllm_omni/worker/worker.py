"""One process per rank: joins vLLM's distributed environment, loads the model, runs work."""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.utils.proc import set_process_title, watch_parent

logger = logging.getLogger(__name__)


def _init_distributed(rank: int, config: OmniEngineConfig, init_method: str, device_type: str):
    """Joins vLLM's world group and cuts this rank's ulysses/ring/cfg/tp/vae groups from it."""
    from vllm.distributed import parallel_state

    from vllm_omni.distributed.groups import vllm_groups

    backend = "nccl" if device_type == "cuda" else "gloo"
    parallel_state.init_distributed_environment(
        world_size=config.world_size, rank=rank, distributed_init_method=init_method,
        local_rank=rank, backend=backend,
    )
    return vllm_groups(config.parallel.layout, rank, backend)


def worker_main(rank: int, config: OmniEngineConfig, init_method: str,
                work_queue, result_queue, cancel_flags=None, heartbeats=None,
                environ: dict[str, str] | None = None) -> None:
    """Messages in: ("execute", batch, want_progress) | ("shutdown",). Out: ("ready", rank) |
    ("load_error", rank, text) | ("done", rank, failed) per batch from every rank; from rank 0
    only: ("progress", ids, step, total) | ("partial", id, index, image) | ("result", outputs)."""
    # Title first: setproctitle finds its memory next to the original environment block.
    set_process_title(f"worker_rank{rank}")
    if environ is not None:  # the engine's environment now, not the fork server's at its start
        os.environ.clear()
        os.environ.update(environ)
    logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"),
                        format=f"%(levelname)s %(asctime)s [worker{rank}] %(message)s")

    def beat() -> None:
        heartbeats[rank] = time.monotonic()

    watch_parent(beat if heartbeats is not None else None)
    try:
        import torch

        from vllm_omni.worker.model_runner import ModelRunner

        if config.device:
            device = torch.device(config.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Ranks share the host's cores; more threads than cores makes every rank spin-wait.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
        groups = _init_distributed(rank, config, init_method, device.type)
        runner = ModelRunner(config, rank, device, groups, cancel_flags)
        runner.load()
    except BaseException:
        result_queue.put(("load_error", rank, traceback.format_exc()))
        return
    result_queue.put(("ready", rank))

    def progress(ids, step, total):
        result_queue.put(("progress", ids, step, total))

    def partial(request_id, index, image):
        result_queue.put(("partial", request_id, index, image))

    while True:
        try:
            msg = work_queue.get(timeout=1.0)
        except queue.Empty:
            continue
        if msg[0] == "shutdown":
            return
        if msg[0] == "execute":
            want_progress = msg[2] and rank == 0
            outputs = runner.execute(msg[1], progress if want_progress else None,
                                     partial if rank == 0 else None)
            if rank == 0:
                result_queue.put(("result", outputs))
            # Every rank says it is through the batch, so the executor can tell a rank stuck in
            # a collective (its peer failed) from one that is merely slow.
            failed = any(o.error is not None and o.error.status >= 500 for o in outputs)
            result_queue.put(("done", rank, failed))
