"""``vllm serve --omni`` started from a preforked interpreter, for the tests.

Most of a server start is importing vLLM and its argument parser (~15 s of a ~17 s start on this
project's 2-core machines), and the suite starts dozens of servers. ``python -m
vllm_omni.testing.preforked`` imports those once and then forks one process per server it is
asked for. The child becomes what ``vllm serve ARGS`` would be: its own session, the given
environment, working directory and log file, and ``sys.argv``; it then runs stock vLLM's CLI
``main`` and exits through the interpreter's normal shutdown. Only the imports are shared, and
of vllm_omni only what every process of the tests imports at start (the platform fix, the test
hooks' installer, this module): the test hooks that read the environment when their module is
imported (``vllm_omni.testing.hooks``) read the server's.

Protocol: one JSON object per line on stdin (``argv``, ``env``, ``cwd``, ``log``); the pid of
the forked server comes back as one line on stdout. The preforked process exits when its stdin
closes; the servers it forked live on (each is stopped by whoever asked for it).

The README's own command and the CLI's tests still start ``vllm serve`` as a fresh process.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading

import setproctitle  # a dependency of vLLM's

# What `vllm serve --omni` imports before it does anything of its own: vLLM's CLI and serve
# argument parser, and the web stack. Nothing here reads a per-server setting at import.
PRELOAD = ("vllm.entrypoints.cli.main", "vllm.entrypoints.launchers.cli_args",
           "vllm.utils.argparse_utils", "fastapi", "uvicorn")


class Preforked:
    """The preforked interpreter, seen from the tests: ``start()`` returns a server process."""

    def __init__(self, vllm: str):
        self.vllm = vllm  # argv[0] of the servers, the `vllm` script of this environment
        self._lock = threading.Lock()  # one request and its answer at a time on the pipes
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def start(self, argv: list[str], env: dict[str, str], log_path: str) -> ServerProcess:
        request = {"argv": [self.vllm, *argv], "env": env, "cwd": os.getcwd(), "log": log_path}
        with self._lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the preforked interpreter exited ({self.proc.wait()})")
        return ServerProcess(int(line))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class ServerProcess:
    """The part of ``subprocess.Popen`` the tests use, for a process that is not our child: a
    pidfd tells when it has exited and signals exactly it, never a later process with its pid.
    Its exit status goes to its parent, the preforked interpreter, which reaps it."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:  # it exited already
            self._fd = None

    def poll(self) -> bool | None:
        """True once the process has exited (its exit status is its parent's), else None."""
        if self._fd is None or select.select([self._fd], [], [], 0)[0]:
            return True
        return None

    def wait(self, timeout: float | None = None) -> bool:
        if self._fd is not None and not select.select([self._fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return True

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _serve_requests() -> dict:
    """Forks one child per request and answers its pid; returns the request in the child."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped without a wait
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            return request
        print(pid, flush=True)
    sys.exit(0)


def _become(request: dict) -> None:
    """Makes this fork what `vllm serve` started by ``subprocess.Popen(argv, env=..., cwd=...,
    stdout=log, stderr=STDOUT, stdin=DEVNULL, start_new_session=True)`` would be."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    setproctitle.setproctitle(" ".join(sys.argv))  # `ps` shows the command it stands for


def main() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # setproctitle finds this process's argv memory by walking from the C environment, on its
    # first use: that must be here, before a child replaces its environment, or no process
    # of a server could set its title (the tests find the engine's processes by title).
    setproctitle.getproctitle()
    _become(_serve_requests())
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())  # as the `vllm` script ends


if __name__ == "__main__":
    main()
