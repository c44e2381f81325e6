"""One process per rank: joins vLLM's distributed environment, loads the model, and runs the
methods the executor calls on every rank (``CollectiveRpc``)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine.errors import GenerationError
from vllm_omni.engine import messages as m
from vllm_omni.engine.request import DiffusionOutput, DiffusionRequest
from vllm_omni.utils.proc import set_process_title, watch_parent

logger = logging.getLogger(__name__)


def _init_distributed(rank: int, config: OmniEngineConfig, init_method: str, device_type: str,
                      local_rank: int):
    """Joins vLLM's world group and cuts this rank's ulysses/ring/cfg/tp/vae groups from it.
    ``init_method``: a file on this host (``mp``) or ``tcp://`` rank 0's node (``ray``)."""
    from vllm.distributed import parallel_state

    from vllm_omni.distributed.groups import vllm_groups

    backend = "nccl" if device_type == "cuda" else "gloo"
    parallel_state.init_distributed_environment(
        world_size=config.world_size, rank=rank, distributed_init_method=init_method,
        local_rank=local_rank, backend=backend,
    )
    return vllm_groups(config.parallel.layout, rank, backend)


class Worker:
    """A rank's model runner and the methods callable on every rank. A public method is all it
    takes to make something callable through ``Executor.collective_rpc``."""

    def __init__(self, rank: int, config: OmniEngineConfig, init_method: str, out_queue,
                 local_rank: int | None = None):
        """``out_queue``: where rank 0 puts ``Progress`` and ``PartialImage`` while a batch runs.
        ``local_rank``: this rank's CUDA device index among those it sees (None: the r-th run of
        ``world_size`` devices for replica r, as the ``mp`` executor starts all on one host)."""
        import torch

        from vllm_omni.worker.model_runner import ModelRunner

        self.rank = rank
        self.out = out_queue
        # Running request id -> why it was cancelled; written by the inbox thread as ``Cancel``
        # messages arrive, read by the runner at its cancel points.
        self.cancelled: dict[str, str] = {}
        self.failed = False  # set by a call that may have left this rank out of step
        # m.Join messages for the running execute call (step batching), in arrival order.
        self.joins: queue.Queue = queue.Queue()
        parallel = config.parallel
        if config.device:
            device = torch.device(config.device)
        elif torch.cuda.is_available():
            if local_rank is None:
                local_rank = parallel.data_parallel_rank * config.world_size + rank
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Ranks (of every replica) share the host's cores; more threads than cores makes
            # every rank spin-wait.
            ranks = config.world_size * parallel.data_parallel_size
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
        groups = _init_distributed(rank, config, init_method, device.type,
                                   rank if local_rank is None else local_rank)
        self.runner = ModelRunner(config, rank, device, groups, self.cancelled)
        self.runner.load()

    def execute(self, batch: list[DiffusionRequest], want_progress: bool = False
                ) -> list[DiffusionOutput]:
        """Rank 0 answers with the outputs; the others with their errors alone (their artifacts
        equal rank 0's, and would only cost a copy)."""
        lead = self.rank == 0

        def progress(ids, step, total):
            self.out.put(m.Progress(ids, step, total))

        def partial(request_id, index, image):
            self.out.put(m.PartialImage(request_id, index, image))

        if self.runner.batcher is not None:
            def emit(outs):
                if lead:
                    self.out.put(m.RequestOutputs(outs))

            self.runner.execute_steps(batch, progress if want_progress and lead else None,
                                      partial if lead else None, emit, self.joins,
                                      batch[0].request_id)
            return []  # each output went out as its request finished
        outputs = self.runner.execute(batch, progress if want_progress and lead else None,
                                      partial if lead else None)
        # A request that failed here may have left the peers waiting in a collective.
        self.failed = any(isinstance(o.error, GenerationError) for o in outputs)
        return outputs if lead else [DiffusionOutput(o.request_id, error=o.error)
                                     for o in outputs]

    def pid(self) -> int:
        return os.getpid()

    def run(self, call: m.CollectiveRpc) -> m.RpcResult:
        """One ``collective_rpc`` call on this rank; a method that raises is answered with its
        traceback, and the rank keeps serving."""
        self.failed = False
        try:
            value = getattr(self, call.method)(*call.args, **call.kwargs)
            return m.RpcResult(call.call_id, self.rank, value, failed=self.failed)
        except Exception:
            logger.error("%s failed:\n%s", call.method, traceback.format_exc())
            return m.RpcResult(call.call_id, self.rank, error=traceback.format_exc(), failed=True)


def worker_main(rank: int, config: OmniEngineConfig, init_method: str, work_queue, out_queue,
                heartbeats=None, environ: dict[str, str] | None = None) -> None:
    """In: ``CollectiveRpc`` | ``Cancel`` | ``Shutdown``. Out: ``WorkerReady`` or
    ``WorkerLoadFailed``, then an ``RpcResult`` per call from every rank (and, from rank 0,
    ``Progress`` and ``PartialImage`` while a batch runs)."""
    # Title first: setproctitle finds its memory next to the original environment block.
    dp = config.parallel
    set_process_title(f"worker_dp{dp.data_parallel_rank}_rank{rank}"
                      if dp.data_parallel_size > 1 else f"worker_rank{rank}")
    if environ is not None:  # the engine's environment now, not the fork server's at its start
        os.environ.clear()
        os.environ.update(environ)
    # force: a fork server forked from the engine core holds the core's handler
    logging.basicConfig(level=os.environ.get("VLLM_OMNI_LOG_LEVEL", "INFO"), force=True,
                        format=f"%(levelname)s %(asctime)s [worker{rank}] %(message)s")

    def beat() -> None:
        heartbeats[rank] = time.monotonic()

    watch_parent(beat if heartbeats is not None else None)
    try:
        worker = Worker(rank, config, init_method, out_queue)
    except BaseException:
        out_queue.put(m.WorkerLoadFailed(rank, traceback.format_exc()))
        return
    out_queue.put(m.WorkerReady(rank))

    # Calls run one at a time on this thread; a thread of its own reads the queue meanwhile, so
    # a m.Cancel reaches a call that is running.
    calls: queue.Queue = queue.Queue()

    def receive() -> None:
        while True:
            msg = work_queue.get()
            if isinstance(msg, m.Cancel):
                worker.cancelled[msg.request_id] = msg.reason
                continue
            if isinstance(msg, m.Join):
                worker.joins.put(msg)
                continue
            if isinstance(msg, m.CollectiveRpc) and msg.method == "execute":
                worker.cancelled.clear()  # in message order: a later m.Cancel is for this batch
            calls.put(msg)
            if isinstance(msg, m.Shutdown):
                return

    threading.Thread(target=receive, name="vllm_omni-worker-inbox", daemon=True).start()
    while True:
        msg = calls.get()
        if isinstance(msg, m.Shutdown):
            return
        out_queue.put(worker.run(msg))
