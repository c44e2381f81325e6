"""Offline inference: ``Omni(model=...).generate(prompts, params)``.

Drives the same ``EngineCore`` and worker processes as the server, in the caller's process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniEngineConfig
from vllm_omni.engine.input_processor import InputProcessor
from vllm_omni.engine.request import Audio, Video
from vllm_omni.inputs.data import OmniDiffusionSamplingParams
from vllm_omni.models.registry import load_model_spec, resolve_model_dir


@dataclass
class OmniRequestOutput:
    request_id: str
    prompt: str
    images: list[Any] = field(default_factory=list)  # PIL, or float32 HxWxC (output_type="np")
    videos: list[Video] = field(default_factory=list)  # frames and fps
    audios: list[Audio] = field(default_factory=list)  # samples and sample rate
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific (GLM: prior_token_ids)


PromptType = str | dict[str, Any]


def _multi_modal_images(data: dict[str, Any]) -> tuple[list[Any], Any]:
    """``{"image": PIL image or list of them, "mask": PIL image}`` as (images, mask)."""
    from PIL import Image

    unknown = set(data) - {"image", "mask"}
    if unknown:
        raise ValueError(f"unknown multi_modal_data keys: {sorted(unknown)}; "
                         "image models take 'image' (and 'mask')")
    images = data.get("image")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) \
        else [images]
    mask = data.get("mask")
    for im in images + ([mask] if mask is not None else []):
        if not isinstance(im, Image.Image):
            raise ValueError(f"multi_modal_data images must be PIL images, got "
                             f"{type(im).__name__}")
    return images, mask


class Omni:
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        seed: int | None = None,
        parallel_config: DiffusionParallelConfig | None = None,
        cache_backend: str | None = None,
        cache_config: dict[str, Any] | str | None = None,
        quantization: str | None = None,
        quantization_config: dict[str, Any] | str | None = None,
        enable_cpu_offload: bool = False,
        enable_layerwise_offload: bool = False,
        lora_path: str | None = None,
        lora_modules: dict[str, str] | None = None,
        max_loras: int = 1,
        max_cpu_loras: int | None = None,
        allowed_lora_dirs: list[str] | None = None,
        enable_lora: bool = False,
        load_timeout_s: float = 1800.0,
        max_num_seqs: int = 1,
        max_request_memory: int | str | None = None,
        distributed_executor_backend: str = "mp",
        step_batching: bool | None = None,
    ):
        from vllm_omni.engine.core import EngineCore

        if parallel_config is not None and parallel_config.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1: replicas serve requests side by side behind "
                             "`vllm serve --omni --data-parallel-size N`; offline, Omni runs one "
                             "engine (call generate with a list of prompts to batch)")
        model_dir = resolve_model_dir(model)
        self.config = OmniEngineConfig(
            model=model_dir, model_name=model, served_model_names=[model], dtype=dtype,
            parallel=parallel_config or DiffusionParallelConfig(),
            cache_backend=cache_backend or "none", cache_config=cache_config or {},
            quantization=quantization, quantization_config=quantization_config,
            enable_cpu_offload=enable_cpu_offload,
            enable_layerwise_offload=enable_layerwise_offload,
            lora_path=lora_path, lora_modules=dict(lora_modules or {}), max_loras=max_loras,
            max_cpu_loras=max_cpu_loras, allowed_lora_dirs=list(allowed_lora_dirs or []),
            enable_lora=enable_lora, default_seed=seed, load_timeout_s=load_timeout_s,
            max_num_seqs=max_num_seqs, max_request_memory=max_request_memory,
            distributed_executor_backend=distributed_executor_backend,
            step_batching=step_batching,
        )
        self.spec = load_model_spec(model_dir)
        self.spec.adapter.check_engine(self.config)
        from vllm_omni.lora import LoraRegistry

        self._inputs = InputProcessor(self.spec, seed,
                                      loras=LoraRegistry.from_config(self.config))
        self._engine = EngineCore(self.config)
        self._counter = 0

    def _to_request(self, prompt: PromptType, params: OmniDiffusionSamplingParams):
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "negative_prompt", "multi_modal_data"}
            if unknown:
                raise ValueError(f"unknown prompt keys: {sorted(unknown)}")
            images, mask = _multi_modal_images(prompt.get("multi_modal_data") or {})
            if prompt.get("negative_prompt") is not None:
                if params.negative_prompt is not None:
                    raise ValueError("negative_prompt given both in the prompt and the params")
                params = OmniDiffusionSamplingParams(
                    **{**params.to_dict(), "negative_prompt": prompt["negative_prompt"]})
            text = prompt.get("prompt")
        else:
            text, images, mask = prompt, [], None
        self._counter += 1
        return self._inputs.process(text, params, request_id=f"offline-{self._counter}",
                                    images=images, mask=mask)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: (OmniDiffusionSamplingParams | Sequence[OmniDiffusionSamplingParams]
                          | None) = None,
        use_tqdm: bool = True,
    ) -> list[OmniRequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = OmniDiffusionSamplingParams()
        if isinstance(sampling_params, OmniDiffusionSamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("need one sampling params object per prompt, or a single one")
        # An invalid request raises InvalidRequestError, a ValueError naming the field.
        requests = [self._to_request(p, sp) for p, sp in zip(prompts, sampling_params)]

        for req in requests:
            self._engine.add_request(req)
        total = sum(r.num_inference_steps for r in requests)
        bar = tqdm(total=total, desc="Denoising steps", unit="step", disable=not use_tqdm)
        done_steps: dict[str, int] = {}

        def on_progress(ids, step, steps):
            for rid in ids:
                bar.update(step - done_steps.get(rid, 0))
                done_steps[rid] = step

        results, ids = {}, {req.request_id for req in requests}
        try:
            while len(results) < len(requests):
                for out in self._engine.step(on_progress):
                    if out.request_id in ids:  # not the answer to an earlier, aborted call
                        results[out.request_id] = out
        finally:
            bar.close()
            # An interrupted call (Ctrl-C) must not leave its requests queued for the next one.
            for req in requests:
                if req.request_id not in results:
                    self._engine.abort_request(req.request_id)
        outputs = []
        for req, prompt in zip(requests, prompts):
            out = results[req.request_id]
            if out.error is not None:
                # The engine's error kinds are the offline API's exceptions: a client mistake
                # is a ValueError, a failure of the server a RuntimeError (engine/errors.py).
                raise out.error
            outputs.append(OmniRequestOutput(
                request_id=req.request_id, prompt=req.prompt, images=out.images,
                videos=out.videos, audios=out.audios, seed=req.seed, metrics=out.metrics,
                extra=out.extra))
        return outputs

    @property
    def worker_pids(self) -> list[int]:
        return self._engine.worker_pids

    def close(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
            self._engine = None

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
