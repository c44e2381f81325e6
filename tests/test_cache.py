"""Step caches (TeaCache, Cache-DiT): exact when off, skip when on, identical decisions under every
parallel layout, and Cache-DiT equal to the library's own pipeline integration."""

import json
import shutil

import numpy as np
import pytest

from vllm_omni.diffusion.data import DiffusionParallelConfig
from vllm_omni.testing.dist import parse_layout_name, run_ranks

STEPS = 12
CALLS = 2 * STEPS  # cond + uncond
# Settings that skip on the tiny model (its random weights change a lot from step to step: the
# residual diffs cache-dit sees are 0.23-0.47, so the seed defaults would cache nothing).
ON = {
    "tea_cache": {"rel_l1_thresh": 0.3},
    "cache_dit": {"residual_diff_threshold": 0.4, "max_warmup_steps": 2,
                  "enable_taylorseer": True},
}
OFF = {"tea_cache": {"rel_l1_thresh": 0}, "cache_dit": {"residual_diff_threshold": 0}}
PROMPTS = [({"prompt": "a red fox", "negative_prompt": "blurry"}, dict(width=80, height=48)),
           ("an old lighthouse on a rocky coast at dusk", dict(width=48, height=96))]
LAYOUTS = ["U2", "R2", "U2xR2", "CFG2", "TP2", "U2xCFG2", "TP2xCFG2", "R2xCFG2", "VAE-PP2"]


def _generate(engine, steps=STEPS, true_cfg_scale=3.0, prompts=PROMPTS):
    from vllm_omni import OmniDiffusionSamplingParams

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, seed=5, output_type="np",
                                          true_cfg_scale=true_cfg_scale, **kw)
              for _, kw in prompts]
    return engine.generate([p for p, _ in prompts], params, use_tqdm=False)


def _psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")


def _counts(out) -> tuple[int, int]:
    return out.metrics["transformer_calls_computed"], out.metrics["transformer_calls_skipped"]


@pytest.fixture(scope="module")
def uncached(omni):
    return _generate(omni)


@pytest.fixture(scope="module", params=["tea_cache", "cache_dit"])
def backend(request):
    return request.param


_CACHED: dict[str, list] = {}


@pytest.fixture
def cached(tiny_qwen_image, backend):
    """World-size-1 outputs with the cache on, built once per backend."""
    from vllm_omni import Omni

    if backend not in _CACHED:
        with Omni(model=tiny_qwen_image, cache_backend=backend, cache_config=ON[backend]) as e:
            _CACHED[backend] = _generate(e)
    return _CACHED[backend]


def test_threshold_zero_is_exactly_no_cache(tiny_qwen_image, uncached, backend):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, cache_backend=backend, cache_config=OFF[backend]) as engine:
        outs = _generate(engine)
    for got, want in zip(outs, uncached):
        assert np.array_equal(got.images[0], want.images[0])
        assert _counts(got) == (CALLS, 0)


def test_cache_skips_steps_and_reports_them(cached, uncached, backend):
    for got, want in zip(cached, uncached):
        computed, skipped = _counts(got)
        assert computed + skipped == CALLS and skipped > 0
        # TeaCache: first and last step of both branches; Cache-DiT: its 2 warmup steps.
        assert computed >= 4
        # Random weights only approximate real quality; this bounds gross breakage.
        assert _psnr(got.images[0], want.images[0]) > 25


@pytest.mark.parametrize("name", LAYOUTS)
def test_cache_under_parallel_layout_matches_single_rank(tiny_qwen_image, cached, backend, name):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, cache_backend=backend, cache_config=ON[backend],
              parallel_config=DiffusionParallelConfig(**parse_layout_name(name))) as engine:
        outs = _generate(engine)
    for got, want in zip(outs, cached):
        assert float(np.abs(got.images[0] - want.images[0]).max()) <= 1e-4
        assert _counts(got) == _counts(want)


def test_named_presets(tiny_qwen_image):
    from vllm_omni import Omni
    from vllm_omni.models.qwen_image import QwenImageAdapter

    assert QwenImageAdapter.teacache_presets["balanced"] == 0.2
    outs = {}
    for backend, config in [("tea_cache", {"preset": "fast"}), ("tea_cache", {"rel_l1_thresh": 0.4}),
                            ("cache_dit", {"preset": "fast"}),
                            ("cache_dit", QwenImageAdapter.cache_dit_presets["fast"])]:
        with Omni(model=tiny_qwen_image, cache_backend=backend, cache_config=config) as engine:
            outs[backend, json.dumps(config)] = _generate(engine)
            if backend == "cache_dit":
                # cache-dit's step masks exist for 4, 6 and 8+ steps: others are a clear 400.
                with pytest.raises(ValueError, match="supports 4, 6, or 8 and more steps"):
                    _generate(engine, steps=2)
                assert len(_generate(engine, steps=4)) == len(PROMPTS)
    # A preset is exactly its settings.
    for backend, explicit in [("tea_cache", {"rel_l1_thresh": 0.4}),
                              ("cache_dit", QwenImageAdapter.cache_dit_presets["fast"])]:
        by_name = outs[backend, json.dumps({"preset": "fast"})]
        for a, b in zip(by_name, outs[backend, json.dumps(explicit)]):
            assert np.array_equal(a.images[0], b.images[0]) and _counts(a) == _counts(b)


def _direct_cache_dit(rank, world_size, model, config, which, true_cfg_scale, separate_cfg):
    """cache-dit applied to a plain diffusers pipeline as its documentation shows (a fresh
    process: the library patches the pipeline class)."""
    import cache_dit
    import torch
    from diffusers import DiffusionPipeline

    from vllm_omni.cache.cache_dit import CacheDiTConfig

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    c = CacheDiTConfig.from_dict(config)
    db = c.db_cache_config(STEPS, separate_cfg)
    if separate_cfg is None:
        db.enable_separate_cfg = None  # let cache-dit recognise the pipeline
    cache_dit.enable_cache(pipe, cache_config=db, calibrator_config=c.calibrator_config())
    prompt, kw = PROMPTS[which]
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    image = pipe(**prompt, **kw, num_inference_steps=STEPS, true_cfg_scale=true_cfg_scale,
                 generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    context = pipe.transformer._context_manager.get_context(pipe.transformer._context_names[0])
    skipped = len(context.get_cached_steps()) + len(context.get_cfg_cached_steps())
    return image, context.cache_config.enable_separate_cfg, skipped


def test_cache_dit_matches_the_library_on_diffusers(tiny_qwen_image):
    """With CFG, cache-dit's own Qwen-Image support (separate CFG passes, recognised from the
    pipeline) gives our output; without CFG, ours equals it told there is one pass per step, the
    case its pipeline-level detection gets wrong."""
    from vllm_omni import Omni

    config = ON["cache_dit"]
    with Omni(model=tiny_qwen_image, cache_backend="cache_dit", cache_config=config) as engine:
        with_cfg = _generate(engine)[0]
        without_cfg = _generate(engine, true_cfg_scale=1.0, prompts=PROMPTS[1:])[0]
    image, separate, skipped = run_ranks(_direct_cache_dit, 1, tiny_qwen_image, config, 0, 3.0,
                                         None)[0]
    assert separate is True
    assert float(np.abs(with_cfg.images[0] - image).max()) <= 1e-5
    assert _counts(with_cfg)[1] == skipped > 0
    image, _, skipped = run_ranks(_direct_cache_dit, 1, tiny_qwen_image, config, 1, 1.0, False)[0]
    assert float(np.abs(without_cfg.images[0] - image).max()) <= 1e-5
    assert sum(_counts(without_cfg)) == STEPS and _counts(without_cfg)[1] == skipped > 0


def test_cache_dit_scm_mask_computes_its_steps(tiny_qwen_image):
    """A static SCM mask decides alone: "fast" on 12 steps computes exactly its 1-steps."""
    import cache_dit

    from vllm_omni import Omni

    mask = cache_dit.steps_mask(total_steps=STEPS, mask_policy="fast")
    with Omni(model=tiny_qwen_image, cache_backend="cache_dit",
              cache_config={"scm_steps_mask_policy": "fast", "scm_steps_policy": "static",
                            "max_continuous_cached_steps": -1, "max_warmup_steps": 0}) as engine:
        out = _generate(engine)[0]
    assert _counts(out) == (2 * sum(mask), 2 * (STEPS - sum(mask)))


def test_bad_cache_settings_fail_at_startup(tiny_qwen_image, tmp_path):
    from vllm_omni import Omni
    from vllm_omni.models.base import ModelAdapter
    from vllm_omni.models.registry import load_model_spec

    def refused(backend, config, match):
        with pytest.raises(ValueError, match=match):
            Omni(model=tiny_qwen_image, cache_backend=backend, cache_config=config)

    refused("tea_cache", {"thresh": 0.2}, "unknown tea_cache cache_config key")
    refused("tea_cache", {"rel_l1_thresh": "x"}, "rel_l1_thresh must be a number")
    refused("tea_cache", {"preset": "turbo"}, "unknown tea_cache preset 'turbo'.*balanced, fast")
    refused("tea_cache", {"preset": "fast", "rel_l1_thresh": 0.1}, "not both")
    refused(None, {"rel_l1_thresh": 0.2}, "without a cache backend")
    refused("cache_dit", {"rel_l1_thresh": 0.2}, "unknown cache_dit cache_config key.*Fn_compute")
    refused("cache_dit", {"Fn_compute_blocks": 0}, "Fn_compute_blocks must be >= 1")
    refused("cache_dit", {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1}, "exceeds the 2 transformer")
    refused("cache_dit", {"residual_diff_threshold": -1}, "residual_diff_threshold must be")
    refused("cache_dit", {"enable_taylorseer": "yes"}, "enable_taylorseer must be")
    refused("cache_dit", {"taylorseer_order": 0}, "taylorseer_order must be an integer >= 1")
    refused("cache_dit", {"scm_steps_mask_policy": "turbo"}, "scm_steps_mask_policy must be")
    refused("cache_dit", {"scm_steps_policy": "eager"}, "scm_steps_policy must be")
    refused("cache_dit", {"preset": "turbo"}, "unknown cache_dit preset 'turbo'")
    # A model family without coefficients refuses TeaCache; one cache-dit does not know, Cache-DiT.
    bare = ModelAdapter()  # a family that declares neither, bound to the tiny model
    bare.spec = load_model_spec(tiny_qwen_image)
    with pytest.raises(ValueError, match="no TeaCache support"):
        bare.check_cache("tea_cache", {})
    with pytest.raises(ValueError, match="no Cache-DiT support"):
        bare.check_cache("cache_dit", {})
    # A stochastic scheduler breaks step-to-step reuse.
    stochastic = tmp_path / "stochastic"
    shutil.copytree(tiny_qwen_image, stochastic)
    cfg_path = stochastic / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["stochastic_sampling"] = True
    cfg_path.write_text(json.dumps(cfg))
    for backend in ("tea_cache", "cache_dit"):
        with pytest.raises(ValueError, match="stochastic scheduler"):
            Omni(model=str(stochastic), cache_backend=backend)


@pytest.mark.parametrize("backend_layout", [("tea_cache", ["--usp", "2"]),
                                            ("cache_dit", ["--cfg-parallel-size", "2"])])
def test_server_with_cache_reports_skips(tiny_qwen_image, tmp_path, backend_layout):
    import requests
    from conftest import Server, decode

    backend, layout = backend_layout
    want = (_CACHED.get(backend) or [None])[0]
    server = Server(tiny_qwen_image, *layout, "--cache-backend", backend,
                    "--cache-config", json.dumps(ON[backend]),
                    log_path=str(tmp_path / "server.log"))
    try:
        prompt, kw = PROMPTS[0]
        r = requests.post(f"{server.url}/v1/images/generations", timeout=120, json={
            "prompt": prompt["prompt"], "negative_prompt": prompt["negative_prompt"],
            "size": f"{kw['width']}x{kw['height']}", "num_inference_steps": STEPS, "seed": 5,
            "true_cfg_scale": 3.0})
        assert r.status_code == 200, r.text
        extra = r.json()["vllm_omni"]
        assert extra["seed"] == 5
        assert extra["transformer_calls_skipped"] > 0
        assert extra["transformer_calls_computed"] + extra["transformer_calls_skipped"] == CALLS
        if want is not None:  # the offline world-size-1 run of the same request
            assert extra["transformer_calls_skipped"] == _counts(want)[1]
            got = np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), np.int16)
            assert np.abs(got - np.round(want.images[0] * 255)).max() <= 1
    finally:
        server.stop()
