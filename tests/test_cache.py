"""TeaCache: exact when off, skips when on, identical decisions under every parallel layout."""

import json
import shutil

import numpy as np
import pytest

from vllm_omni.diffusion.data import DiffusionParallelConfig
from vllm_omni.distributed.layout import parse_layout_name

THRESH = 0.3
PROMPTS = [({"prompt": "a red fox", "negative_prompt": "blurry"}, dict(width=80, height=48)),
           ("an old lighthouse on a rocky coast at dusk", dict(width=48, height=96))]


def _generate(engine, steps=12):
    from vllm_omni import OmniDiffusionSamplingParams

    params = [OmniDiffusionSamplingParams(num_inference_steps=steps, seed=5, true_cfg_scale=3.0,
                                          output_type="np", **kw) for _, kw in PROMPTS]
    return engine.generate([p for p, _ in PROMPTS], params, use_tqdm=False)


def _psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")


@pytest.fixture(scope="module")
def uncached(omni):
    return _generate(omni)


@pytest.fixture(scope="module")
def cached(tiny_qwen_image):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, cache_backend="tea_cache",
              cache_config={"rel_l1_thresh": THRESH}) as engine:
        return _generate(engine)


def test_threshold_zero_is_exactly_no_cache(tiny_qwen_image, uncached):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, cache_backend="tea_cache",
              cache_config={"rel_l1_thresh": 0}) as engine:
        outs = _generate(engine)
    for got, want in zip(outs, uncached):
        assert np.array_equal(got.images[0], want.images[0])
        assert got.metrics["transformer_calls_skipped"] == 0
        assert got.metrics["transformer_calls_computed"] == 24  # 12 steps x (cond + uncond)


def test_named_preset_is_its_threshold(tiny_qwen_image, cached):
    from vllm_omni import Omni
    from vllm_omni.models.qwen_image import QwenImageAdapter

    assert QwenImageAdapter.teacache_presets["balanced"] == 0.2
    with Omni(model=tiny_qwen_image, cache_backend="tea_cache",
              cache_config={"preset": "fast"}) as engine:
        fast = _generate(engine)
    # "fast" (0.4) skips at least as often as the 0.3 threshold of the cached fixture.
    for got, ref in zip(fast, cached):
        assert got.metrics["transformer_calls_skipped"] >= ref.metrics["transformer_calls_skipped"]


def test_cache_skips_steps_and_reports_them(cached, uncached):
    for got, want in zip(cached, uncached):
        computed = got.metrics["transformer_calls_computed"]
        skipped = got.metrics["transformer_calls_skipped"]
        assert computed + skipped == 24 and skipped > 0
        assert computed >= 4  # first and last step of both CFG branches always compute
        # Random weights only approximate real quality; this bounds gross breakage.
        assert _psnr(got.images[0], want.images[0]) > 25


@pytest.mark.parametrize("name", ["U2", "R2", "U2xR2", "CFG2", "TP2", "U2xCFG2", "TP2xCFG2",
                                  "R2xCFG2", "VAE-PP2"])
def test_cache_under_parallel_layout_matches_single_rank(tiny_qwen_image, cached, name):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, cache_backend="tea_cache",
              cache_config={"rel_l1_thresh": THRESH},
              parallel_config=DiffusionParallelConfig(**parse_layout_name(name))) as engine:
        outs = _generate(engine)
    for got, want in zip(outs, cached):
        assert float(np.abs(got.images[0] - want.images[0]).max()) <= 1e-4
        for key in ("transformer_calls_computed", "transformer_calls_skipped"):
            assert got.metrics[key] == want.metrics[key]


def test_bad_cache_settings_fail_at_startup(tiny_qwen_image, tmp_path):
    from vllm_omni import Omni
    from vllm_omni.models.base import ModelAdapter
    from vllm_omni.models.registry import load_model_spec

    with pytest.raises(ValueError, match="unknown tea_cache cache_config key"):
        Omni(model=tiny_qwen_image, cache_backend="tea_cache", cache_config={"thresh": 0.2})
    with pytest.raises(ValueError, match="rel_l1_thresh must be a number"):
        Omni(model=tiny_qwen_image, cache_backend="tea_cache", cache_config={"rel_l1_thresh": "x"})
    with pytest.raises(ValueError, match="unknown tea_cache preset 'turbo'.*balanced, fast"):
        Omni(model=tiny_qwen_image, cache_backend="tea_cache", cache_config={"preset": "turbo"})
    with pytest.raises(ValueError, match="not both"):
        Omni(model=tiny_qwen_image, cache_backend="tea_cache",
             cache_config={"preset": "fast", "rel_l1_thresh": 0.1})
    with pytest.raises(ValueError, match="without a cache backend"):
        Omni(model=tiny_qwen_image, cache_config={"rel_l1_thresh": 0.2})
    with pytest.raises(ValueError, match="cache_dit"):
        Omni(model=tiny_qwen_image, cache_backend="cache_dit")
    # A model family without coefficients refuses TeaCache.
    spec = load_model_spec(tiny_qwen_image)
    with pytest.raises(ValueError, match="no TeaCache support"):
        ModelAdapter().check_cache(spec, "tea_cache", {})
    # A stochastic scheduler breaks step-to-step reuse.
    stochastic = tmp_path / "stochastic"
    shutil.copytree(tiny_qwen_image, stochastic)
    cfg_path = stochastic / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["stochastic_sampling"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="stochastic scheduler"):
        Omni(model=str(stochastic), cache_backend="tea_cache")


def test_server_with_cache_and_usp_reports_skips(tiny_qwen_image, cached, tmp_path):
    import requests
    from conftest import Server, decode

    server = Server(tiny_qwen_image, "--usp", "2", "--cache-backend", "tea_cache",
                    "--cache-config", json.dumps({"rel_l1_thresh": THRESH}),
                    log_path=str(tmp_path / "server.log"))
    try:
        (prompt, kw), want = PROMPTS[0], cached[0]
        r = requests.post(f"{server.url}/v1/images/generations", timeout=120, json={
            "prompt": prompt["prompt"], "negative_prompt": prompt["negative_prompt"],
            "size": f"{kw['width']}x{kw['height']}", "num_inference_steps": 12, "seed": 5,
            "true_cfg_scale": 3.0})
        assert r.status_code == 200, r.text
        extra = r.json()["vllm_omni"]
        assert extra["seed"] == 5
        assert extra["transformer_calls_skipped"] == want.metrics["transformer_calls_skipped"] > 0
        got = np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.round(want.images[0] * 255)).max() <= 1
    finally:
        server.stop()
