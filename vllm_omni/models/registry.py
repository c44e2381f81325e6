"""Maps a pipeline directory's ``model_index.json`` class name to its adapter."""

from __future__ import annotations

import os

from vllm_omni.models.bagel import BagelAdapter
from vllm_omni.models.bagel.layout import is_bagel_dir
from vllm_omni.models.base import ModelAdapter, ModelSpec, read_json
from vllm_omni.models.flux import Flux2KleinAdapter, FluxAdapter
from vllm_omni.models.glm_image import GlmImageAdapter
from vllm_omni.models.longcat_image import LongCatImageAdapter, LongCatImageEditAdapter
from vllm_omni.models.ovis_image import OvisImageAdapter
from vllm_omni.models.qwen_image import (
    QwenImageAdapter,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    QwenImageLayeredAdapter,
)
from vllm_omni.models.sd3 import StableDiffusion3Adapter
from vllm_omni.models.stable_audio import StableAudioAdapter
from vllm_omni.models.wan import WanAdapter, WanI2VAdapter
from vllm_omni.models.z_image import ZImageAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (  # one line each: a new model family adds one
    FluxAdapter(),
    Flux2KleinAdapter(),
    GlmImageAdapter(),
    LongCatImageAdapter(),
    LongCatImageEditAdapter(),
    OvisImageAdapter(),
    QwenImageAdapter(),
    QwenImageEditAdapter(),
    QwenImageEditPlusAdapter(),
    QwenImageLayeredAdapter(),
    StableDiffusion3Adapter(),
    ZImageAdapter(),
    WanAdapter(),
    WanI2VAdapter(),
    StableAudioAdapter(),
    BagelAdapter(),
)

_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.pipeline_classes}


def load_model_spec(model_dir: str) -> ModelSpec:
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    # BAGEL has no diffusers pipeline: its published directory is recognised by its files.
    cls = "BagelPipeline" if is_bagel_dir(model_dir) else \
        read_json(model_dir, "model_index.json").get("_class_name")
    family = _BY_CLASS.get(cls)
    if family is None:
        raise ValueError(
            f"{cls!r} pipelines are not supported; supported pipelines: "
            + ", ".join(sorted(_BY_CLASS))
        )
    adapter = type(family)()  # bound to this model: its methods read ``self.spec``
    spec = adapter.load_spec(model_dir, cls)
    spec.min_steps = scheduler_min_steps(model_dir)
    adapter.spec = spec
    return spec


def scheduler_min_steps(model_dir: str) -> int:
    """The fewest steps the pipeline's scheduler can run: flow-matching schedulers that stretch
    the schedule to a terminal shift divide by zero with one step (NaN latents, a black image)."""
    if not os.path.exists(os.path.join(model_dir, "scheduler", "scheduler_config.json")):
        return 1
    config = read_json(model_dir, "scheduler", "scheduler_config.json")
    return 2 if config.get("shift_terminal") else 1


def resolve_model_dir(model: str, revision: str | None = None) -> str:
    """A local pipeline directory, or a hub id fetched/reused through the Hugging Face cache."""
    if os.path.isdir(model):
        if revision:
            raise ValueError("--revision applies to hub ids, not local directories")
        return os.path.abspath(model)
    if os.path.exists(model) or model.startswith((".", "/")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a pipeline directory nor a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision)
    except Exception as e:  # offline, gated, missing: the message says which
        raise ValueError(f"could not fetch model {model!r}: {e}") from None
