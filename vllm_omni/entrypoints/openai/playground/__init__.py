"""The playground: one static page (HTML, JavaScript and CSS beside this file; no build step, no
external assets) that drives this server's public API from a browser.

The page holds no secret: it asks for the API key, keeps it in the tab's session storage and sends
it as vLLM's clients do. It reads the served model's options from ``/openapi.json`` and the model
and its LoRA adapters from ``/v1/models``, so it shows exactly what the API accepts. Every URL it
uses is relative, so the page works under ``--root-path`` and behind a proxy's prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

HERE = Path(__file__).parent
FILES = {"/playground": ("index.html", "text/html; charset=utf-8"),
         "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
         "/playground.css": ("playground.css", "text/css; charset=utf-8")}
# Paths that answer without the API key (the page itself carries no data of the server's).
ROUTES = frozenset({"/", *FILES})

# Nothing but this server: no inline script, no other origin, no framing (clickjacking); images
# and media come back as data: and blob: URLs made by the page.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data: blob:; media-src 'self' "
                               "blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app: FastAPI) -> None:
    contents = {path: ((HERE / name).read_bytes(), media) for path, (name, media) in FILES.items()}

    def serve(path: str):
        body, media = contents[path]

        async def static() -> Response:
            return Response(body, media_type=media, headers=HEADERS)
        return static

    for path in FILES:
        app.get(path, include_in_schema=False)(serve(path))

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        # Relative, so that a --root-path prefix (or a proxy's) is kept.
        return RedirectResponse("playground", status_code=307)
