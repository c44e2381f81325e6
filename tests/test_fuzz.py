"""Schemathesis over the server's own /openapi.json: whatever it sends, valid or not, the server
answers without a 5xx, and every error is in OpenAI's shape."""

import pytest
import requests

from conftest import SMALL_LIMITS, Server

schemathesis = pytest.importorskip("schemathesis")


# Small limits keep every valid request fast: whatever schemathesis generates runs in ms.
@pytest.fixture(scope="module")
def fuzz_server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, *SMALL_LIMITS,
               log_path=str(tmp_path_factory.mktemp("logs") / "fuzz.log"))
    yield s
    s.stop()


def _check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


def _fuzz(url: str, mode: str, examples: int, path: str | None = None) -> dict[int, int]:
    """Sends ``examples`` derandomized schemathesis cases (of ``path``'s operations, or all) and
    checks each answer; returns the count of each status code."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    if path is not None:
        schema = schema.include(path=path)
    strategy = schema.as_strategy(generation_mode=GenerationMode(mode))
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=url, session=session, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        _check(response)

    run()
    return seen


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(fuzz_server, mode):
    seen = _fuzz(fuzz_server.url, mode, 150)
    assert requests.get(fuzz_server.url + "/health", timeout=10).status_code == 200
    print(f"{mode}: status counts {dict(sorted(seen.items()))}")
    # Both kinds of answer were exercised, not only one.
    assert any(s < 400 for s in seen) or mode == "negative"
    assert any(400 <= s < 500 for s in seen)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error_on_edits(edit_server, mode):
    """The edits route, multipart and JSON as /openapi.json describes them. Random bytes are not
    images, so valid answers come from the hand-made request after the run."""
    import io

    from PIL import Image

    url = edit_server.url  # an edit model (one to three input images)
    seen = _fuzz(url, mode, 100, path="/v1/images/edits")
    print(f"edits {mode}: status counts {dict(sorted(seen.items()))}")
    assert any(400 <= s < 500 for s in seen)
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (10, 200, 30)).save(buf, "PNG")
    r = requests.post(url + "/v1/images/edits", timeout=60,
                      data={"prompt": "a fox", "num_inference_steps": "2", "size": "32x32"},
                      files={"image": ("a.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text[:300]
    assert requests.get(url + "/health", timeout=10).status_code == 200
