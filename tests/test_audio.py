"""Stable Audio Open: offline equal to diffusers, and a real `vllm serve` of the tiny model on
/v1/audio/generate (every response format, seeds, bad input, cancellation, deadlines)."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
import requests

from conftest import Server, metric

ROUTE = "/v1/audio/generate"
RATE, HOP, LONGEST = 16000, 32, 0.512  # the tiny model: 256 latents of 32 samples at 16 kHz
LONG = 20000  # steps: over a minute on the tiny model, so a request is seen running


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory) -> str:
    from vllm_omni.testing.tiny_models import build

    return build("stable-audio", str(tmp_path_factory.mktemp("audio-model") / "stable-audio"))


@pytest.fixture(scope="module")
def audio_server(audio_model, tmp_path_factory):
    s = Server(audio_model, "--served-model-name", "tiny-audio", "--request-timeout", "4",
               "--max-inference-steps", "100000",
               log_path=str(tmp_path_factory.mktemp("logs") / "audio.log"), warmup_sizes=None,
               wait=False)
    t0 = time.monotonic()
    s.wait_healthy(180)
    s.healthy_after = time.monotonic() - t0
    yield s
    s.stop()


def _params(**kw):
    from vllm_omni import OmniDiffusionSamplingParams

    return OmniDiffusionSamplingParams(**{"num_inference_steps": 4, "seed": 7, **kw})


# -- offline ---------------------------------------------------------------------------------------
def test_offline_equals_diffusers_and_batches_like_alone(audio_model):
    import torch
    from diffusers import StableAudioPipeline

    from vllm_omni import Omni

    pipe = StableAudioPipeline.from_pretrained(audio_model)
    pipe.set_progress_bar_config(disable=True)

    def direct(prompt, seed, **kw):
        return pipe(prompt, num_inference_steps=4, generator=[torch.Generator().manual_seed(seed)],
                    **kw).audios[0].numpy()

    prompts = ["rain on a tin roof", "a dog barking"]
    # A memory limit that fits two waveforms in one call but not three (the estimate is per
    # waveform: the VAE decodes the whole window, whatever the clip's length).
    limit = sum(_estimate(audio_model, n) for n in (2, 3)) // 2
    with Omni(model=audio_model, max_num_seqs=2, max_request_memory=limit,
              step_batching=False) as omni:
        [out] = omni.generate(prompts[0], _params(audio_start_in_s=0.1, audio_end_in_s=0.4),
                              use_tqdm=False)
        [audio] = out.audios
        assert audio.sample_rate == RATE and audio.samples.dtype == np.float32
        assert audio.samples.shape == (2, int(0.4 * RATE) - int(0.1 * RATE))
        np.testing.assert_array_equal(
            audio.samples, direct(prompts[0], 7, audio_start_in_s=0.1, audio_end_in_s=0.4))
        # The tiny model's default clip (generation_config.json), a negative prompt, CFG off.
        [out] = omni.generate(prompts[1], _params(negative_prompt="wind", guidance_scale=3.0),
                              use_tqdm=False)
        np.testing.assert_array_equal(out.audios[0].samples, direct(
            prompts[1], 7, audio_end_in_s=0.25, negative_prompt="wind", guidance_scale=3.0))
        # Two requests of one shape run as one call; each waveform is what it is alone, and
        # n=2 gives the seeds s and s + 1.
        batched = omni.generate(prompts, [_params(seed=1), _params(seed=2)], use_tqdm=False)
        assert [o.metrics["batch_size"] for o in batched] == [2, 2]
        [pair] = omni.generate(prompts[0], _params(seed=1, num_images_per_prompt=2),
                               use_tqdm=False)
        for got, (prompt, seed) in [(batched[0].audios[0], (prompts[0], 1)),
                                    (batched[1].audios[0], (prompts[1], 2)),
                                    (pair.audios[0], (prompts[0], 1)),
                                    (pair.audios[1], (prompts[0], 2))]:
            np.testing.assert_allclose(got.samples, direct(prompt, seed, audio_end_in_s=0.25),
                                       atol=1e-5)
        for bad, match in [(dict(num_images_per_prompt=4), r"^a clip with n=4 needs an estimated "
                            r"\d+ MiB .* max_request_memory .*; use n=2 or less$"),
                           (dict(audio_end_in_s=0.6), r"at most 0\.512 s"),
                           (dict(audio_start_in_s=0.3, audio_end_in_s=0.2), "empty"),
                           (dict(width=64, height=64), "makes audio"),
                           (dict(num_frames=5), "num_frames is not supported"),
                           (dict(guidance_scale=1.0, negative_prompt="x"), "no effect")]:
            with pytest.raises(ValueError, match=match):
                omni.generate("rain", _params(**bad), use_tqdm=False)


def test_lora_equals_diffusers_model_level_loader(audio_model, tmp_path):
    """StableAudioDiTModel has no adapter loader of its own: the worker gives it diffusers'
    PeftAdapterMixin, and the clip equals that loader's on a direct pipeline."""
    import torch
    from diffusers import StableAudioPipeline
    from safetensors.torch import load_file

    from vllm_omni import Omni
    from vllm_omni.lora.feature import with_adapter_loader
    from vllm_omni.testing.tiny_lora import build

    lora = build(audio_model, str(tmp_path / "audio-lora.safetensors"))
    with Omni(model=audio_model, lora_modules={"rain": lora}) as omni:
        [out] = omni.generate("rain", _params(lora={"name": "rain", "scale": 0.7}),
                              use_tqdm=False)
        [plain] = omni.generate("rain", _params(), use_tqdm=False)
    pipe = StableAudioPipeline.from_pretrained(audio_model)
    pipe.set_progress_bar_config(disable=True)
    with_adapter_loader(pipe.transformer)
    pipe.transformer.load_lora_adapter(load_file(lora), prefix="transformer", adapter_name="x")
    pipe.transformer.set_adapters(["x"], weights=[0.7])
    want = pipe("rain", num_inference_steps=4, audio_end_in_s=0.25,
                generator=[torch.Generator().manual_seed(7)]).audios[0].numpy()
    np.testing.assert_allclose(out.audios[0].samples, want, atol=1e-5)
    assert np.abs(out.audios[0].samples - plain.audios[0].samples).max() > 1e-3


def _estimate(model: str, n: int) -> int:
    from vllm_omni.models.registry import load_model_spec
    from vllm_omni.testing.memory_probe import request
    from vllm_omni.worker import memory

    spec = load_model_spec(model)
    dims = memory.ModelDims.from_model_dir(model, spec.adapter, spec, element_size=4)
    return memory.estimate(dims, spec.adapter, [request(spec, 0, 0, n, 4)], lambda r: True).total


def test_saved_files_decode_to_the_clip(tmp_path):
    import soundfile

    from vllm_omni.engine.request import Audio

    t = np.arange(4800) / RATE
    clip = Audio(np.stack([np.sin(2 * np.pi * 440 * t), np.cos(2 * np.pi * 440 * t)]) * 0.5,
                 RATE)
    clip.save(str(tmp_path / "a.flac"))
    data, rate = soundfile.read(str(tmp_path / "a.flac"), always_2d=True)
    assert rate == RATE and data.shape == (4800, 2)
    assert np.abs(data.T - clip.samples).max() < 1e-4  # 16-bit


# -- the server ------------------------------------------------------------------------------------
def _decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """(samples x channels, rate) of an encoded response."""
    import soundfile

    if fmt == "pcm":
        return np.frombuffer(data, "<i2").reshape(-1, 2) / 32768.0, RATE
    samples, rate = soundfile.read(io.BytesIO(data), always_2d=True)
    return samples, rate


def test_server_is_healthy_with_its_warm_up(audio_server):
    assert audio_server.healthy_after < 60, audio_server.healthy_after  # 14 s on an idle CPU
    assert "warmed up at the model's defaults" in audio_server.logs()
    [model] = requests.get(audio_server.url + "/v1/models", timeout=10).json()["data"]
    assert (model["id"], model["task"]) == ("tiny-audio", "text-to-audio")


@pytest.mark.parametrize("fmt,media_type", [("wav", "audio/wav"), ("flac", "audio/flac"),
                                            ("mp3", "audio/mpeg"), ("opus", "audio/opus"),
                                            ("pcm", "audio/pcm")])
def test_each_format_decodes_to_the_requested_length(audio_server, fmt, media_type):
    r = requests.post(audio_server.url + ROUTE, timeout=60, json={
        "input": "rain on a tin roof", "audio_length": 0.3, "audio_start": 0.1, "seed": 7,
        "num_inference_steps": 4, "response_format": fmt, "model": "tiny-audio"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media_type
    assert (r.headers["x-seed"], r.headers["x-sample-rate"], r.headers["x-channels"]) == \
        ("7", str(RATE), "2")
    samples, rate = _decode(r.content, fmt)
    assert samples.shape[1] == 2
    assert rate == (48000 if fmt == "opus" else RATE)  # Opus codes 48 kHz
    assert abs(samples.shape[0] / rate - 0.3) <= HOP / RATE, samples.shape
    assert np.abs(samples).max() > 0.01  # not silence


def test_same_seed_same_bytes(audio_server):
    def post(**kw):
        r = requests.post(audio_server.url + ROUTE, timeout=60, json={
            "input": "rain on a tin roof", "num_inference_steps": 4, **kw})
        assert r.status_code == 200, r.text
        return r

    a, b, c = post(seed=3), post(seed=3), post(seed=4)
    assert a.content == b.content != c.content
    # Without a seed the server draws one and reports it: it reproduces the clip.
    drawn = post()
    assert post(seed=int(drawn.headers["x-seed"])).content == drawn.content
    # The tiny model's default clip is 0.25 s.
    samples, _ = _decode(a.content, "wav")
    assert samples.shape[0] == int(0.25 * RATE)


@pytest.mark.parametrize("body,param", [
    ({"audio_length": 0}, "audio_length"),
    ({"audio_length": -1}, "audio_length"),
    ({"audio_length": 0.5, "audio_start": 0.1}, "audio_length"),  # ends past 0.512 s
    ({"audio_length": 10}, "audio_length"),
    ({"audio_start": -0.5}, "audio_start"),
    ({"audio_start": 0.3}, "audio_start"),  # past the default clip's end, no length
    ({"audio_length": "1"}, "audio_length"),
    ({"audio_length": float("nan")}, "audio_length"),
    ({"response_format": "aac"}, "response_format"),
    ({"voice": "alloy"}, "voice"),
    ({"size": "64x64"}, "size"),
    ({"speed": 2.0}, "speed"),
    ({"stream_format": "sse"}, "stream_format"),
    ({"guidance_scale": 1.0, "negative_prompt": "wind"}, "negative_prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"input": ""}, "input"),
    ({"input": None}, "input"),
])
def test_bad_input_is_a_400(audio_server, body, param):
    data = {"input": "rain", **body}
    r = requests.post(audio_server.url + ROUTE, timeout=30, headers={
        "Content-Type": "application/json"}, data=_json(data))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def _json(data) -> str:
    import json

    return json.dumps(data)  # NaN as JSON's NaN literal, which the server refuses


def test_unknown_model_is_a_404(audio_server):
    r = requests.post(audio_server.url + ROUTE, timeout=30, json={"input": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_deadline_and_disconnect_cancel(audio_server):
    t0 = time.monotonic()
    r = requests.post(audio_server.url + ROUTE, timeout=60, json={
        "input": "rain", "num_inference_steps": LONG})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert time.monotonic() - t0 < 15
    before = metric(audio_server, "vllm_omni:engine_requests_total", outcome="cancelled")
    body = _json({"input": "rain", "num_inference_steps": LONG}).encode()
    with socket.create_connection(("127.0.0.1", audio_server.port)) as s:
        s.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        time.sleep(1.5)
    deadline = time.monotonic() + 15
    while metric(audio_server, "vllm_omni:engine_requests_total", outcome="cancelled") == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.2)
    assert metric(audio_server, "vllm_omni:requests_rejected_total",
                  reason="client_disconnected") >= 1
    # The worker is free again.
    r = requests.post(audio_server.url + ROUTE, timeout=30, json={"input": "rain", "seed": 1})
    assert r.status_code == 200, r.text


def test_the_playground_plays_the_clip(audio_server, page):
    """In headless Chromium: the audio panel sends the route's fields and plays the clip it gets,
    byte for byte the API's answer to the same request."""
    page.goto(audio_server.url + "/playground")
    page.wait_for_selector("#field-audio_length")
    assert page.text_content("#prompt-label") == "Text"
    page.fill("#prompt", "rain on a tin roof")
    page.fill("#field-audio_length", "0.125")
    page.fill("#field-num_inference_steps", "3")
    page.fill("#field-seed", "5")
    played = []

    def through(route):  # what the page gets, kept here too
        answer = route.fetch()
        played.append(answer.body())
        route.fulfill(response=answer)
    page.route("**" + ROUTE, through)
    page.click("#run")
    audio = page.wait_for_selector(".result audio", timeout=60_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    page.wait_for_function("a => a.readyState >= 1", arg=audio)
    assert audio.evaluate("a => a.duration") == pytest.approx(0.125, abs=1 / RATE)
    r = requests.post(audio_server.url + ROUTE, json={
        "input": "rain on a tin roof", "audio_length": 0.125, "num_inference_steps": 3,
        "seed": 5}, timeout=60)
    assert r.status_code == 200 and [r.content] == played
    assert "seed 5" in page.text_content(".result figcaption")
