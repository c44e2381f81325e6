"""Schemathesis over the server's own /openapi.json: whatever it sends, valid or not, the server
answers without a 5xx, and every error is in OpenAI's shape."""

import pytest
import requests

from conftest import Server

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def fuzz_server(tiny_qwen_image, tmp_path_factory):
    # Small limits keep every valid request fast: whatever schemathesis generates runs in ms.
    s = Server(tiny_qwen_image, "--max-pixels", str(64 * 64), "--max-inference-steps", "2",
               "--max-images-per-request", "2", "--request-timeout", "30",
               log_path=str(tmp_path_factory.mktemp("logs") / "fuzz.log"))
    yield s
    s.stop()


def _check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(fuzz_server, mode):
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    strategy = schema.as_strategy(generation_mode=GenerationMode(mode))
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        _check(response)

    run()
    assert requests.get(fuzz_server.url + "/health", timeout=10).status_code == 200
    print(f"{mode}: status counts {dict(sorted(seen.items()))}")
    # Both kinds of answer were exercised, not only one.
    assert any(s < 400 for s in seen) or mode == "negative"
    assert any(400 <= s < 500 for s in seen)
