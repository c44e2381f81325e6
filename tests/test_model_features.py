"""The support matrix, model by model: every released feature an adapter declares is run on that
model, and every feature it does not declare is refused at startup.

Requests run through the real worker code (``ModelRunner``: load, parallel hooks, cache hooks,
execute). Parallel layouts run on gloo ranks forked from the preloaded worker server and must
reproduce the single-process image (or every frame of a video); caches must skip transformer calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from test_models import INPUTS, PROMPT, SEED
from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniEngineConfig
from vllm_omni.models.base import FEATURES
from vllm_omni.testing.dist import parse_layout_name, run_ranks

TOL = 1e-4
# What each request looks like per family (inputs, sampling params); CFG on where the model has
# it, so CFG-parallel splits real branches.
REQUESTS: dict[str, dict[str, Any]] = {
    "qwen-image-2512": dict(params=dict(width=64, height=48, true_cfg_scale=2.0)),
    "qwen-image-edit": dict(inputs=1, params=dict(true_cfg_scale=2.0)),
    "qwen-image-edit-2509": dict(inputs=2, params=dict(true_cfg_scale=2.0)),
    "qwen-image-layered": dict(inputs=1, params=dict(layers=2, true_cfg_scale=2.0)),
    "z-image-turbo": dict(params=dict(width=64, height=48)),
    "flux.1-dev": dict(params=dict(width=64, height=48, guidance_scale=3.5)),
    "flux.2-klein-4b": dict(params=dict(width=64, height=48)),
    "flux.2-klein-base-4b": dict(params=dict(width=64, height=48, guidance_scale=3.0)),
    "sd3.5": dict(params=dict(width=64, height=48, guidance_scale=3.0)),
    "longcat-image": dict(params=dict(width=64, height=48, enable_prompt_rewrite=False)),
    "longcat-image-edit": dict(inputs=1),
    "ovis-image": dict(params=dict(width=64, height=48, guidance_scale=3.0)),
    "glm-image": dict(params=dict(width=64, height=64)),
    # 9 frames (3 latent frames) at these sizes are 45 tokens (A14B: 80x48; I2V takes its size from
    # the 64x48 input) and 9 tokens (TI2V-5B, 16x VAE), uneven over 2 and 4 ranks. 3 steps reach
    # the low-noise expert (transformer_2) of both A14B models; their CFG is on by default.
    "wan2.2-t2v": dict(steps=3, params=dict(width=80, height=48, num_frames=9,
                                            negative_prompt="blurry")),
    "wan2.2-i2v": dict(steps=3, inputs=1, params=dict(num_frames=9)),
    "wan2.2-ti2v": dict(steps=3, params=dict(width=96, height=32, num_frames=9)),
    # Text guidance (its default, 4.0) inside the default interval: packed branches some steps.
    "bagel": dict(params=dict(width=64, height=48)),
}
# One layout per parallel feature; two features share a run where the model has both.
LAYOUTS = {
    "sequence_parallel": dict(ulysses_degree=2),
    "cfg_parallel": dict(cfg_parallel_size=2),
    "tensor_parallel": dict(tensor_parallel_size=2),
    "vae_patch_parallel": dict(vae_patch_parallel_size=2),
}
# Further layouts of a feature, for the models that need them proven too (Wan: ring attention,
# alone, inside Ulysses and beside tensor parallelism, over the two experts).
MORE_LAYOUTS = {
    "wan2.2-t2v": {"sequence_parallel": ["R2", "U2xR2"], "tensor_parallel": ["R2xTP2"]},
    "wan2.2-i2v": {"sequence_parallel": ["R2"]},
    "wan2.2-ti2v": {"sequence_parallel": ["R2", "U2xR2"]},
}
# Of those, the ones also run with an adapter loaded and asked for (beside each feature's own
# layout): ring attention over the two Wan experts.
LORA_MORE_LAYOUTS = {"wan2.2-t2v": ["R2"]}
assert all(name in sum(MORE_LAYOUTS[family].values(), [])
           for family, names in LORA_MORE_LAYOUTS.items() for name in names)
# Cache-DiT under parallel layouts: the same calls skipped, the same output as one process.
CACHE_LAYOUTS = {"wan2.2-t2v": ["U2", "CFG2"]}


@pytest.fixture(scope="session")
def feature_models(tiny_models, video_models, tmp_path_factory) -> dict[str, str]:
    from vllm_omni.testing.tiny_models import build

    root = tmp_path_factory.mktemp("models")
    extra = {f: build(f, str(root / f)) for f in ("flux.2-klein-base-4b", "bagel")}
    return {**tiny_models, **video_models, **extra}


def _config(model_dir: str, parallel: dict | None = None, cache_backend: str = "none",
            cache_config: dict | None = None, **engine) -> OmniEngineConfig:
    return OmniEngineConfig(model=model_dir, model_name=model_dir,
                            parallel=DiffusionParallelConfig(**(parallel or {})),
                            cache_backend=cache_backend, cache_config=cache_config or {},
                            device="cpu", **engine)


# VAE patch parallelism needs bands taller than the decoder's halo (~11 latent rows for the
# AutoencoderKL layout), else every rank decodes the whole image and nothing is tested.
TALL = dict(width=64, height=448)


def _request(spec, family: str, steps: int, tall: bool = False):
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    r = REQUESTS[family]
    params = OmniDiffusionSamplingParams(num_inference_steps=steps, seed=SEED, output_type="np",
                                         **{**r.get("params", {}), **(TALL if tall else {})})
    return InputProcessor(spec).process(PROMPT, params, images=INPUTS[:r.get("inputs", 0)])


def _run(runner, req):
    """One request alone through the runner: its images (or each video's frames) as arrays,
    and its metrics."""
    out = runner.execute([req])[0]
    assert out.error is None, out.error
    return [np.asarray(im) for im in out.images or [v.frames for v in out.videos]], out.metrics


def _generate(config: OmniEngineConfig, family: str, steps: int, rank: int = 0, groups=None,
              tall: bool = False):
    from vllm_omni.worker.model_runner import ModelRunner

    runner = ModelRunner(config, rank, torch.device("cpu"), groups)
    runner.load()
    return _run(runner, _request(runner.spec, family, steps, tall))


def _rank(rank, world, config, family, steps, tall=False):
    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.testing.edit_area import apply_from_env

    apply_from_env()
    images, _ = _generate(config, family, steps, rank, torch_groups(config.parallel.layout),
                          tall)
    return images


@pytest.fixture(scope="module")
def singles(feature_models):
    """family -> the single-process image(s), computed once."""
    cache: dict[str, list] = {}

    def get(family: str, tall: bool = False):
        key = f"{family}:{tall}"
        if key not in cache:
            cache[key], _ = _generate(_config(feature_models[family]), family, _steps(family),
                                      tall=tall)
        return cache[key]

    return get


def _steps(family: str) -> int:
    return REQUESTS[family].get("steps", 2)


def _spec(model_dir: str):
    from vllm_omni.models.registry import load_model_spec

    return load_model_spec(model_dir)


@pytest.mark.parametrize("family", sorted(REQUESTS))
def test_parallel_features_reproduce_one_process(family, feature_models, singles, tmp_path):
    """Each parallel feature the model declares gives the one-process output, on ranks that
    have an adapter loaded: for a request without it, and for one with it (under tensor
    parallelism its factors are cut like their layers: FLUX's packed blocks on their own). One
    rank group runs both requests, which saves a group's start and model load."""
    from vllm_omni.testing.tiny_lora import build

    model = feature_models[family]
    spec = _spec(model)
    declared = [f for f in LAYOUTS if f in spec.adapter.features]
    if family == "flux.2-klein-4b":  # step-distilled: no CFG to split (tested on the base model)
        declared = [f for f in declared if f != "cfg_parallel"]
    if not declared:
        pytest.skip(f"{spec.pipeline_class} declares no parallel feature")
    lora = "lora" in spec.adapter.features and build(model, str(tmp_path / "tiny.safetensors"))
    adapters = {"lora_modules": {"tiny": lora}} if lora else {}
    with_lora: dict[bool, list] = {}  # tall -> the one-process output with the adapter
    for feature in declared:
        tall = feature == "vae_patch_parallel"
        want = [singles(family, tall=tall)]
        if lora:
            if tall not in with_lora:
                with_lora[tall], _ = _lora_generate(_config(model, **adapters), family, tall=tall)
            want.append(with_lora[tall])
        more = MORE_LAYOUTS.get(family, {}).get(feature, [])
        for name in [None, *more]:
            layout = LAYOUTS[feature] if name is None else parse_layout_name(name)
            # The adapter on each feature's layout, and on the further ones that need it.
            both = bool(lora) and (name is None or name in LORA_MORE_LAYOUTS.get(family, ()))
            config = _config(model, layout, **adapters)
            for outputs in run_ranks(_plain_and_lora_rank, config.world_size, config, family,
                                     tall, both, timeout=300):
                assert len(outputs) == (2 if both else 1)
                for images, wanted, what in zip(outputs, want, ("plain", "lora")):
                    assert len(images) == len(wanted)
                    for got, w in zip(images, wanted):
                        assert np.abs(got - w).max() < TOL, (family, layout, what)


def _plain_and_lora_rank(rank, world, config, family, tall, lora):
    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.testing.edit_area import apply_from_env
    from vllm_omni.worker.model_runner import ModelRunner

    apply_from_env()
    runner = ModelRunner(config, rank, torch.device("cpu"), torch_groups(config.parallel.layout))
    runner.load()
    reqs = [_request(runner.spec, family, _steps(family), tall)]
    if lora:
        reqs.append(_lora_request(runner.spec, config, family, tall=tall))
    # One at a time: each as the one-process reference ran it.
    return [_run(runner, req)[0] for req in reqs]


@pytest.mark.parametrize("family", sorted(CACHE_LAYOUTS))
def test_cache_dit_under_parallel_layouts_reproduces_one_process(family, feature_models):
    """Cache-DiT on every denoiser (both Wan2.2 experts), with its decisions agreed over the
    ranks: each layout skips the same calls and gives the same output as one process."""
    from vllm_omni.worker.model_runner import ModelRunner

    cache_config = {"residual_diff_threshold": 0.4, "max_warmup_steps": 1}
    steps = 8  # 6 high-noise and 2 low-noise steps, with CFG: 16 calls
    config = _config(feature_models[family], cache_backend="cache_dit", cache_config=cache_config)
    runner = ModelRunner(config, 0, torch.device("cpu"))
    runner.load()
    out = runner.execute([_request(runner.spec, family, steps)])[0]
    want, metrics = [np.asarray(v.frames) for v in out.videos], out.metrics
    caches = runner.features[-1].caches
    assert len(caches) == 2 and all(c.stats.skipped > 0 for c in caches), \
        [c.stats for c in caches]  # each expert reuses its own cached residuals
    for name in CACHE_LAYOUTS[family]:
        config = _config(feature_models[family], parse_layout_name(name), "cache_dit",
                         cache_config)
        results = run_ranks(_cached_rank, config.world_size, config, family, steps, timeout=300)
        for images, got_metrics in results:
            assert got_metrics["transformer_calls_skipped"] == metrics["transformer_calls_skipped"]
            for got, w in zip(images, want):
                assert np.abs(got - w).max() < TOL, (family, name)


def _cached_rank(rank, world, config, family, steps):
    from vllm_omni.distributed.groups import torch_groups

    return _generate(config, family, steps, rank, torch_groups(config.parallel.layout))


@pytest.mark.parametrize("family", sorted(REQUESTS))
@pytest.mark.parametrize("backend", ["tea_cache", "cache_dit"])
def test_cache_backends_skip_calls(family, backend, feature_models):
    spec = _spec(feature_models[family])
    if backend not in spec.adapter.features:
        pytest.skip(f"{spec.pipeline_class} does not declare {backend}")
    # A static step mask (cache-dit) / a loose threshold (TeaCache): skips regardless of weights.
    # Over several experts, which each count their own steps, a mask is refused (see
    # test_video_models); a loose residual threshold skips there.
    cache_config = ({"rel_l1_thresh": 10.0} if backend == "tea_cache" else
                    {"residual_diff_threshold": 0.4, "max_warmup_steps": 1}
                    if len(spec.adapter.parallel_plan().denoisers) > 1 else
                    {"scm_steps_mask_policy": "fast", "scm_steps_policy": "static",
                     "max_warmup_steps": 2})
    steps = 12
    config = _config(feature_models[family], cache_backend=backend, cache_config=cache_config)
    images, metrics = _generate(config, family, steps)
    assert metrics["transformer_calls_skipped"] > 0, metrics
    assert all(np.isfinite(im).all() for im in images)
    if backend == "tea_cache":  # threshold 0 computes every call: the hooks change nothing
        exact = _config(feature_models[family], cache_backend=backend,
                        cache_config={"rel_l1_thresh": 0.0})
        plain, _ = _generate(_config(feature_models[family]), family, steps)
        images, metrics = _generate(exact, family, steps)
        assert metrics["transformer_calls_skipped"] == 0
        for got, want in zip(images, plain):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", sorted(REQUESTS))
def test_undeclared_features_are_refused_at_startup(family, feature_models):
    spec = _spec(feature_models[family])
    configs = {
        "tea_cache": dict(cache_backend="tea_cache"),
        "cache_dit": dict(cache_backend="cache_dit"),
        "fp8": dict(quantization="fp8"),
        "cpu_offload": dict(enable_cpu_offload=True),
        "lora": dict(enable_lora=True),
        **{f: dict(parallel=layout) for f, layout in LAYOUTS.items()},
    }
    for feature, kwargs in configs.items():
        if feature in spec.adapter.features:
            continue
        config = _config(feature_models[family], **kwargs)
        with pytest.raises(ValueError, match=FEATURES[feature]):
            spec.adapter.check_engine(config)


# -- LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(REQUESTS))
def test_lora_equals_diffusers_own_loader(family, feature_models, singles, tmp_path):
    """Every model that declares LoRA: its tiny adapter (vllm_omni.testing.tiny_lora) at scale
    0.7 gives what diffusers' own loader and set_adapters give on the same pipeline (Wan2.2 A14B:
    into both experts), and changes the output."""
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.engine.request import Video
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams
    from vllm_omni.lora import LoraRegistry
    from vllm_omni.lora.feature import with_adapter_loader
    from vllm_omni.testing.tiny_lora import build
    from vllm_omni.worker.model_runner import ModelRunner, make_generators

    model = feature_models[family]
    spec = _spec(model)
    if "lora" not in spec.adapter.features:
        pytest.skip(f"{spec.pipeline_class} does not declare LoRA")
    lora = build(model, str(tmp_path / "tiny.safetensors"))
    config = _config(model, lora_modules={"tiny": lora})
    runner = ModelRunner(config, 0, torch.device("cpu"))
    runner.load()
    r = REQUESTS[family]
    params = OmniDiffusionSamplingParams(num_inference_steps=_steps(family), seed=SEED,
                                         output_type="np", lora={"name": "tiny", "scale": 0.7},
                                         **r.get("params", {}))
    req = InputProcessor(spec, loras=LoraRegistry.from_config(config)).process(
        PROMPT, params, images=INPUTS[:r.get("inputs", 0)])
    ours, metrics = _run(runner, req)
    assert metrics["lora_adapters"] == 1

    pipe = spec.adapter.load(torch.float32)  # diffusers' loader (BAGEL: our own)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "load_lora_weights"):
        two = getattr(pipe, "transformer_2", None) is not None
        pipe.load_lora_weights(lora, adapter_name="x",
                               **({"load_into_transformer_2": True} if two else {}))
        pipe.set_adapters(["x"], adapter_weights=[0.7])
    else:  # diffusers' model-level loader (mixed into models whose class lacks it)
        with_adapter_loader(pipe.transformer)
        pipe.transformer.load_lora_adapter(lora, prefix="transformer", adapter_name="x")
        pipe.transformer.set_adapters(["x"], weights=[0.7])
    result = pipe(**spec.adapter.pipeline_kwargs(req), output_type="np",
                  generator=make_generators(SEED, 1))
    theirs = spec.adapter.flatten_output(spec.adapter.artifacts(result, [req]))
    theirs = [np.asarray(a.frames if isinstance(a, Video) else a) for a in theirs]
    assert len(ours) == len(theirs) > 0
    for a, b, base in zip(ours, theirs, singles(family)):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= 1e-5
        assert np.abs(np.asarray(a, np.float32) - np.asarray(base, np.float32)).max() > 1e-3


def _lora_request(spec, config, family: str, scale: float = 0.7, tall: bool = False):
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams
    from vllm_omni.lora import LoraRegistry

    r = REQUESTS[family]
    params = OmniDiffusionSamplingParams(num_inference_steps=_steps(family), seed=SEED,
                                         output_type="np", lora={"name": "tiny", "scale": scale},
                                         **{**r.get("params", {}), **(TALL if tall else {})})
    return InputProcessor(spec, loras=LoraRegistry.from_config(config)).process(
        PROMPT, params, images=INPUTS[:r.get("inputs", 0)])


def _lora_generate(config, family, rank=0, groups=None, tall=False):
    from vllm_omni.worker.model_runner import ModelRunner

    runner = ModelRunner(config, rank, torch.device("cpu"), groups)
    runner.load()
    return _run(runner, _lora_request(runner.spec, config, family, tall=tall))


def _lora_rank(rank, world, config, family, tall):
    from vllm_omni.distributed.groups import torch_groups
    from vllm_omni.testing.edit_area import apply_from_env

    apply_from_env()
    return _lora_generate(config, family, rank, torch_groups(config.parallel.layout), tall)[0]


@pytest.mark.parametrize("family", ["qwen-image-2512", "wan2.2-t2v", "flux.1-dev"])
def test_a_step_cache_at_threshold_zero_changes_nothing_under_an_adapter(family, feature_models,
                                                                        tmp_path):
    """A step cache at threshold 0 changes nothing under an adapter, in one process (the
    adapter under the parallel layouts: test_parallel_features_reproduce_one_process)."""
    from vllm_omni.testing.tiny_lora import build

    model = feature_models[family]
    spec = _spec(model)
    lora = build(model, str(tmp_path / "tiny.safetensors"))
    want, _ = _lora_generate(_config(model, lora_modules={"tiny": lora}), family)
    backend = "tea_cache" if spec.adapter.teacache_coefficients else "cache_dit"
    cache_config = ({"rel_l1_thresh": 0.0} if backend == "tea_cache"
                    else {"residual_diff_threshold": 0.0})
    cached, metrics = _lora_generate(_config(model, cache_backend=backend,
                                             cache_config=cache_config,
                                             lora_modules={"tiny": lora}), family)
    assert metrics["transformer_calls_skipped"] == 0
    for got, w in zip(cached, want):
        assert np.abs(got - w).max() < TOL, (family, backend)


def _with_alphas(state: dict, alpha: float, kohya: bool) -> dict:
    """``state`` (diffusers' keys) with every module's network alpha: as kohya names
    (``lora_unet_<module_with_underscores>.lora_down/up`` and ``.alpha``, which Qwen-Image's
    converter reads), or beside diffusers' keys (``<module>.alpha``, which FLUX's loader reads)."""
    out = {}
    for key, tensor in state.items():
        module, factor = key.rsplit(".lora_", 1)
        if kohya:
            flat = "lora_unet_" + module.removeprefix("transformer.").replace(".", "_")
            out[f"{flat}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = tensor
            out[f"{flat}.alpha"] = torch.tensor(alpha)
        else:
            out[key] = tensor
            out[f"{module}.alpha"] = torch.tensor(alpha)
    return out


def _text_encoder_factors(model_dir: str, rank: int) -> dict:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    encoder = DiffusionPipeline.from_pretrained(model_dir).text_encoder
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj"]),
                            encoder)
    gen = torch.Generator().manual_seed(1)
    return {f"text_encoder.{k}": torch.randn(v.shape, generator=gen) / v.shape[1] ** 0.5
            for k, v in sorted(get_peft_model_state_dict(encoder).items())}


@pytest.mark.parametrize("family,kohya", [("qwen-image-2512", True), ("flux.1-dev", False)])
def test_adapters_with_network_alphas_under_tensor_parallel(family, kohya, feature_models,
                                                            tmp_path):
    """An adapter whose alphas differ from its rank (kohya's format, or diffusers' keys with
    alphas) gives under tensor parallelism what one process gives for the same factors with B
    scaled by alpha / rank: the alpha is neither lost nor applied twice by the cut."""
    from safetensors.torch import load_file, save_file

    from vllm_omni.testing.tiny_lora import build

    model, rank, alpha = feature_models[family], 4, 8.0
    state = load_file(build(model, str(tmp_path / "plain.safetensors"), rank=rank))
    if not kohya:  # with a text encoder's factors too, the file goes through the converter
        state |= _text_encoder_factors(model, rank)
    scaled = {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in state.items()}
    save_file(scaled, tmp_path / "scaled.safetensors")
    save_file(_with_alphas(state, alpha, kohya), tmp_path / "alphas.safetensors")
    want, _ = _lora_generate(_config(model, lora_modules={"tiny": str(tmp_path /
                                                                    "scaled.safetensors")}),
                             family)
    config = _config(model, LAYOUTS["tensor_parallel"],
                     lora_modules={"tiny": str(tmp_path / "alphas.safetensors")})
    for images in run_ranks(_lora_rank, config.world_size, config, family, False, timeout=300):
        for got, w in zip(images, want):
            assert np.abs(got - w).max() < TOL, family


def test_lora_over_fp8_weights_equals_the_dequantized_model(feature_models, tmp_path):
    """FP8 (weight-only on the CPU) with an adapter: the adapter computes in the model's dtype
    over the FP8 layer, as diffusers' loader does over the same weights dequantized."""
    from diffusers import DiffusionPipeline

    from vllm_omni.quantization.fp8 import dequantize, quantize_rows, targets
    from vllm_omni.testing.tiny_lora import build
    from vllm_omni.worker.model_runner import make_generators

    family = "qwen-image-2512"
    model = feature_models[family]
    lora = build(model, str(tmp_path / "tiny.safetensors"))
    config = _config(model, quantization="fp8", lora_modules={"tiny": lora})
    ours, metrics = _lora_generate(config, family)
    assert metrics["fp8_mode"] and metrics["lora_adapters"] == 1

    spec = _spec(model)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    plan = spec.adapter.parallel_plan()
    with torch.no_grad():
        for name in targets(pipe.transformer, plan.fp8_layers, plan.fp8_ignore):
            layer = pipe.transformer.get_submodule(name)
            layer.weight.copy_(dequantize(*quantize_rows(layer.weight), layer.weight.dtype))
    pipe.load_lora_weights(lora, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    req = _lora_request(spec, config, family)
    theirs = pipe(**spec.adapter.pipeline_kwargs(req), output_type="np",
                  generator=make_generators(SEED, 1)).images
    assert np.abs(np.asarray(ours[0]) - np.asarray(theirs[0])).max() <= 1e-5
