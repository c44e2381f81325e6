"""Small process helpers shared by the engine core and the workers."""

from __future__ import annotations

import os
import socket
import threading
import time


def set_process_title(role: str) -> None:
    """Names the process ``vllm_omni::<role>`` so operators (and tests) can find it."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"vllm_omni::{role}")
    except ImportError:
        pass


HEARTBEAT_S = 0.5


def watch_parent(beat=None) -> None:
    """Starts a thread that exits this process at once when the process that started it dies
    (its sentinel pipe closes), also in the middle of a computation, so no worker outlives its
    engine; and that calls ``beat()`` every ``HEARTBEAT_S`` meanwhile. A thread runs while the
    main thread is inside torch (which releases the interpreter lock), so a missing heartbeat
    means a stopped or frozen process, not a busy one."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()

    def run() -> None:
        while True:
            if beat is not None:
                beat()
            if parent is None:
                time.sleep(HEARTBEAT_S)
            elif wait([parent.sentinel], timeout=HEARTBEAT_S):
                os._exit(1)  # nobody will read our results; skip exit handlers that could block

    threading.Thread(target=run, name="vllm_omni-watch-parent", daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(proc) -> None:
    """Starts a spawn-context process without re-running the caller's ``__main__`` in it.

    Our process targets live in this package, so the child never needs the user's script; and
    re-running it would start a second engine from an unguarded top-level ``Omni(...)`` call
    (the usual ``if __name__ == "__main__"`` requirement of spawn).
    """
    import sys
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        if main is not None:
            sys.modules["__main__"] = main
