"""vllm_omni: diffusion serving for vLLM (``vllm serve MODEL --omni``) and offline ``Omni``."""

__version__ = "0.1.0"

__all__ = ["Omni", "OmniDiffusionSamplingParams", "DiffusionParallelConfig", "__version__"]


def __getattr__(name):
    # Lazy, so that the .pth platform hook and vLLM's plugin loader stay cheap to import.
    if name == "Omni":
        from vllm_omni.entrypoints.omni import Omni

        return Omni
    if name == "OmniDiffusionSamplingParams":
        from vllm_omni.inputs.data import OmniDiffusionSamplingParams

        return OmniDiffusionSamplingParams
    if name == "DiffusionParallelConfig":
        from vllm_omni.diffusion.data import DiffusionParallelConfig

        return DiffusionParallelConfig
    raise AttributeError(name)
