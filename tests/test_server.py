"""End-to-end: the real ``vllm serve DIR --omni`` process, the official client and raw HTTP."""

import io
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
import requests
import torch
from conftest import decode
from PIL import Image

GEN = "/v1/images/generations"


def post(server, body, **kw):
    return requests.post(server.url + GEN, json=body, timeout=120, **kw)


def test_openai_client_generates(server, diffusers_pipe):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    resp = client.images.generate(model="tiny-qwen-image", prompt="a red fox", size="64x64", n=2,
                                  extra_body={"num_inference_steps": 4, "seed": 7})
    assert len(resp.data) == 2
    imgs = [decode(d.b64_json) for d in resp.data]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in imgs)
    # Server output equals a direct diffusers call (image i uses seed + i).
    ref = diffusers_pipe("a red fox", height=64, width=64, num_inference_steps=4,
                         generator=[torch.Generator().manual_seed(7 + i) for i in range(2)],
                         num_images_per_prompt=2).images
    for a, b in zip(imgs, ref):
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))


def test_same_seed_same_bytes_different_seed_differs(server):
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 3, "seed": 5}
    a = post(server, body).json()["data"][0]["b64_json"]
    b = post(server, body).json()["data"][0]["b64_json"]
    c = post(server, {**body, "seed": 6}).json()["data"][0]["b64_json"]
    assert a == b and a != c


def test_url_response_format(server):
    r = post(server, {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2,
                      "response_format": "url", "output_format": "webp",
                      "output_compression": 80})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_format"] == "webp" and body["size"] == "32x32"
    url = body["data"][0]["url"]
    assert url.startswith(server.url) and urlsplit(url).path.endswith("/content")
    img = requests.get(url, timeout=10)
    assert img.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(img.content)).size == (32, 32)
    # Links are signed (tests/test_security.py): an unsigned one is refused.
    missing = requests.get(server.url + "/v1/images/nope/content", timeout=10)
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "invalid_signature"


def test_jpeg_and_cfg_extensions(server):
    r = post(server, {"prompt": "a red fox", "size": "48x32", "num_inference_steps": 2, "seed": 1,
                      "output_format": "jpeg", "output_compression": 50,
                      "negative_prompt": "blurry", "true_cfg_scale": 3.0, "user": "u-1"})
    assert r.status_code == 200, r.text
    img = decode(r.json()["data"][0]["b64_json"])
    assert img.format == "JPEG" and img.size == (48, 32)


@pytest.mark.parametrize("body, status, param, code", [
    ({"prompt": "x", "foo": 1}, 400, "foo", "unknown_parameter"),
    ({"size": "64x64"}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, 400, "prompt", "invalid_value"),
    ({"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "x", "n": 11}, 400, "n", "invalid_value"),
    ({"prompt": "x", "n": "2"}, 400, "n", "invalid_value"),
    ({"prompt": "x", "size": "big"}, 400, "size", "invalid_value"),
    ({"prompt": "x", "size": "65x64"}, 400, "size", "invalid_value"),
    ({"prompt": "x", "size": "8192x8192"}, 400, "size", "invalid_value"),
    ({"prompt": "x", "response_format": "file"}, 400, "response_format", "invalid_value"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format", "invalid_value"),
    ({"prompt": "x", "output_compression": 50}, 400, "output_compression",
     "unsupported_parameter"),
    ({"prompt": "x", "output_format": "jpeg", "output_compression": 101}, 400,
     "output_compression", "invalid_value"),
    ({"prompt": "x", "guidance_scale": 3.5}, 400, "guidance_scale", "unsupported_parameter"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_value"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "x", "stream": True, "n": 2}, 400, "n", "unsupported_parameter"),
    ({"prompt": "x", "quality": "high"}, 400, "quality", "unsupported_parameter"),
    ({"prompt": "x", "background": "transparent"}, 400, "background", "unsupported_parameter"),
    ({"prompt": "x", "negative_prompt": "y", "true_cfg_scale": 1.0}, 400, "negative_prompt",
     "invalid_value"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "model_not_found"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("data, headers", [
    (b"{not json", {"Content-Type": "application/json"}),
    (b"[1, 2]", {"Content-Type": "application/json"}),
    (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}),
])
def test_unparseable_bodies(server, data, headers):
    r = requests.post(server.url + GEN, data=data, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_prompt_too_long_is_400_from_the_worker(server):
    r = post(server, {"prompt": "fox " * 1100, "size": "32x32", "num_inference_steps": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # ...and the server keeps serving.
    assert post(server, {"prompt": "ok", "size": "32x32", "num_inference_steps": 2}).ok


def test_openai_client_sees_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="1x1", extra_body={"num_inference_steps": 2})
    assert "multiple of 16" in str(e.value)


def test_models_health_version_and_unknown_route(server):
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-qwen-image"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    v = requests.get(server.url + "/version", timeout=10).json()
    assert v["version"] and v["vllm_version"]
    r = requests.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
