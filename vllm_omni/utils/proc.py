"""Small process helpers shared by the engine core and the workers."""

from __future__ import annotations

import os
import socket


def set_process_title(role: str) -> None:
    """Names the process ``vllm_omni::<role>`` so operators (and tests) can find it."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"vllm_omni::{role}")
    except ImportError:
        pass


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


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
