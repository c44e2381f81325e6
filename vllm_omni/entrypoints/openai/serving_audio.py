"""``POST /v1/audio/generate``: text to audio, answered with the encoded clip itself.

The route and its field names are vLLM-Omni's (``input``, ``audio_length`` and ``audio_start`` in
seconds, ``response_format``), so its clients work unchanged. The clip is ``audio_start`` to
``audio_start + audio_length`` of the model's window (the pipeline's ``audio_start_in_s`` and
``audio_end_in_s``); the seed, sample rate and channel count come back as headers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.entrypoints.openai.encoders import AUDIO_FORMATS, encode_audio
from vllm_omni.entrypoints.openai.protocol import LoraField, OpenAIError, lora_entries, with_options
from vllm_omni.entrypoints.openai.serving import Serving
from vllm_omni.models.options import MAX_PROMPT_CHARS, MAX_SEED
from vllm_omni.utils.text import log_safe

logger = logging.getLogger("vllm_omni.api")

# The window options, which the route names in seconds from the start instead.
WINDOW = ("audio_start_in_s", "audio_end_in_s")


class AudioRequestBase(BaseModel):
    """Fields of ``POST /v1/audio/generate``; ``add_routes`` adds the model's options
    (negative_prompt, guidance_scale)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    input: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    response_format: Literal[tuple(AUDIO_FORMATS)] = "wav"  # type: ignore[valid-type]
    audio_length: float | None = Field(None, gt=0, description="Seconds of audio (default: the "
                                       "model's; at most its longest clip less audio_start)")
    audio_start: float | None = Field(None, ge=0, description="Where the clip starts in the "
                                      "model's window, in seconds (default 0)")
    num_inference_steps: int | None = Field(None, ge=1)  # bounded by --max-inference-steps
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = Field(None, max_length=256)
    lora: LoraField = Field(None, description="LoRA adapters: {name, path, scale} or a list")
    # vLLM-Omni's speech-style fields, accepted at the only values a diffusion model honours.
    speed: float | None = Field(None, description="Playback speed: 1.0 only")
    stream_format: Literal["audio"] | None = Field(None, description="'audio' only: the clip "
                                                   "is sent whole")


class ServingAudio(Serving):
    def prepare(self, body: AudioRequestBase) -> DiffusionRequest:
        adapter = self.spec.adapter
        self.check_model(body.model)
        if body.speed not in (None, 1.0):
            raise OpenAIError(400, f"speed={body.speed:g} is not supported: the model generates "
                              "the clip at its own pace; leave speed at 1.0", param="speed",
                              code="unsupported_parameter")
        start = body.audio_start or 0.0
        longest = self.spec.extra["max_seconds"]
        if body.audio_length is not None and start + body.audio_length > longest:
            raise OpenAIError(400, f"audio_start + audio_length is {start + body.audio_length:g} s"
                              f"; {self.spec.pipeline_class} makes clips of at most {longest:g} s",
                              param="audio_length", code="invalid_value")
        if body.audio_length is None and start >= adapter.spec.extra["audio_end_in_s"]:
            raise OpenAIError(400, f"audio_start={start:g} is at or past the default clip's end "
                              f"({adapter.spec.extra['audio_end_in_s']:g} s); set audio_length",
                              param="audio_start", code="invalid_value")
        options = body.model_dump(include=set(adapter.schema()) - set(WINDOW), exclude_none=True)
        if body.audio_start is not None:
            options["audio_start_in_s"] = start
        if body.audio_length is not None:
            options["audio_end_in_s"] = start + body.audio_length
        request_id = f"audio-{uuid.uuid4().hex}"
        req = self.process(body.input, request_id, model=body.model,
                           num_inference_steps=body.num_inference_steps, seed=body.seed,
                           lora=lora_entries(body.lora), extra_args=options)
        logger.info("request %s: %.2f-%.2f s, %d steps, seed=%d, format=%s, user=%s", request_id,
                    *adapter.window(req), req.num_inference_steps, req.seed, body.response_format,
                    None if body.user is None else log_safe(body.user))
        return req

    async def generate(self, body: AudioRequestBase, is_disconnected) -> Response:
        req = self.prepare(body)
        audio = (await self.answer(req, is_disconnected)).audios[0]
        data, media_type = await asyncio.to_thread(encode_audio, audio, body.response_format)
        return Response(data, media_type=media_type, headers={
            "X-Request-Id": req.request_id, "X-Seed": str(req.seed),
            "X-Sample-Rate": str(audio.sample_rate), "X-Channels": str(audio.samples.shape[0])})


def add_routes(app, audio: ServingAudio) -> None:
    async def generate_audio(body, request: Request):
        """Generates a clip and answers its bytes (``response_format``: wav, flac, mp3, opus
        or pcm), with ``X-Seed``, ``X-Sample-Rate`` and ``X-Channels`` headers."""
        return await audio.generate(body, request.is_disconnected)
    # The body's model is this server's, which a string annotation cannot name.
    generate_audio.__annotations__["body"] = with_options(
        "AudioGenerateRequest", AudioRequestBase,
        [o for o in audio.spec.adapter.schema().values() if o.name not in WINDOW])
    app.post("/v1/audio/generate", response_class=Response)(generate_audio)
