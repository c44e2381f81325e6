"""One option schema per model: an option added by one declaration (vllm_omni.testing.extra_option)
reaches /openapi.json, offline validation and the pipeline call; other models' options are not
accepted."""

import dataclasses
import os

import pytest
import requests

from conftest import Server
from vllm_omni import OmniDiffusionSamplingParams
from vllm_omni.engine.input_processor import InputProcessor
from vllm_omni.testing import extra_option

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def spec(tiny_qwen_image):
    from vllm_omni.models.registry import load_model_spec

    adapter = extra_option.QwenImageWithOption()  # bound to the tiny model, as the registry does
    adapter.spec = dataclasses.replace(load_model_spec(tiny_qwen_image), adapter=adapter)
    return adapter.spec


@pytest.fixture(scope="module")
def option_server(tiny_qwen_image, tmp_path_factory):
    os.environ[extra_option.ENV] = "1"  # the server's processes serve the test adapter
    try:
        s = Server(tiny_qwen_image, log_path=str(tmp_path_factory.mktemp("logs") / "option.log"))
    finally:
        del os.environ[extra_option.ENV]
    yield s
    s.stop()


def _params(**kw):
    return OmniDiffusionSamplingParams(num_inference_steps=2, width=32, height=32, **kw)


def test_the_option_is_validated_offline_and_reaches_the_pipeline_kwargs(spec):
    inputs = InputProcessor(spec)
    req = inputs.process("a fox", _params(extra_args={"max_sequence_length": 64}))
    assert req.options == {"max_sequence_length": 64}
    assert spec.adapter.pipeline_kwargs(req)["max_sequence_length"] == 64
    for bad, match in [("64", "max_sequence_length must be an integer"),
                       (5000, "max_sequence_length must be an integer between 1 and 1024"),
                       (True, "max_sequence_length must be an integer")]:
        with pytest.raises(ValueError, match=match) as e:
            inputs.process("a fox", _params(extra_args={"max_sequence_length": bad}))
        assert e.value.param == "max_sequence_length"
    # Declared batchable: equal values share a pipeline call, different ones do not.
    other = inputs.process("a cat", _params(extra_args={"max_sequence_length": 64}))
    third = inputs.process("a cat", _params(extra_args={"max_sequence_length": 32}))
    key = spec.adapter.batch_key
    assert key(req) is not None and key(req) == key(other) != key(third)


def test_server_limits_cap_the_schema(spec):
    # A --max-* flag lowers an option's bound; the one validation pass names the flag.
    inputs = InputProcessor(spec, caps={"max_sequence_length": (128, "--max-test-length"),
                                        "num_inference_steps": (3, "--max-inference-steps")})
    assert inputs.process("a fox", _params(extra_args={"max_sequence_length": 128}))
    for params, name, flag in [(_params(extra_args={"max_sequence_length": 129}),
                                "max_sequence_length", "--max-test-length"),
                               (dataclasses.replace(_params(), num_inference_steps=4),
                                "num_inference_steps", "--max-inference-steps")]:
        with pytest.raises(ValueError, match="between 1 and (3|128)") as e:
            inputs.process("a fox", params)
        assert e.value.param == name and f"this server's limit, {flag}" in str(e.value)


def test_models_refuse_options_they_do_not_declare(tiny_qwen_image, spec):
    from vllm_omni.models.registry import load_model_spec

    plain = InputProcessor(load_model_spec(tiny_qwen_image))
    for params, name in [(_params(extra_args={"max_sequence_length": 64}), "max_sequence_length"),
                         (_params(layers=2), "layers")]:
        with pytest.raises(ValueError, match=f"{name} is not supported by QwenImagePipeline"):
            plain.process("a fox", params)
    with pytest.raises(ValueError, match="set twice"):
        _params(true_cfg_scale=2.0, extra_args={"true_cfg_scale": 3.0}).options()


def _generation_fields(server) -> dict:
    schema = requests.get(server.url + "/openapi.json", timeout=10).json()
    ref = schema["paths"][GEN]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"]


def test_openapi_shows_exactly_the_served_models_options(option_server, server):
    added = _generation_fields(option_server)
    assert added["max_sequence_length"]["description"].startswith("Tokens of the prompt")
    plain = _generation_fields(server)
    assert {"negative_prompt", "true_cfg_scale"} <= set(plain)
    assert plain["negative_prompt"]["anyOf"][0]["maxLength"] == 32000, plain["negative_prompt"]
    for name in ("max_sequence_length", "guidance_scale", "layers", "prior_token_ids"):
        assert name not in plain


def test_the_option_over_http(option_server, server):
    body = {"prompt": "a red fox in the snow", "size": "32x32", "num_inference_steps": 2,
            "seed": 3}
    images = []
    for extra in ({}, {"max_sequence_length": 64}, {"max_sequence_length": 1}):
        r = requests.post(option_server.url + GEN, json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text[:300]
        images.append(r.json()["data"][0]["b64_json"])
    # The pipeline got it: one token of the prompt makes another image; 64 covers the prompt.
    assert images[0] == images[1] != images[2]
    r = requests.post(option_server.url + GEN, json={**body, "max_sequence_length": 5000},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_sequence_length"
    # A negative prompt is capped like the prompt, before the worker would tokenize it whole.
    r = requests.post(server.url + GEN, json={**body, "negative_prompt": "x" * 32001,
                                              "true_cfg_scale": 4.0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "negative_prompt", r.text[:300]
    assert "at most 32000 characters" in r.json()["error"]["message"]
    # A server of a model without it: an unknown field.
    r = requests.post(server.url + GEN, json={**body, "max_sequence_length": 64}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "unknown_parameter"
