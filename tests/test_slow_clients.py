"""Slow and numerous clients: a request head and a request body each have a deadline, open
connections a cap, and normal requests are served meanwhile (--header-read-timeout,
--body-read-timeout, --max-connections; vllm_omni/entrypoints/openai/connections.py)."""

import argparse
import json
import selectors
import socket
import threading
import time

import pytest
import requests

from conftest import Server

HEADER_S, BODY_S = 2, 3  # the server's deadlines
SLACK_S = 3  # the server must have closed a connection this long after its deadline
CAP = 72  # above the 60 slow connections and the normal requests beside them
GEN = "/v1/images/generations"
SMALL = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}
SLOW_HEAD = b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
SLOW_BODY = (b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n{\"prompt\": \"")


@pytest.fixture(scope="module")
def server(tiny_qwen_image, tmp_path_factory):
    s = Server(tiny_qwen_image, "--header-read-timeout", str(HEADER_S), "--body-read-timeout",
               str(BODY_S), "--max-connections", str(CAP),
               log_path=str(tmp_path_factory.mktemp("logs") / "slow_clients.log"))
    yield s
    s.stop()


def connect(port: int, head: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    return sock


class Slow:
    """A client that sends one byte of ``drip`` a second (nothing if empty) and records what the
    server answers and when it closes the connection."""

    def __init__(self, sock: socket.socket, drip: bytes = b""):
        self.sock, self.drip, self.reply, self.closed = sock, drip, b"", None
        sock.setblocking(False)
        self.opened = time.monotonic()

    def read(self) -> bool:
        """Takes what the server sent; False once it has closed the connection."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:  # a reset
            data = b""
        self.reply += data
        if not data:
            self.closed = time.monotonic()
        return bool(data)

    def send_byte(self) -> bool:
        """False once the server has closed the connection."""
        if not self.drip:
            return True
        try:
            self.sock.send(self.drip)
        except BlockingIOError:
            pass
        except OSError:  # closed by the server, whose answer may still be unread
            for _ in range(100):
                if not self.read():
                    return False
            self.closed = time.monotonic()
            return False
        return True

    def elapsed(self) -> float:
        return self.closed - self.opened


def drive(conns: list[Slow], limit_s: float) -> None:
    """Drips into every connection once a second and reads its answers, until the server has
    closed them all or ``limit_s`` passes; then closes them all here."""
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    end = time.monotonic() + limit_s
    next_drip = time.monotonic() + 1
    while sel.get_map() and time.monotonic() < end:
        gone = [key for key, _ in sel.select(max(0.0, min(next_drip, end) - time.monotonic()))
                if not key.data.read()]
        if time.monotonic() >= next_drip:
            next_drip += 1
            gone += [key for key in sel.get_map().values()
                     if key not in gone and not key.data.send_byte()]
        for key in gone:
            sel.unregister(key.fileobj)
    sel.close()
    for c in conns:
        c.sock.close()


def error_of(reply: bytes) -> dict:
    """The OpenAI-shaped error of a raw HTTP response."""
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_slow_heads_and_bodies_are_closed_while_normal_requests_are_served(server):
    heads = [Slow(connect(server.port, SLOW_HEAD), b"a") for _ in range(30)]
    bodies = [Slow(connect(server.port, SLOW_BODY), b"a") for _ in range(30)]
    driver = threading.Thread(target=drive, args=(heads + bodies, BODY_S + SLACK_S + 2))
    driver.start()
    try:
        # Served while the 60 are open: milliseconds each, against deadlines of seconds.
        r = requests.get(server.url + "/v1/models", timeout=10)
        models_at = time.monotonic()
        assert r.status_code == 200
        took = []
        for _ in range(3):
            t = time.monotonic()
            r = requests.post(server.url + GEN, json=SMALL, timeout=30)
            took.append(time.monotonic() - t)
            assert r.status_code == 200 and r.json()["data"][0]["b64_json"], r.text[:300]
    finally:
        driver.join(BODY_S + SLACK_S + 5)
    assert not driver.is_alive()
    assert max(took) < 10, took
    conns = heads + bodies
    assert all(c.closed is not None for c in conns), "the server left slow connections open"
    assert models_at < min(c.closed for c in conns), "not served while the slow ones were open"
    for c in heads:  # closed without an answer: no request was read to answer
        assert HEADER_S - 0.5 <= c.elapsed() <= HEADER_S + SLACK_S and c.reply == b""
    for c in bodies:
        assert BODY_S - 0.5 <= c.elapsed() <= BODY_S + SLACK_S
        assert c.reply.startswith(b"HTTP/1.1 408 "), c.reply[:200]
        assert b"connection: close" in c.reply.lower()
        err = error_of(c.reply)
        assert err["code"] == "request_timeout" and "--body-read-timeout" in err["message"]
    assert "Exception in ASGI application" not in server.logs()


def test_next_head_on_a_kept_alive_connection_has_the_deadline(server):
    # uvicorn's keep-alive timer stops at the first byte of the next request; ours must not.
    kept = connect(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += kept.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in answer.lower()
    kept.sendall(b"GET /hea")
    second = Slow(kept, b"a")
    silent = Slow(connect(server.port))  # uvicorn alone never closes one that sends nothing
    drive([second, silent], HEADER_S + SLACK_S + 1)
    for c in (second, silent):
        assert c.closed is not None and HEADER_S - 0.5 <= c.elapsed() <= HEADER_S + SLACK_S
        assert c.reply == b""


def test_connections_beyond_the_cap_get_503_and_service_resumes(server):
    # Opened at once, well within the head deadline that closes the silent ones afterwards.
    held = [Slow(connect(server.port)) for _ in range(CAP + 5)]
    try:
        # A real client beyond the cap reads the 503 (it was written before the close).
        r = requests.get(server.url + "/health", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text[:300]
        assert r.json()["error"]["code"] == "too_many_connections"
    finally:
        drive(held, HEADER_S + SLACK_S)
    refused = [c for c in held if c.reply]
    accepted = [c for c in held if not c.reply]
    assert len(accepted) <= CAP and len(refused) >= 5
    for c in refused:
        assert c.reply.startswith(b"HTTP/1.1 503 ") and c.elapsed() < HEADER_S - 0.5, c.reply[:200]
        err = error_of(c.reply)
        assert err["code"] == "too_many_connections" and "--max-connections" in err["message"]
    assert all(c.closed is not None for c in accepted)
    # Once they are closed, service resumes.
    r = requests.post(server.url + GEN, json=SMALL, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert "refused" in server.logs() and "--max-connections" in server.logs()


def test_flag_values_must_be_positive(capsys):
    from vllm_omni.entrypoints.cli.serve import _positive
    from vllm_omni.entrypoints.openai.limits import ServingLimits

    parser = argparse.ArgumentParser()
    parser.add_argument("--t", type=_positive(float))
    parser.add_argument("--n", type=_positive(int))
    assert parser.parse_args(["--t", "0.5", "--n", "3"]) == argparse.Namespace(t=0.5, n=3)
    for bad in (["--t", "0"], ["--t", "-1"], ["--t", "nan"], ["--t", "inf"], ["--n", "0"],
                ["--n", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert f"> 0, got '{bad[1]}'" in capsys.readouterr().err
    for field in ("header_read_timeout_s", "body_read_timeout_s", "max_connections"):
        with pytest.raises(ValueError, match=field):
            ServingLimits(**{field: 0})
