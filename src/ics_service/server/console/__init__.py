"""The web console of `ics serve`: pages for executions and their items, served at `/` from
the store through the API's own queries, behind the API token (see session.py).

Pages are server-rendered (Jinja2 templates, package data) with one small script for the
live view and no other; every asset is served from here (`/console/static/...`), so the
console works offline, under a Content-Security-Policy that admits nothing else.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from ...config import Settings
from . import executions, items, review, signin
from .render import page
from .session import CsrfRefused, Sessions, SignInRequired
from .thumbnails import Thumbnails

#: Pages and routes of the console: the executions list, and what starts with these.
PREFIXES = ("/executions/", "/review", "/signin", "/signout", "/console/")
#: Pictures made at once (each decodes an image within the decode memory budget).
PICTURE_SLOTS = 2
#: The bound of the picture cache on disk.
PICTURE_CACHE_BYTES = 256 * 1024 * 1024


def is_console_path(path: str) -> bool:
    """Whether the console answers this path (it checks its viewers itself)."""
    return path == "/" or path.startswith(PREFIXES)


def install(app: FastAPI, settings: Settings, *, closed: bool) -> None:
    """Serve the console from `app`. `closed`: SigV4 keys guard the server (with no token,
    nobody can sign in)."""
    app.state.sessions = Sessions(settings.token, closed=closed)
    app.state.thumbnails = Thumbnails(
        settings, settings.home / "cache" / "pictures", PICTURE_CACHE_BYTES
    )
    app.state.picture_slots = asyncio.Semaphore(PICTURE_SLOTS)
    for module in (signin, executions, items, review):
        app.include_router(module.router)
    static = Path(__file__).parent / "static"
    app.mount("/console/static", StaticFiles(directory=static), name="console-static")

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, e: SignInRequired) -> Response:
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            target = urllib.parse.quote(request.url.path, safe="/")
            return RedirectResponse(f"/signin?next={target}", status_code=303)
        return Response(str(e), status_code=401, media_type="text/plain")

    @app.exception_handler(CsrfRefused)
    async def csrf(request: Request, e: CsrfRefused) -> Response:
        return page(
            request,
            None,
            "message.html",
            http_status=403,
            title="Refused",
            message=str(e),
            back="/",
        )
