"""Imported once by the worker fork server, so each worker starts with these modules loaded.

Importing torch, diffusers' pipelines and vLLM's distributed package takes about 10 s of CPU per
process; forking workers from a server that already holds them makes worker start-up and
restart after a crash that much faster. Nothing here starts threads or touches a GPU.
"""

import sys

if sys.platform == "linux":
    # The fork server goes when the engine core that started it goes, also in the middle of
    # these imports (an engine core started early and stopped because the server did not start).
    # A signal, not a thread: nothing may run beside the forks. Forked workers do not inherit it.
    import ctypes
    import os
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # already gone before the line above
        os._exit(0)

import diffusers  # noqa: F401
import torch  # noqa: F401
from diffusers import DiffusionPipeline  # noqa: F401
from diffusers.pipelines import qwenimage  # noqa: F401
from vllm.distributed import parallel_state  # noqa: F401

import vllm_omni.worker.model_runner  # noqa: F401
import vllm_omni.worker.worker  # noqa: F401
