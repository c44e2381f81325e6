"""LoRA adapters: which files load (safetensors under the allowed directories, however the path
is spelled), composition and hot swap offline, eviction under --max-loras, batching, and a real
`vllm serve` with named adapters, request paths and refusals. (Every model against diffusers'
own loader: tests/test_model_features.py.)"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import requests

from conftest import Server, metric

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def loras(tiny_qwen_image, tmp_path_factory):
    """Two adapters for the tiny Qwen-Image: an allowed directory holding one as a file and one
    as a diffusers directory, plus the traps around it."""
    from vllm_omni.testing.tiny_lora import build

    root = tmp_path_factory.mktemp("loras")
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "ink").mkdir(parents=True)
    outside.mkdir()
    a = build(tiny_qwen_image, str(allowed / "ghibli.safetensors"), seed=1)
    b = build(tiny_qwen_image, str(allowed / "ink" / "pytorch_lora_weights.safetensors"), seed=2)
    secret = str(shutil.copy(a, outside / "secret.safetensors"))
    os.symlink(secret, allowed / "link.safetensors")  # a file link out of the directory
    os.symlink(outside, allowed / "dirlink")  # a directory link out of it
    (allowed / "evil.bin").write_bytes(b"\x80\x04pickle")
    (allowed / "pickles").mkdir()
    (allowed / "pickles" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    return {"allowed": str(allowed), "ghibli": a, "ink": os.path.dirname(b), "secret": secret}


def _params(**kw):
    from vllm_omni import OmniDiffusionSamplingParams

    return OmniDiffusionSamplingParams(**{"num_inference_steps": 2, "width": 64, "height": 64,
                                          "seed": 3, "output_type": "np", **kw})


# -- which files load ------------------------------------------------------------------------------
def test_request_paths_stay_in_the_allowed_directories(loras, tiny_qwen_image):
    from vllm_omni.diffusion.data import OmniEngineConfig
    from vllm_omni.engine.errors import InvalidRequestError
    from vllm_omni.lora import LoraRegistry

    def registry(**kw):
        return LoraRegistry.from_config(OmniEngineConfig(
            model=tiny_qwen_image, model_name="m", **{"max_loras": 4, **kw}))

    reg = registry(allowed_lora_dirs=[loras["allowed"]], lora_modules={"ghibli": loras["ghibli"]})
    allowed = loras["allowed"]
    ok = reg.resolve([{"path": os.path.join(allowed, "ink"), "scale": 0.5},
                      {"name": "ghibli"}])
    assert [(r.name, r.scale) for r in ok] == [("pytorch_lora_weights.safetensors", 0.5),
                                               ("ghibli", 1.0)]
    refused = {
        "outside": loras["secret"],
        "dotdot": os.path.join(allowed, "..", "outside", "secret.safetensors"),
        "file link": os.path.join(allowed, "link.safetensors"),
        "dir link": os.path.join(allowed, "dirlink", "secret.safetensors"),
        "missing": os.path.join(allowed, "nope.safetensors"),
        "pickle": os.path.join(allowed, "evil.bin"),
        "pickle dir": os.path.join(allowed, "pickles"),
        "prefix trick": allowed + "-other/x.safetensors",
    }
    for what, path in refused.items():
        with pytest.raises(InvalidRequestError) as e:
            reg.resolve({"path": path})
        assert e.value.param == "lora", what
        expected = {"missing": "does not exist", "pickle": "pickle", "pickle dir": "pickle"}
        assert expected.get(what, "outside the directories") in e.value.message, (what, e.value)
    for bad, match in [({"name": "nobody"}, "no LoRA adapter named 'nobody'"),
                       ({"name": "ghibli", "scale": float("nan")}, "finite"),
                       ({"name": "ghibli", "weight": 1}, "unknown lora field"),
                       ({}, "needs a name or a path"),
                       ([{"name": "ghibli"}, {"path": loras["ghibli"]}], "given twice"),
                       ("ghibli", "must be an object")]:
        with pytest.raises(InvalidRequestError, match=match):
            reg.resolve(bad)
    # A long list is refused by its length, before its paths cost any file-system call.
    with pytest.raises(InvalidRequestError, match="100000 LoRA adapters"):
        reg.resolve([{"path": loras["ghibli"]}] * 100000)
    with pytest.raises(InvalidRequestError, match="at most 1 at once"):
        registry(lora_modules={"a": loras["ghibli"], "b": loras["ink"]}, max_loras=1).resolve(
            [{"name": "a"}, {"name": "b"}])
    # No allowed directory: request paths are refused outright; a server without LoRA refuses
    # any adapter.
    with pytest.raises(InvalidRequestError, match="none is set"):
        registry(enable_lora=True).resolve({"path": loras["ghibli"]})
    with pytest.raises(InvalidRequestError, match="runs without LoRA"):
        registry().resolve({"name": "ghibli"})
    # Operator-given files are checked at start-up.
    with pytest.raises(ValueError, match=r"lora_modules\['x'\] \(--lora-modules\): .*pickle"):
        registry(lora_modules={"x": os.path.join(allowed, "evil.bin")})


# -- offline ---------------------------------------------------------------------------------------
def test_hot_swap_composition_eviction_and_batching(loras, tiny_qwen_image, omni):
    """With --max-loras 1 every switch evicts; each output is what it is the first time, and
    base requests are untouched by what ran before them."""
    from vllm_omni import Omni

    base = omni.generate("a fox", _params(), use_tqdm=False)[0].images[0]
    modules = {"ghibli": loras["ghibli"], "ink": loras["ink"]}
    with Omni(model=tiny_qwen_image, lora_modules=modules, max_loras=2, max_cpu_loras=2,
              max_num_seqs=2, step_batching=False) as engine:
        def run(*lora_sets):
            outs = engine.generate(["a fox"] * len(lora_sets),
                                   [_params(lora=s) for s in lora_sets], use_tqdm=False)
            return [o.images[0] for o in outs], outs

        (g,), _ = run({"name": "ghibli"})
        (gi,), _ = run([{"name": "ghibli", "scale": 0.5}, {"name": "ink", "scale": 0.5}])
        # Different adapter sets never share a call; equal ones do, each as it is alone.
        (a, b, c), outs = run({"name": "ink"}, None, {"name": "ink"})
        assert [o.metrics["batch_size"] for o in outs] == [2, 1, 2]
        assert np.abs(b - base).max() <= 1e-5  # the adapters are off again
        assert np.abs(a - c).max() <= 1e-5 and np.abs(a - g).max() > 1e-3
        assert np.abs(gi - g).max() > 1e-3 and np.abs(gi - a).max() > 1e-3
    with Omni(model=tiny_qwen_image, lora_modules=modules, max_loras=1) as engine:
        for lora, want in [({"name": "ghibli"}, g), ({"name": "ink"}, a), (None, base),
                           ({"name": "ghibli"}, g)]:
            out = engine.generate("a fox", _params(lora=lora), use_tqdm=False)[0]
            assert np.abs(out.images[0] - want).max() <= 1e-5, lora
        # Two adapters cannot be active at once here.
        with pytest.raises(ValueError, match="--max-loras"):
            engine.generate("a fox", _params(lora=[{"name": "ghibli"}, {"name": "ink"}]),
                            use_tqdm=False)


@pytest.mark.parametrize("offload", ["enable_cpu_offload", "enable_layerwise_offload"])
def test_adapters_under_offload_equal_no_offload(loras, tiny_qwen_image, offload):
    """Adapters loaded while the base weights are off the device (model-level or per block),
    switched and dropped between requests: each output is what the engine without offload
    makes."""
    import torch

    from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniEngineConfig
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.lora import LoraRegistry
    from vllm_omni.worker.model_runner import ModelRunner

    def outputs(**flags):
        config = OmniEngineConfig(model=tiny_qwen_image, model_name="m", device="cpu",
                                  parallel=DiffusionParallelConfig(), max_loras=1,
                                  lora_modules={"ghibli": loras["ghibli"], "ink": loras["ink"]},
                                  **flags)
        runner = ModelRunner(config, 0, torch.device("cpu"))
        runner.load()
        process = InputProcessor(runner.spec, loras=LoraRegistry.from_config(config)).process
        images = []
        for lora in ({"name": "ghibli"}, {"name": "ink", "scale": 0.6}, None, {"name": "ghibli"}):
            [out] = runner.execute([process("a fox", _params(lora=lora))])
            assert out.error is None, out.error
            images.append(out.images[0])
        return images

    want = outputs()
    assert np.abs(want[0] - want[2]).max() > 1e-3  # the adapter does something
    for got, w in zip(outputs(**{offload: True}), want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_lora_path_applies_to_every_request(loras, tiny_qwen_image):
    from vllm_omni import Omni

    with Omni(model=tiny_qwen_image, lora_path=loras["ghibli"],
              lora_modules={"ink": loras["ink"]}, max_loras=2) as engine:
        [static] = engine.generate("a fox", _params(), use_tqdm=False)
        [both] = engine.generate("a fox", _params(lora={"name": "ink"}), use_tqdm=False)
        assert static.metrics["lora_adapters"] == 1 and both.metrics["lora_adapters"] == 2
    with Omni(model=tiny_qwen_image, lora_modules={"ghibli": loras["ghibli"]}) as engine:
        [named] = engine.generate("a fox", _params(lora={"name": "ghibli"}), use_tqdm=False)
    assert np.abs(static.images[0] - named.images[0]).max() <= 1e-5


def test_an_adapter_that_does_not_fit_the_model_is_refused(loras, video_models,
                                                           tiny_qwen_image):
    """A Wan adapter on Qwen-Image: refused naming it, and the model serves on unchanged."""
    from vllm_omni import Omni
    from vllm_omni.testing.tiny_lora import build

    wrong = build(video_models["wan2.2-ti2v"], os.path.join(loras["allowed"], "wan.safetensors"))
    with Omni(model=tiny_qwen_image, allowed_lora_dirs=[loras["allowed"]],
              lora_modules={"ghibli": loras["ghibli"]}) as engine:
        with pytest.raises(ValueError, match=r"LoRA 'wan.safetensors' (does not fit|matches no "
                                             r"layer of) QwenImagePipeline"):
            engine.generate("a fox", _params(lora={"path": wrong}), use_tqdm=False)
        [out] = engine.generate("a fox", _params(lora={"name": "ghibli"}), use_tqdm=False)
        assert out.metrics["lora_adapters"] == 1


# -- the server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_server(loras, tiny_qwen_image, tmp_path_factory):
    """One adapter active at a time (each switch evicts), run-time updates allowed (vLLM's
    VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    try:
        s = Server(tiny_qwen_image, "--served-model-name", "base",
                   "--lora-modules", f"ghibli={loras['ghibli']}", f"ink={loras['ink']}",
                   "--max-loras", "1", "--allowed-lora-dirs", loras["allowed"],
                   log_path=str(tmp_path_factory.mktemp("logs") / "lora.log"))
    finally:
        del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    yield s
    s.stop()


def _image(r) -> np.ndarray:
    from conftest import decode

    assert r.status_code == 200, r.text
    return np.asarray(decode(r.json()["data"][0]["b64_json"]), dtype=np.float32)


def test_served_adapters_by_model_name_field_and_path(lora_server, loras, server):
    url = lora_server.url + GEN
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    models = requests.get(lora_server.url + "/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("ghibli", "base"),
                                                        ("ink", "base")]
    base = _image(requests.post(url, json=body, timeout=60))
    by_model = _image(requests.post(url, json={**body, "model": "ghibli"}, timeout=60))
    by_field = _image(requests.post(url, json={**body, "lora": {"name": "ghibli"}}, timeout=60))
    by_path = _image(requests.post(url, json={**body, "lora": [
        {"name": "g", "path": loras["ghibli"], "scale": 1.0}]}, timeout=60))
    assert np.array_equal(by_model, by_field) and np.array_equal(by_field, by_path)
    assert np.abs(by_model - base).max() > 1
    assert np.array_equal(_image(requests.post(url, json=body, timeout=60)), base)
    # --max-loras 1: switching evicts, and coming back reloads the same adapter.
    ink = _image(requests.post(url, json={**body, "model": "ink"}, timeout=60))
    assert np.array_equal(_image(requests.post(url, json={**body, "model": "ghibli"},
                                               timeout=60)), by_model)
    assert np.abs(ink - by_model).max() > 1 and "evicting LoRA" in lora_server.logs()
    assert metric(lora_server, "vllm_omni:lora_adapters_active") == 1
    assert metric(lora_server, "vllm_omni:lora_switch_seconds_count") >= 4
    for lora, what in [({"path": loras["secret"]}, "outside the directories"),
                       ({"path": os.path.join(loras["allowed"], "..", "outside",
                                              "secret.safetensors")}, "outside the directories"),
                       ({"path": os.path.join(loras["allowed"], "link.safetensors")},
                        "outside the directories"),
                       ({"path": os.path.join(loras["allowed"], "evil.bin")}, "pickle"),
                       ({"name": "nobody"}, "no LoRA adapter named"),
                       # Counted first (--max-loras 1): a list is refused before its entries
                       # are resolved or compared (test_request_paths_... has "given twice").
                       ([{"name": "ghibli"}, {"name": "ink"}, {"path": loras["ghibli"]}],
                        "3 LoRA adapters in one request")]:
        r = requests.post(url, json={**body, "lora": lora}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "lora" and what in r.json()["error"]["message"]
    r = requests.post(url, json={**body, "model": "nobody"}, timeout=60)
    assert r.status_code == 404
    # A server started without LoRA refuses an adapter instead of ignoring it.
    r = requests.post(server.url + GEN, json={**body, "lora": {"name": "ghibli"}}, timeout=60)
    assert r.status_code == 400 and "without LoRA" in r.json()["error"]["message"], r.text


def test_runtime_load_and_unload(lora_server, loras, server):
    url = lora_server.url
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}

    def load(**kw):
        return requests.post(url + "/v1/load_lora_adapter", json=kw, timeout=30)

    r = load(lora_name="late", lora_path=loras["ink"])
    assert r.status_code == 200 and r.text.startswith("Success"), r.text
    models = requests.get(url + "/v1/models", timeout=10).json()["data"]
    assert ("late", "base") in [(m["id"], m["parent"]) for m in models]
    late = _image(requests.post(url + GEN, json={**body, "model": "late"}, timeout=60))
    ink = _image(requests.post(url + GEN, json={**body, "lora": {"name": "ink"}}, timeout=60))
    assert np.array_equal(late, ink)  # the same file: the same adapter in the model
    for kw, param in [(dict(lora_name="late", lora_path=loras["ink"]), "lora_name"),
                      (dict(lora_name="x", lora_path=loras["secret"]), "lora_path"),
                      (dict(lora_name="x", lora_path=os.path.join(loras["allowed"], "evil.bin")),
                       "lora_path"),
                      (dict(lora_name="../x", lora_path=loras["ink"]), "lora_name")]:
        r = load(**kw)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert load(lora_name="late", lora_path=loras["ghibli"], load_inplace=True).status_code == 200
    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=30)
    assert r.status_code == 200, r.text
    assert requests.post(url + GEN, json={**body, "model": "late"}, timeout=60).status_code == 404
    r = requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=30)
    assert r.status_code == 404
    # Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the routes do not exist.
    r = requests.post(server.url + "/v1/load_lora_adapter",
                      json={"lora_name": "x", "lora_path": loras["ink"]}, timeout=30)
    assert r.status_code == 404


def test_the_playground_offers_the_adapters(lora_server, page):
    """In headless Chromium: the LoRA choice lists the server's adapters (from /v1/models), and
    choosing one with a scale sends {name, scale}: the API's image for that request."""
    page.goto(lora_server.url + "/playground")
    page.wait_for_selector("#lora-row:not([hidden])")
    options = page.eval_on_selector_all("#lora option", "os => os.map(o => o.value)")
    assert options[:3] == ["", "ghibli", "ink"]
    page.fill("#prompt", "a fox")
    page.fill("#field-size", "64x64")
    page.fill("#field-num_inference_steps", "2")
    page.fill("#field-seed", "3")
    page.select_option("#lora", "ink")
    page.fill("#lora-scale", "0.5")
    page.click("#run")
    img = page.wait_for_selector(".result img")
    assert page.is_hidden("#error"), page.text_content("#error")
    from conftest import decode

    shown = np.asarray(decode(img.get_attribute("src").split(",", 1)[1]), dtype=np.float32)
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    half = _image(requests.post(lora_server.url + GEN, timeout=60,
                                json={**body, "lora": {"name": "ink", "scale": 0.5}}))
    full = _image(requests.post(lora_server.url + GEN, timeout=60, json={**body, "model": "ink"}))
    assert np.array_equal(shown, half) and not np.array_equal(shown, full)
