"""Fault injection for the tests: one rank fails the requests whose prompt carries a marker.

``VLLM_OMNI_TEST_FAIL_RANK=<rank>`` (read when a batch runs) makes that rank answer a marked
request with an error without running it, while its peers run on into their collectives, which is
how a desynchronised parallel group looks. Installed by ``vllm_omni.testing.hooks``, never by
production code.
"""

from __future__ import annotations

import functools
import os

ENV = "VLLM_OMNI_TEST_FAIL_RANK"
FAULT_MARKER = "__vllm_omni_test_fault__"


def install(model_runner_module) -> None:
    from vllm_omni.engine.errors import GenerationError
    from vllm_omni.engine.request import DiffusionOutput

    runner = model_runner_module.ModelRunner
    if getattr(runner._run, "_vllm_omni_fault", False):
        return
    original = runner._run

    @functools.wraps(original)
    def _run(self, reqs, progress, partial=None):
        if int(os.environ.get(ENV, "-1")) == self.rank and any(FAULT_MARKER in r.prompt
                                                               for r in reqs):
            error = GenerationError(f"generation failed: RuntimeError: fault injected on rank "
                                    f"{self.rank} (tests)")
            return {r.request_id: DiffusionOutput(r.request_id, error=error) for r in reqs}
        return original(self, reqs, progress, partial)

    _run._vllm_omni_fault = True
    runner._run = _run
