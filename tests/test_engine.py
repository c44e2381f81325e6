"""The engine's seams: the executor interface, typed errors across processes, progress events."""

import asyncio
import pickle

import pytest

from vllm_omni.diffusion.data import OmniEngineConfig
from vllm_omni.engine import errors
from vllm_omni.engine.request import Audio, DiffusionOutput, Video
from vllm_omni.entrypoints.openai.serving import openai_error
from vllm_omni.inputs.data import OmniDiffusionSamplingParams


def test_collective_rpc_calls_a_worker_method_on_every_rank(omni):
    executor = omni._engine.executor
    assert executor.collective_rpc("pid") == omni.worker_pids
    with pytest.raises(RuntimeError, match="pid failed on rank 0"):
        executor.collective_rpc("pid", (1,))  # raises in the worker: the caller is told
    with pytest.raises(ValueError, match="not a public worker method"):
        executor.collective_rpc("_private")
    # The workers serve on after a failed call.
    assert omni.generate("a fox", OmniDiffusionSamplingParams(num_inference_steps=2, seed=1),
                         use_tqdm=False)[0].images


def test_executor_backends_are_checked_at_the_edge(tiny_qwen_image, monkeypatch):
    with pytest.raises(ValueError, match="must be one of mp, ray.*got 'uni'"):
        OmniEngineConfig(model=tiny_qwen_image, model_name="m", distributed_executor_backend="uni")
    # Without Ray installed, asking for it says what to install (not an ImportError later).
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'vllm-omni\[ray\]'"):
        OmniEngineConfig(model=tiny_qwen_image, model_name="m", distributed_executor_backend="ray")


@pytest.mark.parametrize("error, status, kind", [
    (errors.InvalidRequestError("bad size", param="size"), 400, "invalid_request_error"),
    (errors.RequestTooLargeError("too big", param="n"), 400, "invalid_request_error"),
    (errors.cancelled("cancelled", "after 1 of 2 steps"), 499, "cancelled"),
    (errors.cancelled("timeout", "after 1 of 2 steps"), 504, "server_error"),
    (errors.GenerationError("nan", code="non_finite_output"), 500, "server_error"),
    (errors.WorkerDiedError("rank 0 exited"), 500, "server_error"),
    (errors.EngineDeadError("gone"), 503, "server_error"),
])
def test_error_kinds_cross_processes_and_map_to_http_at_the_edge(error, status, kind):
    out = pickle.loads(pickle.dumps(DiffusionOutput("r", error=error)))
    e = out.error
    assert type(e) is type(error) and (e.message, e.param, e.code) == (
        error.message, error.param, error.code)
    # Offline, a client mistake is a ValueError and a server failure a RuntimeError.
    assert isinstance(e, ValueError if status == 400 else RuntimeError)
    http = openai_error(e)
    assert (http.status, http.type, http.param, http.code) == (status, kind, e.param, e.code)


def test_outputs_file_artifacts_by_kind():
    video, audio = Video(frames=["f0", "f1"], fps=16), Audio(samples=[[0.0]], sample_rate=44100)
    out = DiffusionOutput("r").add(["img", video, audio])
    assert (out.images, out.videos, out.audios) == (["img"], [video], [audio])


def test_progress_reaches_the_api_server_process(tiny_qwen_image):
    """Server mode: the engine core runs in its own process; every step end reaches the
    caller's event loop, in order, before the output."""
    from vllm_omni.engine.async_engine import AsyncOmniEngine
    from vllm_omni.engine.input_processor import InputProcessor
    from vllm_omni.models.registry import load_model_spec

    engine = AsyncOmniEngine(OmniEngineConfig(model=tiny_qwen_image, model_name="m"))
    try:
        req = InputProcessor(load_model_spec(tiny_qwen_image)).process(
            "a fox", OmniDiffusionSamplingParams(num_inference_steps=3, width=64, height=64))
        seen = []
        out = asyncio.run(engine.generate(req, on_progress=lambda *a: seen.append(a)))
        assert out.ok and out.images
        assert seen == [(1, 3), (2, 3), (3, 3)]
    finally:
        engine.shutdown()


def test_one_encoder_per_artifact_kind():
    import io

    import av
    import numpy as np
    import soundfile
    from PIL import Image

    from vllm_omni.entrypoints.openai.encoders import encode

    rng = np.random.default_rng(0)
    frames = [rng.random((33, 65, 3), dtype=np.float32) for _ in range(5)]  # odd sides pad
    data, media_type = encode(Video(frames, fps=16))
    with av.open(io.BytesIO(data)) as f:
        stream = f.streams.video[0]
        assert media_type == "video/mp4" and stream.codec_context.name == "h264"
        assert (stream.frames, stream.average_rate, stream.width, stream.height) == (5, 16, 66, 34)
    samples = (rng.random((2, 4410), dtype=np.float32) * 2 - 1) * 0.5
    for fmt, media in (("wav", "audio/wav"), ("flac", "audio/flac"), ("mp3", "audio/mpeg")):
        data, media_type = encode(Audio(samples, 44100), fmt)
        decoded, rate = soundfile.read(io.BytesIO(data), always_2d=True)
        assert media_type == media and rate == 44100 and decoded.shape[1] == 2
        if fmt != "mp3":  # lossless up to 16-bit rounding
            assert np.abs(decoded.T - samples).max() < 1e-4
    with pytest.raises(ValueError, match="images only"):  # not silently dropped
        encode(Video(frames, fps=16), compression=50)
    data, media_type = encode(Image.new("RGB", (8, 8), "red"), "webp")
    assert media_type == "image/webp" and Image.open(io.BytesIO(data)).size == (8, 8)
