"""The playground page in headless Chromium against real servers: it generates and edits
through the public API, shows what the server says, and its curl/Python snippets reproduce what
it shows. (The video and audio panels are tested beside their servers, in test_videos.py and
test_audio.py; the API key and --root-path in test_security.py.)"""

from __future__ import annotations

import base64
import io
import json
import subprocess

import requests
from PIL import Image


def _open(page, server, path: str = "/") -> None:
    page.goto(server.url + path)
    page.wait_for_selector("#fields label")


def _generate(page, **fields) -> None:
    """Fills the form, runs it and waits until it is done (a new result or an error)."""
    count = page.locator(".result").count()
    for name, value in fields.items():
        page.fill("#prompt" if name == "prompt" else f"#field-{name}", str(value))
    page.click("#run")
    page.wait_for_function(
        "n => document.querySelectorAll('.result').length > n"
        " || !document.getElementById('error').hidden", arg=count)


def _image(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_first_run_defaults_and_the_logged_address(server):
    """README command 1's server: warmed up at the tiny model's own 64x64 (not 1024x1024), and
    the start-up log says where the page is."""
    log = open(server.log_path).read()
    assert "warmed up at 64x64 in" in log, log[-3000:]
    assert f"ready: try it at http://127.0.0.1:{server.port}/playground" in log, log[-3000:]
    r = requests.get(server.url + "/", allow_redirects=False, timeout=10)
    assert r.status_code == 307 and r.headers["location"] == "playground"
    r = requests.get(server.url + "/playground", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # Nothing from another origin, no inline script, no framing.
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http://" not in r.text and "https://" not in r.text
    js = requests.get(server.url + "/playground.js", timeout=10).text
    assert "innerHTML" not in js and "http://" not in js and "https://" not in js


def test_generate_shows_the_image_and_a_new_seed_makes_another(server, page):
    _open(page, server)
    assert page.text_content("#model-name") == "tiny-qwen-image"
    # The fields are the served model's options, read from /openapi.json.
    for name in ("size", "seed", "num_inference_steps", "true_cfg_scale", "negative_prompt"):
        assert page.locator(f"#field-{name}").count() == 1, name
    assert page.locator("#field-guidance_scale").count() == 0  # not an option of Qwen-Image

    _generate(page, prompt="a red fox", seed=7, num_inference_steps=2)
    assert page.is_hidden("#error"), page.text_content("#error")
    first = page.locator(".result img").first
    assert first.evaluate("img => img.complete && img.naturalWidth") == 64  # rendered, 64x64
    assert "seed 7" in page.text_content(".result figcaption")
    # The stream's previews were shown while it ran (Qwen-Image decodes them).
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    shown = _image(first.get_attribute("src"))

    # The same request through the API gives the same image.
    r = requests.post(server.url + "/v1/images/generations", json={
        "prompt": "a red fox", "seed": 7, "num_inference_steps": 2}, timeout=60)
    assert r.status_code == 200, r.text
    direct = _image("data:image/png;base64," + r.json()["data"][0]["b64_json"])
    assert direct.tobytes() == shown.tobytes()

    _generate(page, seed=8)
    assert page.locator(".result").count() == 2
    newest = _image(page.locator(".result img").first.get_attribute("src"))
    assert "seed 8" in page.locator(".result figcaption").first.text_content()
    assert newest.tobytes() != shown.tobytes()


def test_a_bad_size_shows_the_servers_error(server, page):
    _open(page, server)
    _generate(page, prompt="a red fox", size="65x65", num_inference_steps=2)
    error = page.text_content("#error")
    assert error.startswith("400 invalid_value (size): width=65 is not supported"), error
    assert "multiple of 16" in error
    assert page.locator(".result").count() == 0
    # A valid request afterwards clears it.
    _generate(page, size="64x64")
    assert page.is_hidden("#error") and page.locator(".result").count() == 1


def test_the_curl_and_python_snippets_reproduce_the_result(server, page, tmp_path):
    _open(page, server)
    _generate(page, prompt="a lighthouse", seed=11, num_inference_steps=2, n=2)
    cards = page.locator(".result")
    assert cards.count() == 2  # n > 1 comes back as one JSON answer, not a stream
    shown = _image(cards.last.locator("img").get_attribute("src"))  # the first of the two

    cards.first.locator("button", has_text="curl").click()
    curl = cards.first.locator(".snippet").text_content()
    assert curl.startswith(f"curl -s '{server.url}/v1/images/generations'")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout)
    assert _image("data:image/png;base64," + answer["data"][0]["b64_json"]).tobytes() \
        == shown.tobytes()

    cards.first.locator("button", has_text="Python").click()
    python = cards.first.locator(".snippet").text_content()
    assert "Authorization" not in python  # this server has no key; none was entered
    namespace: dict = {}
    exec(python, namespace)  # noqa: S102 - the page's own snippet, against our server
    resp = namespace["resp"]
    assert resp.status_code == 200
    assert resp.json()["data"][0]["b64_json"] == answer["data"][0]["b64_json"]


def test_edit_sends_the_chosen_images(edit_server, page, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(a)
    Image.new("RGB", (64, 48), (30, 30, 200)).save(b)
    _open(page, edit_server)
    assert page.text_content("#run") == "Edit"  # an edit model has no text-to-image mode
    assert "up to 3" in page.text_content("#images-label")
    page.set_input_files("#images", [str(a), str(b)])
    _generate(page, prompt="put them together", seed=3)
    assert page.is_hidden("#error"), page.text_content("#error")
    shown = _image(page.locator(".result img").first.get_attribute("src"))
    assert shown.size == (64, 48)  # the first input's size

    with open(a, "rb") as fa, open(b, "rb") as fb:
        r = requests.post(edit_server.url + "/v1/images/edits", files=[
            ("image[]", ("a.png", fa, "image/png")), ("image[]", ("b.png", fb, "image/png"))],
            data={"prompt": "put them together", "seed": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    direct = _image("data:image/png;base64," + r.json()["data"][0]["b64_json"])
    assert direct.tobytes() == shown.tobytes()

    # The server's limit, as it words it.
    _generate(page, num_inference_steps=3)
    assert "num_inference_steps" in page.text_content("#error")
    assert "--max-inference-steps" in page.text_content("#error")
