"""Who may see the console: a session in a signed cookie, and the CSRF value of its forms.

The pages are behind the API token. Signing in (`POST /signin` with the token) sets the
cookie `ics_session` (HttpOnly, SameSite=Strict, Secure over HTTPS) holding
`EXPIRES.CSRF.MAC`: the MAC is an HMAC-SHA256 of the rest under a key derived from the
token, so the server keeps no session state (replicas that share the token accept each
other's cookies), and a new token signs every session out. Pages also take
`Authorization: Bearer TOKEN`, as the API does (for scripts). A server without a token
(open to all) has an open console, whose cookie carries only the CSRF value of its forms.
A server guarded by SigV4 keys alone has no token to sign in with: its console is closed.
Every form that changes something (cancel, resume, sign out) carries the session's CSRF
value and is refused (403) without it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from ...errors import IcsError

#: The session cookie's name.
COOKIE = "ics_session"
#: How long a sign-in lasts.
SESSION_SECONDS = 12 * 3600


class SignInRequired(IcsError):
    """A console page asked for without a session: a browser is sent to the sign-in page."""

    http_status = 401


class CsrfRefused(IcsError):
    """A console form posted without its session's CSRF value."""

    http_status = 403


@dataclass(frozen=True)
class Session:
    """A viewer of the console: the CSRF value of its forms, and whether the cookie must
    be (re)sent with the answer."""

    csrf: str
    expires: int
    #: Signed in by a bearer token (a script): its forms need no CSRF value.
    bearer: bool = False
    #: Made by this request (an open console's first page): the answer sets the cookie.
    fresh: bool = False


class Sessions:
    """Makes and checks the session cookies of one server."""

    def __init__(self, token: str | None, *, closed: bool) -> None:
        self.token = token.encode() if token else None
        #: SigV4 keys without a token: nothing to sign in with.
        self.closed = closed and self.token is None
        seed = self.token if self.token is not None else secrets.token_bytes(32)
        self._key = hmac.new(seed, b"ics console session", hashlib.sha256).digest()

    @property
    def open(self) -> bool:
        """No credential configured: everyone may see the console."""
        return self.token is None and not self.closed

    def new(self) -> Session:
        return Session(
            csrf=secrets.token_urlsafe(18), expires=int(time.time()) + SESSION_SECONDS, fresh=True
        )

    def cookie_value(self, session: Session) -> str:
        body = f"{session.expires}.{session.csrf}"
        return f"{body}.{self._mac(body)}"

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def from_cookie(self, value: str | None) -> Session | None:
        """The session a cookie holds, if it is one this server signed and not expired."""
        if not value or value.count(".") != 2:
            return None
        expires, csrf, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(f"{expires}.{csrf}")):
            return None
        if not expires.isdigit() or int(expires) < time.time():
            return None
        return Session(csrf=csrf, expires=int(expires))

    def token_matches(self, given: str) -> bool:
        """Constant time: a wrong token takes as long to refuse whatever it shares."""
        return self.token is not None and hmac.compare_digest(given.strip().encode(), self.token)

    def of(self, request: Request) -> Session:
        """The viewer of a console page, or SignInRequired."""
        found = self.from_cookie(request.cookies.get(COOKIE))
        if found is not None:
            return found
        auth = request.headers.get("authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials):
            return Session(csrf="", expires=0, bearer=True)
        if self.open:
            return self.new()
        raise SignInRequired("sign in with the server's API token")

    def check_form(self, session: Session, csrf: str | None) -> None:
        """CsrfRefused unless a form came with its session's CSRF value."""
        if session.bearer:
            return
        if session.fresh or not csrf or not hmac.compare_digest(csrf, session.csrf):
            raise CsrfRefused(
                "this form is stale or came from another site: reload the page and try again"
            )


def sessions_of(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def viewer(request: Request) -> Session:
    """The dependency of every console page: who is looking (SignInRequired otherwise)."""
    return sessions_of(request).of(request)
