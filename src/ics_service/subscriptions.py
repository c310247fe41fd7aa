"""A subscription: a channel URL, the alert kinds it wants, each or digest, a rate limit.

On the command line every option rides on the URL as an `ics-` query parameter, removed
before the channel sees the URL: `ics-kinds=low_confidence,item_failed`, `ics-mode=digest`,
`ics-rate=10/1m`, and for a webhook `ics-secret=...` (the HMAC key). In ics.toml a
subscription is a URL string or a table with `url`, `kinds`, `mode`, `rate_limit`, `secret`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .redact import hide_secrets

#: The kinds an item or an execution raises (a subscription may filter on them).
ITEM_KINDS = ("low_confidence", "item_failed", "execution_failed")
_OPTIONS = {"ics-kinds": "kinds", "ics-mode": "mode", "ics-rate": "rate_limit"}
SECRET_PARAM = "ics-secret"
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]*)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS.update({"h": 3600.0, "hour": 3600.0})


def parse_rate(text: str) -> tuple[int, float]:
    """'10/1m' (or '10/min', '3/2s', '100/h') as (count, seconds)."""
    m = _RATE.match(text.lower())
    unit = m.group(3) if m else ""
    if m is None or unit not in _UNITS or int(m.group(1)) < 1:
        raise ValueError(
            f"rate limit {text!r} must look like 10/1m: a count of at least 1, a slash, "
            "a period in s, m or h"
        )
    amount = float(m.group(2)) if m.group(2) else 1.0
    seconds = amount * _UNITS[unit]
    if seconds <= 0:
        raise ValueError(f"rate limit {text!r} has an empty period")
    return int(m.group(1)), seconds


class Subscription(BaseModel):
    """Where alerts go, and which and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The channel's URL without the ics- options (the secret aside).
    url: str
    kinds: tuple[str, ...] | None = None
    mode: Literal["each", "digest"] = "each"
    rate_limit: str | None = None
    secret: str | None = Field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"url": data}
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise ValueError("a subscription is a URL, or a table with a url")
        data = dict(data)
        parts = urlsplit(data["url"].strip())
        if not parts.scheme:
            raise ValueError(
                f"{hide_secrets(data['url'])} is not a URL: it needs a scheme "
                "(https://, file://, sns://, mailto://...)"
            )
        kept = []
        query = parse_qsl(parts.query, keep_blank_values=True)
        for key, value in query:
            if key in _OPTIONS:
                data.setdefault(_OPTIONS[key], value)
            elif key == SECRET_PARAM:
                data.setdefault("secret", value)
            else:
                kept.append((key, value))
        if len(kept) < len(query):  # else the URL stays exactly as written
            data["url"] = urlunsplit(parts._replace(query=urlencode(kept, safe=",/:@")))
        if isinstance(data.get("kinds"), str):
            data["kinds"] = [k.strip() for k in data["kinds"].split(",") if k.strip()]
        return data

    @model_validator(mode="after")
    def _check(self) -> Subscription:
        for kind in self.kinds or ():
            if kind not in ITEM_KINDS:
                raise ValueError(
                    f"unknown alert kind {kind!r} in {self.shown()}; kinds: {', '.join(ITEM_KINDS)}"
                )
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        if self.secret is not None and urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"a secret signs webhooks only, not {self.shown()}")
        return self

    @property
    def rate(self) -> tuple[int, float] | None:
        return None if self.rate_limit is None else parse_rate(self.rate_limit)

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    @property
    def id(self) -> str:
        """Stable for the same subscription, whatever process states it."""
        spec = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()

    def shown(self, channel_shown: str | None = None) -> str:
        """The subscription as it may appear in logs and `ics config show`: channel_shown
        (what its built channel shows) or its URL with secrets hidden, then its options."""
        extra = []
        if self.kinds is not None:
            extra.append("ics-kinds=" + ",".join(self.kinds))
        if self.mode != "each":
            extra.append("ics-mode=" + self.mode)
        if self.rate_limit is not None:
            extra.append("ics-rate=" + self.rate_limit)
        if self.secret is not None:
            extra.append(SECRET_PARAM + "=***")
        url = hide_secrets(self.url) if channel_shown is None else channel_shown
        return url + ("&" if "?" in url else "?") + "&".join(extra) if extra else url
