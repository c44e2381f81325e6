"""OpenAI's Videos API against real `vllm serve` processes of the tiny Wan2.2 models: the openai
client's calls, restart survival, cancellation and bad input."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
import requests
from PIL import Image

from conftest import Server, metric

LONG = 400  # steps: several seconds on the tiny model, so a job is seen running


def _mp4_frames(data: bytes) -> list:
    import av

    with av.open(io.BytesIO(data)) as f:
        return [frame.to_image() for frame in f.decode(video=0)]


def _png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def t2v(video_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("video-logs")
    s = Server(video_models["wan2.2-t2v"], "--served-model-name", "tiny-wan",
               "--video-storage-dir", str(logs / "store"), "--max-queue-len", "3",
               log_path=str(logs / "t2v.log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def i2v(video_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("video-logs")
    s = Server(video_models["wan2.2-i2v"], "--video-storage-dir", str(logs / "store"),
               log_path=str(logs / "i2v.log"))
    yield s
    s.stop()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _wait(server, job_id: str, status=("completed", "failed"), timeout=120,
          progress: int = 0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{server.url}/v1/videos/{job_id}", timeout=10).json()
        if job["status"] in status and job["progress"] >= progress:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"{job_id} still {job['status']}")


def test_openai_client_lifecycle(t2v):
    client = _client(t2v)
    job = client.videos.create_and_poll(
        model="tiny-wan", prompt="a corgi surfing", seconds="1", size="64x48",
        extra_body={"num_inference_steps": 2, "seed": 7, "fps": 4}, poll_interval_ms=100)
    assert job.status == "completed" and job.progress == 100, job
    assert (job.size, job.seconds) == ("64x48", "1.25")  # 1 s at 4 fps -> 5 frames (4k+1)
    assert job.completed_at and job.expires_at > job.completed_at
    assert client.videos.retrieve(job.id).status == "completed"
    assert job.id in [v.id for v in client.videos.list(limit=100)]
    frames = _mp4_frames(client.videos.download_content(job.id).read())
    assert len(frames) == 5 and frames[0].size == (64, 48)
    thumb = Image.open(io.BytesIO(client.videos.download_content(job.id, variant="thumbnail")
                                  .read()))
    assert thumb.format == "WEBP" and thumb.size == (64, 48)
    assert client.videos.delete(job.id).deleted
    r = requests.get(f"{t2v.url}/v1/videos/{job.id}", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_json_create_list_pages_and_sync(t2v):
    ids = []
    for seed in (1, 2):
        r = requests.post(t2v.url + "/v1/videos", timeout=30, json={
            "prompt": "a fox", "size": "32x32", "num_frames": 5, "num_inference_steps": 2,
            "seed": seed})
        assert r.status_code == 200 and r.headers["openai-poll-after-ms"], r.text
        ids.append(r.json()["id"])
    for i in ids:
        assert _wait(t2v, i)["status"] == "completed"
    page = requests.get(t2v.url + "/v1/videos", params={"limit": 1, "order": "asc",
                                                        "after": ids[0]}, timeout=10).json()
    assert [v["id"] for v in page["data"]] == [ids[1]] and page["first_id"] == ids[1]
    newest = requests.get(t2v.url + "/v1/videos", params={"limit": 1}, timeout=10).json()
    assert newest["data"][0]["id"] == ids[1] and newest["has_more"]
    # The synchronous route answers the same video as the job with the same seed.
    r = requests.post(t2v.url + "/v1/videos/sync", timeout=60, json={
        "prompt": "a fox", "size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    job_video = requests.get(f"{t2v.url}/v1/videos/{ids[1]}/content", timeout=10).content
    assert r.content == job_video


def test_delete_stops_a_running_job(t2v):
    steps = metric(t2v, "vllm_omni:denoise_steps_total")
    r = requests.post(t2v.url + "/v1/videos", timeout=30, json={
        "prompt": "a long one", "size": "32x32", "num_frames": 5, "num_inference_steps": LONG})
    job_id = r.json()["id"]
    cancelled = metric(t2v, "vllm_omni:engine_requests_total", outcome="cancelled")
    try:
        # Running, and past 1% (4 of 400 steps: "in_progress" comes with the first step, which
        # is 0% of 400; on a slow machine a poll may see it there).
        running = _wait(t2v, job_id, status=("in_progress",), progress=1)
        assert 0 < running["progress"] < 100
    finally:  # a failure here must not leave a 400-step job in the shared server
        r = requests.delete(f"{t2v.url}/v1/videos/{job_id}", timeout=30)
    assert r.json() == {"id": job_id, "object": "video.deleted", "deleted": True}
    deadline = time.monotonic() + 30
    while metric(t2v, "vllm_omni:engine_requests_total", outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the deleted job's steps did not stop"
        time.sleep(0.1)
    # It stopped at a step end, long before its last step.
    assert metric(t2v, "vllm_omni:denoise_steps_total") - steps < LONG
    # The worker is free: the next job runs at once.
    r = requests.post(t2v.url + "/v1/videos", timeout=30, json={
        "prompt": "next", "size": "32x32", "num_frames": 5, "num_inference_steps": 2})
    assert _wait(t2v, r.json()["id"], timeout=30)["status"] == "completed"


def test_jobs_count_against_the_queue(t2v):
    body = {"prompt": "wait", "size": "32x32", "num_frames": 5, "num_inference_steps": LONG}
    ids = []
    try:
        for _ in range(4):  # one running + --max-queue-len 3 waiting
            r = requests.post(t2v.url + "/v1/videos", json=body, timeout=30)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = requests.post(t2v.url + "/v1/videos", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        for job_id in ids:  # queued ones leave the engine's queue, the running one stops
            assert requests.delete(f"{t2v.url}/v1/videos/{job_id}", timeout=30).ok
    r = requests.post(t2v.url + "/v1/videos", timeout=30, json={**body, "num_inference_steps": 2})
    assert _wait(t2v, r.json()["id"], timeout=30)["status"] == "completed"


@pytest.mark.parametrize("body,param", [
    ({"size": "33x32"}, "size"),  # not a multiple of the model's 16
    ({"num_frames": 6}, "num_frames"),  # not 4k+1: the message names 5 and 9
    ({"seconds": "-1"}, "seconds"),
    ({"seconds": "1", "num_frames": 5}, "seconds"),
    ({"colour": "red"}, "colour"),
    ({"input_reference": "data:image/png;base64,AAAA"}, "input_reference"),  # T2V takes none
    ({"guidance_scale": float("inf")}, "guidance_scale"),
])
def test_bad_input_is_400_naming_the_field(t2v, body, param):
    import json

    r = requests.post(t2v.url + "/v1/videos", timeout=30,
                      data=json.dumps({"prompt": "a fox", **body}, allow_nan=True),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if param == "num_frames":
        assert "5" in err["message"] and "9" in err["message"]


def test_image_to_video_takes_its_reference(i2v):
    client = _client(i2v)
    job = client.videos.create_and_poll(
        prompt="it moves", input_reference=("ref.png", _png(), "image/png"), size="32x32",
        extra_body={"num_inference_steps": 2, "num_frames": 5, "seed": 3}, poll_interval_ms=100)
    assert job.status == "completed", job
    assert len(_mp4_frames(client.videos.download_content(job.id).read())) == 5
    # Without a reference, with a non-image one, or a URL it would have to fetch: 400.
    prompt = {"prompt": (None, "x"), "size": (None, "32x32")}  # multipart text parts
    for files, code in [
            (prompt, "missing_required_parameter"),
            ({**prompt, "input_reference": ("a.png", b"not an image", "image/png")},
             "invalid_image"),
            ({**prompt, "input_reference[image_url]": (None, "https://example.com/a.png")},
             "invalid_value")]:
        r = requests.post(i2v.url + "/v1/videos", files=files, timeout=30)
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) \
            == ("input_reference", code), r.text


def test_jobs_survive_a_killed_server(video_models, tmp_path):
    """SIGKILL of the whole process tree: the completed job stays downloadable; the running and
    the queued one run again to completion on the next server."""
    store = str(tmp_path / "store")
    args = ("--video-storage-dir", store)
    s = Server(video_models["wan2.2-t2v"], *args, log_path=str(tmp_path / "a.log"))
    try:
        def create(steps, seed):
            r = requests.post(s.url + "/v1/videos", timeout=30, json={
                "prompt": "a fox", "size": "32x32", "num_frames": 5, "seed": seed,
                "num_inference_steps": steps})
            assert r.status_code == 200, r.text
            return r.json()["id"]

        done = create(2, 1)
        assert _wait(s, done)["status"] == "completed"
        before = requests.get(f"{s.url}/v1/videos/{done}/content", timeout=10).content
        running, queued = create(LONG, 2), create(2, 3)
        _wait(s, running, status=("in_progress",))
        assert requests.get(f"{s.url}/v1/videos/{queued}", timeout=10).json()["status"] \
            == "queued"
    finally:
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
    s = Server(video_models["wan2.2-t2v"], *args, log_path=str(tmp_path / "b.log"))
    try:
        listed = {v["id"] for v in requests.get(s.url + "/v1/videos", timeout=10)
                  .json()["data"]}
        assert {done, running, queued} <= listed
        assert requests.get(f"{s.url}/v1/videos/{done}/content", timeout=10).content == before
        for job_id in (running, queued):
            job = _wait(s, job_id, timeout=180)
            assert job["status"] == "completed", job
            assert job["vllm_omni"]["seed"] in (2, 3)
    finally:
        s.stop()


def test_a_vanished_storage_directory_fails_the_job_not_the_server(t2v, tmp_path):
    store = t2v.extra[t2v.extra.index("--video-storage-dir") + 1]
    os.rename(store, store + ".away")
    open(store, "w").close()  # where the videos go is now a file: every write there fails
    try:
        r = requests.post(t2v.url + "/v1/videos", timeout=30, json={
            "prompt": "a fox", "size": "32x32", "num_frames": 5, "num_inference_steps": 2})
        job = _wait(t2v, r.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "storage_error", job
        assert "could not be stored" in job["error"]["message"]
    finally:
        os.remove(store)
        os.rename(store + ".away", store)
    assert requests.get(t2v.url + "/health", timeout=10).status_code == 200


def test_store_refuses_unusable_and_shared_directories(tmp_path):
    from vllm_omni.entrypoints.openai.video_jobs import JobStore

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not usable"):
        JobStore(str(tmp_path / "file" / "videos"), 60)
    first = JobStore(str(tmp_path / "videos"), 60)
    try:
        with pytest.raises(ValueError, match="in use by another server"):
            JobStore(str(tmp_path / "videos"), 60)
    finally:
        first.close()
    JobStore(str(tmp_path / "videos"), 60).close()  # free again once the first is closed


def test_store_writes_whole_files_or_none_and_sweeps_expired_jobs(tmp_path):
    import resource

    from vllm_omni.entrypoints.openai.video_jobs import JobStore, VideoJob

    store = JobStore(str(tmp_path / "videos"), 60)
    try:
        # A file-size limit stands in for a full disk: the write fails part-way.
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
        try:
            with pytest.raises(OSError):
                store.write_file("v.mp4", b"x" * 10000)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert not [n for n in os.listdir(store.directory) if n.startswith("v.mp4")]
        job = VideoJob(id="video_old", model="m", prompt="p", size="32x32", seconds="1",
                       params={}, status="completed", expires_at=int(time.time()) - 1)
        store.add(job)
        store.write_file("video_old.mp4", b"data")
        assert store.sweep() == 1
        assert store.get("video_old") is None and store.read_file("video_old.mp4") is None
    finally:
        store.close()


@pytest.mark.parametrize("layout", [("--usp", "2", "--cfg-parallel-size", "2"),
                                    ("--ring", "2", "--tensor-parallel-size", "2")],
                         ids=lambda a: "+".join(f.strip("-") for f in a[::2]))
def test_a_parallel_server_makes_the_same_video(t2v, video_models, tmp_path, layout):
    """`vllm serve` with each parallel flag of the seed's video row, two to a server (four ranks
    on gloo; 3 steps reach both experts, CFG on by default), against the one-process server: the
    same frames, up to what H.264 makes of float-rounding-level differences. (Each layout alone
    is proven exact offline, tests/test_model_features.py.)"""
    import numpy as np

    body = {"prompt": "a fox", "size": "64x32", "num_frames": 9, "num_inference_steps": 3,
            "seed": 5}
    s = Server(video_models["wan2.2-t2v"], *layout, "--video-storage-dir",
               str(tmp_path / "store"), log_path=str(tmp_path / "server.log"))
    try:
        got = requests.post(s.url + "/v1/videos/sync", json=body, timeout=120)
    finally:
        s.stop()
    one = requests.post(t2v.url + "/v1/videos/sync", json=body, timeout=120)
    assert got.status_code == one.status_code == 200, got.text
    a, b = (np.stack([np.asarray(f, dtype=np.int16) for f in _mp4_frames(r.content)])
            for r in (got, one))
    assert a.shape == b.shape == (9, 32, 64, 3)
    # Float rounding (ring attention sums its blocks in another order) can flip an encoder
    # decision in a block: measured on one CPU, ring gave max 8, mean 0.015, 0.24% of values
    # off by more than 2 (the others: identical). A wrong layout moves every pixel.
    d = np.abs(a - b)
    assert d.max() <= 16 and d.mean() < 0.1 and (d > 2).mean() < 0.01, (d.max(), d.mean())


def test_the_playground_runs_a_job_with_a_moving_progress_bar(t2v, page):
    """In headless Chromium: the video panel starts a job, its progress bar moves through the
    denoising steps, and the finished mp4 plays in the page."""
    page.goto(t2v.url + "/playground")
    page.wait_for_selector("#field-num_frames")  # the model's own options, from /openapi.json
    assert page.text_content("#model-task") == "text-to-video"
    # Samples the bar every 20 ms (the page polls the job every 250 ms).
    page.evaluate("""() => { window.bar = []; const el = document.getElementById('progress');
        setInterval(() => { if (!el.hidden) window.bar.push(el.value); }, 20); }""")
    page.fill("#prompt", "a corgi surfing")
    page.fill("#field-num_inference_steps", "150")  # about 3 s: several polls see it move
    page.fill("#field-seed", "7")
    page.click("#run")
    video = page.wait_for_selector(".result video", timeout=120_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    page.wait_for_function("v => v.readyState >= 1", arg=video)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [64, 64]
    assert video.evaluate("v => v.duration") > 0
    seen = page.evaluate("window.bar")
    moving = sorted({v for v in seen if 0 < v < 100})
    assert len(moving) >= 2 and seen[-1] == 100, seen
    caption = page.text_content(".result figcaption")
    assert "seed 7" in caption and "video_" in caption  # the job's id
