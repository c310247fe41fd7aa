"""Pages from the templates (package data, autoescaped: everything from outside shows as
text) with the console's headers: a Content-Security-Policy that lets in only what the
server serves, and the session cookie when the request made one."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from ... import __version__
from .session import COOKIE, SESSION_SECONDS, Session, sessions_of

#: Only the server's own scripts, styles and images; no inline script; forms post here.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ics_service.server.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["duration"] = duration
    env.globals["version"] = __version__
    return env


def page(
    request: Request,
    session: Session | None,
    template: str,
    http_status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """The template rendered for this viewer (its CSRF value is `csrf` in every form)."""
    sessions = sessions_of(request)
    html = (
        environment()
        .get_template(template)
        .render(
            csrf=session.csrf if session is not None else "",
            signed_in=session is not None and not sessions.open,
            **context,
        )
    )
    response = HTMLResponse(html, status_code=http_status, headers=HEADERS)
    if session is not None and session.fresh:
        set_cookie(request, response, sessions.cookie_value(session))
    return response


def set_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def when(ts: dt.datetime | None) -> str:
    """A time as the pages show it: UTC, to the second."""
    return "–" if ts is None else ts.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"
