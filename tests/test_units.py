"""Small pieces that need no engine."""

import hashlib
import os
import time

import pytest

from vllm_omni.engine.request import DiffusionRequest
from vllm_omni.engine.scheduler import Scheduler
from vllm_omni.entrypoints.openai.image_store import ImageStore
from vllm_omni.entrypoints.openai.protocol import OpenAIError, parse_size
from vllm_omni.testing.tiny_models import build


def _req(i):
    return DiffusionRequest(f"r{i}", "p", None, 64, 64, 2, i)


def test_scheduler_is_fifo_and_aborts():
    s = Scheduler()
    for i in range(3):
        s.add(_req(i))
    assert s.abort("r1") is not None and s.abort("r1") is None
    assert [r.request_id for r in s.schedule()] == ["r0"]
    assert [r.request_id for r in s.schedule()] == ["r2"]
    assert s.schedule() == []
    with pytest.raises(ValueError):
        s.add(_req(5)), s.add(_req(5))


def test_parse_size():
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size("auto") == (None, None) and parse_size(None) == (None, None)
    for bad in ("1024", "0x64", "64X64", "-1x2", "64x64x3"):
        with pytest.raises(OpenAIError):
            parse_size(bad)


def test_image_store_expires_and_bounds_bytes():
    store = ImageStore(ttl_s=0.2, max_bytes=10)
    store.put("a", b"123456", "png")
    store.put("b", b"123456", "png")  # over budget: the oldest goes
    assert store.get("a") is None and store.get("b") == (b"123456", "image/png")
    time.sleep(0.25)
    assert store.get("b") is None


def _digest(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_tiny_builder_is_deterministic(tiny_qwen_image, tmp_path):
    again = build("qwen-image", str(tmp_path / "again"))
    assert _digest(again) == _digest(tiny_qwen_image)
    with pytest.raises(ValueError, match="unknown family"):
        build("nope", str(tmp_path / "x"))


def test_readme_model_table_is_generated_from_the_adapters():
    from vllm_omni.models.support_table import readme_path, replace_in

    with open(readme_path()) as f:
        text = f.read()
    assert replace_in(text) == text, "run: python -m vllm_omni.models.support_table --write"


def test_task_local_is_per_greenlet_and_per_thread():
    import threading

    import greenlet

    from vllm_omni.utils.tasks import TaskLocal

    local = TaskLocal(lambda: {"n": 0})
    local.n = 1
    seen = []

    def task(value):
        seen.append(local.n)  # a fresh task starts from the factory
        local.n = value
        greenlet.getcurrent().parent.switch()
        seen.append(local.n)  # its own value survives the other task's turn

    a, b = greenlet.greenlet(task), greenlet.greenlet(task)
    a.switch(2)
    b.switch(3)
    a.switch()
    b.switch()
    thread = threading.Thread(target=lambda: seen.append(local.n))
    thread.start()
    thread.join()
    assert seen == [0, 0, 2, 3, 0] and local.n == 1
    del local.n
    with pytest.raises(AttributeError):
        local.n


def test_no_module_passes_500_lines():
    """Issue 14's size rule: a module that grows past this is split by what it does."""
    import pathlib

    import vllm_omni

    root = pathlib.Path(vllm_omni.__file__).parent
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines())
             for p in root.rglob("*.py") if "testing" not in p.relative_to(root).parts}
    assert sizes and not {p: n for p, n in sizes.items() if n > 500}
