"""Guards against slow and numerous clients: a deadline for each request head and a cap on open
connections (in uvicorn's HTTP protocol, where connections live), and a deadline for each request
body (ASGI middleware, where a 408 can be answered in OpenAI's error shape).

Without them a client keeps a connection, its buffers and a file descriptor for as long as it
likes by sending a request a byte at a time, or by connecting and sending nothing: uvicorn times
out only idle kept-alive connections, and stops that timer at the first byte received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vllm_omni.entrypoints.openai.protocol import OpenAIError

logger = logging.getLogger("vllm_omni.api")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request-head deadline and a connection cap.

    httptools rather than ``http="auto"``: auto picks httptools wherever vLLM is installed (vLLM
    requires fastapi[standard], hence uvicorn[standard] and httptools), and naming it means one
    parser's internals to hook and test, not a guard that silently lapses under the other one.
    Configured by subclassing: see ``guarded_protocol``.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 512
    refusal: bytes = b""
    _head_timer: asyncio.TimerHandle | None = None
    _awaiting_head = True
    _refused = False
    _refused_unlogged = 0
    _refusal_logged_at = float("-inf")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        # uvicorn itself never times out a connection that sends nothing at all.
        self._arm_head_timer()

    def _refuse(self, transport) -> None:
        # Refused at once, without waiting for the request: a slot held until the request comes
        # is what the cap exists to bound. The 503 is written first because it costs nothing: a
        # client that reads it sees why (and its Retry-After); one whose request crosses our close
        # gets a reset instead. Either way OpenAI's clients retry.
        self._refused, self.transport = True, transport
        transport.write(self.refusal)
        transport.close()
        cls = GuardedHttpToolsProtocol
        cls._refused_unlogged += 1
        now = time.monotonic()
        if now - cls._refusal_logged_at >= 10:  # a flood must not flood the log too
            logger.warning("refused %d connection(s) since the last such message: %d open, the "
                           "limit (--max-connections)", cls._refused_unlogged,
                           len(self.connections))
            cls._refused_unlogged, cls._refusal_logged_at = 0, now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # On a kept-alive connection, the first byte after a response stops uvicorn's keep-alive
        # timer; from that byte on, the next request head has our deadline instead.
        if self._awaiting_head and self._head_timer is None:
            self._arm_head_timer()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request's head was already read. Otherwise the next bytes are a new head,
        # or the unread rest of a body answered early (401, 413), which is bounded by the same
        # deadline rather than drained for as long as the client cares to send it.
        self._awaiting_head = not self.pipeline
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        # Closed without an answer, as uvicorn's keep-alive timeout does: no request was read to
        # answer, and a kept-alive client could take a 408 for the reply to its next request.
        self._head_timer = None
        logger.debug("closing %s: no complete request head within %gs (--header-read-timeout)",
                     self.client, self.header_timeout_s)
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    error = OpenAIError(503, f"Too many open connections: this server accepts at most "
                        f"{max_connections} (--max-connections); retry shortly", "server_error",
                        code="too_many_connections")
    body = json.dumps(error.body()).encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
               % (len(body), body))
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout_s": header_timeout_s, "max_connections": max_connections,
        "refusal": refusal})


class BodyDeadline:
    """ASGI middleware: a request body not fully received within ``timeout_s`` of its head gets
    408, and its connection is closed."""

    def __init__(self, app, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = timed_out = False

        async def receive_by_deadline():
            nonlocal body_done, timed_out
            if body_done:
                # Later receives wait for the client to disconnect, which has no deadline.
                return await receive()
            try:
                # timeout_at, not wait_for: a part that has already arrived is returned even
                # when the app asks for it after the deadline.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                # An HTTPException passes FastAPI's body parsing (anything else becomes a 400)
                # and reaches the app's handler, which answers in OpenAI's error shape.
                raise HTTPException(408, f"Request body not received within "
                                    f"{self.timeout_s:g}s (--body-read-timeout)") from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_closing(message):
            if timed_out and message["type"] == "http.response.start":
                # The rest of the body may still come: the connection cannot carry a next request.
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_by_deadline, send_closing)
