"""A test adapter: the Qwen-Image adapter plus one option, added by its declaration alone
(tests/test_options.py checks it reaches /openapi.json, validation and the pipeline call).

Tests set ``VLLM_OMNI_TEST_EXTRA_OPTION=1`` for the server they start; every process of it that
imports the model registry (API server, engine core, workers) then serves QwenImagePipeline
with this adapter. Unset, nothing changes.
"""

from __future__ import annotations

import os

from vllm_omni.models.options import Option
from vllm_omni.models.qwen_image import QwenImageAdapter

ENV = "VLLM_OMNI_TEST_EXTRA_OPTION"
# A real QwenImagePipeline argument, so the pipeline call shows it arrived.
MAX_SEQUENCE_LENGTH = Option("max_sequence_length", int, "Tokens of the prompt the text encoder "
                             "reads", ge=1, le=1024, batchable=True)


class QwenImageWithOption(QwenImageAdapter):
    options = (*QwenImageAdapter.options, MAX_SEQUENCE_LENGTH)


def apply_from_env(registry) -> None:
    if os.environ.get(ENV):
        registry._BY_CLASS["QwenImagePipeline"] = QwenImageWithOption()
