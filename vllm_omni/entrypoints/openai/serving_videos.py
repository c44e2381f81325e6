"""OpenAI's Videos API: ``POST /v1/videos`` starts a job, which runs in the background, reports
its progress at every denoising step and keeps its mp4 in the job store (``video_jobs``) until it
expires; ``POST /v1/videos/sync`` answers the mp4 itself.

``seconds`` becomes a frame count as ``seconds x fps`` rounded to the nearest count the model
takes (Wan: 4k+1), with fps the request's or the model's default; ``num_frames`` sets it exactly
instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import sqlite3
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_omni.engine.async_engine import AsyncOmniEngine
from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.entrypoints.openai.encoders import encode_image, encode_video
from vllm_omni.entrypoints.openai.limits import ServingLimits
from vllm_omni.entrypoints.openai.metrics import ServerMetrics
from vllm_omni.entrypoints.openai.protocol import (
    FORM_FILE,
    LoraField,
    OpenAIError,
    form_request_body,
    lora_entries,
    parse_size,
    with_options,
)
from vllm_omni.entrypoints.openai.serving import Serving, _never_disconnected, openai_error
from vllm_omni.entrypoints.openai.uploads import add_text_field, body_kind, validate_body
from vllm_omni.entrypoints.openai.video_jobs import JobStore, VideoJob
from vllm_omni.models.base import ModelSpec
from vllm_omni.models.options import MAX_PROMPT_CHARS, MAX_SEED

logger = logging.getLogger("vllm_omni.api")

_SECONDS = re.compile(r"[0-9]{1,4}(\.[0-9]{1,3})?")
# How long the openai client waits between retrievals of a job.
POLL_HEADERS = {"openai-poll-after-ms": "500"}


class VideoRequestBase(BaseModel):
    """Fields of ``POST /v1/videos``; ``ServingVideos`` adds the served model's options."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    seconds: str | None = None  # OpenAI's client sends a string ("4"); the frame count follows
    size: str | None = None
    # JSON: a base64 string or data URL, or {"image_url": <one of those>}. Multipart: a file.
    input_reference: str | dict[str, str] | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = Field(None, max_length=256)
    lora: LoraField = Field(None, description="LoRA adapters: {name, path, scale} or a list")


def reference_source(value: Any) -> Any:
    """The upload or base64 text of ``input_reference``, as the openai client or JSON send it."""
    if isinstance(value, dict):
        if set(value) != {"image_url"}:
            raise OpenAIError(400, "input_reference takes an image: a file, a base64 string, or "
                              "{\"image_url\": <data URL>} (file ids are not stored here)",
                              param="input_reference", code="invalid_value")
        value = value["image_url"]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise OpenAIError(400, "input_reference: this server does not fetch URLs; send the image "
                          "as a file or a data URL", param="input_reference",
                          code="invalid_value")
    return value


class ServingVideos(Serving):
    def __init__(self, engine: AsyncOmniEngine, spec: ModelSpec, served_model_names: list[str],
                 seed: int | None, store: JobStore, limits: ServingLimits,
                 metrics: ServerMetrics, loras):
        super().__init__(engine, spec, served_model_names, seed, limits, metrics, loras)
        self.store = store
        self.request_model = with_options("VideoRequest", VideoRequestBase,
                                          spec.adapter.schema().values())
        self.tasks: dict[str, asyncio.Task] = {}
        # Jobs whose record is newer here than in the store: running ones (their progress) and
        # any whose last save failed (a full disk), so retrieval never shows a stale
        # "in_progress" for a job that ended.
        self.live: dict[str, VideoJob] = {}

    # -- requests ----------------------------------------------------------------------------------
    def prepare(self, body: VideoRequestBase, reference: Image.Image | None,
                request_id: str) -> DiffusionRequest:
        adapter = self.spec.adapter
        self.check_model(body.model)
        width, height = parse_size(body.size)
        options = body.model_dump(include=set(adapter.schema()), exclude_none=True)
        if body.seconds is not None:
            if "num_frames" in options:
                raise OpenAIError(400, "give seconds or num_frames, not both", param="seconds",
                                  code="invalid_value")
            if not _SECONDS.fullmatch(body.seconds) or float(body.seconds) <= 0:
                raise OpenAIError(400, f"seconds must be a positive number of seconds, got "
                                  f"{body.seconds!r}", param="seconds", code="invalid_value")
            options["num_frames"] = adapter.frames_for_seconds(float(body.seconds),
                                                               options.get("fps"))
        return self.process(body.prompt, request_id,
                            [reference] if reference is not None else [], model=body.model,
                            num_inference_steps=body.num_inference_steps, width=width,
                            height=height, seed=body.seed, lora=lora_entries(body.lora),
                            extra_args=options)

    async def sync(self, body: VideoRequestBase, reference: Image.Image | None,
                   is_disconnected) -> tuple[bytes, DiffusionRequest]:
        """``POST /v1/videos/sync``: the mp4 of one request, without a job."""
        req = self.prepare(body, reference, f"video-{uuid.uuid4().hex}")
        video = (await self.answer(req, is_disconnected)).videos[0]
        data, _ = await asyncio.to_thread(encode_video, video)
        return data, req

    # -- jobs ----------------------------------------------------------------------------------
    async def create(self, body: VideoRequestBase, reference: Image.Image | None,
                     fields: dict[str, Any]) -> dict[str, Any]:
        """Validates, admits and stores a job, then starts it; its record as created.
        ``fields``: the request as given (without the reference), kept to run it again."""
        job_id = f"video_{uuid.uuid4().hex}"
        req = self.prepare(body, reference, job_id)
        self.admit()
        try:
            frames, fps = self.spec.adapter.video_shape(req)
            job = VideoJob(id=job_id, model=body.model or self.served_model_names[0],
                           prompt=req.prompt, size=f"{req.width}x{req.height}",
                           seconds=f"{frames / fps:g}",
                           params={**fields, "seed": req.seed},
                           has_reference=reference is not None)
            await asyncio.to_thread(self._add, job, reference)
        except BaseException:
            self.in_flight -= 1
            raise
        self.tasks[job.id] = asyncio.create_task(self._run_job(job, req))
        return job.public()

    def _add(self, job: VideoJob, reference: Image.Image | None) -> None:
        try:
            if reference is not None:
                self.store.write_file(job.id + ".png", encode_image(reference, "png"))
            self.store.add(job)
        except (OSError, sqlite3.Error) as e:
            why = getattr(e, "strerror", None) or e
            raise OpenAIError(507, f"the job could not be stored: {why}",
                              "server_error", code="storage_error") from None

    async def _run_job(self, job: VideoJob, req: DiffusionRequest) -> None:
        def on_progress(step: int, total: int) -> None:
            # Progress is read from ``live``; the store learns only that the job started (a
            # restart runs it again from its first step anyway).
            if job.status != "in_progress":
                job.status = "in_progress"
                with contextlib.suppress(sqlite3.Error):
                    self.store.save(job)
            job.progress = min(99, 100 * step // total)

        self.live[job.id] = job

        try:
            job.error = None
            out = await self.run(req, _never_disconnected, on_progress=on_progress)
            if out.error is not None:
                raise openai_error(out.error)
            video = out.videos[0]
            mp4, _ = await asyncio.to_thread(encode_video, video)
            thumbnail = await asyncio.to_thread(encode_image, video.frames[0], "webp")
            await asyncio.to_thread(self.store.write_file, job.id + ".webp", thumbnail)
            await asyncio.to_thread(self.store.write_file, job.id + ".mp4", mp4)
            job.status, job.progress = "completed", 100
        except asyncio.CancelledError:  # deleted: the record is gone with it
            raise
        except OpenAIError as e:
            job.status, job.error = "failed", {"code": e.code or e.type, "message": e.message}
        except OSError as e:
            job.status, job.error = "failed", {
                "code": "storage_error",
                "message": f"the video could not be stored: {e.strerror or e}"}
        except Exception as e:  # anything else still ends the job, never leaves it running
            logger.exception("video job %s failed", job.id)
            job.status, job.error = "failed", {"code": "server_error",
                                               "message": f"internal error: {type(e).__name__}"}
        finally:
            self.in_flight -= 1
            self.tasks.pop(job.id, None)
        job.completed_at = int(time.time())
        job.expires_at = job.completed_at + int(self.store.retention_s)
        if job.status == "failed":
            logger.info("video job %s failed: %s", job.id, job.error["message"])
        try:
            self.store.save(job)
            self.live.pop(job.id, None)
        except sqlite3.Error:
            logger.exception("video job %s: its final state could not be saved", job.id)

    def resume(self) -> int:
        """Runs again the jobs a previous server left queued or running; how many."""
        jobs = self.store.unfinished()
        for job in jobs:
            job.status, job.progress = "queued", 0
            self.in_flight += 1  # admitted before the restart: not refused now
            try:
                reference = None
                if job.has_reference:
                    data = self.store.read_file(job.id + ".png")
                    if data is None:
                        raise OpenAIError(500, "its input reference is missing from the store",
                                          "server_error", code="storage_error")
                    reference = Image.open(io.BytesIO(data))
                    reference.load()
                try:
                    body = self.request_model.model_validate({**job.params, "model": None},
                                                             strict=False)
                except ValidationError as e:  # the server restarted with other options
                    raise OpenAIError(400, str(e.errors()[0]["msg"]),
                                      param=".".join(map(str, e.errors()[0]["loc"])),
                                      code="invalid_value") from None
                req = self.prepare(body, reference, job.id)
            except OpenAIError as e:
                self.in_flight -= 1
                job.status, job.error = "failed", {"code": e.code or e.type,
                                                   "message": f"not resumed: {e.message}"}
                job.completed_at = int(time.time())
                job.expires_at = job.completed_at + int(self.store.retention_s)
                self.store.save(job)
                continue
            self.store.save(job)
            self.tasks[job.id] = asyncio.create_task(self._run_job(job, req))
        return len(jobs)

    def get(self, job_id: str) -> VideoJob:
        job = self.live.get(job_id) or self.store.get(job_id)
        if job is None:
            raise OpenAIError(404, f"No video with id {job_id!r}", param="video_id",
                              code="not_found")
        return job

    def content(self, job_id: str, variant: str) -> tuple[bytes, str]:
        job = self.get(job_id)
        kinds = {"video": (".mp4", "video/mp4"), "thumbnail": (".webp", "image/webp")}
        if variant not in kinds:
            raise OpenAIError(400, f"variant {variant!r} is not available: use video or "
                              "thumbnail", param="variant", code="invalid_value")
        if job.status != "completed":
            why = f": {job.error['message']}" if job.error else ""
            raise OpenAIError(409, f"video {job_id} is {job.status}{why}; its content is there "
                              "once status is completed", param="video_id",
                              code="video_not_ready")
        suffix, media_type = kinds[variant]
        data = self.store.read_file(job_id + suffix)
        if data is None:
            raise OpenAIError(404, f"the {variant} of video {job_id} is missing from the store",
                              param="video_id", code="not_found")
        return data, media_type

    async def delete(self, job_id: str) -> dict[str, Any]:
        """Deletes a job, stopping it at its next denoising step if it runs."""
        self.get(job_id)
        task = self.tasks.pop(job_id, None)
        self.live.pop(job_id, None)
        if task is not None:
            self.engine.set_abort_reason(job_id, "cancelled")
            task.cancel()  # AsyncOmniEngine.generate sends the abort
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.store.delete, job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    def list(self, after: str | None, limit: int, order: str) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise OpenAIError(400, f"limit must be between 1 and 100, got {limit}",
                              param="limit", code="invalid_value")
        if order not in ("asc", "desc"):
            raise OpenAIError(400, f"order must be asc or desc, got {order!r}", param="order",
                              code="invalid_value")
        try:
            jobs, more = self.store.list(after, limit, order)
        except KeyError:
            raise OpenAIError(404, f"No video with id {after!r} (after)", param="after",
                              code="not_found") from None
        data = [j.public() for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    async def sweep_forever(self) -> None:
        """Deletes expired jobs (``--video-retention-hours``) as they expire."""
        period = max(1.0, min(60.0, self.store.retention_s / 4))
        while True:
            removed = await asyncio.to_thread(self.store.sweep)
            if removed:
                logger.info("removed %d expired video jobs", removed)
            await asyncio.sleep(period)


# -- routes ----------------------------------------------------------------------------------------
async def parse_request(request, model: type[VideoRequestBase], decoder, limits: ServingLimits
                        ) -> tuple[VideoRequestBase, Image.Image | None, dict[str, Any]]:
    """(fields validated by the served model's ``model``, the decoded input reference, the
    fields as given without the reference) of a multipart form, as the openai client sends it
    (``input_reference`` a file, or ``input_reference[image_url]``), or of a JSON body."""
    if body_kind(request) == "multipart/form-data":
        form = await request.form(max_part_size=limits.max_body_bytes)
        fields: dict[str, Any] = {}
        source = None
        try:
            for key, value in form.multi_items():
                if key in ("input_reference", "input_reference[image_url]"):
                    if source is not None:
                        raise OpenAIError(400, "input_reference was given more than once",
                                          param="input_reference", code="invalid_value")
                    source = value
                elif key.startswith("input_reference["):
                    raise OpenAIError(400, f"{key}: only an image (a file or an image_url data "
                                      "URL) is accepted here", param="input_reference",
                                      code="invalid_value")
                else:
                    add_text_field(fields, key, value)
            body = validate_body(model, fields)
            reference = await _reference(decoder, source)
        finally:
            await form.close()
        return body, reference, fields
    raw = await request.body()
    body = validate_body(model, raw)
    fields = {k: v for k, v in json.loads(raw).items() if k != "input_reference"}
    return body, await _reference(decoder, body.input_reference), fields


async def _reference(decoder, source) -> Image.Image | None:
    lo, hi = decoder.adapter.image_inputs
    name = decoder.spec.pipeline_class
    if source is None:
        if lo:
            raise OpenAIError(400, f"{name} animates an input image: send input_reference",
                              param="input_reference", code="missing_required_parameter")
        return None
    if not hi:
        raise OpenAIError(400, f"input_reference is not supported by {name}: it generates from "
                          "text alone", param="input_reference", code="unsupported_parameter")
    return (await decoder.decode([reference_source(source)], "input_reference"))[0]


def add_routes(app, videos: ServingVideos, decoder, limits: ServingLimits) -> None:
    model = videos.request_model
    body_doc = form_request_body(model, {"input_reference": FORM_FILE})

    @app.post("/v1/videos", openapi_extra=body_doc)
    async def create_video(request: Request):
        """Starts a video job (OpenAI's Videos API); poll it with GET /v1/videos/{id}."""
        body, reference, fields = await parse_request(request, model, decoder, limits)
        return JSONResponse(await videos.create(body, reference, fields), headers=POLL_HEADERS)

    @app.post("/v1/videos/sync", openapi_extra=body_doc)
    async def create_video_sync(request: Request):
        """Generates a video and answers its mp4 bytes (no job is kept)."""
        body, reference, _ = await parse_request(request, model, decoder, limits)
        data, req = await videos.sync(body, reference, request.is_disconnected)
        return Response(data, media_type="video/mp4", headers={
            "X-Request-Id": req.request_id, "X-Seed": str(req.seed)})

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        return videos.list(after, limit, order)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        """The job; a failed one is answered 200 with status failed and its error."""
        return JSONResponse(videos.get(video_id).public(), headers=POLL_HEADERS)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video"):
        data, media_type = await asyncio.to_thread(videos.content, video_id, variant)
        return Response(data, media_type=media_type)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        return await videos.delete(video_id)
