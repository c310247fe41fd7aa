"""Subscription URLs as they may be shown: passwords, query values and tokens hidden."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

#: Query parameters that are a subscription's options, shown as they are.
PLAIN_PARAMS = ("ics-kinds", "ics-mode", "ics-rate")
#: A path segment this long made of token characters is taken for a secret (chat webhooks
#: carry their tokens in the path).
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{16,}$")


def hide_secrets(url: str) -> str:
    """The URL with its password, query values (but the plain options) and token-like path
    segments replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name = user.split(":", 1)[0]
        netloc = f"{name}:***@{host}" if ":" in user else f"***@{host}"
    path = "/".join("***" if _TOKEN.match(seg) else seg for seg in parts.path.split("/"))
    query = urlencode(
        [(k, v if k in PLAIN_PARAMS else "***") for k, v in parse_qsl(parts.query, True)],
        safe="*,/",
    )
    return urlunsplit((parts.scheme, netloc, quote(path, safe="/*:@"), query, ""))
