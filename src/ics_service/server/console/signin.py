"""Signing in and out of the console (`/signin`, `/signout`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from .render import HEADERS, page, set_cookie
from .session import COOKIE, Session, sessions_of, viewer

router = APIRouter(include_in_schema=False)


def local_target(target: str | None) -> str:
    """Where to go after signing in: a path of this server, never another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


@router.get("/signin")
def signin_page(request: Request, next: str | None = None) -> Response:
    sessions = sessions_of(request)
    if sessions.open:
        return RedirectResponse(local_target(next), status_code=303)
    return page(request, None, "signin.html", target=local_target(next), closed=sessions.closed)


@router.post("/signin")
def signin(
    request: Request,
    token: Annotated[str, Form(max_length=4096)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    sessions = sessions_of(request)
    target = local_target(next)
    if sessions.open:
        return RedirectResponse(target, status_code=303)
    if not sessions.token_matches(token):
        return page(
            request,
            None,
            "signin.html",
            http_status=401,
            target=target,
            closed=sessions.closed,
            error="That is not the API token of this server.",
        )
    response = RedirectResponse(target, status_code=303, headers=HEADERS)
    set_cookie(request, response, sessions.cookie_value(sessions.new()))
    return response


@router.post("/signout")
def signout(
    request: Request,
    session: Annotated[Session, Depends(viewer)],
    csrf: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    sessions_of(request).check_form(session, csrf)
    response = RedirectResponse("/signin", status_code=303, headers=HEADERS)
    response.delete_cookie(COOKIE, path="/")
    return response
