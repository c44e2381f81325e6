"""Test-only hooks, installed in every process the tests start and in none other.

``tests/hooks/sitecustomize.py`` (put on ``PYTHONPATH`` by ``tests/conftest.py``) calls
``install()`` when any Python process starts: the API server, the engine core, the worker fork
server and so its workers. Each hook waits for the module it changes to be imported (most
processes never import it), then applies itself:

- ``vllm_omni.models.registry`` -> the edit pipelines' working-area cap (``edit_area``, from
  ``VLLM_OMNI_TEST_EDIT_AREA``), so the API server and the workers agree on input sizes, and
  the test adapter with one more option (``extra_option``, from ``VLLM_OMNI_TEST_EXTRA_OPTION``);
- ``vllm_omni.worker.model_runner`` -> fault injection (``faults``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def _registry(module) -> None:
    from vllm_omni.testing import edit_area, extra_option

    edit_area.apply_from_env()
    extra_option.apply_from_env(module)


def _faults(module) -> None:
    from vllm_omni.testing import faults

    faults.install(module)


HOOKS: dict[str, Callable] = {
    "vllm_omni.models.registry": _registry,
    "vllm_omni.worker.model_runner": _faults,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``HOOKS[name](module)`` right after ``name`` is first imported (or at once, if it
    already is)."""

    def find_spec(self, name, path=None, target=None):
        if name not in HOOKS:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, HOOKS[name]

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                hook(module)

        spec.loader = Loader()
        return spec


def install() -> None:
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImport())
    for name, hook in HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
