"""vllm_omni: diffusion serving for vLLM (``vllm serve MODEL --omni``) and offline ``Omni``."""

__version__ = "0.1.0"

__all__ = ["Omni", "OmniDiffusionSamplingParams", "DiffusionParallelConfig", "__version__"]

_LAZY = {
    "Omni": "vllm_omni.entrypoints.omni",
    "OmniDiffusionSamplingParams": "vllm_omni.inputs.data",
    "DiffusionParallelConfig": "vllm_omni.diffusion.data",
}


def __getattr__(name):
    # Lazy, so that the .pth platform hook and vLLM's plugin loader stay cheap to import.
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
