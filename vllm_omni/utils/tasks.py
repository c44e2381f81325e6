"""State kept per pipeline call. Step batching runs each call as a greenlet on the runner's own
thread (torch on a second OS thread runs 15-25% slower on a CPU while the first one lives, as
each gets an OpenMP pool of its own), so what belongs to one call (its cache state, its CFG
branch count, its timing) is kept per greenlet. Each thread has a main greenlet of its own,
so outside step batching this is per thread, as ``threading.local`` is."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import greenlet


def current() -> greenlet.greenlet:
    """The running task: a step batching call's greenlet, or else its thread's main one."""
    return greenlet.getcurrent()


class TaskLocal:
    """``threading.local`` per task: attributes set in one task are not seen in another. Each
    task's first access starts from ``factory()`` (empty by default); a finished task's
    state goes with it."""

    def __init__(self, factory: Callable[[], dict[str, Any]] = dict) -> None:
        object.__setattr__(self, "_states", weakref.WeakKeyDictionary())
        object.__setattr__(self, "_factory", factory)

    def _mine(self) -> dict[str, Any]:
        task = greenlet.getcurrent()
        state = self._states.get(task)
        if state is None:
            state = self._states[task] = self._factory()
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mine()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._mine()[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._mine()[name]
        except KeyError:
            raise AttributeError(name) from None
