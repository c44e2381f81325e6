"""Caps the working area of the edit and layered pipelines, so tiny-model tests stay fast.

Qwen-Image-Edit(-2509), Qwen-Image-Layered and LongCat-Image-Edit resize their input to a fixed
area (about 1 megapixel, or 640²/1024² for Layered) whatever the requested size; on a CPU the
VAE encode at that size takes seconds even for a tiny model. Each pipeline module computes the
size with its own ``calculate_dimensions(target_area, ratio)``; this wraps it to cap the area.

Tests set ``VLLM_OMNI_TEST_EDIT_AREA=<pixels>``; every process that imports the model registry
(API server, engine core, workers) then applies the same cap, so the sizes the server reports
and the images the workers make agree. Unset, nothing changes.
"""

from __future__ import annotations

import importlib
import os

ENV = "VLLM_OMNI_TEST_EDIT_AREA"
_MODULES = (
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_layered",
    "diffusers.pipelines.longcat_image.pipeline_longcat_image_edit",
)


def cap_edit_area(pixels: int) -> None:
    for name in _MODULES:
        module = importlib.import_module(name)
        original = getattr(module.calculate_dimensions, "_vllm_omni_original",
                           module.calculate_dimensions)

        def capped(target_area, ratio, _original=original):
            return _original(min(target_area, pixels), ratio)

        capped._vllm_omni_original = original
        module.calculate_dimensions = capped


def apply_from_env() -> None:
    value = os.environ.get(ENV)
    if value:
        cap_edit_area(int(value))
